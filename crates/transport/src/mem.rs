//! The in-process channel: a byte pipe on crossbeam-channel, and a registry of
//! named in-process listeners so `mem:NAME` works like any other URI.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

/// Chunks in flight per direction (back-pressure for a fast writer).
const PIPE_DEPTH_CHUNKS: usize = 64;
/// Largest chunk one write hands over.
const MAX_CHUNK_BYTES: usize = 1 << 20;
/// How often a blocked reader looks at its close flag.
const POLL: Duration = Duration::from_millis(20);

/// One end of an in-process duplex byte pipe.
pub(crate) struct MemConn {
    tx: Sender<Bytes>,
    rx: Receiver<Bytes>,
    pending: Bytes,
    closed: Arc<AtomicBool>,
}

/// Makes a connected pair of in-process pipe ends.
pub(crate) fn pipe() -> (MemConn, MemConn) {
    let (a_tx, b_rx) = bounded(PIPE_DEPTH_CHUNKS);
    let (b_tx, a_rx) = bounded(PIPE_DEPTH_CHUNKS);
    let end = |tx, rx| MemConn {
        tx,
        rx,
        pending: Bytes::new(),
        closed: Arc::new(AtomicBool::new(false)),
    };
    (end(a_tx, a_rx), end(b_tx, b_rx))
}

impl MemConn {
    /// A flag that, once set, makes blocked and future reads return end-of-file.
    pub(crate) fn close_flag(&self) -> Arc<AtomicBool> {
        self.closed.clone()
    }

    /// A second end that reads what this end would read (and cannot write), sharing
    /// its close flag. Only one of the two may read.
    pub(crate) fn reader(&self) -> MemConn {
        let (dead_tx, _) = bounded(0);
        MemConn {
            tx: dead_tx,
            rx: self.rx.clone(),
            pending: Bytes::new(),
            closed: self.closed.clone(),
        }
    }

    /// A second end that writes where this end writes (and reads nothing), sharing
    /// its close flag.
    pub(crate) fn writer(&self) -> MemConn {
        let (_, dead_rx) = bounded(0);
        MemConn {
            tx: self.tx.clone(),
            rx: dead_rx,
            pending: Bytes::new(),
            closed: self.closed.clone(),
        }
    }

    /// Makes sure `pending` holds bytes; false at end of file.
    fn fill(&mut self) -> bool {
        while self.pending.is_empty() {
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            match self.rx.recv_timeout(POLL) {
                Ok(b) => self.pending = b,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        true
    }

    /// Reads into raw buffers; returns bytes read, 0 at end of file.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for writes of `len` bytes.
    pub(crate) unsafe fn read_raw(&mut self, iov: &[(*mut u8, usize)]) -> io::Result<usize> {
        if !self.fill() {
            return Ok(0);
        }
        let mut done = 0;
        for &(p, len) in iov {
            if self.pending.is_empty() {
                break;
            }
            let n = len.min(self.pending.len());
            // SAFETY: the caller guarantees `p` is valid for `len >= n` bytes of writes;
            // `pending` is our own buffer, so the ranges cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(self.pending.as_ptr(), p, n) };
            self.pending.advance(n);
            done += n;
            if n < len {
                break;
            }
        }
        Ok(done)
    }

    /// Reads into one slice.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.fill() {
            return Ok(0);
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.advance(n);
        Ok(n)
    }

    /// Writes up to 1 MiB of the slices as one chunk (a copy: the pipe owns its bytes).
    pub(crate) fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let take = total.min(MAX_CHUNK_BYTES);
        if take == 0 {
            return Ok(0);
        }
        let mut chunk = BytesMut::with_capacity(take);
        for b in bufs {
            let room = take - chunk.len();
            if room == 0 {
                break;
            }
            chunk.extend_from_slice(&b[..b.len().min(room)]);
        }
        self.tx
            .send(chunk.freeze())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "in-process peer is gone"))?;
        Ok(take)
    }
}

type Registry = Mutex<HashMap<String, Sender<MemConn>>>;

fn registry() -> &'static Registry {
    static REG: OnceLock<Registry> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Registers an in-process listener under `name`.
pub(crate) fn listen(name: &str) -> io::Result<Receiver<MemConn>> {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    if reg.contains_key(name) {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("mem:{name} is already bound"),
        ));
    }
    let (tx, rx) = bounded(MAX_CHANNELS_BACKLOG);
    reg.insert(name.to_string(), tx);
    Ok(rx)
}

/// Backlog of the in-process accept queue.
const MAX_CHANNELS_BACKLOG: usize = 128;

/// Removes an in-process listener.
pub(crate) fn unlisten(name: &str) {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.remove(name);
}

/// Connects to an in-process listener.
pub(crate) fn connect(name: &str) -> io::Result<MemConn> {
    let tx = {
        let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        reg.get(name).cloned()
    };
    let refused = || {
        io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("no in-process listener mem:{name}"),
        )
    };
    let tx = tx.ok_or_else(refused)?;
    let (ours, theirs) = pipe();
    tx.send(theirs).map_err(|_| refused())?;
    Ok(ours)
}
