//! How much a connection still holds: bytes written but not yet delivered, read
//! from the kernel (`SIOCOUTQ`). What was delivered is what the link carried, so the
//! engine can measure a link of any speed without counting socket buffers as speed.

use std::os::fd::{AsRawFd, OwnedFd};

use crate::conn::Conn;

/// A duplicate of a socket descriptor, kept to ask the kernel about its send queue.
pub(crate) struct QueueProbe {
    fd: Option<OwnedFd>,
}

impl QueueProbe {
    /// A probe of `conn`; one that always reads 0 for files and in-process pipes.
    pub(crate) fn of(conn: &Conn) -> QueueProbe {
        let fd = match conn {
            Conn::Tcp(s) | Conn::Tls(crate::tls::TlsConn { sock: s, .. }) => {
                s.try_clone().map(OwnedFd::from)
            }
            Conn::Unix(s) => s.try_clone().map(OwnedFd::from),
            _ => return QueueProbe { fd: None },
        };
        match fd {
            Ok(fd) => QueueProbe { fd: Some(fd) },
            Err(e) => {
                // The link is then measured by what was written, buffers included.
                tracing::warn!(error = %e, "no probe of a connection's send queue");
                QueueProbe { fd: None }
            }
        }
    }

    /// Bytes written to the socket that the peer has not yet received (TCP: not yet
    /// acknowledged; Unix: not yet read). 0 when unknown.
    pub(crate) fn queued_bytes(&self) -> u64 {
        let Some(fd) = &self.fd else { return 0 };
        let mut n: libc::c_int = 0;
        // SAFETY: `fd` is an open socket we own; SIOCOUTQ (TIOCOUTQ) writes one c_int
        // into `n`, which lives for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
        if r == 0 && n > 0 {
            n as u64
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_unix_socket_reports_what_the_peer_has_not_read() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let probe = QueueProbe::of(&Conn::Unix(a.try_clone().unwrap()));
        assert_eq!(probe.queued_bytes(), 0);
        a.write_all(&[7u8; 10_000]).unwrap();
        assert!(probe.queued_bytes() >= 10_000, "{}", probe.queued_bytes());
        let mut buf = vec![0u8; 10_000];
        std::io::Read::read_exact(&mut &b, &mut buf).unwrap();
        assert_eq!(probe.queued_bytes(), 0);
    }
}
