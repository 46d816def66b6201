//! The sending side: connects every channel, writes the header, then page
//! batches, zero pages, device state, iteration markers and the end of stream.
//!
//! Threading: [`Sender`] is `Sync`. Each call writes one record synchronously on
//! one channel, picking a free one (round-robin, skipping channels another thread
//! is writing). One thread drives the channels one batch at a time; to keep N
//! connections busy at once, call `send_pages` from N threads (the engine's
//! per-channel workers), each with its own borrowed page slices. Page slices are
//! never copied on the uncompressed path: one `writev` carries header, offsets
//! and the guest's pages.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::cancel::Cancel;
use crate::checksum::{self, PageChecksum};
use crate::conn::{Conn, ConnTimeouts};
use crate::counters::ByteCounters;
use crate::error::{Error, Result};
use crate::format::{
    encode_record, max_batch_pages, u32_at, u64_at, BlockInfo, Compression, Features, Kind,
    Preamble, RecordHeader, StreamHeader, FLAG_LIVE, FLAG_ZSTD, MAX_BATCH_PAGES, MAX_BODY_BYTES,
    MAX_DISCARD_RUNS, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_ZERO_BATCH_PAGES, PREAMBLE_BYTES,
    RECORD_HEADER_BYTES,
};
use crate::io::{write_all, RecordReader};
use crate::limiter::RateLimiter;
use crate::sparse::{SparseBatch, MAX_SPARSE_PAGE_BYTES};
use crate::uri::Uri;

/// Pages of a stream's blocks: `(block index, runs of (first page, pages))`.
pub type BlockRuns = Vec<(usize, Vec<(u64, u64)>)>;

/// How long a failed write waits for the receiver's refusal to arrive.
const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// zstd level for page batches (fast; guest pages compress well or not at all).
const ZSTD_LEVEL: i32 = 1;

/// How to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOptions {
    /// Number of connections, control included (1 = a single connection).
    pub channels: u16,
    /// Compression of page batches.
    pub compression: Compression,
    /// Bandwidth cap over all channels in bytes/s; 0 = unlimited.
    pub max_bandwidth_bytes_per_sec: u64,
    /// Declare sparse pages in the header, so [`Sender::send_sparse_pages`] works.
    pub sparse_pages: bool,
    /// Checksum of page batches. Default [`PageChecksum::Xxh3`] (header feature
    /// `FEATURE_XXH3_PAGES`, about 2.5 times faster than CRC32C without VPCLMULQDQ);
    /// [`PageChecksum::Crc32c`] for receivers that predate the feature.
    pub page_checksum: PageChecksum,
    /// Most time one TCP connect may take (zero: no limit). Default 10 s.
    pub connect_timeout: Duration,
    /// Liveness of the destination (zero: the kernel's defaults): a TCP peer that
    /// stops acknowledging is given up after about this long (keepalive and
    /// `TCP_USER_TIMEOUT`), and a write to a peer that stops reading (TCP or Unix)
    /// fails after this long without progress. Default 10 s.
    pub io_timeout: Duration,
    /// Most time [`Sender::finish`] waits for the receiver's `Ready`, and then again
    /// for its acknowledgement after the commit (zero: no limit). Default 10 s.
    pub switchover_timeout: Duration,
    /// Make the stream able to switch to postcopy ([`Sender::switch_to_postcopy`]):
    /// one more connection, the priority connection, is opened after `channels`; it
    /// carries only the pages the receiver requests after the switch, so they never
    /// queue behind the background stream (QEMU's postcopy-preempt). Default false.
    pub postcopy: bool,
    /// TLS 1.3 on every connection (`tcp:` only): the handshake runs on each
    /// connection before its preamble, bounded by `connect_timeout`. `None`
    /// (default): plaintext.
    pub tls: Option<crate::TlsConfig>,
}

/// Default of [`SendOptions::connect_timeout`], [`SendOptions::io_timeout`] and
/// [`SendOptions::switchover_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a wait sleeps before it looks at the cancel token again.
const CANCEL_SLICE: Duration = Duration::from_millis(50);

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            channels: 1,
            compression: Compression::None,
            max_bandwidth_bytes_per_sec: 0,
            sparse_pages: true,
            page_checksum: PageChecksum::Xxh3,
            connect_timeout: DEFAULT_TIMEOUT,
            io_timeout: DEFAULT_TIMEOUT,
            switchover_timeout: DEFAULT_TIMEOUT,
            postcopy: false,
            tls: None,
        }
    }
}

/// The receiver's answer to the end of stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Whether the destination resumed the guest. Always false for `file:`
    /// (a snapshot has no reader to answer).
    pub resumed: bool,
}

struct Channel {
    conn: Conn,
    records: u64,
    /// The priority connection of a postcopy stream: its writes skip the rate limit
    /// (a vCPU waits on every page it carries).
    unlimited: bool,
    prefix: Vec<u8>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zin: Vec<u8>,
    zout: Vec<u8>,
}

/// Stops a [`Sender`] (or a [`Receiver`](crate::Receiver)) from another thread: every
/// connection is shut down, so a send or read blocked on a stalled peer returns an
/// error at once.
#[derive(Clone)]
pub struct AbortHandle {
    pub(crate) closers: Arc<Vec<crate::conn::Closer>>,
    pub(crate) cancel: Cancel,
}

impl AbortHandle {
    /// Cancels the sender's token (a rate-limiter sleep or a wait of `finish` ends
    /// at once) and shuts every connection of the stream down (both directions).
    pub fn abort(&self) {
        self.cancel.cancel();
        for c in self.closers.iter() {
            c.close();
        }
    }
}

/// The sending end of a migration stream over one or more connections.
pub struct Sender {
    aborters: Arc<Vec<crate::conn::Closer>>,
    header: StreamHeader,
    channels: Vec<Mutex<Channel>>,
    next: AtomicUsize,
    last_iteration: Mutex<Option<u64>>,
    limiter: RateLimiter,
    counters: Arc<ByteCounters>,
    /// The receiver's answers; `None` for `file:`.
    back: Option<Arc<BackChannel>>,
    /// One per connection: what it holds that the peer has not received yet.
    queues: Vec<crate::queue::QueueProbe>,
    /// Ends the waits of this stream (the limiter's sleeps, `finish`).
    cancel: Cancel,
    /// The connections `pick` chooses from: all but the priority connection.
    data_channels: usize,
    /// What the receiver asked for after a switch to postcopy.
    requests: Option<crossbeam_channel::Receiver<PageRequest>>,
    io_timeout: Duration,
    switchover_timeout: Duration,
    /// In every connection's preamble; names the stream to resume it.
    session_id: u64,
}

fn session_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
        ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(17)
}

fn lock(m: &Mutex<Channel>) -> MutexGuard<'_, Channel> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sender {
    /// Opens `opts.channels` connections to `uri` and writes the stream header, with
    /// a token nobody cancels (see [`Sender::connect_with`]).
    pub fn connect(
        uri: &Uri,
        page_size: u32,
        blocks: Vec<BlockInfo>,
        opts: SendOptions,
    ) -> Result<Sender> {
        Self::connect_with(uri, page_size, blocks, opts, &Cancel::new())
    }

    /// Opens `opts.channels` connections to `uri` and writes the stream header.
    ///
    /// Every wait is bounded: a TCP connect gives up after `opts.connect_timeout`
    /// ([`Error::TimedOut`], naming the address), and `cancel` ends it at once
    /// ([`Error::Cancelled`]). The sender keeps `cancel`: it also ends the rate
    /// limiter's sleeps and the waits of [`Sender::finish`]; [`AbortHandle::abort`]
    /// fires it.
    pub fn connect_with(
        uri: &Uri,
        page_size: u32,
        blocks: Vec<BlockInfo>,
        opts: SendOptions,
        cancel: &Cancel,
    ) -> Result<Sender> {
        Self::open(uri, page_size, blocks, opts, cancel, None)
    }

    /// Continues the postcopy stream `session_id` (see [`Sender::session_id`]) whose
    /// connections broke, over new connections to `uri` (the receiver's recovery
    /// address): opens them as [`Sender::connect_with`] does, with a header that says
    /// so ([`FEATURE_RESUME`](crate::format::FEATURE_RESUME)), and waits up to the
    /// switch-over timeout for the receiver's answer: the pages it still lacks, per
    /// block, as `(block index, runs of (first page, pages))`. The sender is then in
    /// the postcopy part: page requests arrive ([`Sender::page_requests`]), and every
    /// missing page must be sent before [`Sender::finish_postcopy`].
    ///
    /// `opts.postcopy` must be set, and `page_size`, `blocks` and `opts.channels` must
    /// be the first stream's: the receiver refuses anything else.
    pub fn resume_postcopy(
        uri: &Uri,
        page_size: u32,
        blocks: Vec<BlockInfo>,
        opts: SendOptions,
        cancel: &Cancel,
        session_id: u64,
    ) -> Result<(Sender, BlockRuns)> {
        if !opts.postcopy {
            return Err(Error::InvalidArgument(
                "only a postcopy stream can be resumed".into(),
            ));
        }
        let s = Self::open(uri, page_size, blocks, opts, cancel, Some(session_id))?;
        let back = s
            .back
            .clone()
            .ok_or_else(|| Error::InvalidArgument("a file stream cannot be resumed".into()))?;
        let mut st = match s.wait_back(&back, |st| st.ready || st.done) {
            Ok(st) => st,
            Err(WaitEnd::Cancelled) => return Err(Error::Cancelled),
            Err(WaitEnd::TimedOut) => {
                return Err(Error::TimedOut(format!(
                    "the destination did not answer the resume within {}",
                    crate::fmt_duration(s.switchover_timeout)
                )))
            }
        };
        if !st.ready {
            return Err(match st.answer.take() {
                Some(Err(e)) => e,
                _ => Error::Aborted("the destination closed the resumed stream".into()),
            });
        }
        let missing = std::mem::take(&mut st.missing);
        drop(st);
        info!(
            missing_pages = missing
                .iter()
                .flat_map(|(_, runs)| runs.iter().map(|r| r.1))
                .sum::<u64>(),
            "postcopy: the resumed stream is open"
        );
        Ok((s, missing))
    }

    /// The stream's session id, in every connection's preamble: what
    /// [`Sender::resume_postcopy`] names to continue this stream.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    fn open(
        uri: &Uri,
        page_size: u32,
        blocks: Vec<BlockInfo>,
        opts: SendOptions,
        cancel: &Cancel,
        resume: Option<u64>,
    ) -> Result<Sender> {
        // The priority connection of a postcopy stream comes last.
        let total = opts.channels.saturating_add(u16::from(opts.postcopy));
        let header = StreamHeader {
            page_size,
            blocks,
            features: Features {
                compression: opts.compression,
                channels: total,
                sparse_pages: opts.sparse_pages,
                page_checksum: opts.page_checksum,
                postcopy: opts.postcopy,
                resume: resume.is_some(),
                aead_pages: opts.tls.is_some(),
            },
        };
        header
            .validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let is_file = matches!(uri, Uri::File(_));
        if is_file && total != 1 {
            return Err(Error::InvalidArgument(
                "file: carries exactly one channel, and no postcopy".into(),
            ));
        }
        let counters = Arc::new(ByteCounters::new(total.into()));
        let session_id = resume.unwrap_or_else(session_id);
        let mut channels = Vec::with_capacity(total.into());
        let timeouts = ConnTimeouts {
            connect: opts.connect_timeout,
            io: opts.io_timeout,
        };
        let stalled = |e| stalled_write(e, opts.io_timeout);
        for channel_index in 0..total {
            let mut conn = Conn::connect(uri, timeouts, cancel)?;
            if let Some(tls) = &opts.tls {
                conn = conn.into_tls_client(tls, uri, opts.connect_timeout, cancel)?;
            }
            let pre = Preamble {
                channel_index,
                channel_count: total,
                session_id,
            }
            .encode();
            write_all(&mut conn, &[&pre], None).map_err(stalled)?;
            debug!(
                channel = channel_index,
                channels = total,
                uri = %uri,
                "migration channel connected"
            );
            counters.add(channel_index.into(), PREAMBLE_BYTES as u64, 0);
            let zstd = match opts.compression {
                Compression::None => None,
                Compression::Zstd => Some(
                    zstd::bulk::Compressor::new(ZSTD_LEVEL)
                        .map_err(|e| Error::Compression(e.to_string()))?,
                ),
            };
            channels.push(Mutex::new(Channel {
                conn,
                records: 0,
                unlimited: opts.postcopy && channel_index + 1 == total,
                prefix: Vec::new(),
                zstd,
                zin: Vec::new(),
                zout: Vec::new(),
            }));
        }
        let aborters = Arc::new(channels.iter().map(|c| lock(c).conn.aborter()).collect());
        let queues = channels
            .iter()
            .map(|c| crate::queue::QueueProbe::of(&lock(c).conn))
            .collect();
        let (request_tx, requests) = if opts.postcopy {
            let (tx, rx) = crossbeam_channel::unbounded();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let back = match lock(&channels[0]).conn.try_clone_reader()? {
            Some(reader) => Some(BackChannel::start(
                reader,
                request_tx,
                resume.map(|_| header.clone()),
            )?),
            None => None,
        };
        let s = Sender {
            aborters,
            header,
            channels,
            next: AtomicUsize::new(0),
            last_iteration: Mutex::new(None),
            limiter: RateLimiter::new(opts.max_bandwidth_bytes_per_sec),
            counters,
            back,
            queues,
            cancel: cancel.clone(),
            data_channels: usize::from(opts.channels),
            requests,
            io_timeout: opts.io_timeout,
            switchover_timeout: opts.switchover_timeout,
            session_id,
        };
        let body = s.header.encode_body();
        let mut control = lock(&s.channels[0]);
        s.write_record(0, &mut control, Kind::Header, 0, &[&body], 0)?;
        if resume.is_some() {
            // A resumed stream is all postcopy part, which counts its records afresh.
            control.records = 0;
        }
        drop(control);
        Ok(s)
    }

    /// Bytes written on every connection that the receiver has not received yet (in
    /// socket buffers or on the link); 0 for files. Written minus this is what the
    /// link delivered: a measure of its speed that socket buffers cannot inflate.
    pub fn queued_bytes(&self) -> u64 {
        self.queues.iter().map(|q| q.queued_bytes()).sum()
    }

    /// The stream header as sent.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// A handle that aborts this stream from any thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle {
            closers: self.aborters.clone(),
            cancel: self.cancel.clone(),
        }
    }

    /// Byte counters, readable from any thread at any time.
    pub fn counters(&self) -> Arc<ByteCounters> {
        self.counters.clone()
    }

    /// Most pages one `send_pages` call may carry.
    pub fn max_batch_pages(&self) -> usize {
        max_batch_pages(self.header.page_size) as usize
    }

    /// Changes the bandwidth cap (bytes/s, 0 = unlimited) while sending.
    pub fn set_max_bandwidth(&self, bytes_per_sec: u64) {
        self.limiter.set_bytes_per_sec(bytes_per_sec);
    }

    fn pick(&self) -> (usize, MutexGuard<'_, Channel>) {
        let n = self.data_channels;
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for k in 0..n {
            let i = (start + k) % n;
            if let Ok(g) = self.channels[i].try_lock() {
                return (i, g);
            }
        }
        (start, lock(&self.channels[start]))
    }

    fn limiter(&self) -> Option<(&RateLimiter, &Cancel)> {
        (self.limiter.bytes_per_sec() != 0).then_some((&self.limiter, &self.cancel))
    }

    /// Writes one record: header (with the CRC32C of `body`) then the body parts.
    fn write_record(
        &self,
        ch_idx: usize,
        ch: &mut Channel,
        kind: Kind,
        flags: u8,
        body: &[&[u8]],
        payload_bytes: u64,
    ) -> Result<()> {
        let crc = PageChecksum::Crc32c.of_parts(body);
        self.write_record_summed(ch_idx, ch, kind, flags, body, crc, payload_bytes)
    }

    /// Writes one record whose header carries the body checksum `crc`.
    #[allow(clippy::too_many_arguments)]
    fn write_record_summed(
        &self,
        ch_idx: usize,
        ch: &mut Channel,
        kind: Kind,
        flags: u8,
        body: &[&[u8]],
        crc: u32,
        payload_bytes: u64,
    ) -> Result<()> {
        let body_len: usize = body.iter().map(|b| b.len()).sum();
        let hdr = RecordHeader {
            kind,
            flags,
            body_len: body_len as u32,
            body_crc: crc,
        }
        .encode();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(body.len() + 1);
        parts.push(&hdr);
        parts.extend_from_slice(body);
        let limiter = if ch.unlimited { None } else { self.limiter() };
        if let Err(e) = write_all(&mut ch.conn, &parts, limiter) {
            if matches!(e, Error::Cancelled) || self.cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            // A receiver that refused the stream closes it: its reason beats our EPIPE.
            return Err(self
                .refusal()
                .unwrap_or_else(|| stalled_write(e, self.io_timeout)));
        }
        ch.records += 1;
        let total = (RECORD_HEADER_BYTES + body_len) as u64;
        self.counters
            .add(ch_idx, total - payload_bytes, payload_bytes);
        Ok(())
    }

    fn check_block(&self, block_idx: usize, offsets_pages: &[u64]) -> Result<()> {
        let pages = self.header.block_pages(block_idx).ok_or_else(|| {
            Error::InvalidArgument(format!("block index {block_idx} not in the header"))
        })?;
        if let Some(&bad) = offsets_pages.iter().find(|&&o| o >= pages) {
            return Err(Error::InvalidArgument(format!(
                "page {bad} outside block {block_idx} ({pages} pages)"
            )));
        }
        Ok(())
    }

    /// [`Sender::check_block`], and offsets that strictly increase (the receiver
    /// refuses others: no two destination pages of a record may alias).
    fn check_page_offsets(&self, block_idx: usize, offsets_pages: &[u64]) -> Result<()> {
        if offsets_pages.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::InvalidArgument(
                "page offsets must be strictly increasing".into(),
            ));
        }
        self.check_block(block_idx, offsets_pages)
    }

    /// Sends a batch of pages of one block: `offsets_pages[i]` is the page index
    /// (strictly increasing) of `pages[i]`, a page-sized slice borrowed from guest
    /// memory. Uncompressed, the slices go to the socket without a copy.
    pub fn send_pages(
        &self,
        block_idx: usize,
        offsets_pages: &[u64],
        pages: &[&[u8]],
    ) -> Result<()> {
        self.send_pages_flagged(block_idx, offsets_pages, pages, false, false)
    }

    /// Like [`Sender::send_pages`], on the priority connection of a postcopy stream
    /// and outside the rate limit: pages the receiver requested
    /// ([`Sender::page_requests`]), which a vCPU waits on.
    pub fn send_requested_pages(
        &self,
        block_idx: usize,
        offsets_pages: &[u64],
        pages: &[&[u8]],
    ) -> Result<()> {
        if !self.header.features.postcopy {
            return Err(Error::InvalidArgument(
                "requested pages go on the priority connection of a postcopy stream".into(),
            ));
        }
        self.send_pages_flagged(block_idx, offsets_pages, pages, false, true)
    }

    /// Like [`Sender::send_pages`], for pages of a guest that is still running: the
    /// guest may write a page while it is on its way. Uncompressed, the record carries
    /// a separate data checksum; a page whose bytes changed in flight arrives *torn*,
    /// and the receiver fails the stream at its end unless the page was sent again
    /// (the dirty log guarantees that: the write that tore it dirtied it). Compressed
    /// batches are copied before compression, so they never tear.
    pub fn send_live_pages(
        &self,
        block_idx: usize,
        offsets_pages: &[u64],
        pages: &[&[u8]],
    ) -> Result<()> {
        self.send_pages_flagged(block_idx, offsets_pages, pages, true, false)
    }

    fn send_pages_flagged(
        &self,
        block_idx: usize,
        offsets_pages: &[u64],
        pages: &[&[u8]],
        live: bool,
        priority: bool,
    ) -> Result<()> {
        let n = offsets_pages.len();
        if n == 0 {
            return Ok(());
        }
        if pages.len() != n || n > self.max_batch_pages() {
            return Err(Error::InvalidArgument(format!(
                "{n} offsets, {} pages, at most {} per batch",
                pages.len(),
                self.max_batch_pages()
            )));
        }
        let page_size = self.header.page_size as usize;
        if pages.iter().any(|p| p.len() != page_size) {
            return Err(Error::InvalidArgument(format!(
                "every page must be {page_size} bytes"
            )));
        }
        self.check_page_offsets(block_idx, offsets_pages)?;

        let (ch_idx, mut guard) = if priority {
            let last = self.channels.len() - 1;
            (last, lock(&self.channels[last]))
        } else {
            self.pick()
        };
        let ch = &mut *guard;
        ch.prefix.clear();
        ch.prefix
            .extend_from_slice(&(block_idx as u32).to_le_bytes());
        ch.prefix.extend_from_slice(&(n as u32).to_le_bytes());
        for o in offsets_pages {
            ch.prefix.extend_from_slice(&o.to_le_bytes());
        }
        let prefix = std::mem::take(&mut ch.prefix);
        let sum = self.header.features.page_checksum;
        // Inside TLS the AEAD authenticates the batch: no body checksum (zero).
        let body_sum = |parts: &[&[u8]]| {
            if self.header.features.aead_pages {
                0
            } else {
                sum.of_parts(parts)
            }
        };
        let payload = (n * page_size) as u64;
        let res = match ch.zstd.as_mut() {
            None if live => {
                // One checksum per page, so a page torn in flight condemns only itself.
                let mut crcs = Vec::with_capacity(4 * n);
                for p in pages {
                    crcs.extend_from_slice(&sum.of(p).to_le_bytes());
                }
                let crc = body_sum(&[&prefix, &crcs]);
                let mut body: Vec<&[u8]> = Vec::with_capacity(n + 2);
                body.push(&prefix);
                body.push(&crcs);
                body.extend_from_slice(pages);
                self.write_record_summed(ch_idx, ch, Kind::Pages, FLAG_LIVE, &body, crc, payload)
            }
            None => {
                let mut body: Vec<&[u8]> = Vec::with_capacity(n + 1);
                body.push(&prefix);
                body.extend_from_slice(pages);
                let crc = body_sum(&body);
                self.write_record_summed(ch_idx, ch, Kind::Pages, 0, &body, crc, payload)
            }
            Some(z) => {
                ch.zin.clear();
                for p in pages {
                    ch.zin.extend_from_slice(p);
                }
                ch.zout.clear();
                ch.zout
                    .reserve(zstd::zstd_safe::compress_bound(ch.zin.len()));
                match z.compress_to_buffer(&ch.zin, &mut ch.zout) {
                    Ok(_) => {
                        let zout = std::mem::take(&mut ch.zout);
                        let crc = body_sum(&[&prefix, &zout]);
                        let r = self.write_record_summed(
                            ch_idx,
                            ch,
                            Kind::Pages,
                            FLAG_ZSTD,
                            &[&prefix, &zout],
                            crc,
                            zout.len() as u64,
                        );
                        ch.zout = zout;
                        r
                    }
                    Err(e) => Err(Error::Compression(e.to_string())),
                }
            }
        };
        ch.prefix = prefix;
        if res.is_ok() {
            self.counters.add_pages(n as u64, 0);
        }
        res
    }

    /// Sends zero pages of one block as offsets only (any number; split as needed).
    pub fn send_zero_pages(&self, block_idx: usize, offsets_pages: &[u64]) -> Result<()> {
        self.check_block(block_idx, offsets_pages)?;
        for chunk in offsets_pages.chunks(MAX_ZERO_BATCH_PAGES as usize) {
            let (ch_idx, mut guard) = self.pick();
            let ch = &mut *guard;
            let mut body = std::mem::take(&mut ch.prefix);
            body.clear();
            body.extend_from_slice(&(block_idx as u32).to_le_bytes());
            body.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            for o in chunk {
                body.extend_from_slice(&o.to_le_bytes());
            }
            let r = self.write_record(ch_idx, ch, Kind::ZeroPages, 0, &[&body], 0);
            ch.prefix = body;
            r?;
            self.counters.add_pages(0, chunk.len() as u64);
        }
        Ok(())
    }

    /// Sends a batch of sparse pages of one block (offsets strictly increasing, at
    /// most [`Sender::max_batch_pages`]): each page as its non-zero words. The words
    /// were copied out of guest memory when the batch was built, so a sparse page
    /// never tears; the receiver zeroes each page and stores the words.
    pub fn send_sparse_pages(&self, block_idx: usize, batch: &SparseBatch) -> Result<()> {
        let n = batch.len();
        if n == 0 {
            return Ok(());
        }
        if !self.header.features.sparse_pages {
            return Err(Error::InvalidArgument(
                "sparse pages were not declared for this stream".into(),
            ));
        }
        if n > MAX_BATCH_PAGES as usize || self.header.page_size as usize > MAX_SPARSE_PAGE_BYTES {
            return Err(Error::InvalidArgument(format!(
                "{n} sparse pages of {} bytes (at most {MAX_BATCH_PAGES} of {MAX_SPARSE_PAGE_BYTES})",
                self.header.page_size
            )));
        }
        let offsets = batch.offsets();
        self.check_page_offsets(block_idx, offsets)?;
        let (ch_idx, mut guard) = self.pick();
        let ch = &mut *guard;
        let mut prefix = std::mem::take(&mut ch.prefix);
        prefix.clear();
        prefix.extend_from_slice(&(block_idx as u32).to_le_bytes());
        prefix.extend_from_slice(&(n as u32).to_le_bytes());
        // The channel's zstd input buffer is free scratch here (no page data).
        let mut offsets_buf = std::mem::take(&mut ch.zin);
        let [o, c, e] = batch.body_parts(&mut offsets_buf);
        let res = self.write_record(
            ch_idx,
            ch,
            Kind::SparsePages,
            0,
            &[&prefix, o, c, e],
            e.len() as u64,
        );
        ch.prefix = prefix;
        ch.zin = offsets_buf;
        if res.is_ok() {
            self.counters.add_pages(n as u64, 0);
        }
        res
    }

    /// Sends one device's state on the control connection.
    pub fn send_device_state(&self, name: &str, data: &[u8]) -> Result<()> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(Error::InvalidArgument(format!(
                "device name {name:?}: 1..={MAX_NAME_BYTES} bytes"
            )));
        }
        if 1 + name.len() + data.len() > MAX_BODY_BYTES as usize {
            return Err(Error::InvalidArgument(format!(
                "device state of {name} is {} bytes, cap {MAX_BODY_BYTES}",
                data.len()
            )));
        }
        let head = [&[name.len() as u8][..], name.as_bytes()].concat();
        let mut ch = lock(&self.channels[0]);
        self.write_record(
            0,
            &mut ch,
            Kind::DeviceState,
            0,
            &[&head, data],
            data.len() as u64,
        )
    }

    /// Ends iteration `iteration` (strictly increasing): a `Sync` record on every
    /// connection. The receiver applies no page of a later iteration before every
    /// channel delivered this one. Call it after every `send_*` of the iteration
    /// returned, and before any `send_*` of the next starts.
    pub fn iteration_end(&self, iteration: u64) -> Result<()> {
        let mut last = self
            .last_iteration
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|l| iteration <= l) {
            return Err(Error::InvalidArgument(format!(
                "iteration {iteration} after {last:?}: must increase"
            )));
        }
        let body = iteration.to_le_bytes();
        let mut guards: Vec<_> = self.channels.iter().map(lock).collect();
        for (i, g) in guards.iter_mut().enumerate().rev() {
            self.write_record(i, g, Kind::Sync, 0, &[&body], 0)?;
        }
        *last = Some(iteration);
        Ok(())
    }

    /// Ends the stream and hands the guest over: `End` on every data connection,
    /// then on the control one; then (except for `file:`) waits for the receiver's
    /// `Ready`, writes `Commit` and waits for its `Ack`.
    ///
    /// The receiver starts the guest only after `Commit`, so an error returned
    /// before it went out means the receiver does not run the guest, and the
    /// caller may resume its own copy. Once `Commit` is written, a missing answer
    /// is [`Error::InDoubt`]: the receiver may be running the guest, and the
    /// caller must not resume. A `Refuse` after `Commit` (the receiver failed to
    /// start the guest) is [`Error::Refused`], as before it.
    pub fn finish(self) -> Result<Ack> {
        let mut chans: Vec<Channel> = self
            .channels
            .iter()
            .map(|m| std::mem::replace(&mut *lock(m), dummy_channel()))
            .collect();
        for (i, ch) in chans.iter_mut().enumerate().rev() {
            let body = ch.records.to_le_bytes();
            self.write_record(i, ch, Kind::End, 0, &[&body], 0)?;
            ch.conn.flush()?;
            // The control connection stays open for the commit.
            if i > 0 || self.back.is_none() {
                ch.conn.shutdown_write()?;
            }
        }
        let Some(back) = &self.back else {
            return Ok(Ack { resumed: false });
        };
        self.await_ready(back)?;
        let control = &mut chans[0].conn;
        self.commit(control)?;
        // The commit is written and flushed; closing our half only tells the receiver
        // nothing follows. Whether it arrived is the acknowledgement's to say.
        let _ = control.shutdown_write();
        self.await_ack(back)
    }

    /// Waits for the receiver's `Ready` (it loaded the stream and holds the guest).
    fn await_ready(&self, back: &BackChannel) -> Result<()> {
        let mut st = match self.wait_back(back, |st| st.ready || st.done) {
            Ok(st) => st,
            Err(WaitEnd::Cancelled) => return Err(Error::Cancelled),
            Err(WaitEnd::TimedOut) => {
                return Err(Error::TimedOut(format!(
                    "the destination did not offer the switch-over within {}",
                    crate::fmt_duration(self.switchover_timeout)
                )))
            }
        };
        if !st.ready {
            // `apply` turns an Ack before Ready into an error.
            return Err(st
                .answer
                .take()
                .and_then(|a| a.err())
                .unwrap_or_else(|| Error::Aborted("no answer".into())));
        }
        info!("switch-over: the destination is Ready");
        Ok(())
    }

    /// Writes `Commit` on the control connection: the point of no return, from here on
    /// the receiver may run the guest. A write that fails delivered no whole record,
    /// so no commit.
    fn commit(&self, control: &mut Conn) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        write_all(control, &[&encode_record(Kind::Commit, &[])], None)
            .map_err(|e| stalled_write(e, self.io_timeout))?;
        control.flush()?;
        info!("switch-over: Commit sent");
        Ok(())
    }

    /// Waits for the acknowledgement of the commit; anything but an `Ack` or a
    /// `Refuse` leaves the sender in doubt.
    fn await_ack(&self, back: &BackChannel) -> Result<Ack> {
        let mut st = match self.wait_back(back, |st| st.acked.is_some() || st.answer.is_some()) {
            Ok(st) => st,
            Err(WaitEnd::Cancelled) => {
                return Err(Error::InDoubt(
                    "cancelled while waiting for the acknowledgement".into(),
                ))
            }
            Err(WaitEnd::TimedOut) => {
                return Err(Error::InDoubt(format!(
                    "no acknowledgement within {}",
                    crate::fmt_duration(self.switchover_timeout)
                )))
            }
        };
        if let Some(ack) = st.acked {
            info!(
                destination_resumed = ack.resumed,
                "switch-over: Ack received"
            );
            return Ok(ack);
        }
        match st.answer.take() {
            Some(Ok(ack)) => {
                info!(
                    destination_resumed = ack.resumed,
                    "switch-over: Ack received"
                );
                Ok(ack)
            }
            Some(Err(Error::Refused(why))) => Err(Error::Refused(why)),
            Some(Err(e)) => Err(Error::InDoubt(e.to_string())),
            None => Err(Error::InDoubt("no answer".into())),
        }
    }

    /// Sends the pages the receiver must drop before the switch to postcopy (pages
    /// it received during precopy that the guest wrote since): runs of `(first page,
    /// pages)` of one block, on the control connection. Only in a postcopy stream,
    /// after the last iteration's pages and before [`Sender::switch_to_postcopy`].
    pub fn send_discard(&self, block_idx: usize, runs: &[(u64, u64)]) -> Result<()> {
        if !self.header.features.postcopy {
            return Err(Error::InvalidArgument(
                "discards belong to a postcopy stream".into(),
            ));
        }
        crate::format::check_runs(&self.header, block_idx, runs, "discard")?;
        let mut ch = lock(&self.channels[0]);
        for chunk in runs.chunks(MAX_DISCARD_RUNS as usize) {
            let body = crate::format::encode_runs(block_idx, chunk);
            self.write_record(0, &mut ch, Kind::Discard, 0, &[&body], 0)?;
        }
        Ok(())
    }

    /// Switches a postcopy stream over: `Switch` on every connection (after the last
    /// iteration's pages, the discards and the device state), then the handshake of
    /// [`Sender::finish`]: the receiver's `Ready`, our `Commit`, its `Ack`. The
    /// connections stay open: from here on the receiver runs the guest, asks for the
    /// pages it lacks ([`Sender::page_requests`]), and the sender sends them
    /// ([`Sender::send_requested_pages`]) and every other page it still holds
    /// ([`Sender::send_pages`]), then ends with [`Sender::finish_postcopy`].
    ///
    /// Errors as [`Sender::finish`]: before the commit the sender keeps the guest;
    /// after it, [`Error::InDoubt`].
    pub fn switch_to_postcopy(&self) -> Result<Ack> {
        let back = match (&self.back, self.header.features.postcopy) {
            (Some(back), true) => back,
            _ => {
                return Err(Error::InvalidArgument(
                    "the stream was not opened for postcopy".into(),
                ))
            }
        };
        {
            let mut guards: Vec<_> = self.channels.iter().map(lock).collect();
            for (i, g) in guards.iter_mut().enumerate().rev() {
                let body = g.records.to_le_bytes();
                self.write_record(i, g, Kind::Switch, 0, &[&body], 0)?;
                // The postcopy part counts its records afresh.
                g.records = 0;
            }
        }
        back.lock().postcopy = true;
        self.await_ready(back)?;
        self.commit(&mut lock(&self.channels[0]).conn)?;
        self.await_ack(back)
    }

    /// The pages the receiver asked for after the switch to postcopy, in the order it
    /// asked; the channel disconnects when the back-channel ends. `None` for a stream
    /// not opened for postcopy.
    pub fn page_requests(&self) -> Option<&crossbeam_channel::Receiver<PageRequest>> {
        self.requests.as_ref()
    }

    /// Ends a postcopy stream once every page the receiver lacked was sent: `End` on
    /// every connection, then waits for the receiver's `Done` (every page is in its
    /// memory). Only then may the sender let its copy of the guest go.
    pub fn finish_postcopy(self) -> Result<()> {
        let Some(back) = self.back.clone() else {
            return Err(Error::InvalidArgument(
                "the stream was not opened for postcopy".into(),
            ));
        };
        let mut chans: Vec<Channel> = self
            .channels
            .iter()
            .map(|m| std::mem::replace(&mut *lock(m), dummy_channel()))
            .collect();
        for (i, ch) in chans.iter_mut().enumerate().rev() {
            let body = ch.records.to_le_bytes();
            self.write_record(i, ch, Kind::End, 0, &[&body], 0)?;
            ch.conn.flush()?;
            ch.conn.shutdown_write()?;
        }
        let mut st = match self.wait_back(&back, |st| st.done) {
            Ok(st) => st,
            Err(WaitEnd::Cancelled) => return Err(Error::Cancelled),
            Err(WaitEnd::TimedOut) => {
                return Err(Error::TimedOut(format!(
                    "the destination did not report every page within {}",
                    crate::fmt_duration(self.switchover_timeout)
                )))
            }
        };
        match st.answer.take() {
            Some(Ok(_)) => {
                info!("postcopy: the destination has every page");
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Err(Error::Aborted("no answer".into())),
        }
    }

    /// Waits on the back-channel until `done` holds, a cancel, or the switch-over
    /// timeout, whichever is first; returns the state, locked, when `done` held.
    fn wait_back<'a>(
        &self,
        back: &'a BackChannel,
        done: impl Fn(&BackState) -> bool,
    ) -> std::result::Result<MutexGuard<'a, BackState>, WaitEnd> {
        let deadline = deadline_after(self.switchover_timeout);
        let mut st = back.lock();
        while !done(&st) {
            if self.cancel.is_cancelled() {
                return Err(WaitEnd::Cancelled);
            }
            let slice = slice_until(deadline).ok_or(WaitEnd::TimedOut)?;
            st = back
                .changed
                .wait_timeout(st, slice)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(st)
    }

    /// The receiver's refusal, if it sent one (it may do so at any time, e.g. right
    /// after the header when the guests do not match). Called after a write failed:
    /// gives the reader thread a moment to read what the receiver said before it
    /// closed the connection.
    fn refusal(&self) -> Option<Error> {
        let back = self.back.as_ref()?;
        let mut st = back.lock();
        if !st.done {
            st = back
                .changed
                .wait_timeout_while(st, REFUSAL_WAIT, |st| !st.done)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        match &st.answer {
            Some(Err(Error::Refused(why))) => Some(Error::Refused(why.clone())),
            _ => None,
        }
    }

    /// The last iteration (see [`Sender::iteration_end`]) whose pages the receiver
    /// reported to be in its memory; `None` before the first, and always for `file:`.
    pub fn applied_iteration(&self) -> Option<u64> {
        self.back.as_ref().and_then(|b| b.lock().applied)
    }

    /// Waits up to `timeout` until the receiver has every page of iterations up to
    /// `iteration` in its memory: `Ok(true)` once it has (at once for `file:`, which
    /// has no receiver to wait for), `Ok(false)` on timeout. An error means the
    /// receiver answered or went away mid-stream: the stream is lost.
    pub fn wait_applied(&self, iteration: u64, timeout: std::time::Duration) -> Result<bool> {
        let Some(back) = &self.back else {
            return Ok(true);
        };
        let deadline = std::time::Instant::now() + timeout;
        let mut st = back.lock();
        loop {
            if st.applied.is_some_and(|a| a >= iteration) {
                return Ok(true);
            }
            if st.done {
                let why = match &st.answer {
                    Some(Err(e)) => e.to_string(),
                    _ => "it answered before the end of the stream".into(),
                };
                return Err(Error::Aborted(format!(
                    "the receiver's back-channel: {why}"
                )));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            st = back
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Sender {
    /// Shuts every connection down: the abort handles hold duplicates of the sockets,
    /// so closing ours alone would not end the stream for the peer.
    fn drop(&mut self) {
        for c in self.aborters.iter() {
            c.close();
        }
    }
}

/// The deadline `d` from now; `None` (never) for zero.
fn deadline_after(d: Duration) -> Option<Instant> {
    (!d.is_zero()).then(|| Instant::now() + d)
}

/// How long the next slice of a wait until `deadline` may sleep; `None` once it passed.
fn slice_until(deadline: Option<Instant>) -> Option<Duration> {
    match deadline {
        None => Some(CANCEL_SLICE),
        Some(t) => {
            let left = t.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| left.min(CANCEL_SLICE))
        }
    }
}

/// A write that failed because the send timeout ran out (the peer stopped reading)
/// says so; other errors pass unchanged.
fn stalled_write(e: Error, io_timeout: Duration) -> Error {
    e.or_timed_out(|| {
        format!(
            "the destination did not read for {}",
            crate::fmt_duration(io_timeout)
        )
    })
}

fn dummy_conn() -> Conn {
    let (a, _b) = crate::mem::pipe();
    Conn::Mem(a)
}

fn dummy_channel() -> Channel {
    Channel {
        conn: dummy_conn(),
        records: 0,
        unlimited: false,
        prefix: Vec::new(),
        zstd: None,
        zin: Vec::new(),
        zout: Vec::new(),
    }
}

/// Why [`Sender::wait_back`] stopped waiting.
enum WaitEnd {
    Cancelled,
    TimedOut,
}

/// A page the receiver asked for after the switch to postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRequest {
    /// Block index in the stream header.
    pub block_idx: usize,
    /// Page index within the block.
    pub page_index: u64,
}

/// What the receiver says on the control connection while the sender writes.
#[derive(Default)]
struct BackState {
    /// Highest iteration the receiver reported applied.
    applied: Option<u64>,
    /// Whether the receiver reported the stream loaded and waits for the commit.
    ready: bool,
    /// Set before a postcopy commit: the `Ack` then opens the postcopy part instead
    /// of ending the back-channel.
    postcopy: bool,
    /// The postcopy `Ack`.
    acked: Option<Ack>,
    /// Where postcopy page requests go (none when the stream cannot switch).
    requests: Option<crossbeam_channel::Sender<PageRequest>>,
    /// Its final answer (or why none can come); taken by `finish`.
    answer: Option<Result<Ack>>,
    /// Whether the reader stopped (an answer came, or the connection failed).
    done: bool,
    /// A resumed postcopy stream: the receiver first lists what it lacks (`Missing`*,
    /// `Ready`), then the postcopy part's records follow.
    resuming: bool,
    /// What it listed, `(block, runs)`.
    missing: BlockRuns,
}

impl BackState {
    /// Takes one record (or the error reading it); returns whether more may follow.
    /// Order: `Applied`*, `Ready`, then `Ack` or `Refuse` (a refusal at any time);
    /// after a postcopy `Ack`, `PageRequest`* then `Done`. A resumed stream starts
    /// with `Missing`* and `Ready`, then `PageRequest`* and `Done`.
    fn apply(&mut self, rec: Result<Back>) -> bool {
        let answer = match rec {
            Ok(Back::Missing(block, runs)) if self.resuming && !self.ready => {
                self.missing.push((block, runs));
                return true;
            }
            Ok(Back::Ready) if self.resuming && !self.ready => {
                // The resumed stream is past its switch-over: requests may follow.
                self.ready = true;
                self.postcopy = true;
                self.acked = Some(Ack { resumed: true });
                return true;
            }
            Ok(Back::Missing(..)) => Err(Error::Protocol(
                "a Missing record outside the start of a resumed stream".into(),
            )),
            Ok(Back::Applied(n)) if !self.ready => {
                self.applied = self.applied.max(Some(n));
                return true;
            }
            Ok(Back::Ready) if !self.ready => {
                self.ready = true;
                return true;
            }
            Ok(Back::Applied(_)) => Err(Error::Protocol("Applied after Ready".into())),
            Ok(Back::Ready) => Err(Error::Protocol("a second switch-over offer".into())),
            Ok(Back::Answer(_)) if !self.ready || self.acked.is_some() => Err(Error::Protocol(
                "an acknowledgement of a switch-over never offered".into(),
            )),
            Ok(Back::Answer(ack)) if self.postcopy => {
                self.acked = Some(ack);
                return true;
            }
            Ok(Back::Answer(ack)) => Ok(ack),
            Ok(Back::Request(r)) if self.acked.is_some() => {
                // The engine may have stopped listening (it sent every page): a
                // request for a page on its way is answered by that page.
                if let Some(tx) = &self.requests {
                    let _ = tx.send(r);
                }
                return true;
            }
            Ok(Back::Done) if self.acked.is_some() => self.acked.ok_or(Error::Cancelled),
            Ok(Back::Request(_) | Back::Done) => Err(Error::Protocol(
                "a postcopy record before the switch to postcopy".into(),
            )),
            Err(e) => Err(e),
        };
        self.answer = Some(answer);
        self.done = true;
        // The engine's request loop sees the channel disconnect.
        self.requests = None;
        false
    }
}

/// What a receiver said on its back-channel, decoded from bytes by
/// [`decode_answers`].
#[derive(Debug)]
pub struct Answers {
    /// The last iteration it reported applied.
    pub applied: Option<u64>,
    /// Whether it offered the switch-over (`Ready`).
    pub ready: bool,
    /// Its final answer, or why none came.
    pub answer: Result<Ack>,
}

/// Decodes a receiver's whole back-channel held in memory with the parser the
/// sender's reader thread uses. The fuzz target drives that parser through this.
pub fn decode_answers(stream: &[u8]) -> Answers {
    let mut r = RecordReader::new(Conn::Bytes(bytes::Bytes::copy_from_slice(stream)));
    let mut st = BackState::default();
    while st.apply(read_back_record(&mut r, None)) {}
    Answers {
        applied: st.applied,
        ready: st.ready,
        answer: st
            .answer
            .unwrap_or_else(|| Err(Error::Aborted("no answer".into()))),
    }
}

/// The sender's view of the back-channel, filled by its reader thread.
#[derive(Default)]
struct BackChannel {
    state: Mutex<BackState>,
    changed: Condvar,
}

impl BackChannel {
    fn lock(&self) -> MutexGuard<'_, BackState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the reader thread on a read-only handle of the control connection;
    /// postcopy page requests go to `requests`. `resumed`: the header of a resumed
    /// stream, whose `Missing` records it checks.
    fn start(
        conn: Conn,
        requests: Option<crossbeam_channel::Sender<PageRequest>>,
        resumed: Option<StreamHeader>,
    ) -> Result<Arc<BackChannel>> {
        let back = Arc::new(BackChannel::default());
        {
            let mut st = back.lock();
            st.requests = requests;
            st.resuming = resumed.is_some();
        }
        let b = back.clone();
        // Its events belong to the migration that started it.
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("mig/backchannel".into())
            .spawn(move || {
                let _entered = span.enter();
                let mut r = RecordReader::new(conn);
                loop {
                    let rec = read_back_record(&mut r, resumed.as_ref());
                    match &rec {
                        Err(Error::Refused(why)) => {
                            warn!(reason = %why, "the destination refused the stream");
                        }
                        Err(e @ Error::Checksum { .. }) => {
                            warn!(error = %e, "checksum failure on the back-channel");
                        }
                        _ => {}
                    }
                    let mut st = b.lock();
                    let more = st.apply(rec);
                    b.changed.notify_all();
                    if !more {
                        return;
                    }
                }
            })
            .map_err(Error::Io)?;
        Ok(back)
    }
}

/// One record from the receiver.
enum Back {
    Applied(u64),
    Ready,
    Answer(Ack),
    Request(PageRequest),
    Done,
    Missing(usize, Vec<(u64, u64)>),
}

/// Reads one record of the back-channel: `Applied`, `Ready`, `Ack`, `PageRequest`,
/// `Done`, `Missing` (checked against `header` when there is one), or `Refuse` (an
/// error).
fn read_back_record(r: &mut RecordReader, header: Option<&StreamHeader>) -> Result<Back> {
    let mut hb = [0u8; RECORD_HEADER_BYTES];
    r.read_exact(&mut hb, "acknowledgement")?;
    let h = RecordHeader::decode(&hb)?;
    let cap = match h.kind {
        Kind::Ack => 1,
        Kind::Applied => 8,
        Kind::Ready | Kind::Done => 0,
        Kind::PageRequest => 12,
        Kind::Missing => 8 + 16 * MAX_DISCARD_RUNS,
        Kind::Refuse => MAX_MESSAGE_BYTES,
        other => {
            return Err(Error::Protocol(format!(
                "expected an acknowledgement, got {other:?}"
            )))
        }
    };
    if h.body_len > cap {
        return Err(Error::TooLong {
            what: "acknowledgement",
            len_bytes: h.body_len.into(),
            max_bytes: cap.into(),
        });
    }
    let body = r.read_vec(h.body_len as usize, "acknowledgement")?;
    if checksum::crc32c(&body) != h.body_crc {
        return Err(Error::Checksum {
            what: "acknowledgement",
        });
    }
    match h.kind {
        Kind::Ack if body.len() == 1 && body[0] <= 1 => Ok(Back::Answer(Ack {
            resumed: body[0] == 1,
        })),
        Kind::Applied if body.len() == 8 => Ok(Back::Applied(u64_at(&body, 0))),
        Kind::Ready => Ok(Back::Ready),
        Kind::Done => Ok(Back::Done),
        Kind::PageRequest if body.len() == 12 => Ok(Back::Request(PageRequest {
            block_idx: u32_at(&body, 0) as usize,
            page_index: u64_at(&body, 4),
        })),
        Kind::Missing => {
            let header = header.ok_or_else(|| {
                Error::Protocol("a Missing record on a stream that was not resumed".into())
            })?;
            let (block, runs) = crate::format::decode_runs(header, &body, "missing")?;
            Ok(Back::Missing(block, runs))
        }
        Kind::Ack | Kind::Applied | Kind::PageRequest => {
            Err(Error::Malformed(format!("{:?} body", h.kind)))
        }
        _ => Err(Error::Refused(String::from_utf8_lossy(&body).into_owned())),
    }
}
