//! One byte connection of any kind (TCP, Unix, file, in-process), with the
//! three operations the stream needs: vectored write, raw vectored read, close.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mem::{self, MemConn};
use crate::uri::Uri;

/// Most iovecs handed to one `writev`/`readv` (Linux IOV_MAX is 1024).
pub(crate) const MAX_IOVECS: usize = 1024;

/// A connected byte stream.
pub(crate) enum Conn {
    Tcp(TcpStream),
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

impl Conn {
    /// Opens a connection to `uri` (for `file:` creates or truncates the file).
    pub(crate) fn connect(uri: &Uri) -> Result<Conn> {
        Ok(match uri {
            Uri::Tcp { host, port } => {
                let s = TcpStream::connect(format!("{host}:{port}"))?;
                s.set_nodelay(true)?;
                Conn::Tcp(s)
            }
            Uri::Unix(p) => {
                let s = UnixStream::connect(p)?;
                grow_unix_buffers(&s);
                Conn::Unix(s)
            }
            Uri::File(p) => Conn::File(File::create(p)?),
            Uri::Mem(n) => Conn::Mem(mem::connect(n)?),
        })
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
            Conn::Unix(s) => Some(Conn::Unix(s.try_clone()?)),
            Conn::Mem(m) => Some(Conn::Mem(m.reader())),
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
            Conn::Tcp(s) => match s.try_clone() {
                Ok(c) => Closer::Socket(Box::new(move || {
                    let _ = c.shutdown(how);
                })),
                Err(_) => Closer::None,
            },
            Conn::Unix(s) => match s.try_clone() {
                Ok(c) => Closer::Socket(Box::new(move || {
                    let _ = c.shutdown(how);
                })),
                Err(_) => Closer::None,
            },
            Conn::File(_) | Conn::Bytes(_) => Closer::None,
            Conn::Mem(m) => Closer::Mem(m.close_flag()),
        }
    }

    /// Reads into one buffer; 0 at end of file.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
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

impl Drop for RawListener {
    fn drop(&mut self) {
        match self {
            RawListener::Unix(_, p) => {
                let _ = std::fs::remove_file(p);
            }
            RawListener::Mem(n, _) => mem::unlisten(n),
            _ => {}
        }
    }
}
