//! One byte connection of any kind (TCP, Unix, file, in-process), with the
//! three operations the stream needs: vectored write, raw vectored read, close.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::mem::{self, MemConn};
use crate::tls::{self, TlsConfig, TlsConn};
use crate::uri::Uri;

/// The timeouts of one outgoing connection (zero: none).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnTimeouts {
    /// Most time a TCP connect may take.
    pub(crate) connect: Duration,
    /// Liveness of the peer and most time a write may make no progress.
    pub(crate) io: Duration,
}

/// Most iovecs handed to one `writev`/`readv` (Linux IOV_MAX is 1024).
pub(crate) const MAX_IOVECS: usize = 1024;

/// A connected byte stream.
pub(crate) enum Conn {
    Tcp(TcpStream),
    /// TCP after a TLS handshake.
    Tls(TlsConn),
    Unix(UnixStream),
    File(File),
    Mem(MemConn),
    /// A whole stream already in memory (read-only, like a file).
    Bytes(bytes::Bytes),
}

/// A handle that can unblock a reader of a [`Conn`] from another thread.
pub(crate) enum Closer {
    Socket(Box<dyn Fn() + Send + Sync>),
    Mem(Arc<AtomicBool>),
    None,
}

impl Closer {
    /// Shuts the connection down in the direction the closer was made for (reads end
    /// with end of file; with an aborter, writes fail too).
    pub(crate) fn close(&self) {
        match self {
            Closer::Socket(f) => f(),
            Closer::Mem(flag) => flag.store(true, Ordering::Release),
            Closer::None => {}
        }
    }
}

/// Socket buffer for Unix connections: a stream socket queues at most its sender's
/// `SO_SNDBUF` (208 KiB by default), so a 4 MiB page batch would cost the writer
/// ~20 sleeps and the reader as many wake-ups. TCP keeps its own autotuning.
const UNIX_BUFFER_BYTES: libc::c_int = 4 << 20;

/// Best effort: the kernel caps the value at `net.core.wmem_max` / `rmem_max`.
fn grow_unix_buffers(s: &UnixStream) {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: a valid socket descriptor and a c_int option of the right size.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&UNIX_BUFFER_BYTES as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Slice of a wait that also watches a cancel token.
const POLL_SLICE: Duration = Duration::from_millis(20);

/// Keepalive probes before the kernel gives a silent peer up.
const KEEPALIVE_PROBES: u32 = 3;

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid socket descriptor and a c_int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Keepalive and `TCP_USER_TIMEOUT` so that a dead peer (host gone, link cut) fails
/// the connection within about `io_timeout` instead of the kernel's ~15 minutes:
/// unacknowledged data is given up after `io_timeout`, and an idle connection is
/// probed after half of it, [`KEEPALIVE_PROBES`] times. Zero leaves the defaults.
pub(crate) fn set_tcp_liveness(s: &TcpStream, io_timeout: Duration) -> io::Result<()> {
    if io_timeout.is_zero() {
        return Ok(());
    }
    let fd = s.as_raw_fd();
    let secs = io_timeout.as_secs().max(1);
    let idle = (secs / 2).max(1);
    let interval = ((secs - idle.min(secs)) / u64::from(KEEPALIVE_PROBES)).max(1);
    let user_ms = io_timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        idle as libc::c_int,
    )?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        interval as libc::c_int,
    )?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        KEEPALIVE_PROBES as libc::c_int,
    )?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        user_ms.max(1),
    )
}

/// `addr` as a C socket address.
fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (st, len as libc::socklen_t)
}

/// Connects to one address without blocking for longer than a poll slice at a
/// time: gives up at `deadline` (`None`: never) or when `cancel` fires.
fn connect_one(addr: &SocketAddr, deadline: Option<Instant>, cancel: &Cancel) -> Result<TcpStream> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket creation; the descriptor is owned right below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().into());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let (sa, len) = sockaddr_of(addr);
    // SAFETY: `sa` holds a valid socket address of `len` bytes.
    let r = unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e.into());
        }
        loop {
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let mut slice = POLL_SLICE;
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::TimedOut(String::new()));
                }
                slice = slice.min(left);
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, slice.as_millis().max(1) as libc::c_int) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if n > 0 {
                break;
            }
        }
        let mut err: libc::c_int = 0;
        let mut elen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket and a c_int out-parameter of the right size.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&mut err as *mut libc::c_int).cast(),
                &mut elen,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error().into());
        }
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err).into());
        }
    }
    let s = TcpStream::from(sock);
    s.set_nonblocking(false)?;
    Ok(s)
}

/// Connects to `host:port`, trying each address in turn within one `timeout`
/// overall (zero: no limit), and returns at once with [`Error::Cancelled`] when
/// `cancel` fires.
fn connect_tcp(host: &str, port: u16, timeout: Duration, cancel: &Cancel) -> Result<TcpStream> {
    let target = format!("{host}:{port}");
    let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
    let mut last = None;
    for addr in target.to_socket_addrs()? {
        match connect_one(&addr, deadline, cancel) {
            Ok(s) => return Ok(s),
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            Err(Error::TimedOut(_)) => {
                return Err(Error::TimedOut(format!(
                    "connecting to {target} ({addr}) took longer than {}",
                    crate::fmt_duration(timeout)
                )))
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        Error::Io(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{target} resolves to no address"),
        ))
    }))
}

impl Conn {
    /// Opens a connection to `uri` (for `file:` creates or truncates the file). A TCP
    /// connect gives up after `t.connect` and stops at once on `cancel`; sockets get
    /// the liveness options and a send timeout of `t.io` (zero: none).
    pub(crate) fn connect(uri: &Uri, t: ConnTimeouts, cancel: &Cancel) -> Result<Conn> {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(match uri {
            Uri::Tcp { host, port } => {
                let s = connect_tcp(host, *port, t.connect, cancel)?;
                s.set_nodelay(true)?;
                set_tcp_liveness(&s, t.io)?;
                if !t.io.is_zero() {
                    s.set_write_timeout(Some(t.io))?;
                }
                Conn::Tcp(s)
            }
            Uri::Unix(p) => {
                let s = UnixStream::connect(p)?;
                grow_unix_buffers(&s);
                if !t.io.is_zero() {
                    s.set_write_timeout(Some(t.io))?;
                }
                Conn::Unix(s)
            }
            Uri::File(p) => Conn::File(File::create(p)?),
            Uri::Mem(n) => Conn::Mem(mem::connect(n)?),
        })
    }

    /// Runs the source's TLS handshake on a fresh `tcp:` connection to `uri`
    /// (bounded by `timeout`, zero: none; ended at once by `cancel`); other URIs
    /// refuse TLS.
    pub(crate) fn into_tls_client(
        self,
        cfg: &TlsConfig,
        uri: &Uri,
        timeout: Duration,
        cancel: &Cancel,
    ) -> Result<Conn> {
        match (self, uri) {
            (Conn::Tcp(s), Uri::Tcp { host, .. }) => {
                Ok(Conn::Tls(tls::client(s, cfg, host, timeout, cancel)?))
            }
            _ => Err(Error::InvalidArgument(format!(
                "tls-creds is set but {uri} is not a tcp: URI (TLS runs on TCP only)"
            ))),
        }
    }

    /// Runs the destination's TLS handshake on an accepted connection (its read
    /// timeout bounds the wait); only TCP connections can.
    pub(crate) fn into_tls_server(self, cfg: &TlsConfig) -> Result<Conn> {
        match self {
            Conn::Tcp(s) => Ok(Conn::Tls(tls::server(s, cfg)?)),
            _ => Err(Error::InvalidArgument(
                "tls-creds is set but the listener is not a tcp: URI (TLS runs on TCP only)".into(),
            )),
        }
    }

    /// The peer's address, for messages.
    pub(crate) fn peer_name(&self) -> String {
        match self {
            Conn::Tls(t) => t
                .sock
                .peer_addr()
                .map_or_else(|_| "an unknown TLS peer".into(), |a| a.to_string()),
            Conn::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "an unknown TCP peer".into(), |a| a.to_string()),
            Conn::Unix(_) => "a Unix socket peer".into(),
            Conn::File(_) | Conn::Bytes(_) => "a file".into(),
            Conn::Mem(_) => "an in-process peer".into(),
        }
    }

    /// Sets (or with `None` clears) the read timeout of a socket; nothing for others.
    pub(crate) fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(d),
            Conn::Tls(t) => t.sock.set_read_timeout(d),
            Conn::Unix(s) => s.set_read_timeout(d),
            _ => Ok(()),
        }
    }

    /// Whether this is a file (one channel, no back-channel).
    pub(crate) fn is_file(&self) -> bool {
        matches!(self, Conn::File(_) | Conn::Bytes(_))
    }

    /// A second handle for reading only, for a thread that reads the peer's answers
    /// while this one writes; `None` for files (no peer).
    pub(crate) fn try_clone_reader(&self) -> io::Result<Option<Conn>> {
        Ok(match self {
            Conn::Tcp(s) => Some(Conn::Tcp(s.try_clone()?)),
            Conn::Tls(t) => Some(Conn::Tls(t.try_clone()?)),
            Conn::Unix(s) => Some(Conn::Unix(s.try_clone()?)),
            Conn::Mem(m) => Some(Conn::Mem(m.reader())),
            Conn::File(_) | Conn::Bytes(_) => None,
        })
    }

    /// A second handle that writes to this connection's peer (sockets and `mem:`);
    /// `None` for files and buffers.
    pub(crate) fn try_clone_writer(&self) -> io::Result<Option<Conn>> {
        Ok(match self {
            Conn::Tcp(s) => Some(Conn::Tcp(s.try_clone()?)),
            Conn::Tls(t) => Some(Conn::Tls(t.try_clone()?)),
            Conn::Unix(s) => Some(Conn::Unix(s.try_clone()?)),
            Conn::Mem(m) => Some(Conn::Mem(m.writer())),
            Conn::File(_) | Conn::Bytes(_) => None,
        })
    }

    /// A closer for this connection: ends reading on it.
    pub(crate) fn closer(&self) -> Closer {
        self.closer_how(Shutdown::Read)
    }

    /// A closer that ends both directions: blocked writes and reads fail at once.
    pub(crate) fn aborter(&self) -> Closer {
        self.closer_how(Shutdown::Both)
    }

    fn closer_how(&self, how: Shutdown) -> Closer {
        match self {
            // A shutdown that fails finds the socket closed already: nothing to end.
            Conn::Tcp(s) | Conn::Tls(TlsConn { sock: s, .. }) => match s.try_clone() {
                Ok(c) => Closer::Socket(Box::new(move || {
                    let _ = c.shutdown(how);
                })),
                Err(e) => {
                    warn!(error = %e, "no handle to abort a migration connection with");
                    Closer::None
                }
            },
            Conn::Unix(s) => match s.try_clone() {
                Ok(c) => Closer::Socket(Box::new(move || {
                    let _ = c.shutdown(how);
                })),
                Err(e) => {
                    warn!(error = %e, "no handle to abort a migration connection with");
                    Closer::None
                }
            },
            Conn::File(_) | Conn::Bytes(_) => Closer::None,
            Conn::Mem(m) => Closer::Mem(m.close_flag()),
        }
    }

    /// Reads into one buffer; 0 at end of file.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::File(f) => f.read(buf),
            Conn::Mem(m) => m.read(buf),
            Conn::Bytes(b) => {
                let n = buf.len().min(b.len());
                buf[..n].copy_from_slice(&b[..n]);
                bytes::Buf::advance(b, n);
                Ok(n)
            }
        }
    }

    /// Reads into raw buffers with one `readv`; 0 at end of file.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for writes of `len` bytes.
    pub(crate) unsafe fn read_raw(&mut self, iov: &[(*mut u8, usize)]) -> io::Result<usize> {
        let fd = match self {
            Conn::Tcp(s) => s.as_raw_fd(),
            // SAFETY: the caller's guarantee is passed on unchanged.
            Conn::Tls(t) => return unsafe { t.read_raw(iov) },
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::File(f) => f.as_raw_fd(),
            // SAFETY: the caller's guarantee is passed on unchanged.
            Conn::Mem(m) => return unsafe { m.read_raw(iov) },
            Conn::Bytes(b) => {
                let mut done = 0;
                for &(p, len) in iov {
                    let n = len.min(b.len());
                    // SAFETY: the caller guarantees `p` is valid for `len >= n` bytes of
                    // writes; `b` is our own buffer, so the ranges do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), p, n) };
                    bytes::Buf::advance(b, n);
                    done += n;
                    if n < len {
                        break;
                    }
                }
                return Ok(done);
            }
        };
        let n = iov.len().min(MAX_IOVECS);
        let mut vecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOVECS];
        for (v, &(p, len)) in vecs.iter_mut().zip(&iov[..n]) {
            v.iov_base = p.cast();
            v.iov_len = len;
        }
        loop {
            // SAFETY: `fd` is open (borrowed from `self`); the first `n` iovecs describe
            // buffers the caller guarantees are writable for their lengths.
            let r = unsafe { libc::readv(fd, vecs.as_ptr(), n as libc::c_int) };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Writes some of `bufs` with one vectored write.
    pub(crate) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write_vectored(bufs),
            Conn::Tls(t) => t.write_vectored(bufs),
            Conn::Unix(s) => s.write_vectored(bufs),
            Conn::File(f) => f.write_vectored(bufs),
            Conn::Mem(m) => m.write_vectored(bufs),
            Conn::Bytes(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Ends the writing direction of a socket, so the peer reads end of file even while
    /// a duplicate of the descriptor (an abort handle) is still open.
    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Tls(t) => t.shutdown_write(),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
            _ => Ok(()),
        }
    }

    /// Flushes buffered data to durable storage for files; nothing for sockets.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::File(f) => f.sync_data(),
            _ => Ok(()),
        }
    }
}

/// A bound endpoint that hands out incoming connections.
pub(crate) enum RawListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    File(PathBuf),
    Mem(String, crossbeam_channel::Receiver<MemConn>),
}

impl RawListener {
    /// Binds `uri`. A stale Unix socket file at the path is replaced.
    pub(crate) fn bind(uri: &Uri) -> Result<RawListener> {
        Ok(match uri {
            Uri::Tcp { host, port } => {
                RawListener::Tcp(TcpListener::bind(format!("{host}:{port}"))?)
            }
            Uri::Unix(p) => {
                if let Ok(md) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    if md.file_type().is_socket() {
                        std::fs::remove_file(p)?;
                    }
                }
                RawListener::Unix(UnixListener::bind(p)?, p.clone())
            }
            Uri::File(p) => RawListener::File(p.clone()),
            Uri::Mem(n) => RawListener::Mem(n.clone(), mem::listen(n)?),
        })
    }

    /// The URI a sender should connect to (resolves TCP port 0).
    pub(crate) fn local_uri(&self) -> Result<Uri> {
        Ok(match self {
            RawListener::Tcp(l) => {
                let a = l.local_addr()?;
                let host = match a.ip() {
                    std::net::IpAddr::V4(ip) => ip.to_string(),
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                };
                Uri::Tcp {
                    host,
                    port: a.port(),
                }
            }
            RawListener::Unix(_, p) => Uri::Unix(p.clone()),
            RawListener::File(p) => Uri::File(p.clone()),
            RawListener::Mem(n, _) => Uri::Mem(n.clone()),
        })
    }

    /// Waits for the next connection (for `file:` opens the file for reading).
    pub(crate) fn accept(&self) -> Result<Conn> {
        Ok(match self {
            RawListener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            RawListener::Unix(l, _) => {
                let s = l.accept()?.0;
                grow_unix_buffers(&s);
                Conn::Unix(s)
            }
            RawListener::File(p) => Conn::File(File::open(p)?),
            RawListener::Mem(_, rx) => Conn::Mem(rx.recv().map_err(|_| {
                Error::Io(io::Error::new(io::ErrorKind::BrokenPipe, "listener closed"))
            })?),
        })
    }
}

impl RawListener {
    /// For sockets: waits up to `wait` for a connection and accepts it (`None` if
    /// none came), with the liveness options of `io_timeout` on TCP. `None` at once
    /// for `file:` and `mem:` (use [`RawListener::accept`]).
    pub(crate) fn poll_accept(&self, wait: Duration, io_timeout: Duration) -> Result<Option<Conn>> {
        let fd = match self {
            RawListener::Tcp(l) => l.as_raw_fd(),
            RawListener::Unix(l, _) => l.as_raw_fd(),
            _ => return Ok(None),
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on a descriptor `self` keeps open.
        let n = unsafe { libc::poll(&mut pfd, 1, wait.as_millis().max(1) as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(e.into());
        }
        if n == 0 {
            return Ok(None);
        }
        let r = match self {
            RawListener::Tcp(l) => {
                l.set_nonblocking(true)?;
                l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    // Best effort: a connection without them is still a connection.
                    if let Err(e) = set_tcp_liveness(&s, io_timeout) {
                        debug!(error = %e, "no TCP liveness options on an accepted connection");
                    }
                    Ok(Conn::Tcp(s))
                })
            }
            RawListener::Unix(l, _) => {
                l.set_nonblocking(true)?;
                l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    grow_unix_buffers(&s);
                    Ok(Conn::Unix(s))
                })
            }
            _ => return Ok(None),
        };
        match r {
            Ok(c) => Ok(Some(c)),
            // Gone between poll and accept, or a per-connection failure: not the
            // listener's.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether connections come over TCP (the only kind TLS runs on).
    pub(crate) fn is_tcp(&self) -> bool {
        matches!(self, RawListener::Tcp(_))
    }

    /// Whether connections come over a socket (accepted concurrently, with timeouts).
    pub(crate) fn is_socket(&self) -> bool {
        matches!(self, RawListener::Tcp(_) | RawListener::Unix(..))
    }
}

impl Drop for RawListener {
    fn drop(&mut self) {
        match self {
            RawListener::Unix(_, p) => {
                // Best effort: a socket file left behind is replaced by the next bind.
                let _ = std::fs::remove_file(p);
            }
            RawListener::Mem(n, _) => mem::unlisten(n),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn getsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid socket and a c_int out-parameter of the right size.
        let r = unsafe {
            libc::getsockopt(
                fd,
                level,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0);
        v
    }

    #[test]
    fn liveness_options_give_a_dead_peer_up_within_io_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        set_tcp_liveness(&s, Duration::from_secs(10)).unwrap();
        let fd = s.as_raw_fd();
        let get = |level, opt| getsockopt_int(fd, level, opt);
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 10_000);
        let idle = get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE);
        let intvl = get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL);
        let cnt = get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT);
        assert_eq!((idle, intvl, cnt), (5, 1, 3));
        assert!(idle + intvl * cnt <= 10);
    }

    #[test]
    fn an_outgoing_tcp_socket_gets_a_send_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let uri = Uri::Tcp {
            host: a.ip().to_string(),
            port: a.port(),
        };
        let t = ConnTimeouts {
            connect: Duration::from_secs(1),
            io: Duration::from_secs(3),
        };
        let Conn::Tcp(s) = Conn::connect(&uri, t, &Cancel::new()).unwrap() else {
            panic!("not TCP");
        };
        assert_eq!(s.write_timeout().unwrap(), Some(Duration::from_secs(3)));
        assert_eq!(s.read_timeout().unwrap(), None);
        assert_eq!(
            getsockopt_int(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            3000
        );
    }
}
