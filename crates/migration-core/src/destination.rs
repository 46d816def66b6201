//! The precopy destination: accept the stream, write pages into guest memory, and only
//! after a clean end of stream load the device state, offer the switch-over, and once
//! the source commits, resume and acknowledge.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use dirty_sync::PAGE_SIZE;
use stats::{MigStats, MigrationStatus};
use tracing::{debug, error, info, info_span, warn};
use transport::{Event, Listener, PageSink, Uri};

use crate::guest::{GuestRam, MigratableVm};

mod postcopy;
use crate::runstate::{RunControl, RunState};
use crate::source::RUN_STATE_DEVICE;
use crate::{Error, Result};

/// What the destination saw, for reports and tests.
#[derive(Clone, Debug, Default)]
pub struct IncomingReport {
    /// Iterations the stream carried.
    pub iterations: u64,
    /// Bytes received on all channels.
    pub received_bytes: u64,
    /// Stream start (accept) to guest resumed, ms.
    pub total_ms: u64,
    /// Device state bytes loaded.
    pub device_state_bytes: u64,
    /// Digest of guest RAM taken after loading and before resuming (with `verify`).
    pub ram_digest: Option<u64>,
    /// How long taking [`IncomingReport::ram_digest`] held the guest paused, µs
    /// (after the acknowledgement, so outside the source's downtime).
    pub ram_digest_us: Option<u64>,
    /// Whether the guest was resumed (false: autostart was off or the source's guest
    /// was paused; it waits for `cont`).
    pub resumed: bool,
}

/// How a destination finishes a migration.
#[derive(Clone, Default)]
pub struct IncomingOptions {
    /// Take a digest of RAM as it was at the switch-over, before the guest runs here
    /// (tests and the demo). It is taken after the acknowledgement, so it does not
    /// add to the downtime the source measures: the guest stays paused for the
    /// digest's time ([`IncomingReport::ram_digest_us`]) and is resumed after it.
    /// The acknowledgement then says whether the guest *will* be resumed.
    pub verify: bool,
    /// The guest's run state, shared with the VMM's monitor; it must be in
    /// inmigrate. After the commit it starts the guest if its autostart is on (QEMU's
    /// default) and the source's guest was running, else holds it paused for `cont`
    /// (QEMU's `-S`). Either way the source is told the migration succeeded. `None`:
    /// a run state of its own, with autostart on.
    pub run: Option<Arc<RunControl>>,
    /// How incoming connections are taken: preamble timeout, most pending
    /// connections, liveness of the source.
    pub accept: transport::AcceptOptions,
}

/// A destination waiting for, or receiving, a migration.
pub struct Incoming {
    stats: Arc<MigStats>,
    uri: Uri,
    control: IncomingControl,
    thread: Option<JoinHandle<Result<IncomingReport>>>,
}

/// What the owner of a destination may do while it receives, from any thread: pause a
/// postcopy migration, and recover a paused one on a new address (QEMU's
/// `migrate-pause` and `migrate-recover`). Cheap to clone.
#[derive(Clone)]
pub struct IncomingControl {
    stats: Arc<MigStats>,
    recovery: Arc<Recovery>,
}

/// Shared by an [`IncomingControl`] and the incoming thread.
struct Recovery {
    /// Recovery listeners handed to the thread (at most one pending).
    listeners: (
        crossbeam_channel::Sender<Listener>,
        crossbeam_channel::Receiver<Listener>,
    ),
    /// `migrate-recover` was asked and has not ended yet.
    pending: std::sync::atomic::AtomicBool,
    /// Shuts the current postcopy stream's connections down; with `true`, a
    /// `migrate-pause` came while no stream was being received (between the commit
    /// and the first receive, or during a recovery) and the next stream is shut
    /// down as soon as it is set.
    stream: std::sync::Mutex<(Option<transport::AbortHandle>, bool)>,
}

impl Recovery {
    fn new() -> Arc<Self> {
        Arc::new(Recovery {
            listeners: crossbeam_channel::bounded(1),
            pending: std::sync::atomic::AtomicBool::new(false),
            stream: std::sync::Mutex::new((None, false)),
        })
    }

    fn set_stream(&self, abort: Option<transport::AbortHandle>) {
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = &abort {
            if std::mem::take(&mut stream.1) {
                info!("postcopy: paused by the user");
                a.abort();
            }
        }
        stream.0 = abort;
    }
}

impl IncomingControl {
    /// QEMU's `migrate-recover`: listens on `uri` for the source's `migrate` with
    /// `resume`, which continues a paused postcopy migration; returns the address to
    /// give the source (the real port for `tcp:HOST:0`). Only in postcopy-paused; the
    /// status stays there until the source connects.
    pub fn recover(&self, uri: &str) -> Result<Uri> {
        use std::sync::atomic::Ordering;
        if self.stats.status() != MigrationStatus::PostcopyPaused {
            return Err(Error::InvalidParameter(
                "Migrate recover can only be run when postcopy is paused.".into(),
            ));
        }
        if self.recovery.pending.swap(true, Ordering::AcqRel) {
            return Err(Error::Busy("Migrate recovery is triggered already".into()));
        }
        let bound = (|| -> Result<(Listener, Uri)> {
            let uri: Uri = uri
                .parse()
                .map_err(|e: transport::Error| Error::InvalidParameter(e.to_string()))?;
            let listener = Listener::bind(&uri)?;
            let local = listener.local_uri()?;
            Ok((listener, local))
        })();
        match bound {
            Ok((listener, local)) => {
                info!(uri = %local, "postcopy: listening for the source to resume");
                // The thread waits on the other end for as long as postcopy is paused.
                let _ = self.recovery.listeners.0.try_send(listener);
                Ok(local)
            }
            Err(e) => {
                self.recovery.pending.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// QEMU's `migrate-pause` on the destination: shuts the postcopy stream down, so
    /// the migration pauses (and waits for `migrate-recover`).
    pub fn pause(&self) -> Result<()> {
        let s = self.stats.status();
        let mut stream = self
            .recovery
            .stream
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match (&mut *stream, s) {
            (
                (Some(abort), _),
                MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover,
            ) => {
                info!("postcopy: paused by the user");
                abort.abort();
                Ok(())
            }
            // Committed, the stream not (or no more) being received: it pauses as
            // soon as it is.
            (
                (None, pending),
                MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover,
            ) => {
                *pending = true;
                Ok(())
            }
            _ => Err(Error::InvalidParameter(
                "migrate-pause is currently only supported during postcopy-active or \
                 postcopy-recover state"
                    .into(),
            )),
        }
    }
}

impl Incoming {
    /// Pause and recovery of this destination, from any thread.
    pub fn control(&self) -> IncomingControl {
        self.control.clone()
    }

    /// The URI the source should use (the real port for `tcp:HOST:0`).
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// Status: setup (listening), active (receiving), completed or failed.
    pub fn stats(&self) -> &Arc<MigStats> {
        &self.stats
    }

    /// Waits for the end of the incoming migration.
    pub fn wait(mut self) -> Result<IncomingReport> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(Error::Guest("the incoming thread panicked".into())),
        }
    }
}

/// Guest RAM as the receiver's page sink.
struct RamSink<'a> {
    ram: &'a GuestRam,
}

// SAFETY: page_ptr returns a pointer inside the block's mapping (bounds-checked here,
// null otherwise), pages do not overlap, and the destination guest does not run while
// the stream is received (it is resumed only after `receive` returned).
unsafe impl PageSink for RamSink<'_> {
    fn page_ptr(&self, block_idx: usize, page_index: u64) -> *mut u8 {
        match self.ram.blocks().get(block_idx) {
            Some(b) if page_index < b.pages() => b
                .memory
                .range_ptr(page_index * PAGE_SIZE, PAGE_SIZE)
                .unwrap_or(std::ptr::null_mut()),
            _ => std::ptr::null_mut(),
        }
    }

    /// Maps each run of consecutive pages with one `MADV_POPULATE_WRITE` before the
    /// receiver writes them: a fresh destination's RAM is mapped lazily, and a page
    /// fault per incoming page cost ~20 % of a raw socket copy's speed here. Pages
    /// already mapped stay as they are; a kernel without the advice (before 5.14)
    /// refuses it and the pages fault in as before.
    fn prepare_pages(&self, block_idx: usize, offsets: &[u64], page_size: usize) {
        let Some(b) = self.ram.blocks().get(block_idx) else {
            return;
        };
        if page_size as u64 != PAGE_SIZE {
            return;
        }
        for (first, n) in crate::guest::page_runs(offsets.iter().copied()) {
            if first + n > b.pages() {
                continue;
            }
            let Some(ptr) = b.memory.range_ptr(first * PAGE_SIZE, n * PAGE_SIZE) else {
                continue;
            };
            // SAFETY: [first, first + n) pages lie inside the block's live mapping
            // (checked just above); populating a range maps in the pages that are not
            // (zero-filled, or from their backing) and changes no byte of any page.
            unsafe {
                libc::madvise(
                    ptr.cast(),
                    n as usize * page_size,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
}

/// Binds `uri` and receives one migration into `vm` on a thread (`mig/dst`).
///
/// The guest is resumed only when the stream ended cleanly on every channel, matched
/// the guest's RAM blocks, and its device state loaded. With `verify`, a digest of RAM
/// is taken before resuming, after the acknowledgement (see [`IncomingOptions::verify`]).
pub fn incoming(vm: Arc<dyn MigratableVm>, uri: &str, verify: bool) -> Result<Incoming> {
    incoming_with(
        vm,
        uri,
        IncomingOptions {
            verify,
            ..Default::default()
        },
    )
}

/// Like [`incoming`], with every option.
pub fn incoming_with(
    vm: Arc<dyn MigratableVm>,
    uri: &str,
    opts: IncomingOptions,
) -> Result<Incoming> {
    let uri: Uri = uri
        .parse()
        .map_err(|e: transport::Error| Error::InvalidParameter(e.to_string()))?;
    let run = match &opts.run {
        Some(run) => {
            if run.state() != RunState::Inmigrate {
                return Err(Error::Busy(format!(
                    "the guest is {}, not waiting for an incoming migration",
                    run.state().name()
                )));
            }
            run.clone()
        }
        None => RunControl::incoming(vm.clone(), true),
    };
    let listener = Listener::bind(&uri)?;
    let local = listener.local_uri()?;
    // Made here, so it nests under the caller's span; entered on the thread.
    let span = info_span!(
        "incoming",
        uri = %local,
        channels = tracing::field::Empty
    );
    span.in_scope(|| info!("listening for an incoming migration"));
    let stats = Arc::new(MigStats::new());
    stats.set_incoming(socket_address(&local));
    stats.set_status(MigrationStatus::Setup);
    let st = stats.clone();
    let recovery = Recovery::new();
    let control = IncomingControl {
        stats: stats.clone(),
        recovery: recovery.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("mig/dst".into())
        .spawn(move || {
            let _entered = span.enter();
            // A panic (the engine's, or the VMM's `load_device_state`) ends this side
            // `failed` like any error: the connection drops, so a source that had not
            // committed resumes its guest; this side never started one.
            let r = catch_unwind(AssertUnwindSafe(|| {
                receive(vm, &run, listener, &st, &opts, &recovery)
            }))
            .unwrap_or_else(|p| Err(Error::panicked("the incoming thread", &*p)));
            st.total_time_ms
                .store(st.elapsed_ms(), std::sync::atomic::Ordering::Relaxed);
            match &r {
                Ok(report) => {
                    info!(
                        total_ms = report.total_ms,
                        received_bytes = report.received_bytes,
                        iterations = report.iterations,
                        resumed = report.resumed,
                        "incoming migration completed"
                    );
                    st.set_status(MigrationStatus::Completed)
                }
                Err(e) => {
                    error!(error = %e, "incoming migration failed");
                    st.set_error(e.to_string());
                    st.set_status(MigrationStatus::Failed);
                }
            }
            r
        })
        .map_err(|e| Error::Guest(format!("cannot start the incoming thread: {e}")))?;
    Ok(Incoming {
        stats,
        uri: local,
        control,
        thread: Some(thread),
    })
}

/// QEMU's `socket-address` of a listening URI (None for `mem:` and `file:`).
fn socket_address(uri: &Uri) -> Option<stats::SocketAddress> {
    match uri {
        Uri::Tcp { host, port } => Some(stats::SocketAddress::Inet {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: port.to_string(),
        }),
        Uri::Unix(path) => Some(stats::SocketAddress::Unix {
            path: path.display().to_string(),
        }),
        Uri::File(_) | Uri::Mem(_) => None,
    }
}

fn receive(
    vm: Arc<dyn MigratableVm>,
    run: &RunControl,
    listener: Listener,
    stats: &MigStats,
    opts: &IncomingOptions,
    recovery: &Recovery,
) -> Result<IncomingReport> {
    let mut rx = listener.accept_with(&opts.accept)?;
    let start = Instant::now();
    stats.set_status(MigrationStatus::Active);
    let ram = GuestRam::new(vm.clone());
    let header = rx.header().clone();
    tracing::Span::current().record("channels", header.features.channels);
    info!(
        channels = header.features.channels,
        ram_bytes = header.blocks.iter().map(|b| b.size_bytes).sum::<u64>(),
        "incoming stream accepted"
    );
    let checked = check_blocks(&ram, &header).and_then(|()| {
        if rx.is_resumed() {
            Err(Error::Incompatible(
                "a resumed postcopy stream, but no postcopy migration is paused here".into(),
            ))
        } else {
            Ok(())
        }
    });
    if let Err(e) = checked {
        refuse(&mut rx, &e);
        return Err(e);
    }
    let mut report = IncomingReport::default();
    let mut device_state: Option<Vec<u8>> = None;
    let mut discards: Vec<(usize, Vec<(u64, u64)>)> = Vec::new();
    // A stream without the record comes from a source whose guest ran.
    let mut source_was_running = true;
    let sink = RamSink { ram: &ram };
    rx.receive(&sink, |ev| {
        match ev {
            Event::DeviceState { name, data } if name == "vcpus" => device_state = Some(data),
            Event::DeviceState { name, data } if name == RUN_STATE_DEVICE => {
                source_was_running = match data.as_slice() {
                    b"running" => true,
                    b"paused" => false,
                    other => {
                        return Err(transport::Error::Protocol(format!(
                            "unknown source run state {:?}",
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
            }
            Event::DeviceState { name, .. } => {
                return Err(transport::Error::Protocol(format!(
                    "unknown device state {name:?}"
                )))
            }
            Event::IterationEnd { iteration } => report.iterations = iteration,
            Event::Discard { block_idx, runs } => discards.push((block_idx, runs)),
        }
        Ok(())
    })?;
    let counters = rx.counters();
    report.received_bytes = counters.total_bytes();
    info!(
        received_bytes = report.received_bytes,
        iterations = report.iterations,
        "stream received and ended cleanly"
    );
    stats
        .transferred_bytes
        .store(report.received_bytes, std::sync::atomic::Ordering::Relaxed);
    if rx.switched_to_postcopy() {
        let switch = Switch {
            device_state,
            source_was_running,
            discards,
            start,
        };
        return postcopy::receive(&vm, run, rx, stats, opts, switch, report, recovery);
    }
    let result = (|| -> Result<()> {
        load_and_offer(&vm, &mut rx, device_state, source_was_running, &mut report)?;
        if !opts.verify {
            report.resumed = run.finish_incoming(source_was_running)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        refuse(&mut rx, &e);
        return Err(e);
    }
    // The guest is ours from the commit on: a lost acknowledgement leaves the source
    // paused and in doubt, never this side failed.
    if !opts.verify {
        ack(&mut rx, report.resumed);
        report.total_ms = start.elapsed().as_millis() as u64;
        return Ok(report);
    }
    // Verify: acknowledge first (what the guest's downtime would be without the
    // check), then digest RAM while the guest is still paused (nothing has written it
    // since the end of the stream), then start it. A failure to start it now is
    // this side's alone: the source already let go and stays paused.
    ack(&mut rx, run.autostart() && source_was_running);
    let digest_start = Instant::now();
    report.ram_digest = Some(ram_digest(&ram));
    report.ram_digest_us = Some(digest_start.elapsed().as_micros() as u64);
    report.resumed = run.finish_incoming(source_was_running)?;
    report.total_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

/// What the precopy part of a stream that switched to postcopy left for the switch.
struct Switch {
    device_state: Option<Vec<u8>>,
    source_was_running: bool,
    discards: Vec<(usize, Vec<(u64, u64)>)>,
    start: Instant,
}

/// Loads the device state and offers the switch-over; the guest starts nothing
/// unless the source commits.
fn load_and_offer(
    vm: &Arc<dyn MigratableVm>,
    rx: &mut transport::Receiver,
    device_state: Option<Vec<u8>>,
    source_was_running: bool,
    report: &mut IncomingReport,
) -> Result<()> {
    let state = device_state
        .ok_or_else(|| Error::Incompatible("the stream carried no device state".into()))?;
    report.device_state_bytes = state.len() as u64;
    vm.load_device_state(&state)
        .map_err(|e| Error::Guest(format!("loading device state: {e}")))?;
    info!(
        device_state_bytes = report.device_state_bytes,
        source_was_running, "device state loaded"
    );
    rx.await_commit()?;
    Ok(())
}

/// Tells the source why this side refuses the stream. Best effort: the source may
/// be gone already (then it fails on its own), and this side fails either way.
fn refuse(rx: &mut transport::Receiver, e: &Error) {
    if let Err(se) = rx.send_refusal(&e.to_string()) {
        debug!(error = %se, "the refusal could not be sent to the source");
    }
}

/// Acknowledges the switch-over. A lost acknowledgement does not fail this side (the
/// guest is ours from the commit on); the source then stays paused and in doubt.
fn ack(rx: &mut transport::Receiver, resumed: bool) {
    if let Err(e) = rx.send_ack(resumed) {
        warn!(
            error = %e,
            "the switch-over acknowledgement could not be sent: the source stays paused, in doubt"
        );
    }
}

fn check_blocks(ram: &GuestRam, header: &transport::StreamHeader) -> Result<()> {
    if u64::from(header.page_size) != PAGE_SIZE {
        return Err(Error::Incompatible(format!(
            "page size {} (this guest uses {PAGE_SIZE})",
            header.page_size
        )));
    }
    let ours = ram.blocks();
    let same = ours.len() == header.blocks.len()
        && ours
            .iter()
            .zip(&header.blocks)
            .all(|(a, b)| a.id == b.id && a.size_bytes == b.size_bytes);
    if !same {
        let fmt = |v: Vec<(String, u64)>| {
            v.iter()
                .map(|(id, sz)| format!("{id}:{sz}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        return Err(Error::Incompatible(format!(
            "RAM blocks differ: stream [{}], guest [{}]",
            fmt(header
                .blocks
                .iter()
                .map(|b| (b.id.clone(), b.size_bytes))
                .collect()),
            fmt(ours.iter().map(|b| (b.id.clone(), b.size_bytes)).collect())
        )));
    }
    Ok(())
}

/// One non-zero page's share of [`ram_digest`]: its content hash seeded by its global
/// page number, so the digest is a sum that can be taken a page at a time.
pub(crate) fn page_digest(page: &[u8], global_page: u64) -> u64 {
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(page, global_page);
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// A 64-bit digest of every non-zero page of guest RAM and its index, so two guests
/// with equal memory have equal digests. Pages the host never mapped are skipped
/// without being read when RAM is private anonymous memory.
pub fn ram_digest(ram: &GuestRam) -> u64 {
    let mut digest = 0u64;
    let anon = ram.vm().untouched_ram_is_zero();
    for (bi, b) in ram.blocks().iter().enumerate() {
        let touched = anon.then(|| {
            let bm = dirty_sync::DirtyBitmap::new(b.first_page + b.pages());
            // Without the page map every page is read: slower, the same digest.
            crate::guest::mark_touched_pages(b, &bm).ok().map(|_| bm)
        });
        for p in 0..b.pages() {
            if let Some(Some(bm)) = &touched {
                if !bm.is_set(b.first_page + p) {
                    continue;
                }
            }
            let Some(page) = ram.page(bi, p) else {
                continue;
            };
            // SAFETY: a digest is taken of a paused guest (query-ram-digest refuses a
            // running one; the tests call it after the migration), and a torn page would
            // only make the digest differ, which the caller reports.
            let page = unsafe { page.as_bytes() };
            if transport::is_zero(page) {
                continue;
            }
            // Order-independent combination of (global page, content hash).
            digest = digest.wrapping_add(page_digest(page, b.first_page + p));
        }
    }
    digest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::mark_touched_pages;
    use crate::testing::TestVm;
    use dirty_sync::DirtyBitmap;

    /// A guest whose one RAM block is 64 pages of fresh (lazily mapped) memory.
    fn lazy_vm() -> Arc<TestVm> {
        TestVm::new(64 * PAGE_SIZE)
    }

    #[test]
    fn prepare_pages_maps_the_runs_and_changes_no_byte() {
        let vm = lazy_vm();
        assert!(vm.mem.write_volatile(3 * PAGE_SIZE + 5, &[0xab]));
        let ram = GuestRam::new(vm.clone());
        let sink = RamSink { ram: &ram };
        let present = || {
            let b = DirtyBitmap::new(64);
            mark_touched_pages(&ram.blocks()[0], &b).unwrap();
            b.iter_set().collect::<Vec<u64>>()
        };
        assert_eq!(present(), vec![3]);
        // Two runs and a page past the block (ignored), and a wrong block.
        sink.prepare_pages(0, &[2, 3, 4, 10, 11, 64], PAGE_SIZE as usize);
        sink.prepare_pages(1, &[20], PAGE_SIZE as usize);
        assert_eq!(present(), vec![2, 3, 4, 10, 11]);
        let mut bytes = vec![0u8; 64 * PAGE_SIZE as usize];
        assert!(vm.mem.read_volatile(0, &mut bytes));
        let nonzero: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i] != 0).collect();
        assert_eq!(nonzero, vec![3 * PAGE_SIZE as usize + 5]);
    }
}
