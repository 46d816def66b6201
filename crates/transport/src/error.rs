//! The crate's one error type.

use std::io;

/// Everything that can go wrong on the migration wire.
///
/// Input from a peer never panics: every malformed byte sequence maps to one
/// of these variants.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A URI that does not parse; names the accepted forms.
    #[error(
        "invalid migration URI {uri:?}: expected tcp:HOST:PORT, unix:PATH, file:PATH or mem:NAME"
    )]
    BadUri {
        /// The text that failed to parse.
        uri: String,
    },
    /// An operating-system I/O error on a channel.
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// TLS failed: a handshake, a certificate or name check, the allow-list, a
    /// plaintext peer, or a record that failed authentication. The text says which.
    #[error("{0}")]
    Tls(String),
    /// The peer closed the connection before a complete stream arrived.
    #[error("stream truncated: connection closed in the middle of {what}")]
    Truncated {
        /// What was being read when the stream ended.
        what: &'static str,
    },
    /// The connection preamble does not start with Ferry's magic.
    #[error("bad magic {found:02x?}: not a Ferry migration stream")]
    BadMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// The stream was written by an unsupported format version.
    #[error("unsupported stream version {found} (this build reads version {supported})")]
    BadVersion {
        /// Version found in the preamble.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },
    /// A checksum did not match: the bytes were damaged in flight or at rest.
    #[error("checksum mismatch in {what}")]
    Checksum {
        /// Which part of the stream failed its check.
        what: &'static str,
    },
    /// A record type this version does not know.
    #[error("unknown record type {0}")]
    UnknownRecord(u8),
    /// A length field above the format's cap.
    #[error("{what} length {len_bytes} exceeds the cap of {max_bytes} bytes")]
    TooLong {
        /// Which length was too large.
        what: &'static str,
        /// The length found.
        len_bytes: u64,
        /// The cap.
        max_bytes: u64,
    },
    /// A record whose fields are inconsistent.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// A page address outside the header's RAM block table.
    #[error("page out of bounds: block {block_idx}, page {page_index}")]
    OutOfBounds {
        /// Block index from the record.
        block_idx: u64,
        /// Page index within the block, from the record.
        page_index: u64,
    },
    /// A well-formed record that is not allowed at this point of the stream.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Compression or decompression failed.
    #[error("compression error: {0}")]
    Compression(String),
    /// The receiver reported an error on the control connection.
    #[error("receiver refused the migration: {0}")]
    Refused(String),
    /// Another channel of the same stream failed first.
    #[error("stream aborted: {0}")]
    Aborted(String),
    /// The sender committed the switch-over but the receiver's acknowledgement did
    /// not come: the receiver may be running the guest, so the sender must not.
    #[error(
        "the destination took the switch-over but did not acknowledge it ({0}): it may be running the guest"
    )]
    InDoubt(String),
    /// The operation was cancelled through its [`crate::Cancel`] token (or its
    /// stream's [`crate::AbortHandle`]).
    #[error("cancelled")]
    Cancelled,
    /// A wait ran out of time; the message says which one and how long it was.
    #[error("timed out: {0}")]
    TimedOut(String),
    /// The destination's memory could not take pages (a postcopy install failed).
    #[error("storing pages: {0}")]
    Sink(String),
    /// A caller-side argument that cannot be honoured (not peer input).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// An I/O error that a socket timeout ended (`WouldBlock` / `TimedOut`) becomes
    /// [`Error::TimedOut`] saying `why`; any other error passes unchanged.
    pub(crate) fn or_timed_out(self, why: impl FnOnce() -> String) -> Error {
        match self {
            Error::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Error::TimedOut(why())
            }
            e => e,
        }
    }
}

impl From<io::Error> for Error {
    /// An I/O error; a TLS failure carried through an I/O path becomes [`Error::Tls`].
    fn from(e: io::Error) -> Self {
        if let Some(t) = e
            .get_ref()
            .and_then(|x| x.downcast_ref::<crate::tls::TlsIoError>())
        {
            return Error::Tls(t.0.clone());
        }
        Error::Io(e)
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
