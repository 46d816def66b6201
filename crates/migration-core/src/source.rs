//! The precopy source: setup, iterate, converge, stop-and-copy, on its own thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver as ChanReceiver;
use dirty_sync::{AddressSpace, DirtyBitmap, DirtyReason, BITS_PER_WORD, PAGE_SIZE};
use stats::{MigStats, MigrationInfo, MigrationStatus};
use tracing::{debug, error, info, info_span, warn};
use transport::{
    is_zero, BlockInfo, Compression, PageClass, SendOptions, Sender, SparseBatch, Uri,
};

use crate::guest::{mark_touched_pages, GuestRam, MigratableVm};
use crate::params::{
    Capabilities, Capability, CompressionParam, MigrationParameters, ParametersUpdate,
};
use crate::rates::{
    predict_convergence, AutoConverge, BandwidthEstimator, DirtyGrowth, DirtyRatePeriod, PassCost,
    SendWindow,
};
use crate::runstate::{MigrationEvent, RunControl, RunState, SwitchoverEnd};
use crate::{Error, Result};

/// How often the progress numbers (mbps, pages-per-second, bandwidth) are refreshed.
const TICK_MS: u64 = 100;
/// How often the sending thread looks at the clock: the dirty-rate period closes at
/// most this late, so a 1 s window is measured to within 1 %.
const POLL_MS: u64 = 10;
/// Pages a worker claims at a time (two bitmap words).
const CHUNK_WORDS: usize = 2;
/// Whole pages per record: 128 (512 KiB) are read, checksummed and handed to the
/// socket while they are still in L2; a 4 MiB batch would be read from memory twice.
/// Zero and sparse pages, a few bytes each, fill batches up to the wire's cap.
const SEND_BATCH_PAGES: usize = 128;
/// Most threads the final pass reads pages with.
const MAX_FINAL_PASS_WORKERS: usize = 8;
/// A wait for the destination to catch up longer than this is followed by a sync,
/// to count what the guest dirtied meanwhile before switching over.
const CATCH_UP_MS: u64 = 10;
/// The device-state record that carries the source's run state at the switch-over
/// (QEMU's `globalstate` section): `running` or `paused`.
pub(crate) const RUN_STATE_DEVICE: &str = "runstate";

/// Parameters that may change while a migration runs.
#[derive(Debug)]
struct LiveParams {
    max_bandwidth: AtomicU64,
    downtime_limit_ms: AtomicU64,
    avail_switchover_bandwidth: AtomicU64,
}

struct Shared {
    params: Mutex<MigrationParameters>,
    caps: Mutex<Capabilities>,
    live: Arc<LiveParams>,
    stats: RwLock<Arc<MigStats>>,
    cancel: Mutex<Arc<AtomicBool>>,
    /// The running migration's transport token: `cancel` fires it, which ends a
    /// connect or a rate-limiter sleep at once.
    cancel_token: Mutex<transport::Cancel>,
    /// Aborts the running migration's connections (set once connected).
    abort: Mutex<Option<transport::AbortHandle>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The source side of migrations of one VM (QEMU's MigrationState): parameters,
/// capabilities, and at most one migration at a time, running on its own thread.
pub struct MigrationSource {
    vm: Arc<dyn MigratableVm>,
    run: Arc<RunControl>,
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MigrationSource {
    /// A source for `vm`, whose vCPUs run, with QEMU's default parameters.
    pub fn new(vm: Arc<dyn MigratableVm>) -> Self {
        Self::with_run_control(RunControl::running(vm))
    }

    /// A source for the guest of `run`, the run state the VMM's monitor shares (its
    /// `stop` and `cont` go through the same [`RunControl`]).
    pub fn with_run_control(run: Arc<RunControl>) -> Self {
        let vm = run.vm().clone();
        let params = MigrationParameters::default();
        let live = Arc::new(LiveParams {
            max_bandwidth: AtomicU64::new(params.max_bandwidth),
            downtime_limit_ms: AtomicU64::new(params.downtime_limit),
            avail_switchover_bandwidth: AtomicU64::new(params.avail_switchover_bandwidth),
        });
        MigrationSource {
            vm,
            run,
            shared: Arc::new(Shared {
                params: Mutex::new(params),
                caps: Mutex::new(Capabilities::default()),
                live,
                stats: RwLock::new(Arc::new(MigStats::new())),
                cancel: Mutex::new(Arc::new(AtomicBool::new(false))),
                cancel_token: Mutex::new(transport::Cancel::new()),
                abort: Mutex::new(None),
                thread: Mutex::new(None),
            }),
        }
    }

    /// The current parameters.
    pub fn parameters(&self) -> MigrationParameters {
        lock(&self.shared.params).clone()
    }

    /// Updates parameters (all or nothing). max-bandwidth, downtime-limit and
    /// avail-switchover-bandwidth also apply to a migration already running.
    pub fn set_parameters(&self, update: &ParametersUpdate) -> Result<()> {
        let mut p = lock(&self.shared.params);
        p.apply(update)?;
        let live = &self.shared.live;
        live.max_bandwidth.store(p.max_bandwidth, Ordering::Relaxed);
        live.downtime_limit_ms
            .store(p.downtime_limit, Ordering::Relaxed);
        live.avail_switchover_bandwidth
            .store(p.avail_switchover_bandwidth, Ordering::Relaxed);
        Ok(())
    }

    /// The capabilities.
    pub fn capabilities(&self) -> Capabilities {
        *lock(&self.shared.caps)
    }

    /// Sets a capability; refused while a migration runs (as QEMU does).
    pub fn set_capability(&self, cap: Capability, on: bool) -> Result<()> {
        if self.is_active() {
            return Err(Error::Busy(
                "There's a migration process in progress".into(),
            ));
        }
        lock(&self.shared.caps).set(cap, on);
        Ok(())
    }

    /// True while a migration is between setup and its end.
    pub fn is_active(&self) -> bool {
        let s = self.stats().status();
        s != MigrationStatus::None && !s.is_finished()
    }

    /// The counters of the current (or last) migration.
    pub fn stats(&self) -> Arc<MigStats> {
        self.shared
            .stats
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The `query-migrate` answer; never waits for the migration thread.
    pub fn query(&self) -> MigrationInfo {
        self.stats().snapshot()
    }

    /// Receives status changes, passes, and the guest's stops and resumes from now on.
    pub fn subscribe(&self) -> ChanReceiver<MigrationEvent> {
        self.run.subscribe()
    }

    /// The guest's run state, shared with whoever else pauses and resumes it.
    pub fn run_control(&self) -> &Arc<RunControl> {
        &self.run
    }

    /// Starts migrating to `uri` on a new thread (`mig/src`); returns once it started.
    ///
    /// Refused while the guest is in postmigrate (after a completed or in-doubt
    /// migration, until `cont`), inmigrate or finish-migrate, as QEMU refuses it.
    ///
    /// However it ends, the source guest returns to the run state it had when the
    /// switch-over began (running again only if it ran and nobody stopped it), except
    /// after a completed migration (postmigrate: the guest runs on the destination)
    /// and after a lost acknowledgement of the switch-over: then the destination may
    /// run the guest, the status is failed with an error-desc that says so, and the
    /// source stays paused in postmigrate for its VMM to decide.
    pub fn migrate(&self, uri: &str) -> Result<()> {
        let uri: Uri = uri
            .parse()
            .map_err(|e: transport::Error| Error::InvalidParameter(e.to_string()))?;
        let mut thread = lock(&self.shared.thread);
        if self.is_active() {
            return Err(Error::Busy(
                "There's a migration process in progress".into(),
            ));
        }
        self.run.check_can_migrate()?;
        if let Some(old) = thread.take() {
            let _ = old.join();
        }
        let stats = Arc::new(MigStats::new());
        stats.set_status(MigrationStatus::Setup);
        *self.shared.stats.write().unwrap_or_else(|p| p.into_inner()) = stats.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        *lock(&self.shared.cancel) = cancel.clone();
        let run = Run {
            ram: GuestRam::new(self.vm.clone()),
            space: self.vm.address_space().clone(),
            vm: self.vm.clone(),
            run: self.run.clone(),
            stats,
            params: self.parameters(),
            caps: self.capabilities(),
            live: self.shared.live.clone(),
            cancel,
            shared: self.shared.clone(),
            busy_ns: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            committing: AtomicBool::new(false),
            span: info_span!(
                "migration",
                uri = %uri,
                channels = if self.capabilities().multifd {
                    u64::from(self.parameters().multifd_channels)
                } else {
                    1
                }
            ),
        };
        run.emit(MigrationEvent::Status(MigrationStatus::Setup));
        let handle = std::thread::Builder::new()
            .name("mig/src".into())
            .spawn(move || run.run(uri))
            .map_err(|e| Error::Guest(format!("cannot start the migration thread: {e}")))?;
        *thread = Some(handle);
        Ok(())
    }

    /// Asks the running migration to stop; the guest keeps running on the source.
    pub fn cancel(&self) {
        let stats = self.stats();
        info!(status = ?stats.status(), "migration cancel requested");
        for from in [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Device,
        ] {
            if stats.transition(from, MigrationStatus::Cancelling) {
                break;
            }
        }
        lock(&self.shared.cancel).store(true, Ordering::Release);
        lock(&self.shared.cancel_token).cancel();
        // A send or the wait for the destination's answer may be blocked on a stalled
        // peer: shut the connections so the migration thread sees the cancel at once.
        if let Some(abort) = lock(&self.shared.abort).as_ref() {
            abort.abort();
        }
    }

    /// Waits for the current migration to end and returns its final status.
    pub fn wait(&self) -> MigrationStatus {
        if let Some(h) = lock(&self.shared.thread).take() {
            let _ = h.join();
        }
        self.stats().status()
    }
}

impl Drop for MigrationSource {
    fn drop(&mut self) {
        if self.is_active() {
            self.cancel();
        }
        let _ = self.wait();
    }
}

/// Progress at the last tick, to turn counters into rates.
struct Tick {
    at: Instant,
    bytes: u64,
    /// Bytes the receiver had received (written minus queued in the sockets).
    delivered: u64,
    pages: u64,
    busy_ns: u64,
}

/// One migration, on its thread.
struct Run {
    vm: Arc<dyn MigratableVm>,
    run: Arc<RunControl>,
    ram: GuestRam,
    space: Arc<AddressSpace>,
    stats: Arc<MigStats>,
    params: MigrationParameters,
    caps: Capabilities,
    live: Arc<LiveParams>,
    cancel: Arc<AtomicBool>,
    shared: Arc<Shared>,
    /// Nanoseconds the workers spent inside send calls (sum over workers).
    busy_ns: AtomicU64,
    /// The vCPUs are paused for the final pass (pages go out as they are, not live).
    paused: AtomicBool,
    /// The run state went to finish-migrate: the end of the run must leave it.
    switching: AtomicBool,
    /// The switch-over's commit may have gone out: a panic from here on leaves the
    /// source paused, as a lost acknowledgement does.
    committing: AtomicBool,
    /// The `migration` span, made on the caller's thread (so it nests under the
    /// caller's span) and entered on the migration thread.
    span: tracing::Span,
}

/// The state the iteration loop keeps between syncs (owned by the migration thread).
struct Loop {
    bitmap: Arc<DirtyBitmap>,
    window: Arc<DirtyBitmap>,
    bw: BandwidthEstimator,
    /// Wire bytes and sending time per page, learnt from the passes.
    cost: PassCost,
    period: DirtyRatePeriod,
    /// Distinct pages dirtied per window length, for the convergence prediction.
    growth: DirtyGrowth,
    /// When the last sync ran, ms since the migration started.
    last_sync_ms: Option<u64>,
    auto: AutoConverge,
    last_sync_dirty_pages: u64,
    period_start_bytes: u64,
    tick: Tick,
    /// When the iterations began, and what the receiver had then: the bandwidth's
    /// lower bound counts from here.
    sending_since: Instant,
    delivered_since: u64,
    sender_counters: Arc<transport::ByteCounters>,
    channels: usize,
    applied_max_bandwidth: u64,
}

impl Run {
    fn emit(&self, ev: MigrationEvent) {
        self.run.emit(ev);
    }

    fn set_status(&self, s: MigrationStatus) {
        self.stats.set_status(s);
        self.emit(MigrationEvent::Status(s));
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Acquire) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    /// The thread's body: a panic anywhere in it (the engine's or a VMM callback's)
    /// ends the migration `failed` and never leaves the status active.
    fn run(self, uri: Uri) {
        let (stats, run, space) = (self.stats.clone(), self.run.clone(), self.space.clone());
        // `run_to_end` catches what `migrate` panics; this catches its own clean-up
        // (the VMM's resume or throttle callbacks).
        if let Err(p) = catch_unwind(AssertUnwindSafe(move || self.run_to_end(uri))) {
            if space.reasons().contains(DirtyReason::Migration) {
                // Left on, it would refuse the next migration.
                let _ = space.global_dirty_log_stop(DirtyReason::Migration);
            }
            if !stats.status().is_finished() {
                stats.set_error(Error::panicked("the migration thread", &*p).to_string());
                stats.set_status(MigrationStatus::Failed);
                run.emit(MigrationEvent::Status(MigrationStatus::Failed));
            }
        }
    }

    fn run_to_end(self, uri: Uri) {
        // A panic is a failure like any other: the guest resumes before the commit
        // (through `switching`), and stays paused after it (`committing`).
        let span = self.span.clone();
        let _entered = span.enter();
        info!("migration started");
        let result = catch_unwind(AssertUnwindSafe(|| self.migrate(&uri)))
            .unwrap_or_else(|p| Err(Error::panicked("the migration thread", &*p)));
        lock(&self.shared.abort).take();
        let stats = &self.stats;
        stats
            .total_time_ms
            .store(stats.elapsed_ms(), Ordering::Relaxed);
        let in_doubt = match &result {
            Err(Error::Transport(transport::Error::InDoubt(_))) => true,
            Err(Error::Panicked(_)) => self.committing.load(Ordering::Acquire),
            _ => false,
        };
        // Leave finish-migrate: postmigrate once the destination has the guest (or may
        // have it), else back to the state before the switch-over. Two running copies
        // would be worse than none, so in doubt the source stays paused.
        let mut resume_error = None;
        if self.switching.swap(false, Ordering::AcqRel) {
            let end = match (&result, in_doubt) {
                (Ok(()), _) => SwitchoverEnd::Completed,
                (Err(_), true) => SwitchoverEnd::InDoubt,
                (Err(_), false) => SwitchoverEnd::Failed,
            };
            resume_error = self.run.end_switchover(end).err();
            if let Some(e) = &resume_error {
                error!(error = %e, "resuming the source guest after the switch-over failed");
            }
        }
        self.paused.store(false, Ordering::Release);
        match result {
            Ok(()) => {
                info!(
                    total_ms = stats.total_time_ms.load(Ordering::Relaxed),
                    downtime_ms = stats.downtime_ms.load(Ordering::Relaxed),
                    transferred_bytes = stats.transferred_bytes.load(Ordering::Relaxed),
                    precopy_passes = stats.iterations.load(Ordering::Relaxed),
                    "migration completed"
                );
                self.set_status(MigrationStatus::Completed)
            }
            Err(e) => {
                self.vm.set_throttle_percent(0);
                stats.cpu_throttle_percentage.store(0, Ordering::Relaxed);
                if self.space.reasons().contains(DirtyReason::Migration) {
                    if let Err(le) = self.space.global_dirty_log_stop(DirtyReason::Migration) {
                        warn!(error = %le, "stopping the migration's dirty log failed");
                    }
                }
                let resume_note = resume_error
                    .map(|re| format!("; and resuming the source failed: {re}"))
                    .unwrap_or_default();
                if in_doubt {
                    error!(
                        error = %e,
                        "migration failed after the commit: the destination may run the \
                         guest; the source guest stays paused (postmigrate)"
                    );
                    stats.set_error(format!(
                        "{e}; the source guest stays paused (postmigrate): resume it \
                         (cont) only if the destination does not run it"
                    ));
                    self.set_status(MigrationStatus::Failed);
                } else if matches!(e, Error::Cancelled)
                    || (self.cancel.load(Ordering::Acquire) && !matches!(e, Error::Panicked(_)))
                {
                    // After a cancel, whatever error the aborted connections produced
                    // is the cancel's doing.
                    if !resume_note.is_empty() {
                        stats.set_error(format!("migration cancelled{resume_note}"));
                    }
                    info!(
                        total_ms = stats.total_time_ms.load(Ordering::Relaxed),
                        error = %e,
                        "migration cancelled"
                    );
                    self.set_status(MigrationStatus::Cancelled);
                } else {
                    error!(
                        error = %format!("{}{resume_note}", self.explain(&e)),
                        total_ms = stats.total_time_ms.load(Ordering::Relaxed),
                        "migration failed"
                    );
                    stats.set_error(format!("{}{resume_note}", self.explain(&e)));
                    self.set_status(MigrationStatus::Failed);
                }
            }
        }
    }

    /// The error-desc for `e`: a connection that broke says what that means.
    fn explain(&self, e: &Error) -> String {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, TimedOut};
        match e {
            Error::Transport(transport::Error::Io(io))
                if matches!(
                    io.kind(),
                    BrokenPipe | ConnectionReset | ConnectionAborted | TimedOut
                ) =>
            {
                format!(
                    "the connection to the destination was lost ({io}): it closed, or \
                     acknowledged nothing for x-ferry-io-timeout-ms ({} ms)",
                    self.params.x_ferry_io_timeout_ms
                )
            }
            e => e.to_string(),
        }
    }

    fn migrate(&self, uri: &Uri) -> Result<()> {
        let blocks: Vec<BlockInfo> = self
            .space
            .blocks()
            .iter()
            .map(|b| BlockInfo {
                id: b.id.clone(),
                size_bytes: b.size_bytes,
            })
            .collect();
        let channels = if self.caps.multifd {
            usize::from(self.params.multifd_channels)
        } else {
            1
        };
        let opts = SendOptions {
            channels: channels as u16,
            compression: match self.params.multifd_compression {
                CompressionParam::None => Compression::None,
                CompressionParam::Zstd => Compression::Zstd,
            },
            max_bandwidth_bytes_per_sec: self.live.max_bandwidth.load(Ordering::Relaxed),
            sparse_pages: self.params.x_ferry_sparse_pages,
            page_checksum: transport::PageChecksum::default(),
            connect_timeout: Duration::from_millis(self.params.x_ferry_connect_timeout_ms),
            io_timeout: Duration::from_millis(self.params.x_ferry_io_timeout_ms),
            switchover_timeout: Duration::from_millis(self.params.x_ferry_switchover_timeout_ms),
        };
        // A fresh token for this run, published before the flag is looked at: a
        // cancel either set the flag already or fires this token.
        let token = transport::Cancel::new();
        *lock(&self.shared.cancel_token) = token.clone();
        if self.cancel.load(Ordering::Acquire) {
            token.cancel();
        }
        self.check_cancel()?;
        let sender = Sender::connect_with(uri, PAGE_SIZE as u32, blocks, opts, &token)?;
        info!(
            channels,
            max_bandwidth_bytes_per_sec = opts.max_bandwidth_bytes_per_sec,
            downtime_limit_ms = self.live.downtime_limit_ms.load(Ordering::Relaxed),
            "setup: connected to the destination"
        );
        *lock(&self.shared.abort) = Some(sender.abort_handle());
        self.check_cancel()?;
        let stats = &self.stats;
        stats
            .total_bytes
            .store(self.space.total_pages() * PAGE_SIZE, Ordering::Relaxed);
        stats.page_size_bytes.store(PAGE_SIZE, Ordering::Relaxed);

        // Setup: the log on for MIGRATION, then everything the guest ever touched dirty.
        let bitmap = self.space.global_dirty_log_start(DirtyReason::Migration)?;
        let window = self.space.observe(DirtyReason::Migration)?;
        // The first sync absorbs KVM's INITIALLY_SET (all ones) and anything from before.
        self.space.global_dirty_log_sync(None)?;
        stats.dirty_sync_count.fetch_add(1, Ordering::Relaxed);
        bitmap.clear_all();
        self.bulk_stage(&bitmap)?;
        self.rearm_unstaged(&bitmap)?;
        window.clear_all();
        stats
            .remaining_bytes
            .store(bitmap.count() * PAGE_SIZE, Ordering::Relaxed);
        stats
            .setup_time_ms
            .store(stats.elapsed_ms(), Ordering::Relaxed);
        if !stats.transition(MigrationStatus::Setup, MigrationStatus::Active) {
            return Err(Error::Cancelled);
        }
        info!(
            setup_ms = stats.setup_time_ms.load(Ordering::Relaxed),
            ram_bytes = self.space.total_pages() * PAGE_SIZE,
            dirty_pages = bitmap.count(),
            "setup done: dirty log on, precopy starts"
        );
        self.emit(MigrationEvent::Status(MigrationStatus::Active));

        let counters = sender.counters();
        let mut lp = Loop {
            bitmap,
            window,
            bw: BandwidthEstimator::default(),
            cost: PassCost::default(),
            period: DirtyRatePeriod::default(),
            growth: DirtyGrowth::new(self.space.total_pages()),
            // The log started during setup: the first sync's window runs from here.
            last_sync_ms: Some(stats.elapsed_ms()),
            auto: AutoConverge::default(),
            last_sync_dirty_pages: 0,
            period_start_bytes: 0,
            tick: Tick {
                at: Instant::now(),
                bytes: counters.total_bytes(),
                delivered: counters.total_bytes().saturating_sub(sender.queued_bytes()),
                pages: 0,
                busy_ns: 0,
            },
            sending_since: Instant::now(),
            delivered_since: counters.total_bytes().saturating_sub(sender.queued_bytes()),
            sender_counters: counters,
            channels,
            applied_max_bandwidth: opts.max_bandwidth_bytes_per_sec,
        };
        // The first dirty-rate period starts with the setup sync (the window was
        // cleared then), so a rate is known a second in, even during a long bulk pass.
        lp.period.add(0, stats.elapsed_ms());
        let mut iteration = 0u64;
        loop {
            self.check_cancel()?;
            iteration += 1;
            let pass_start = (
                Instant::now(),
                self.pages_sent(),
                self.stats.precopy_bytes.load(Ordering::Relaxed),
            );
            info!(
                pass = iteration,
                dirty_pages = lp.bitmap.count(),
                "pass start"
            );
            self.send_pass(&sender, &mut lp)?;
            self.measure_link(&sender, &mut lp);
            lp.cost.add_pass(
                self.pages_sent() - pass_start.1,
                self.stats.precopy_bytes.load(Ordering::Relaxed) - pass_start.2,
                pass_start.0.elapsed().as_nanos() as u64,
            );
            sender.iteration_end(iteration)?;
            stats.iterations.store(iteration, Ordering::Relaxed);
            self.sync(&mut lp)?;
            info!(
                pass = iteration,
                sent_pages = self.pages_sent() - pass_start.1,
                sent_bytes = self.stats.precopy_bytes.load(Ordering::Relaxed) - pass_start.2,
                duration_ms = pass_start.0.elapsed().as_millis() as u64,
                dirty_pages = lp.bitmap.count(),
                "pass end"
            );
            // The first decision's prediction is kept to set beside what happens
            // (`first-pass-convergence`): made once the first pass is sent, or, when
            // the engine waited for the destination to apply it, once it has.
            if !self.ready_to_switch(&lp) {
                self.log_decision(&lp, false);
                stats.record_first_pass_convergence();
                continue;
            }
            if self.wait_for_destination(&sender, iteration)? {
                // That took a while: switch only if what the guest dirtied meanwhile
                // still fits the downtime.
                self.sync(&mut lp)?;
                if !self.ready_to_switch(&lp) {
                    self.log_decision(&lp, false);
                    stats.record_first_pass_convergence();
                    continue;
                }
            }
            self.log_decision(&lp, true);
            stats.record_first_pass_convergence();
            break;
        }
        self.complete(sender, &mut lp, iteration + 1)
    }

    /// Marks the pages to send first. With private anonymous guest RAM only pages the
    /// host ever mapped are sent: never-touched pages read as zero on both sides, and
    /// reading them here would fault each one in (225 ms per GiB on this machine kind).
    fn bulk_stage(&self, bitmap: &DirtyBitmap) -> Result<()> {
        if self.vm.untouched_ram_is_zero() {
            let mut touched = 0;
            for b in self.space.blocks() {
                touched += mark_touched_pages(b, bitmap)
                    .map_err(|e| Error::Guest(format!("reading /proc/self/pagemap: {e}")))?;
            }
            let untouched = self.space.total_pages() - touched;
            self.stats
                .zero_pages
                .fetch_add(untouched, Ordering::Relaxed);
        } else {
            bitmap.set_all();
        }
        Ok(())
    }

    /// With a listener that defers re-protecting what it harvested, the first sync
    /// left every page armed-for-clear; the sender re-arms a chunk as it reads it, so
    /// the pages the bulk stage skipped (never touched, never read) are re-armed here,
    /// or KVM would report them again at every sync. In runs of 64-page words that
    /// are not all staged (a listener clears only what it harvested, so the staged
    /// pages of such a word are merely re-armed early). Free for other listeners.
    fn rearm_unstaged(&self, bitmap: &DirtyBitmap) -> Result<()> {
        let words = bitmap.words();
        let total = self.space.total_pages();
        let mut run: Option<usize> = None;
        for w in 0..=words.len() {
            let staged = words
                .get(w)
                .is_none_or(|x| x.load(Ordering::Relaxed) == u64::MAX);
            match (run, staged) {
                (None, false) => run = Some(w),
                (Some(start), true) => {
                    let first = start as u64 * BITS_PER_WORD;
                    let end = (w as u64 * BITS_PER_WORD).min(total);
                    self.space.clear_dirty_log(first, end - first)?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn bandwidth(&self, lp: &Loop) -> u64 {
        let avail = self.live.avail_switchover_bandwidth.load(Ordering::Relaxed);
        if avail > 0 {
            return avail;
        }
        // Never an assumed speed: until the link was measured (the estimate's lower
        // bound counts from the first byte received) the answer is 0, and nothing
        // switches over on it.
        let cap = self.live.max_bandwidth.load(Ordering::Relaxed);
        match (lp.bw.bytes_per_sec(), cap) {
            (est, 0) => est,
            (est, cap) => est.min(cap),
        }
    }

    /// Pages sent so far (whole, sparse and zero).
    fn pages_sent(&self) -> u64 {
        self.stats.normal_pages.load(Ordering::Relaxed)
            + self.stats.zero_pages.load(Ordering::Relaxed)
    }

    /// How long the rest would take to send, ms, at what pages cost on the wire and
    /// the measured bandwidth; `None` until the bandwidth is known.
    fn expected_downtime_ms(&self, lp: &Loop) -> Option<u64> {
        lp.cost.expected_ms(lp.bitmap.count(), self.bandwidth(lp))
    }

    /// The convergence decision after a pass: debug while another pass is needed,
    /// info for the switch-over.
    fn log_decision(&self, lp: &Loop, switch: bool) {
        let remaining_bytes = lp.bitmap.count() * PAGE_SIZE;
        let expected_downtime_ms = self.expected_downtime_ms(lp);
        let downtime_limit_ms = self.live.downtime_limit_ms.load(Ordering::Relaxed);
        let bandwidth_bytes_per_sec = self.bandwidth(lp);
        if switch {
            info!(
                remaining_bytes,
                expected_downtime_ms,
                downtime_limit_ms,
                bandwidth_bytes_per_sec,
                "converged: switching over"
            );
        } else {
            debug!(
                remaining_bytes,
                expected_downtime_ms,
                downtime_limit_ms,
                bandwidth_bytes_per_sec,
                "the rest does not fit the downtime limit yet: another pass"
            );
        }
    }

    fn ready_to_switch(&self, lp: &Loop) -> bool {
        let limit_ms = self.live.downtime_limit_ms.load(Ordering::Relaxed);
        self.expected_downtime_ms(lp)
            .is_some_and(|ms| ms <= limit_ms)
    }

    /// Waits (the guest still running) until the destination has every page of
    /// `iteration` in its memory. Its backlog must not land in the downtime: writing
    /// pages it never had costs it a page fault each (~2 µs here, 140 ms for 256 MiB),
    /// and small sparse records, or a slow link with deep buffers, let the sender run
    /// far ahead of it. True when the wait took longer than [`CATCH_UP_MS`].
    ///
    /// Bounded: a destination that receives nothing for the I/O timeout (its queue
    /// does not shrink) fails the migration, with the guest still running here.
    fn wait_for_destination(&self, sender: &Sender, iteration: u64) -> Result<bool> {
        let start = Instant::now();
        let io_timeout = Duration::from_millis(self.params.x_ferry_io_timeout_ms);
        let mut queued = sender.queued_bytes();
        let mut progress_at = start;
        debug!(
            pass = iteration,
            "waiting for the destination to apply the pass"
        );
        while !sender.wait_applied(iteration, Duration::from_millis(POLL_MS))? {
            self.check_cancel()?;
            let now_queued = sender.queued_bytes();
            if now_queued < queued {
                progress_at = Instant::now();
            }
            queued = now_queued;
            if progress_at.elapsed() >= io_timeout {
                return Err(Error::Transport(transport::Error::TimedOut(format!(
                    "the destination did not confirm pass {iteration} and received \
                     nothing for {} ms",
                    io_timeout.as_millis()
                ))));
            }
        }
        debug!(
            pass = iteration,
            waited_ms = start.elapsed().as_millis() as u64,
            "the destination applied the pass"
        );
        Ok(start.elapsed() > Duration::from_millis(CATCH_UP_MS))
    }

    /// Refreshes the bandwidth's lower bound (what the receiver has, over the time
    /// since sending began) after a pass: short passes end before the first progress
    /// tick, and the switch-over must not wait for one to know the link carries them.
    fn measure_link(&self, sender: &Sender, lp: &mut Loop) {
        let bytes = lp.sender_counters.total_bytes();
        let delivered = bytes - sender.queued_bytes().min(bytes);
        lp.bw.set_lower_bound(
            delivered.saturating_sub(lp.delivered_since),
            lp.sending_since.elapsed().as_nanos() as u64,
        );
    }

    /// Refreshes the progress numbers; called every [`TICK_MS`] while sending.
    fn tick(&self, sender: &Sender, lp: &mut Loop) {
        let now = Instant::now();
        let dt_ns = now.duration_since(lp.tick.at).as_nanos() as u64;
        if dt_ns < TICK_MS * 1_000_000 {
            return;
        }
        // max-bandwidth may be changed while running; stop-and-copy runs unlimited.
        if !self.paused.load(Ordering::Acquire) {
            let cap = self.live.max_bandwidth.load(Ordering::Relaxed);
            if cap != lp.applied_max_bandwidth {
                info!(
                    max_bandwidth_bytes_per_sec = cap,
                    "max-bandwidth changed while running"
                );
                sender.set_max_bandwidth(cap);
                lp.applied_max_bandwidth = cap;
            }
        }
        let stats = &self.stats;
        let bytes = lp.sender_counters.total_bytes();
        stats.transferred_bytes.store(bytes, Ordering::Relaxed);
        let c = &lp.sender_counters;
        let multifd: u64 = (1..c.channels()).map(|i| c.channel_bytes(i)).sum();
        stats.multifd_bytes.store(multifd, Ordering::Relaxed);
        let pages =
            stats.normal_pages.load(Ordering::Relaxed) + stats.zero_pages.load(Ordering::Relaxed);
        let busy = self.busy_ns.load(Ordering::Relaxed);
        let d_bytes = bytes - lp.tick.bytes;
        let d_busy_wall = (busy - lp.tick.busy_ns) / lp.channels as u64;
        let queued = sender.queued_bytes().min(bytes);
        let delivered = (bytes - queued).max(lp.tick.delivered);
        lp.bw.add_window(&SendWindow {
            wall_ns: dt_ns,
            busy_ns: d_busy_wall.min(dt_ns),
            written_bytes: d_bytes,
            delivered_bytes: delivered - lp.tick.delivered,
            queued_bytes: queued,
        });
        self.measure_link(sender, lp);
        stats
            .bandwidth_bytes_per_sec
            .store(lp.bw.bytes_per_sec(), Ordering::Relaxed);
        stats.mbps.store(
            d_bytes as f64 * 8.0 / (dt_ns as f64 / 1e9) / 1e6,
            Ordering::Relaxed,
        );
        stats.pages_per_second.store(
            (pages - lp.tick.pages) * 1_000_000_000 / dt_ns,
            Ordering::Relaxed,
        );
        let remaining = lp.bitmap.count() * PAGE_SIZE;
        stats.remaining_bytes.store(remaining, Ordering::Relaxed);
        if let Some(ms) = self.expected_downtime_ms(lp) {
            stats.expected_downtime_ms.store(ms, Ordering::Relaxed);
        }
        lp.tick = Tick {
            at: now,
            bytes,
            delivered,
            pages,
            busy_ns: busy,
        };
    }

    /// One global dirty-log sync and the accounting QEMU does around it.
    fn sync(&self, lp: &mut Loop) -> Result<()> {
        let report = self.space.global_dirty_log_sync(None)?;
        let stats = &self.stats;
        let syncs = stats.dirty_sync_count.fetch_add(1, Ordering::Relaxed) + 1;
        let new_pages = report.new_pages(DirtyReason::Migration);
        debug!(
            sync = syncs,
            found_pages = report.reported_pages,
            new_pages,
            duration_us = report.sync_ns / 1000,
            "dirty-log sync"
        );
        lp.last_sync_dirty_pages = report.reported_pages;
        let now_ms = stats.elapsed_ms();
        if let Some(prev) = lp.last_sync_ms.replace(now_ms) {
            lp.growth
                .observe_sync(now_ms.saturating_sub(prev), report.reported_pages);
        }
        let bytes = lp.sender_counters.total_bytes();
        stats.transferred_bytes.store(bytes, Ordering::Relaxed);
        if let Some((new_rate, period_ms)) = lp.period.add(new_pages, now_ms) {
            // QEMU's rule counts a page once per sync; Ferry's dirty-pages-rate counts it
            // once per period (unique pages), which is the guest's write rate.
            let unique = lp.window.count();
            lp.window.clear_all();
            lp.growth.observe_period(period_ms, unique);
            stats
                .dirty_pages_rate
                .store(unique * 1000 / period_ms.max(1), Ordering::Relaxed);
            stats
                .true_dirty_pages_rate
                .store(unique * 1000 / period_ms.max(1), Ordering::Relaxed);
            stats
                .new_dirty_pages_rate
                .store(new_rate, Ordering::Relaxed);
            let sent = bytes - lp.period_start_bytes;
            lp.period_start_bytes = bytes;
            if self.caps.auto_converge {
                let p = &self.params;
                if let Some(pct) = lp.auto.on_period(
                    new_rate * period_ms / 1000 * PAGE_SIZE,
                    sent,
                    p.throttle_trigger_threshold,
                    p.cpu_throttle_initial,
                    p.cpu_throttle_increment,
                    p.max_cpu_throttle,
                ) {
                    info!(
                        throttle_percent = pct,
                        dirtied_bytes = new_rate * period_ms / 1000 * PAGE_SIZE,
                        sent_bytes = sent,
                        "auto-converge: vCPU throttle changed"
                    );
                    self.vm.set_throttle_percent(pct);
                    stats
                        .cpu_throttle_percentage
                        .store(u64::from(pct), Ordering::Relaxed);
                }
            }
        }
        let remaining = lp.bitmap.count() * PAGE_SIZE;
        stats.remaining_bytes.store(remaining, Ordering::Relaxed);
        // In bytes on the wire: what the link has to carry.
        let conv = predict_convergence(
            lp.cost.wire_bytes(lp.bitmap.count()),
            &lp.growth,
            lp.cost.bytes_per_page(),
            self.bandwidth(lp),
            self.live.downtime_limit_ms.load(Ordering::Relaxed),
        );
        stats.set_convergence(conv);
        self.emit(MigrationEvent::Pass(syncs));
        Ok(())
    }

    /// Sends every page dirty in the bitmap once, on `lp.channels` worker threads; the
    /// calling thread refreshes the numbers and, while the guest runs, syncs the dirty
    /// log whenever a dirty-rate period is due (at least once a second), so the rate
    /// is measured over 1 s windows however long a pass takes.
    fn send_pass(&self, sender: &Sender, lp: &mut Loop) -> Result<()> {
        // With the guest paused its vCPUs leave the host's cores free: the final pass
        // reads (and sorts out zero and sparse) pages on all of them, whatever the
        // number of channels (workers share a channel's connection under its lock).
        let workers = if self.paused.load(Ordering::Acquire) {
            lp.channels.max(
                std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .min(MAX_FINAL_PASS_WORKERS),
            )
        } else {
            lp.channels
        };
        let bitmap = lp.bitmap.clone();
        let abort = AtomicBool::new(false);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(workers);
        std::thread::scope(|s| {
            for k in 0..workers {
                let done_tx = done_tx.clone();
                let (bitmap, abort, first_error) = (&bitmap, &abort, &first_error);
                s.spawn(move || {
                    // A worker that panics stops the others and fails the pass.
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        self.send_share(sender, bitmap, k, workers, abort)
                    }))
                    .unwrap_or_else(|p| Err(Error::panicked("a migration sender thread", &*p)));
                    if let Err(e) = r {
                        abort.store(true, Ordering::Release);
                        lock(first_error).get_or_insert(e);
                    }
                    // The receiver lives until every worker is done (this scope).
                    let _ = done_tx.send(());
                });
            }
            drop(done_tx);
            let mut finished = 0;
            // A panic here (a dirty-log sync's) unwinds through the scope, which joins
            // the workers: stop them first.
            let _stop_workers = AbortOnUnwind(&abort);
            while finished < workers {
                match done_rx.recv_timeout(Duration::from_millis(POLL_MS)) {
                    Ok(()) => finished += 1,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
                self.tick(sender, lp);
                let paused = self.paused.load(Ordering::Acquire);
                if !paused && lp.period.is_due(self.stats.elapsed_ms()) {
                    if let Err(e) = self.sync(lp) {
                        abort.store(true, Ordering::Release);
                        lock(&first_error).get_or_insert(e);
                    }
                }
                if self.cancel.load(Ordering::Acquire) {
                    abort.store(true, Ordering::Release);
                }
            }
        });
        self.tick(sender, lp);
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => self.check_cancel(),
        }
    }

    /// Worker `k` of `n`: claims every `n`th chunk of bitmap words and sends its pages.
    fn send_share(
        &self,
        sender: &Sender,
        bitmap: &DirtyBitmap,
        k: usize,
        n: usize,
        abort: &AtomicBool,
    ) -> Result<()> {
        let max_batch = sender.max_batch_pages().max(1);
        let mut batch = Batch::with_capacity(max_batch);
        let sparse = sender.header().features.sparse_pages;
        let words = bitmap.words().len();
        let paused = || self.paused.load(Ordering::Relaxed);
        let mut chunk = k * CHUNK_WORDS;
        while chunk < words {
            if abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            let chunk_end = (chunk + CHUNK_WORDS).min(words);
            let mut taken = [0u64; CHUNK_WORDS];
            for (t, w) in taken.iter_mut().zip(chunk..chunk_end) {
                *t = bitmap.take_word(w);
            }
            if taken.iter().any(|&b| b != 0) && !paused() {
                // QEMU's lazy clear: a listener that deferred re-protecting what it
                // harvested (KvmBitmapConfig::deferred_clear) re-arms these pages now,
                // just before they are read, so a write from here on is logged again.
                // Listeners that cleared during the sync return at once.
                let first = chunk as u64 * BITS_PER_WORD;
                let pages = ((chunk_end - chunk) as u64 * BITS_PER_WORD)
                    .min(self.space.total_pages().saturating_sub(first));
                self.space.clear_dirty_log(first, pages)?;
            }
            for (mut bits, w) in taken.into_iter().zip(chunk..chunk_end) {
                while bits != 0 {
                    let page = w as u64 * BITS_PER_WORD + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let Some((block_idx, offset)) = self.space.locate_page(page) else {
                        continue;
                    };
                    if batch.block != Some(block_idx)
                        || batch.len() >= max_batch
                        || batch.offsets.len() >= SEND_BATCH_PAGES
                    {
                        self.flush(sender, &mut batch, paused())?;
                        batch.block = Some(block_idx);
                    }
                    let Some(page) = self.ram.page(block_idx, offset) else {
                        continue;
                    };
                    // SAFETY: the sender's reads race the guest's writes by design: the
                    // bytes are classified, hashed and written to the socket as they
                    // are, never assumed to stay the same, and a page torn by a write is
                    // resent because that write dirtied it again (FORMAT.md, torn
                    // pages). While the guest is paused nothing writes it. Nothing in
                    // this process writes a source guest's RAM through Rust code.
                    let data = unsafe { page.as_bytes() };
                    let class = if sparse {
                        batch.sparse.classify(offset, data)
                    } else if is_zero(data) {
                        PageClass::Zero
                    } else {
                        PageClass::Dense
                    };
                    match class {
                        PageClass::Zero => batch.zero.push(offset),
                        // Its words are in the batch already.
                        PageClass::Sparse => {}
                        // Sent in place, no copy. While the guest runs the batch goes
                        // out live: a page torn by a write in flight is resent, because
                        // that write dirtied it again (transport FORMAT.md, torn pages).
                        PageClass::Dense => {
                            batch.offsets.push(offset);
                            batch.pages.push(data);
                        }
                    }
                }
            }
            self.flush(sender, &mut batch, paused())?;
            chunk += n * CHUNK_WORDS;
        }
        Ok(())
    }

    fn flush<'a>(&self, sender: &Sender, batch: &mut Batch<'a>, paused: bool) -> Result<()> {
        let Some(block) = batch.block else {
            return Ok(());
        };
        let start = Instant::now();
        if !batch.offsets.is_empty() {
            if paused {
                sender.send_pages(block, &batch.offsets, &batch.pages)?;
            } else {
                sender.send_live_pages(block, &batch.offsets, &batch.pages)?;
            }
            self.stats
                .normal_pages
                .fetch_add(batch.offsets.len() as u64, Ordering::Relaxed);
        }
        if !batch.sparse.is_empty() {
            sender.send_sparse_pages(block, &batch.sparse)?;
            let n = batch.sparse.len() as u64;
            self.stats.normal_pages.fetch_add(n, Ordering::Relaxed);
            self.stats.sparse_pages.fetch_add(n, Ordering::Relaxed);
        }
        if !batch.zero.is_empty() {
            sender.send_zero_pages(block, &batch.zero)?;
            self.stats
                .zero_pages
                .fetch_add(batch.zero.len() as u64, Ordering::Relaxed);
        }
        self.busy_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        // Everything on the wire so far was sent in precopy until the switch-over,
        // which takes its own count (`complete`). Several workers send at once, so a
        // difference of totals around one batch would count the others' bytes too.
        if !paused {
            self.stats
                .precopy_bytes
                .fetch_max(sender.counters().total_bytes(), Ordering::Relaxed);
        }
        batch.clear();
        Ok(())
    }

    /// Stop and copy: pause, final sync, the rest of the pages, device state, end of
    /// stream, and the destination's word that the guest runs there.
    fn complete(&self, sender: Sender, lp: &mut Loop, iteration: u64) -> Result<()> {
        let paused_at = Instant::now();
        // Through the run state: STOP if the guest ran (before the `device` status, as
        // QEMU orders them), and a failure from here on returns the guest to the state
        // it had, or that a `stop` since asked for.
        // Set first: a pause that panics has entered finish-migrate already.
        self.switching.store(true, Ordering::Release);
        let was_running = self.run.begin_switchover()?;
        info!(was_running, "switch-over: guest paused (finish-migrate)");
        self.paused.store(true, Ordering::Release);
        if !self
            .stats
            .transition(MigrationStatus::Active, MigrationStatus::Device)
        {
            return Err(Error::Cancelled);
        }
        self.emit(MigrationEvent::Status(MigrationStatus::Device));
        let phases = &self.stats.downtime_phases;
        let mut lap = paused_at;
        let mut phase_done = |phase: &AtomicU64| {
            let now = Instant::now();
            phase.store((now - lap).as_micros() as u64, Ordering::Relaxed);
            lap = now;
        };
        phase_done(&phases.pause_us);
        // The precopy workers are done: every byte from here on is the downtime's.
        let counters = sender.counters();
        let at_pause = counters.total_bytes();
        self.stats.precopy_bytes.store(at_pause, Ordering::Relaxed);
        sender.set_max_bandwidth(0);
        self.sync(lp)?;
        phase_done(&phases.sync_us);
        let final_start = (Instant::now(), self.pages_sent());
        self.send_pass(&sender, lp)?;
        sender.iteration_end(iteration)?;
        phase_done(&phases.pages_us);
        info!(
            pass = iteration,
            sent_pages = self.pages_sent() - final_start.1,
            sent_bytes = counters.total_bytes() - at_pause,
            duration_ms = final_start.0.elapsed().as_millis() as u64,
            "final pass sent (guest paused)"
        );
        let state = self
            .vm
            .save_device_state()
            .map_err(|e| Error::Guest(format!("saving device state: {e}")))?;
        info!(
            device_state_bytes = state.len() as u64,
            "device state saved"
        );
        // QEMU's global state: a guest that was paused stays paused on the destination.
        sender.send_device_state(
            RUN_STATE_DEVICE,
            if was_running {
                RunState::Running.name().as_bytes()
            } else {
                RunState::Paused.name().as_bytes()
            },
        )?;
        sender.send_device_state("vcpus", &state)?;
        phase_done(&phases.device_us);
        self.check_cancel()?;
        // The switch-over: the destination says it loaded everything, the source
        // commits, the destination starts the guest and acknowledges. Until the
        // commit any failure resumes the source; after it a missing answer is
        // `InDoubt` and the source stays paused (see `run`). `resumed: false` is a
        // destination that holds the guest paused for its VMM to start (autostart
        // off, QEMU's `-S`), or a `file:` snapshot: the migration succeeded either
        // way. A destination that failed refuses instead, an error.
        self.committing.store(true, Ordering::Release);
        sender.finish()?;
        phase_done(&phases.ack_us);
        let after = counters.total_bytes();
        self.stats
            .downtime_bytes
            .store(after.saturating_sub(at_pause), Ordering::Relaxed);
        self.stats.transferred_bytes.store(after, Ordering::Relaxed);
        let downtime_ms = paused_at.elapsed().as_millis() as u64;
        self.stats.downtime_ms.store(downtime_ms, Ordering::Relaxed);
        // QEMU's final mbps: all bytes over the time after setup.
        let stats = &self.stats;
        let busy_ms = stats
            .elapsed_ms()
            .saturating_sub(stats.setup_time_ms.load(Ordering::Relaxed))
            .max(1);
        stats.mbps.store(
            after as f64 * 8.0 / busy_ms as f64 / 1000.0,
            Ordering::Relaxed,
        );
        self.stats.remaining_bytes.store(0, Ordering::Relaxed);
        // The guest now runs on the destination; the source stays paused (postmigrate,
        // set by `run`).
        self.vm.set_throttle_percent(0);
        // The guest runs on the destination now: nothing may fail this migration any
        // more (failing would resume the source, and two copies would run). A listener
        // that cannot stop logging leaves the slots logging, which only costs speed.
        if let Err(e) = self.space.global_dirty_log_stop(DirtyReason::Migration) {
            warn!(error = %e, "stopping the migration's dirty log failed (slots keep logging)");
        }
        Ok(())
    }
}

/// Sets its flag when dropped by a panic's unwinding.
struct AbortOnUnwind<'a>(&'a AtomicBool);

impl Drop for AbortOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// Pages of one block waiting to go out, borrowed from guest memory.
struct Batch<'a> {
    block: Option<usize>,
    offsets: Vec<u64>,
    pages: Vec<&'a [u8]>,
    sparse: SparseBatch,
    zero: Vec<u64>,
}

impl<'a> Batch<'a> {
    fn with_capacity(n: usize) -> Self {
        Batch {
            block: None,
            offsets: Vec::with_capacity(n),
            pages: Vec::with_capacity(n),
            sparse: SparseBatch::with_capacity(n),
            zero: Vec::with_capacity(n),
        }
    }

    fn len(&self) -> usize {
        self.offsets.len() + self.sparse.len() + self.zero.len()
    }

    fn clear(&mut self) {
        self.block = None;
        self.offsets.clear();
        self.pages.clear();
        self.sparse.clear();
        self.zero.clear();
    }
}
