//! Ferry's migration wire: a versioned, checksummed stream format, channels by
//! URI (`tcp:`, `unix:`, `file:`, `mem:`), parallel connections with an
//! iteration barrier, a rate limiter and byte counters.
//!
//! Every wait is bounded: [`SendOptions`] carries `connect_timeout`, `io_timeout`
//! (TCP keepalive, `TCP_USER_TIMEOUT`, and a send timeout on sockets) and
//! `switchover_timeout`; a [`Cancel`] token given to [`Sender::connect_with`] ends a
//! connect, a rate-limiter sleep or a wait of `finish` at once. The receiver's
//! [`Listener::accept_with`] takes connections concurrently under
//! [`AcceptOptions`], so silent or bogus connections cannot block a real stream.
//!
//! Send side: [`Sender::connect`], then [`Sender::send_pages`] (page slices
//! borrowed from guest memory, written with one `writev`),
//! [`Sender::send_zero_pages`], [`Sender::send_sparse_pages`] (pages with a few
//! non-zero words, sorted out by [`SparseBatch::classify`]), [`Sender::send_device_state`],
//! [`Sender::iteration_end`] and [`Sender::finish`] (the switch-over: waits for the
//! receiver's `Ready`, commits, waits for its [`Ack`]). Receive side:
//! [`Listener::bind`], [`Listener::accept`], then [`Receiver::receive`] writes pages
//! through a [`PageSink`] straight into the destination's memory and hands device
//! state and iteration ends to a callback; then [`Receiver::await_commit`] and
//! [`Receiver::send_ack`]. The byte layout is in `FORMAT.md`.

mod barrier;
mod cancel;
pub mod checksum;
mod conn;
mod counters;
mod error;
pub mod format;
mod io;
mod limiter;
mod mem;
mod queue;
mod recv;
mod send;
mod sink;
mod sparse;
mod tls;
mod uri;

pub use cancel::Cancel;
pub use checksum::PageChecksum;
pub use counters::ByteCounters;
pub use error::{Error, Result};
pub use format::{
    BlockInfo, Compression, Features, StreamHeader, FEATURE_SPARSE_PAGES, FEATURE_XXH3_PAGES,
};
pub use limiter::RateLimiter;
pub use recv::{decode_bytes, AcceptOptions, Decoded, Event, Listener, PageRequester, Receiver};
pub use send::{
    decode_answers, AbortHandle, Ack, Answers, BlockRuns, PageRequest, SendOptions, Sender,
    DEFAULT_TIMEOUT,
};
pub use sink::{is_zero, PageSink, VecSink};
pub use sparse::{PageClass, SparseBatch, MAX_SPARSE_WORDS};
pub use tls::{subject_dn, AuthzFormat, AuthzRule, TlsAuthz, TlsConfig, TlsCreds, TlsEndpoint};
pub use uri::Uri;

/// Binds a fresh in-process endpoint: returns the `mem:` URI for the sender and
/// the listener for the receiver.
pub fn mem_pair() -> Result<(Uri, Listener)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let uri = Uri::Mem(format!(
        "pair-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let listener = Listener::bind(&uri)?;
    Ok((uri, listener))
}

/// A duration for an error message: whole seconds when it is, else milliseconds.
pub(crate) fn fmt_duration(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
