//! Reading and writing whole byte ranges on a [`Conn`]: a small read-ahead buffer
//! for record headers, raw vectored reads straight into destination pages, and
//! vectored, rate-limited writes of borrowed slices.

use std::io::{self, IoSlice};

use crate::cancel::Cancel;
use crate::conn::{Conn, MAX_IOVECS};
use crate::error::{Error, Result};
use crate::limiter::RateLimiter;

/// Read-ahead buffer size.
const BUF_BYTES: usize = 64 * 1024;
/// Most bytes read past what is asked for (they are copied once more, so keep it small).
const READ_AHEAD_BYTES: usize = 4096;
/// Growth step when reading a record body into a `Vec` (a hostile length only costs
/// memory as the bytes actually arrive).
const VEC_STEP_BYTES: usize = 1 << 20;

/// A read that ended early: end of file, or the peer reset the connection (it closed
/// with our answers unread), is a truncated stream; anything else is an I/O error.
fn truncated_or_io(e: io::Error, what: &'static str) -> Error {
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => Error::Truncated { what },
        _ => Error::from(e),
    }
}

/// Most buffers one `readv` of [`RecordReader::read_exact_raw`] fills: 32 pages
/// (128 KiB) stay in L2 until `on_filled` has checksummed them; one read of a whole
/// 4 MiB batch would leave its first pages to be read back from memory.
const READ_RAW_MAX_IOVECS: usize = 32;

/// A connection's read side with a small read-ahead buffer.
pub(crate) struct RecordReader {
    pub(crate) conn: Conn,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RecordReader {
    /// Wraps a connection.
    pub(crate) fn new(conn: Conn) -> Self {
        RecordReader {
            conn,
            buf: vec![0u8; BUF_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn read_conn(&mut self, at: usize, len: usize, what: &'static str) -> Result<usize> {
        loop {
            match self.conn.read(&mut self.buf[at..at + len]) {
                Ok(0) => return Err(Error::Truncated { what }),
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(truncated_or_io(e, what)),
            }
        }
    }

    /// Reads exactly `dst.len()` bytes.
    pub(crate) fn read_exact(&mut self, dst: &mut [u8], what: &'static str) -> Result<()> {
        let mut done = 0;
        while done < dst.len() {
            if self.start < self.end {
                let n = (self.end - self.start).min(dst.len() - done);
                dst[done..done + n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                done += n;
                continue;
            }
            self.start = 0;
            self.end = 0;
            let need = dst.len() - done;
            if need >= BUF_BYTES {
                match self.conn.read(&mut dst[done..]) {
                    Ok(0) => return Err(Error::Truncated { what }),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(truncated_or_io(e, what)),
                }
            } else {
                let want = (need + READ_AHEAD_BYTES).min(BUF_BYTES);
                self.end = self.read_conn(0, want, what)?;
            }
        }
        Ok(())
    }

    /// Reads a body of `len` bytes into a new `Vec`, growing as bytes arrive.
    pub(crate) fn read_vec(&mut self, len: usize, what: &'static str) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(len.min(VEC_STEP_BYTES));
        while v.len() < len {
            let at = v.len();
            let step = (len - at).min(VEC_STEP_BYTES);
            v.resize(at + step, 0);
            self.read_exact(&mut v[at..], what)?;
        }
        Ok(v)
    }

    /// Reads exactly the total length of `iov` into those raw buffers, in order,
    /// with `readv` straight into them (page data lands in guest memory directly),
    /// handing each range to `on_filled(buffer index, bytes)` as it arrives, in order
    /// (so a checksum reads it while it is still in cache).
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for writes of `len` bytes and must not
    /// overlap this reader's own buffer.
    pub(crate) unsafe fn read_exact_raw(
        &mut self,
        iov: &[(*mut u8, usize)],
        mut on_filled: impl FnMut(usize, &[u8]),
        what: &'static str,
    ) -> Result<()> {
        let (mut i, mut off) = (0usize, 0usize);
        // Drain the read-ahead first.
        while i < iov.len() && self.start < self.end {
            let (p, len) = iov[i];
            let n = (len - off).min(self.end - self.start);
            // SAFETY: `p + off .. p + off + n` lies within the caller's buffer `i`
            // (off + n <= len); the source is our own buffer, which the caller
            // guarantees does not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(self.buf.as_ptr().add(self.start), p.add(off), n)
            };
            on_filled(i, &self.buf[self.start..self.start + n]);
            self.start += n;
            off += n;
            if off == len {
                i += 1;
                off = 0;
            }
        }
        if i == iov.len() {
            return Ok(());
        }
        self.start = 0;
        self.end = 0;
        let mut list: Vec<(*mut u8, usize)> =
            Vec::with_capacity((iov.len() - i + 1).min(MAX_IOVECS));
        while i < iov.len() {
            list.clear();
            // SAFETY: off < iov[i].len, so the adjusted pointer stays inside buffer `i`.
            list.push((unsafe { iov[i].0.add(off) }, iov[i].1 - off));
            list.extend(iov[i + 1..].iter().take(READ_RAW_MAX_IOVECS - 2).copied());
            let want: usize = list.iter().map(|&(_, l)| l).sum();
            if list.len() == iov.len() - i {
                // Trailing slot: our own buffer, filled only after every caller
                // buffer is full (so only when the list covers all of them).
                list.push((self.buf.as_mut_ptr(), READ_AHEAD_BYTES));
            }
            // SAFETY: all entries but the last are sub-ranges of the caller's buffers
            // (valid for writes per this function's contract); the last is our buffer.
            let n = match unsafe { self.conn.read_raw(&list) } {
                Ok(0) => return Err(Error::Truncated { what }),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(truncated_or_io(e, what)),
            };
            let mut n_left = n.min(want);
            self.end = n - n_left;
            while n_left > 0 {
                let len = iov[i].1;
                let step = (len - off).min(n_left);
                // SAFETY: `readv` just filled these `step` bytes of buffer `i`, which the
                // caller guarantees is valid (and so readable) for `len` bytes.
                let filled = unsafe { std::slice::from_raw_parts(iov[i].0.add(off), step) };
                on_filled(i, filled);
                n_left -= step;
                off += step;
                if off == len {
                    i += 1;
                    off = 0;
                }
            }
        }
        Ok(())
    }
}

/// Writes all of `parts` with vectored writes (no copy of the slices), honouring
/// `limiter` in steps of its quantum; its sleeps end with [`Error::Cancelled`] when
/// the token fires.
pub(crate) fn write_all(
    conn: &mut Conn,
    parts: &[&[u8]],
    limiter: Option<(&RateLimiter, &Cancel)>,
) -> Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    let mut list: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len().min(MAX_IOVECS));
    while i < parts.len() {
        if parts[i].len() == off {
            i += 1;
            off = 0;
            continue;
        }
        let mut budget = limiter.map_or(usize::MAX, |(l, _)| l.quantum_bytes());
        list.clear();
        let (mut j, mut o) = (i, off);
        while j < parts.len() && list.len() < MAX_IOVECS && budget > 0 {
            let s = &parts[j][o..];
            let take = s.len().min(budget);
            if take > 0 {
                list.push(IoSlice::new(&s[..take]));
                budget -= take;
            }
            j += 1;
            o = 0;
        }
        let n = loop {
            match conn.write_vectored(&list) {
                Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::from(e)),
            }
        };
        if let Some((l, cancel)) = limiter {
            if !l.pace_or_cancel(n as u64, cancel) {
                return Err(Error::Cancelled);
            }
        }
        let mut left = n;
        while left > 0 {
            let step = (parts[i].len() - off).min(left);
            left -= step;
            off += step;
            if off == parts[i].len() {
                i += 1;
                off = 0;
            }
        }
    }
    Ok(())
}
