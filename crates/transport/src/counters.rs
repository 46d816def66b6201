//! Byte counters the stats layer reads at any time from another thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// Wire counters of one stream (sender or receiver side), all monotonic.
///
/// `payload_bytes` is page data as it travels (compressed size when compressed)
/// plus device-state bytes; `header_bytes` is everything else on the wire
/// (preambles, record headers, offsets, markers). Their sum is the total
/// (QEMU's `transferred`); `channel_bytes(i)` splits the total by connection
/// (QEMU's `multifd-bytes` is the sum over channels 1..).
#[derive(Debug)]
pub struct ByteCounters {
    payload_bytes: AtomicU64,
    header_bytes: AtomicU64,
    pages: AtomicU64,
    zero_pages: AtomicU64,
    channel_bytes: Box<[AtomicU64]>,
}

impl ByteCounters {
    /// Counters for `channels` connections.
    pub fn new(channels: usize) -> Self {
        ByteCounters {
            payload_bytes: AtomicU64::new(0),
            header_bytes: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            channel_bytes: (0..channels).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Page data and device-state bytes.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_bytes.load(Ordering::Relaxed)
    }
    /// Framing bytes: preambles, headers, offsets, markers.
    pub fn header_bytes(&self) -> u64 {
        self.header_bytes.load(Ordering::Relaxed)
    }
    /// All bytes on the wire.
    pub fn total_bytes(&self) -> u64 {
        self.payload_bytes() + self.header_bytes()
    }
    /// Normal (non-zero) pages carried.
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }
    /// Zero pages carried (as offsets only).
    pub fn zero_pages(&self) -> u64 {
        self.zero_pages.load(Ordering::Relaxed)
    }
    /// Number of connections counted.
    pub fn channels(&self) -> usize {
        self.channel_bytes.len()
    }
    /// All bytes on connection `idx` (0 if out of range).
    pub fn channel_bytes(&self, idx: usize) -> u64 {
        self.channel_bytes
            .get(idx)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Records one record's bytes on channel `ch`.
    pub(crate) fn add(&self, ch: usize, header_bytes: u64, payload_bytes: u64) {
        self.header_bytes.fetch_add(header_bytes, Ordering::Relaxed);
        self.payload_bytes
            .fetch_add(payload_bytes, Ordering::Relaxed);
        if let Some(c) = self.channel_bytes.get(ch) {
            c.fetch_add(header_bytes + payload_bytes, Ordering::Relaxed);
        }
    }
    /// Records pages carried.
    pub(crate) fn add_pages(&self, pages: u64, zero_pages: u64) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.zero_pages.fetch_add(zero_pages, Ordering::Relaxed);
    }
}
