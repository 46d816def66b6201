//! The receiving side: accepts every connection of a stream, reads the header,
//! then runs one thread per data connection writing pages straight into the
//! destination's memory, with the control connection read on the caller's thread.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::barrier::IterationBarrier;
use crate::checksum;
use crate::conn::{Closer, Conn, RawListener};
use crate::counters::ByteCounters;
use crate::error::{Error, Result};
use crate::format::{
    encode_record, max_batch_pages, u32_at, u64_at, Compression, Kind, Preamble, RecordHeader,
    StreamHeader, FLAG_LIVE, FLAG_ZSTD, MAX_BATCH_PAGES, MAX_DISCARD_RUNS, MAX_MESSAGE_BYTES,
    MAX_ZERO_BATCH_PAGES, PREAMBLE_BYTES, RECORD_HEADER_BYTES,
};
use crate::io::{write_all, RecordReader};
use crate::sink::{PageSink, VecSink};
use crate::sparse;
use crate::uri::Uri;

/// What the control connection delivers besides pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// One device's state.
    DeviceState {
        /// Device name.
        name: String,
        /// Its serialized state.
        data: Vec<u8>,
    },
    /// Every channel delivered every page of this iteration.
    IterationEnd {
        /// The iteration number the sender gave.
        iteration: u64,
    },
    /// Postcopy streams, before the switch: pages of a block the receiver must drop
    /// (the guest wrote them after they were sent); they come again after the switch.
    Discard {
        /// Block index in the header.
        block_idx: usize,
        /// `(first page, pages)` runs, in bounds, none empty.
        runs: Vec<(u64, u64)>,
    },
}

/// How a connection's part of the stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// `End`: the stream is over on this connection.
    End,
    /// `Switch`: the precopy part is over; the postcopy part follows.
    Switch,
}

/// Which part of the stream a connection is reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Until `End` or `Switch`.
    Precopy,
    /// After the switch: pages only, until `End`.
    Postcopy,
}

/// Writes postcopy page requests to the sender on the control connection; cheap to
/// clone, usable from any thread (one record at a time).
#[derive(Clone)]
pub struct PageRequester {
    conn: Arc<Mutex<Conn>>,
}

impl PageRequester {
    /// Asks the sender for page `page_index` of block `block_idx`.
    pub fn request(&self, block_idx: usize, page_index: u64) -> Result<()> {
        let mut body = [0u8; 12];
        body[..4].copy_from_slice(&(block_idx as u32).to_le_bytes());
        body[4..].copy_from_slice(&page_index.to_le_bytes());
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        write_back(&mut conn, Kind::PageRequest, &body)
    }
}

/// A bound endpoint waiting for a migration stream.
pub struct Listener {
    raw: RawListener,
}

impl Listener {
    /// Binds `uri` (for `file:` nothing happens until `accept`).
    pub fn bind(uri: &Uri) -> Result<Listener> {
        Ok(Listener {
            raw: RawListener::bind(uri)?,
        })
    }

    /// The URI a sender should use (with the real port for `tcp:HOST:0`).
    pub fn local_uri(&self) -> Result<Uri> {
        self.raw.local_uri()
    }

    /// [`Listener::accept_with`] with the default [`AcceptOptions`].
    pub fn accept(&self) -> Result<Receiver> {
        self.accept_with(&AcceptOptions::default())
    }

    /// Accepts every connection of one stream and reads its header.
    ///
    /// On sockets (`tcp:`, `unix:`) connections are taken concurrently: each must
    /// deliver its preamble (channel 0 also the stream header) within
    /// `opts.preamble_timeout`; they are grouped by the stream's session id, and the
    /// first stream whose channels have all connected wins. A connection that stays
    /// silent, sends garbage, repeats a channel or belongs to a stream that never
    /// completes is dropped (one line on stderr) and never blocks another; so this
    /// waits until a whole stream arrives and fails only if the listener does.
    /// `file:` reads the file; `mem:` takes its connections one by one, as they come.
    pub fn accept_with(&self, opts: &AcceptOptions) -> Result<Receiver> {
        if opts.tls.is_some() && !self.raw.is_tcp() {
            return Err(Error::InvalidArgument(
                "tls-creds is set but the listener is not a tcp: URI (TLS runs on TCP only)".into(),
            ));
        }
        if self.raw.is_socket() {
            accept_concurrently(&self.raw, opts)
        } else {
            accept_from(|| self.raw.accept())
        }
    }
}

/// How [`Listener::accept_with`] treats incoming connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptOptions {
    /// Most time a connection may take to deliver its preamble (and, for the control
    /// connection, the stream header) before it is dropped. Default 10 s.
    pub preamble_timeout: Duration,
    /// Most pending items, each a connection still delivering its preamble or a
    /// stream still waiting for some of its channels (which counts once, whatever
    /// its channel count); past that, the oldest is dropped. Default 16.
    pub max_pending: usize,
    /// Liveness of the source on accepted TCP connections: keepalive and
    /// `TCP_USER_TIMEOUT` give a dead peer up after about this long (zero: the
    /// kernel's defaults). No read timeout is set on an established stream: a
    /// source may legitimately be slow. Default 10 s.
    pub io_timeout: Duration,
    /// TLS 1.3 on every connection (`tcp:` only): the handshake, the source's
    /// certificate and the allow-list are checked before the preamble, within
    /// `preamble_timeout`; a plaintext source is refused. `None` (default):
    /// plaintext, and a source that speaks TLS is refused.
    pub tls: Option<crate::TlsConfig>,
}

impl Default for AcceptOptions {
    fn default() -> Self {
        AcceptOptions {
            preamble_timeout: Duration::from_secs(10),
            max_pending: 16,
            io_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// How long the accept loop waits for a connection before it looks at its reports
/// and deadlines again.
const ACCEPT_SLICE: Duration = Duration::from_millis(20);
/// A connection younger than this is never dropped to make room: a real sender
/// writes its preamble right after it connects, and a burst of its channels may
/// outnumber `max_pending` for a moment.
const EVICTION_GRACE: Duration = Duration::from_millis(200);

/// What a connection's first bytes said.
struct Arrived {
    reader: RecordReader,
    preamble: Preamble,
    /// For channel 0: the stream header and its record's size in bytes.
    header: Option<(StreamHeader, usize)>,
}

/// A connection reading its preamble on its own thread.
struct Reading {
    closer: Closer,
    accepted: Instant,
    peer: String,
}

/// The connections of one stream that have arrived so far.
struct Group {
    /// Arrival number of its first connection (the age order for eviction).
    first: u64,
    slots: Vec<Option<RecordReader>>,
    header: Option<(StreamHeader, usize)>,
    filled: usize,
}

fn drop_note(peer: &str, why: impl std::fmt::Display) {
    warn!(peer, reason = %why, "incoming migration connection dropped");
}

/// Reads a connection's preamble (and for channel 0 the stream header) within
/// `timeout`, then clears the read timeout again.
fn read_arrival(
    mut conn: Conn,
    timeout: Duration,
    tls: Option<&crate::TlsConfig>,
) -> Result<Arrived> {
    if !timeout.is_zero() {
        conn.set_read_timeout(Some(timeout))?;
    }
    if let Some(tls) = tls {
        conn = conn.into_tls_server(tls).map_err(|e| {
            e.or_timed_out(|| format!("no TLS handshake within {}", crate::fmt_duration(timeout)))
        })?;
    }
    let plaintext = tls.is_none();
    let mut reader = RecordReader::new(conn);
    let timed = |e: Error| {
        e.or_timed_out(|| {
            format!(
                "no preamble and header within {}",
                crate::fmt_duration(timeout)
            )
        })
    };
    let mut pb = [0u8; PREAMBLE_BYTES];
    reader.read_exact(&mut pb, "preamble").map_err(timed)?;
    let preamble = match Preamble::decode(&pb) {
        Err(Error::BadMagic { found }) if plaintext && crate::tls::is_client_hello(&found) => {
            // Tell a TLS source why, before closing: it reads this as plaintext.
            let msg = "this destination has no tls-creds and the source speaks TLS";
            let _ = write_back(&mut reader.conn, Kind::Refuse, msg.as_bytes());
            return Err(Error::Tls(
                "TLS: the peer speaks TLS but tls-creds is not set".into(),
            ));
        }
        r => r?,
    };
    let header = if preamble.channel_index == 0 {
        let (h, bytes) = read_header(&mut reader).map_err(timed)?;
        if h.features.channels != preamble.channel_count {
            return Err(Error::Protocol(format!(
                "header says {} channels, the preamble {}",
                h.features.channels, preamble.channel_count
            )));
        }
        Some((h, bytes))
    } else {
        None
    };
    reader.conn.set_read_timeout(None)?;
    Ok(Arrived {
        reader,
        preamble,
        header,
    })
}

/// The socket accept loop of [`Listener::accept_with`].
fn accept_concurrently(raw: &RawListener, opts: &AcceptOptions) -> Result<Receiver> {
    let (tx, rx) = crossbeam_channel::unbounded::<(u64, Result<Arrived>)>();
    let mut reading: HashMap<u64, Reading> = HashMap::new();
    let mut groups: HashMap<u64, Group> = HashMap::new();
    let mut next_id: u64 = 0;
    loop {
        if let Some(conn) = raw.poll_accept(ACCEPT_SLICE, opts.io_timeout)? {
            let id = next_id;
            next_id += 1;
            let peer = conn.peer_name();
            let closer = conn.aborter();
            let tx = tx.clone();
            let timeout = opts.preamble_timeout;
            let tls = opts.tls.clone();
            let spawned = std::thread::Builder::new()
                .name("mig/accept".into())
                .spawn(move || {
                    // The accept loop may have returned already (the stream it was
                    // waiting for is complete): then this connection just closes.
                    let _ = tx.send((id, read_arrival(conn, timeout, tls.as_ref())));
                });
            match spawned {
                Ok(_) => {
                    debug!(peer = %peer, "migration connection accepted");
                    reading.insert(
                        id,
                        Reading {
                            closer,
                            accepted: Instant::now(),
                            peer,
                        },
                    );
                }
                Err(e) => drop_note(&peer, format!("cannot start its thread: {e}")),
            }
        }
        while let Ok((id, result)) = rx.try_recv() {
            // Not in the table: dropped already (late, or evicted); the connection
            // closes with `result`.
            let Some(r) = reading.remove(&id) else {
                continue;
            };
            let a = match result {
                Ok(a) => a,
                Err(e) => {
                    drop_note(&r.peer, e);
                    continue;
                }
            };
            let p = a.preamble;
            debug!(
                peer = %r.peer,
                channel = p.channel_index,
                channels = p.channel_count,
                session = %format_args!("{:016x}", p.session_id),
                "migration channel arrived"
            );
            let g = groups.entry(p.session_id).or_insert_with(|| Group {
                first: id,
                slots: (0..p.channel_count).map(|_| None).collect(),
                header: None,
                filled: 0,
            });
            if g.slots.len() != usize::from(p.channel_count) {
                drop_note(
                    &r.peer,
                    format!(
                        "claims {} channels, its stream {}",
                        p.channel_count,
                        g.slots.len()
                    ),
                );
                continue;
            }
            let slot = &mut g.slots[usize::from(p.channel_index)];
            if slot.is_some() {
                drop_note(
                    &r.peer,
                    format!("channel {} connected twice", p.channel_index),
                );
                continue;
            }
            *slot = Some(a.reader);
            g.filled += 1;
            if a.header.is_some() {
                g.header = a.header;
            }
            if g.filled == g.slots.len() {
                if let Some(g) = groups.remove(&p.session_id) {
                    if let Some((header, bytes)) = g.header {
                        debug!(
                            channels = g.slots.len(),
                            session = %format_args!("{:016x}", p.session_id),
                            "every channel of the stream connected"
                        );
                        for r in reading.values() {
                            r.closer.close();
                        }
                        return make_receiver(
                            g.slots.into_iter().flatten().collect(),
                            header,
                            bytes,
                            p.session_id,
                        );
                    }
                }
            }
        }
        let now = Instant::now();
        if !opts.preamble_timeout.is_zero() {
            reading.retain(|_, r| {
                let late = now.duration_since(r.accepted) > opts.preamble_timeout;
                if late {
                    r.closer.close();
                    drop_note(
                        &r.peer,
                        format!(
                            "no preamble within {}",
                            crate::fmt_duration(opts.preamble_timeout)
                        ),
                    );
                }
                !late
            });
        }
        while reading.len() + groups.len() > opts.max_pending.max(1) {
            let oldest_reading = reading
                .iter()
                .filter(|(_, r)| now.duration_since(r.accepted) >= EVICTION_GRACE)
                .map(|(&id, _)| id)
                .min();
            let oldest_group = groups.iter().map(|(&sid, g)| (g.first, sid)).min();
            match (oldest_reading, oldest_group) {
                (Some(id), g) if g.is_none_or(|(first, _)| id < first) => {
                    if let Some(r) = reading.remove(&id) {
                        r.closer.close();
                        drop_note(&r.peer, "too many pending connections; this was the oldest");
                    }
                }
                (_, Some((_, sid))) => {
                    if let Some(g) = groups.remove(&sid) {
                        warn!(
                            session = %format_args!("{sid:016x}"),
                            connected_channels = g.filled,
                            channels = g.slots.len(),
                            "incoming migration stream dropped: too many pending connections"
                        );
                    }
                }
                _ => break,
            }
        }
    }
}

/// A whole one-channel stream decoded from memory (see [`decode_bytes`]).
#[derive(Debug)]
pub struct Decoded {
    /// The stream header.
    pub header: StreamHeader,
    /// Guest memory, one vector per RAM block.
    pub memory: Vec<Vec<u8>>,
    /// Device state and iteration ends, in stream order.
    pub events: Vec<Event>,
}

/// Decodes a complete one-channel stream held in memory (e.g. a snapshot file's
/// bytes) into fresh memory. Refuses headers whose RAM exceeds `max_ram_bytes`.
/// The fuzz target drives the decoder through this.
pub fn decode_bytes(stream: &[u8], max_ram_bytes: u64) -> Result<Decoded> {
    let mut source = Some(Conn::Bytes(bytes::Bytes::copy_from_slice(stream)));
    let mut rx = accept_from(|| {
        source
            .take()
            .ok_or_else(|| Error::Protocol("an in-memory stream carries one channel".into()))
    })?;
    let ram_bytes = rx
        .header
        .blocks
        .iter()
        .fold(0u64, |a, b| a.saturating_add(b.size_bytes));
    if ram_bytes > max_ram_bytes {
        return Err(Error::TooLong {
            what: "guest RAM",
            len_bytes: ram_bytes,
            max_bytes: max_ram_bytes,
        });
    }
    let sink = VecSink::for_header(&rx.header);
    let mut events = Vec::new();
    rx.receive(&sink, |e| {
        events.push(e);
        Ok(())
    })?;
    Ok(Decoded {
        header: rx.header.clone(),
        memory: sink.into_blocks(),
        events,
    })
}

/// Accepts the connections of one stream from `next` and reads the header.
fn accept_from(mut next: impl FnMut() -> Result<Conn>) -> Result<Receiver> {
    let mut slots: Vec<Option<RecordReader>> = Vec::new();
    let mut session = None;
    let mut filled = 0;
    loop {
        let conn = next()?;
        let is_file = conn.is_file();
        let mut r = RecordReader::new(conn);
        let mut pb = [0u8; PREAMBLE_BYTES];
        r.read_exact(&mut pb, "preamble")?;
        let p = Preamble::decode(&pb)?;
        match session {
            None => {
                if is_file && p.channel_count != 1 {
                    return Err(Error::Protocol("a file carries exactly one channel".into()));
                }
                session = Some((p.session_id, p.channel_count));
                slots.resize_with(p.channel_count.into(), || None);
            }
            Some((id, count)) if id != p.session_id || count != p.channel_count => {
                return Err(Error::Protocol(
                    "connection from another migration stream".into(),
                ));
            }
            Some(_) => {}
        }
        let slot = &mut slots[usize::from(p.channel_index)];
        if slot.is_some() {
            return Err(Error::Protocol(format!(
                "channel {} connected twice",
                p.channel_index
            )));
        }
        *slot = Some(r);
        filled += 1;
        debug!(
            channel = p.channel_index,
            channels = p.channel_count,
            "migration channel opened"
        );
        if filled == slots.len() {
            break;
        }
    }
    let mut readers: Vec<RecordReader> = slots.into_iter().flatten().collect();
    let (header, bytes) = read_header(&mut readers[0])?;
    let session_id = session.map_or(0, |(id, _)| id);
    make_receiver(readers, header, bytes, session_id)
}

/// Reads and checks the stream header on the control connection; returns it and
/// its record's size in bytes.
fn read_header(control: &mut RecordReader) -> Result<(StreamHeader, usize)> {
    let mut hb = [0u8; RECORD_HEADER_BYTES];
    control.read_exact(&mut hb, "record header")?;
    let h = RecordHeader::decode(&hb)?;
    if h.kind != Kind::Header {
        return Err(Error::Protocol(format!(
            "first record is {:?}, not the stream header",
            h.kind
        )));
    }
    let body = control.read_vec(h.body_len as usize, "stream header")?;
    if checksum::crc32c(&body) != h.body_crc {
        return Err(Error::Checksum {
            what: "stream header",
        });
    }
    let header = StreamHeader::decode_body(&body)?;
    Ok((header, RECORD_HEADER_BYTES + body.len()))
}

/// A receiver for a stream whose every connection arrived (control first).
fn make_receiver(
    readers: Vec<RecordReader>,
    header: StreamHeader,
    header_bytes: usize,
    session_id: u64,
) -> Result<Receiver> {
    if header.features.aead_pages && !matches!(readers[0].conn, Conn::Tls(_)) {
        return Err(Error::Protocol(
            "the header leaves page checksums to TLS, but the stream does not run inside TLS"
                .into(),
        ));
    }
    if usize::from(header.features.channels) != readers.len() {
        return Err(Error::Protocol(format!(
            "header says {} channels, {} connected",
            header.features.channels,
            readers.len()
        )));
    }
    let counters = Arc::new(ByteCounters::new(readers.len()));
    for i in 0..readers.len() {
        counters.add(i, PREAMBLE_BYTES as u64, 0);
    }
    counters.add(0, header_bytes as u64, 0);
    Ok(Receiver {
        header,
        readers,
        counters,
        received: false,
        ended_cleanly: false,
        committed: false,
        switched: false,
        back_writer: None,
        session_id,
    })
}

/// The receiving end of one migration stream.
pub struct Receiver {
    header: StreamHeader,
    readers: Vec<RecordReader>,
    counters: Arc<ByteCounters>,
    received: bool,
    /// Whether `receive` returned `Ok`.
    ended_cleanly: bool,
    /// Whether the sender's `Commit` arrived (always true for `file:`, once asked).
    committed: bool,
    /// Whether the precopy part ended with `Switch` on every connection.
    switched: bool,
    /// The control connection's writing half, shared with page requesters once the
    /// postcopy part began (every answer then goes through it).
    back_writer: Option<Arc<Mutex<Conn>>>,
    /// The preamble's session id (see [`Receiver::session_id`]).
    session_id: u64,
}

struct Shared<'a> {
    header: &'a StreamHeader,
    counters: &'a ByteCounters,
    barrier: IterationBarrier,
    closers: Vec<Closer>,
    first_error: Mutex<Option<Error>>,
    torn: Torn,
    /// The `Discard` runs of a postcopy stream's precopy part, `(block, first, pages)`:
    /// a page torn in flight and then discarded comes again after the switch.
    discarded: Mutex<Vec<(usize, u64, u64)>>,
}

/// Pages that arrived torn (a live page's data checksum did not match) and have not
/// been received intact since. The stream ends cleanly only when this is empty.
#[derive(Default)]
struct Torn {
    pages: Mutex<std::collections::HashSet<(usize, u64)>>,
    count: std::sync::atomic::AtomicUsize,
}

impl Torn {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<(usize, u64)>> {
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `offsets` of `block` torn.
    fn mark(&self, block: usize, offsets: &[u64]) {
        let mut set = self.lock();
        for &o in offsets {
            set.insert((block, o));
        }
        self.count
            .store(set.len(), std::sync::atomic::Ordering::Release);
    }

    /// `offsets` of `block` arrived intact. Free while nothing is torn.
    fn clear(&self, block: usize, offsets: &[u64]) {
        if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        let mut set = self.lock();
        for &o in offsets {
            set.remove(&(block, o));
        }
        self.count
            .store(set.len(), std::sync::atomic::Ordering::Release);
    }

    fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Shared<'_> {
    /// Records the first error and stops every other channel.
    fn fail(&self, e: Error) {
        {
            let mut g = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            if g.is_none() {
                *g = Some(e);
            }
        }
        self.barrier.close("another channel failed");
        for c in &self.closers {
            c.close();
        }
    }
}

impl Receiver {
    /// The stream header (page size, RAM blocks, features).
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Byte counters, readable from any thread at any time.
    pub fn counters(&self) -> Arc<ByteCounters> {
        self.counters.clone()
    }

    /// The session id every connection's preamble carried: a resumed stream
    /// ([`Receiver::is_resumed`]) names the stream it continues with it.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Whether this stream resumes a postcopy stream whose connections broke: it has
    /// no precopy part. Answer with [`Receiver::resume_postcopy`] (or refuse it).
    pub fn is_resumed(&self) -> bool {
        self.header.features.resume
    }

    /// Answers a resumed stream with the pages this side still lacks, `(block index,
    /// runs of (first page, pages))`, and opens its postcopy part: then
    /// [`Receiver::page_requester`], [`Receiver::receive_postcopy`] and
    /// [`Receiver::send_done`] work as after a switch.
    pub fn resume_postcopy(&mut self, missing: &[(usize, Vec<(u64, u64)>)]) -> Result<()> {
        if !self.is_resumed() || self.received {
            return Err(Error::Protocol(
                "only a resumed stream is answered with the missing pages, once".into(),
            ));
        }
        for (block_idx, runs) in missing {
            crate::format::check_runs(&self.header, *block_idx, runs, "missing")?;
            for chunk in runs.chunks(MAX_DISCARD_RUNS as usize) {
                let body = crate::format::encode_runs(*block_idx, chunk);
                self.answer(Kind::Missing, &body)?;
            }
        }
        self.answer(Kind::Ready, &[])?;
        self.received = true;
        self.ended_cleanly = true;
        self.switched = true;
        self.committed = true;
        info!("postcopy: the resumed stream is answered; its postcopy part follows");
        Ok(())
    }

    /// A handle that shuts every connection of this stream down from another thread
    /// (QEMU's `migrate-pause` on the destination): its reads fail at once.
    pub fn abort_handle(&self) -> crate::AbortHandle {
        crate::AbortHandle {
            closers: Arc::new(self.readers.iter().map(|r| r.conn.aborter()).collect()),
            cancel: crate::Cancel::new(),
        }
    }

    /// Receives the whole stream: pages go into `sink`, device state and
    /// iteration ends go to `on_event` (on this thread). Returns `Ok` only after
    /// every channel delivered its end-of-stream record with matching checksums
    /// and record counts. On error the guest memory may hold partial pages; a
    /// stream that did not end cleanly must never be resumed.
    pub fn receive<S, F>(&mut self, sink: &S, mut on_event: F) -> Result<()>
    where
        S: PageSink + ?Sized,
        F: FnMut(Event) -> Result<()>,
    {
        if self.is_resumed() {
            return Err(Error::Protocol(
                "a resumed postcopy stream has no precopy part".into(),
            ));
        }
        if std::mem::replace(&mut self.received, true) {
            return Err(Error::Protocol("the stream was already received".into()));
        }
        let endings = self.run_channels(sink, Some(&mut on_event), Part::Precopy)?;
        if endings.contains(&Ending::Switch) {
            if endings.contains(&Ending::End) {
                return Err(Error::Protocol(
                    "some connections switched to postcopy and others ended".into(),
                ));
            }
            self.switched = true;
            info!("the precopy part ended: the sender switches to postcopy");
        }
        self.ended_cleanly = true;
        Ok(())
    }

    /// Whether the stream's precopy part ended with a switch to postcopy: then the
    /// switch-over ([`Receiver::await_commit`], [`Receiver::send_ack`]) is followed by
    /// [`Receiver::receive_postcopy`].
    pub fn switched_to_postcopy(&self) -> bool {
        self.switched
    }

    /// Receives the postcopy part of a stream, after the switch-over was acknowledged:
    /// pages only, on every connection, until each ends with `End`. Each record's pages
    /// are written to `sink` and then handed to [`PageSink::pages_done`], where a
    /// postcopy sink installs them.
    pub fn receive_postcopy<S: PageSink + ?Sized>(&mut self, sink: &S) -> Result<()> {
        if !self.switched || !self.committed {
            return Err(Error::Protocol(
                "the postcopy part comes after a committed switch to postcopy".into(),
            ));
        }
        self.run_channels(sink, None, Part::Postcopy)?;
        info!("the postcopy part ended on every connection");
        Ok(())
    }

    /// A handle that writes page requests to the sender from any thread (postcopy).
    pub fn page_requester(&mut self) -> Result<PageRequester> {
        Ok(PageRequester {
            conn: self.back_writer()?,
        })
    }

    /// Tells the sender that every page is in memory (postcopy): it may let its copy
    /// of the guest go.
    pub fn send_done(&mut self) -> Result<()> {
        if !self.switched || !self.committed {
            return Err(Error::Protocol(
                "Done belongs to a committed postcopy stream".into(),
            ));
        }
        self.answer(Kind::Done, &[])?;
        info!("postcopy: Done sent");
        Ok(())
    }

    /// The shared writing half of the control connection, made on first use.
    fn back_writer(&mut self) -> Result<Arc<Mutex<Conn>>> {
        if let Some(w) = &self.back_writer {
            return Ok(w.clone());
        }
        let conn = self.readers[0]
            .conn
            .try_clone_writer()?
            .ok_or_else(|| Error::Protocol("this connection has no sender to answer".into()))?;
        let w = Arc::new(Mutex::new(conn));
        self.back_writer = Some(w.clone());
        Ok(w)
    }

    /// Runs every connection's reader (data connections on scoped threads, control
    /// here) until each ends its `part`; the first error stops them all.
    fn run_channels<S: PageSink + ?Sized>(
        &mut self,
        sink: &S,
        events: EventFn<'_>,
        part: Part,
    ) -> Result<Vec<Ending>> {
        let shared = Shared {
            header: &self.header,
            counters: &self.counters,
            barrier: IterationBarrier::new(self.readers.len()),
            closers: self.readers.iter().map(|r| r.conn.closer()).collect(),
            first_error: Mutex::new(None),
            torn: Torn::default(),
            discarded: Mutex::new(Vec::new()),
        };
        let mut endings = vec![Ending::End; self.readers.len()];
        let (control, data) = self.readers.split_at_mut(1);
        std::thread::scope(|s| {
            let shared = &shared;
            let handles: Vec<_> = data
                .iter_mut()
                .enumerate()
                .map(|(i, r)| {
                    s.spawn(
                        move || match run_channel(i + 1, r, sink, shared, None, part) {
                            Ok(e) => Some(e),
                            Err(e) => {
                                shared.fail(e);
                                None
                            }
                        },
                    )
                })
                .collect();
            match run_channel(0, &mut control[0], sink, shared, events, part) {
                Ok(e) => endings[0] = e,
                Err(e) => shared.fail(e),
            }
            for (i, h) in handles.into_iter().enumerate() {
                match h.join() {
                    Ok(Some(e)) => endings[i + 1] = e,
                    Ok(None) => {}
                    Err(_) => shared.fail(Error::Aborted("a channel thread panicked".into())),
                }
            }
        });
        // Pages torn in flight are sent again: in precopy, before the end; in a stream
        // that switches to postcopy, the source discards them (they are dirty) and
        // sends them after the switch.
        let torn = if endings.iter().all(|e| *e == Ending::Switch) {
            let discarded = shared.discarded.lock().unwrap_or_else(|p| p.into_inner());
            shared
                .torn
                .lock()
                .iter()
                .filter(|(b, p)| {
                    !discarded
                        .iter()
                        .any(|&(db, first, n)| db == *b && (first..first + n).contains(p))
                })
                .count()
        } else {
            shared.torn.count()
        };
        match shared
            .first_error
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
        {
            Some(e) => {
                if matches!(e, Error::Checksum { .. }) {
                    warn!(error = %e, "checksum failure: the stream is rejected");
                }
                Err(e)
            }
            None if torn > 0 => {
                warn!(
                    torn_pages = torn,
                    "checksum failure: pages torn in flight were never sent again"
                );
                Err(Error::Checksum {
                    what: "pages torn in flight and never sent again",
                })
            }
            None => Ok(endings),
        }
    }

    fn answer(&mut self, kind: Kind, body: &[u8]) -> Result<()> {
        match &self.back_writer {
            Some(w) => write_back(&mut w.lock().unwrap_or_else(|p| p.into_inner()), kind, body),
            None => write_back(&mut self.readers[0].conn, kind, body),
        }
    }

    /// The switch-over handshake: tells the sender that the stream ended cleanly
    /// and is loaded (`Ready`), then waits for its `Commit`. Call it after
    /// [`Receiver::receive`] returned `Ok` and the device state loaded, and start
    /// the guest only once it returns `Ok`: an error means the sender did not hand
    /// the guest over (it went away, was cancelled, or kept it) and may be running
    /// it. For `file:` there is no sender to ask, and it returns `Ok` at once.
    pub fn await_commit(&mut self) -> Result<()> {
        if !self.ended_cleanly {
            return Err(Error::Protocol(
                "the switch-over comes after a stream that ended cleanly".into(),
            ));
        }
        let control = &mut self.readers[0];
        if !control.conn.is_file() {
            write_back(&mut control.conn, Kind::Ready, &[])?;
            info!("switch-over: Ready sent, waiting for the source's Commit");
            let mut hb = [0u8; RECORD_HEADER_BYTES];
            control
                .read_exact(&mut hb, "the switch-over commit")
                .map_err(|e| match e {
                    Error::Truncated { .. } => Error::Aborted(
                        "the sender closed the stream without handing the guest over".into(),
                    ),
                    e => e,
                })?;
            let h = RecordHeader::decode(&hb)?;
            if h.kind != Kind::Commit {
                return Err(Error::Protocol(format!(
                    "{:?} record where the switch-over commit belongs",
                    h.kind
                )));
            }
            if h.body_len != 0 || h.body_crc != checksum::crc32c(&[]) {
                return Err(Error::Malformed("commit body".into()));
            }
            info!("switch-over: Commit received");
        }
        self.committed = true;
        Ok(())
    }

    /// Acknowledges the switch-over on the control connection (no-op for `file:`):
    /// whether the guest now runs here. Only after [`Receiver::await_commit`].
    pub fn send_ack(&mut self, resumed: bool) -> Result<()> {
        if !self.committed {
            return Err(Error::Protocol(
                "an acknowledgement before the sender's commit".into(),
            ));
        }
        self.answer(Kind::Ack, &[u8::from(resumed)])?;
        info!(resumed, "switch-over: Ack sent");
        Ok(())
    }

    /// Tells the sender the stream was refused, with a message (at most 4 KiB).
    pub fn send_refusal(&mut self, message: &str) -> Result<()> {
        warn!(reason = message, "refusing the stream");
        let mut end = message.len().min(MAX_MESSAGE_BYTES as usize);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.answer(Kind::Refuse, &message.as_bytes()[..end])
    }
}

/// Writes a record to the sender on the control connection (nothing for files).
fn write_back(control: &mut Conn, kind: Kind, body: &[u8]) -> Result<()> {
    if control.is_file() {
        return Ok(());
    }
    write_all(control, &[&encode_record(kind, body)], None)
}

type EventFn<'a> = Option<&'a mut dyn FnMut(Event) -> Result<()>>;

/// Reads one connection's records until the end of its `part`: `End`, or in a
/// postcopy stream's precopy part `Switch`.
fn run_channel<S: PageSink + ?Sized>(
    idx: usize,
    r: &mut RecordReader,
    sink: &S,
    sh: &Shared<'_>,
    mut events: EventFn<'_>,
    part: Part,
) -> Result<Ending> {
    let postcopy_stream = sh.header.features.postcopy;
    let precopy = part == Part::Precopy;
    // The control connection's precopy part counts its Header.
    let mut records: u64 = if idx == 0 && precopy { 1 } else { 0 };
    let mut last_iteration: Option<u64> = None;
    let mut scratch = PageScratch::default();
    loop {
        let mut hb = [0u8; RECORD_HEADER_BYTES];
        r.read_exact(&mut hb, "record header")?;
        let h = RecordHeader::decode(&hb)?;
        match h.kind {
            Kind::Pages => read_pages(idx, r, &h, sink, sh, &mut scratch)?,
            Kind::ZeroPages => read_zero_pages(idx, r, &h, sink, sh, &mut scratch)?,
            Kind::SparsePages => read_sparse_pages(idx, r, &h, sink, sh, &mut scratch)?,
            Kind::DeviceState if idx == 0 && precopy => {
                let body = read_checked(r, &h, "device state")?;
                let len = *body
                    .first()
                    .ok_or_else(|| Error::Malformed("empty device state".into()))?
                    as usize;
                if len == 0 || body.len() < 1 + len {
                    return Err(Error::Malformed("device state name".into()));
                }
                let name = std::str::from_utf8(&body[1..1 + len])
                    .map_err(|_| Error::Malformed("device name is not UTF-8".into()))?
                    .to_string();
                let data = body[1 + len..].to_vec();
                sh.counters.add(
                    idx,
                    (RECORD_HEADER_BYTES + 1 + len) as u64,
                    data.len() as u64,
                );
                if let Some(f) = events.as_mut() {
                    f(Event::DeviceState { name, data })?;
                }
            }
            Kind::Sync if precopy => {
                let iteration = read_u64_body(r, &h, "iteration marker")?;
                if last_iteration.is_some_and(|l| iteration <= l) {
                    return Err(Error::Protocol(format!(
                        "iteration {iteration} after {last_iteration:?}"
                    )));
                }
                sh.counters.add(idx, (RECORD_HEADER_BYTES + 8) as u64, 0);
                sh.barrier.wait(iteration)?;
                last_iteration = Some(iteration);
                if idx == 0 {
                    // Every channel is past this iteration's pages: tell the sender, so
                    // it does not stop the guest while we still have a backlog. A sender
                    // that is gone shows as a cut stream on the next read.
                    let _ = write_back(&mut r.conn, Kind::Applied, &iteration.to_le_bytes());
                }
                if let Some(f) = events.as_mut() {
                    f(Event::IterationEnd { iteration })?;
                }
            }
            Kind::Discard if idx == 0 && precopy && postcopy_stream => {
                let body = read_checked(r, &h, "discard")?;
                let (block_idx, runs) = crate::format::decode_runs(sh.header, &body, "discard")?;
                sh.counters
                    .add(idx, (RECORD_HEADER_BYTES + body.len()) as u64, 0);
                sh.discarded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(runs.iter().map(|&(first, n)| (block_idx, first, n)));
                if let Some(f) = events.as_mut() {
                    f(Event::Discard { block_idx, runs })?;
                }
            }
            Kind::End | Kind::Switch if h.kind == Kind::End || (precopy && postcopy_stream) => {
                let sent = read_u64_body(r, &h, "end of stream")?;
                if sent != records {
                    return Err(Error::Protocol(format!(
                        "channel {idx}: sender wrote {sent} records, {records} arrived"
                    )));
                }
                sh.counters.add(idx, (RECORD_HEADER_BYTES + 8) as u64, 0);
                sh.barrier
                    .close("a channel ended while another waits at an iteration barrier");
                return Ok(if h.kind == Kind::End {
                    Ending::End
                } else {
                    Ending::Switch
                });
            }
            other => {
                return Err(Error::Protocol(format!(
                    "{other:?} record on channel {idx}"
                )))
            }
        }
        records += 1;
    }
}

/// Reads a whole (small, capped) body and checks its CRC before anyone uses it.
fn read_checked(r: &mut RecordReader, h: &RecordHeader, what: &'static str) -> Result<Vec<u8>> {
    let body = r.read_vec(h.body_len as usize, what)?;
    if checksum::crc32c(&body) != h.body_crc {
        return Err(Error::Checksum { what });
    }
    Ok(body)
}

/// Reads a small (capped by the caller) body into `buf` and checks its CRC.
fn read_small_body(
    r: &mut RecordReader,
    h: &RecordHeader,
    buf: &mut Vec<u8>,
    what: &'static str,
) -> Result<()> {
    buf.resize(h.body_len as usize, 0);
    r.read_exact(buf, what)?;
    if checksum::crc32c(buf) != h.body_crc {
        return Err(Error::Checksum { what });
    }
    Ok(())
}

fn read_u64_body(r: &mut RecordReader, h: &RecordHeader, what: &'static str) -> Result<u64> {
    if h.body_len != 8 {
        return Err(Error::Malformed(format!(
            "{what} body of {} bytes",
            h.body_len
        )));
    }
    let mut b = [0u8; 8];
    r.read_exact(&mut b, what)?;
    if checksum::crc32c(&b) != h.body_crc {
        return Err(Error::Checksum { what });
    }
    Ok(u64::from_le_bytes(b))
}

/// Per-channel buffers reused across records.
#[derive(Default)]
struct PageScratch {
    bytes: Vec<u8>,
    crcs: Vec<u8>,
    page_crcs: Vec<u32>,
    pages: Vec<u8>,
    offsets: Vec<u64>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

/// Parses `count` offsets and checks them against the block (and, for page data,
/// that they strictly increase so no two destination slices overlap).
fn parse_offsets(
    raw: &[u8],
    block_idx: usize,
    block_pages: u64,
    increasing: bool,
    out: &mut Vec<u64>,
) -> Result<()> {
    out.clear();
    let mut prev: Option<u64> = None;
    for c in raw.chunks_exact(8) {
        let o = u64_at(c, 0);
        if o >= block_pages {
            return Err(Error::OutOfBounds {
                block_idx: block_idx as u64,
                page_index: o,
            });
        }
        if increasing && prev.is_some_and(|p| o <= p) {
            return Err(Error::Malformed(
                "page offsets do not strictly increase".into(),
            ));
        }
        prev = Some(o);
        out.push(o);
    }
    Ok(())
}

/// Looks up the block of a batch; errors if the index is not in the header.
fn block_of(sh: &Shared<'_>, block_idx: u32) -> Result<(usize, u64)> {
    let idx = block_idx as usize;
    let pages = sh.header.block_pages(idx).ok_or(Error::OutOfBounds {
        block_idx: block_idx.into(),
        page_index: 0,
    })?;
    Ok((idx, pages))
}

fn page_ptr<S: PageSink + ?Sized>(
    sink: &S,
    channel: usize,
    block_idx: usize,
    page_index: u64,
) -> Result<*mut u8> {
    let p = sink.channel_page_ptr(channel, block_idx, page_index);
    if p.is_null() {
        return Err(Error::OutOfBounds {
            block_idx: block_idx as u64,
            page_index,
        });
    }
    Ok(p)
}

/// A page batch: prefix, offsets, then page data read straight into the sink
/// (uncompressed) or decompressed after its checksum checked (zstd). Every checksum
/// of the record is the header's [`PageChecksum`](checksum::PageChecksum).
fn read_pages<S: PageSink + ?Sized>(
    idx: usize,
    r: &mut RecordReader,
    h: &RecordHeader,
    sink: &S,
    sh: &Shared<'_>,
    sc: &mut PageScratch,
) -> Result<()> {
    let page_size = sh.header.page_size as usize;
    let compressed = h.flags & FLAG_ZSTD != 0;
    let live = h.flags & FLAG_LIVE != 0;
    if compressed != (sh.header.features.compression == Compression::Zstd) {
        return Err(Error::Protocol(
            "page batch compression differs from the header".into(),
        ));
    }
    if compressed && live {
        return Err(Error::Malformed(
            "a compressed page batch marked live".into(),
        ));
    }
    let crc_bytes_per_page = if live { 4 } else { 0 };
    let body_len = h.body_len as usize;
    if body_len < 8 {
        return Err(Error::Malformed(
            "page batch shorter than its prefix".into(),
        ));
    }
    let mut pre = [0u8; 8];
    r.read_exact(&mut pre, "page batch")?;
    let (block_idx, block_pages) = block_of(sh, u32_at(&pre, 0))?;
    let count = u32_at(&pre, 4);
    if count == 0 || count > max_batch_pages(sh.header.page_size) {
        return Err(Error::Malformed(format!("page batch of {count} pages")));
    }
    let count = count as usize;
    let offsets_bytes = 8 * count;
    let crc_bytes = crc_bytes_per_page * count;
    let data_bytes = body_len
        .checked_sub(8 + offsets_bytes + crc_bytes)
        .ok_or_else(|| Error::Malformed("page batch shorter than its offsets".into()))?;
    let expected_bytes = count * page_size;
    if (!compressed && data_bytes != expected_bytes) || (compressed && data_bytes == 0) {
        return Err(Error::Malformed(format!(
            "page batch of {count} pages carries {data_bytes} data bytes"
        )));
    }
    sc.bytes.resize(offsets_bytes, 0);
    r.read_exact(&mut sc.bytes, "page offsets")?;
    // Every checksum of this record is the stream's page checksum (CRC32C, or XXH3
    // with FEATURE_XXH3_PAGES); the body's is streamed over prefix, offsets, then
    // the rest, in wire order.
    let sum = sh.header.features.page_checksum;
    // Inside TLS (FEATURE_AEAD_PAGES) the AEAD authenticated the body already.
    let check_body = !sh.header.features.aead_pages;
    let mut body_sum = sum.hasher();
    body_sum.update(&pre);
    body_sum.update(&sc.bytes);
    parse_offsets(&sc.bytes, block_idx, block_pages, true, &mut sc.offsets)?;
    let mut iov: Vec<(*mut u8, usize)> = Vec::with_capacity(count);
    for &o in &sc.offsets {
        iov.push((page_ptr(sink, idx, block_idx, o)?, page_size));
    }
    sink.prepare_pages(block_idx, &sc.offsets, page_size);
    if compressed {
        sc.bytes.resize(data_bytes, 0);
        r.read_exact(&mut sc.bytes, "compressed pages")?;
        body_sum.update(&sc.bytes);
        if check_body && body_sum.finish() != h.body_crc {
            return Err(Error::Checksum { what: "page batch" });
        }
        if sc.zstd.is_none() {
            sc.zstd = Some(
                zstd::bulk::Decompressor::new().map_err(|e| Error::Compression(e.to_string()))?,
            );
        }
        let dec = sc
            .zstd
            .as_mut()
            .ok_or_else(|| Error::Compression("no decompressor".into()))?;
        sc.pages.clear();
        sc.pages.reserve(expected_bytes);
        let n = dec
            .decompress_to_buffer(&sc.bytes, &mut sc.pages)
            .map_err(|e| Error::Compression(e.to_string()))?;
        if n != expected_bytes || sc.pages.len() != expected_bytes {
            return Err(Error::Compression(format!(
                "batch decompressed to {n} bytes, expected {expected_bytes}"
            )));
        }
        for (&(p, len), src) in iov.iter().zip(sc.pages.chunks_exact(page_size)) {
            // SAFETY: `p` is valid for `len == page_size` bytes of writes per the
            // PageSink contract (bounds checked above); `src` is our own buffer.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, len) };
        }
    } else if live {
        sc.crcs.resize(crc_bytes, 0);
        r.read_exact(&mut sc.crcs, "page checksums")?;
        body_sum.update(&sc.crcs);
        if check_body && body_sum.finish() != h.body_crc {
            return Err(Error::Checksum {
                what: "page batch offsets",
            });
        }
        // Each page's checksum is computed as its bytes land, while they are in
        // cache: read back after the whole batch, they come from memory (the kernel's
        // copy of a large read does not keep them cached). A page that lands in one
        // piece (the common case) is hashed in one go; one that lands in several is
        // streamed (pieces come in page order).
        sc.page_crcs.clear();
        sc.page_crcs.resize(count, 0);
        let page_crcs = &mut sc.page_crcs;
        let mut piecewise = sum.hasher();
        let (mut cur, mut filled) = (usize::MAX, 0usize);
        // SAFETY: as below: distinct pages of the sink, valid for writes.
        unsafe {
            r.read_exact_raw(
                &iov,
                |i, b| {
                    if b.len() == page_size {
                        page_crcs[i] = sum.of(b);
                        return;
                    }
                    if i != cur {
                        piecewise.reset();
                        (cur, filled) = (i, 0);
                    }
                    piecewise.update(b);
                    filled += b.len();
                    if filled == page_size {
                        page_crcs[i] = piecewise.finish();
                    }
                },
                "page data",
            )?
        };
        for (i, (&got, &o)) in sc.page_crcs.iter().zip(&sc.offsets).enumerate() {
            let one = [o];
            if got == u32_at(&sc.crcs, 4 * i) {
                sh.torn.clear(block_idx, &one);
            } else {
                // The guest wrote this page while it was sent: it must come again.
                sh.torn.mark(block_idx, &one);
            }
        }
    } else if check_body {
        // SAFETY: each `(p, page_size)` is a distinct page of the sink (offsets
        // strictly increase), valid for writes per the PageSink contract, and
        // never our buffer.
        unsafe { r.read_exact_raw(&iov, |_, b| body_sum.update(b), "page data")? };
        if body_sum.finish() != h.body_crc {
            return Err(Error::Checksum { what: "page batch" });
        }
    } else {
        // SAFETY: as above.
        unsafe { r.read_exact_raw(&iov, |_, _| {}, "page data")? };
    }
    if !live {
        sh.torn.clear(block_idx, &sc.offsets);
    }
    sink.pages_done(idx, block_idx, &sc.offsets, page_size)
        .map_err(Error::Sink)?;
    sh.counters.add(
        idx,
        (RECORD_HEADER_BYTES + 8 + offsets_bytes + crc_bytes) as u64,
        data_bytes as u64,
    );
    sh.counters.add_pages(count as u64, 0);
    Ok(())
}

/// Zero pages: the whole (small) record is checked before any page is touched.
fn read_zero_pages<S: PageSink + ?Sized>(
    idx: usize,
    r: &mut RecordReader,
    h: &RecordHeader,
    sink: &S,
    sh: &Shared<'_>,
    sc: &mut PageScratch,
) -> Result<()> {
    let body_len = h.body_len as usize;
    if body_len < 8 || (body_len - 8) & 7 != 0 || (body_len - 8) / 8 > MAX_ZERO_BATCH_PAGES as usize
    {
        return Err(Error::Malformed(format!(
            "zero-page record of {body_len} bytes"
        )));
    }
    read_small_body(r, h, &mut sc.bytes, "zero pages")?;
    let (block_idx, block_pages) = block_of(sh, u32_at(&sc.bytes, 0))?;
    let count = u32_at(&sc.bytes, 4) as usize;
    if count == 0 || count * 8 != body_len - 8 {
        return Err(Error::Malformed(format!("zero-page count {count}")));
    }
    parse_offsets(
        &sc.bytes[8..],
        block_idx,
        block_pages,
        false,
        &mut sc.offsets,
    )?;
    let page_size = sh.header.page_size as usize;
    for &o in &sc.offsets {
        page_ptr(sink, idx, block_idx, o)?;
        sink.zero_page(block_idx, o, page_size);
    }
    sink.pages_done(idx, block_idx, &sc.offsets, page_size)
        .map_err(Error::Sink)?;
    sh.torn.clear(block_idx, &sc.offsets);
    sh.counters
        .add(idx, (RECORD_HEADER_BYTES + body_len) as u64, 0);
    sh.counters.add_pages(0, count as u64);
    Ok(())
}

/// Sparse pages: the whole (small, capped) record is checked (CRC, offsets, counts,
/// word indices) before any page is touched; then each page is zeroed and its words
/// stored.
fn read_sparse_pages<S: PageSink + ?Sized>(
    idx: usize,
    r: &mut RecordReader,
    h: &RecordHeader,
    sink: &S,
    sh: &Shared<'_>,
    sc: &mut PageScratch,
) -> Result<()> {
    if !sh.header.features.sparse_pages {
        return Err(Error::Protocol(
            "sparse pages in a stream that did not declare them".into(),
        ));
    }
    let body_len = h.body_len as usize;
    if !(8..=sparse::MAX_SPARSE_BODY_BYTES).contains(&body_len) {
        return Err(Error::Malformed(format!(
            "sparse-page record of {body_len} bytes"
        )));
    }
    read_small_body(r, h, &mut sc.bytes, "sparse pages")?;
    let (block_idx, block_pages) = block_of(sh, u32_at(&sc.bytes, 0))?;
    let count = u32_at(&sc.bytes, 4) as usize;
    if count == 0 || count > MAX_BATCH_PAGES as usize || body_len - 8 < count * 8 {
        return Err(Error::Malformed(format!("sparse-page count {count}")));
    }
    let page_size = sh.header.page_size as usize;
    let rest = &sc.bytes[8..];
    parse_offsets(
        &rest[..count * 8],
        block_idx,
        block_pages,
        true,
        &mut sc.offsets,
    )?;
    let mut pages = Vec::with_capacity(count);
    sparse::parse_pages(rest, count, page_size, &mut pages).map_err(Error::Malformed)?;
    let ptrs = sc
        .offsets
        .iter()
        .map(|&o| page_ptr(sink, idx, block_idx, o))
        .collect::<Result<Vec<_>>>()?;
    for (p, page) in ptrs.into_iter().zip(&pages) {
        // SAFETY: per the PageSink contract `p` is valid for `page_size` bytes of
        // writes and nobody else touches it during the receive; offsets strictly
        // increase, so no two pages of the record alias.
        let dst = unsafe { std::slice::from_raw_parts_mut(p, page_size) };
        sparse::apply(dst, page);
    }
    sink.pages_done(idx, block_idx, &sc.offsets, page_size)
        .map_err(Error::Sink)?;
    sh.torn.clear(block_idx, &sc.offsets);
    let entry_bytes = (body_len - 8 - count * 10) as u64;
    sh.counters.add(
        idx,
        (RECORD_HEADER_BYTES + body_len) as u64 - entry_bytes,
        entry_bytes,
    );
    sh.counters.add_pages(count as u64, 0);
    Ok(())
}
