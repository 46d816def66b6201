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
    predict_convergence, AutoConverge, BandwidthEstimator, DirtyGrowth, DirtyRatePeriod,
    LazySamples, PassCost, SendWindow,
};
use crate::runstate::{MigrationEvent, RunControl, RunState, SwitchoverEnd};
use crate::{Error, Result};

mod policy;
mod postcopy;
mod precopy;

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
    max_postcopy_bandwidth: AtomicU64,
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
    /// `migrate-start-postcopy` asked the running migration to switch to postcopy.
    start_postcopy: AtomicBool,
    /// What a paused postcopy migration waits for (`migrate` with `resume`).
    resume: (
        crossbeam_channel::Sender<ResumeCmd>,
        crossbeam_channel::Receiver<ResumeCmd>,
    ),
    /// `migrate-pause` broke the postcopy stream (the pause's reason says so).
    pause_requested: AtomicBool,
    /// Wakes a migration waiting in pre-switchover: `migrate-continue`, or a cancel
    /// (which the waiter tells apart by the cancel flag).
    proceed: (
        crossbeam_channel::Sender<()>,
        crossbeam_channel::Receiver<()>,
    ),
    /// The guest's per-vCPU dirty limits (QMP's `set-vcpu-dirty-limit`, and the
    /// migration's `dirty-limit` capability).
    limiter: Arc<crate::DirtyLimiter>,
    /// The TLS objects `tls-creds` and `tls-authz` name.
    tls_objects: crate::TlsObjects,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A message to a paused postcopy migration.
enum ResumeCmd {
    /// Continue over a new connection to this address (the destination's
    /// `migrate-recover`).
    Resume(Uri),
    /// The source is going away: stop waiting (the guest stays paused).
    Shutdown,
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
            max_postcopy_bandwidth: AtomicU64::new(params.max_postcopy_bandwidth),
            downtime_limit_ms: AtomicU64::new(params.downtime_limit),
            avail_switchover_bandwidth: AtomicU64::new(params.avail_switchover_bandwidth),
        });
        let limiter = Arc::new(crate::DirtyLimiter::new(vm.clone()));
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
                start_postcopy: AtomicBool::new(false),
                resume: crossbeam_channel::unbounded(),
                proceed: crossbeam_channel::unbounded(),
                pause_requested: AtomicBool::new(false),
                limiter,
                tls_objects: crate::TlsObjects::default(),
                thread: Mutex::new(None),
            }),
        }
    }

    /// The TLS objects (`tls-creds-x509`, `authz-list`) the `tls-creds` and
    /// `tls-authz` parameters name; a monitor's `object-add` adds to it.
    pub fn tls_objects(&self) -> &crate::TlsObjects {
        &self.shared.tls_objects
    }

    /// The destination's TLS under the current parameters (`tls-creds` with a
    /// server endpoint, `tls-authz`); `None` without `tls-creds`.
    pub fn incoming_tls(&self) -> Result<Option<transport::TlsConfig>> {
        self.shared
            .tls_objects
            .resolve(&self.parameters(), transport::TlsEndpoint::Server)
    }

    /// The current parameters.
    pub fn parameters(&self) -> MigrationParameters {
        lock(&self.shared.params).clone()
    }

    /// Updates parameters (all or nothing). max-bandwidth, max-postcopy-bandwidth,
    /// downtime-limit and avail-switchover-bandwidth also apply to a migration already
    /// running.
    pub fn set_parameters(&self, update: &ParametersUpdate) -> Result<()> {
        let mut p = lock(&self.shared.params);
        p.apply(update)?;
        let live = &self.shared.live;
        live.max_bandwidth.store(p.max_bandwidth, Ordering::Relaxed);
        live.max_postcopy_bandwidth
            .store(p.max_postcopy_bandwidth, Ordering::Relaxed);
        live.downtime_limit_ms
            .store(p.downtime_limit, Ordering::Relaxed);
        live.avail_switchover_bandwidth
            .store(p.avail_switchover_bandwidth, Ordering::Relaxed);
        // QEMU's dirty limit measures every `x-vcpu-dirty-limit-period`, with or
        // without a migration (validated above).
        self.shared
            .limiter
            .set_period_ms(p.x_vcpu_dirty_limit_period)?;
        Ok(())
    }

    /// The capabilities.
    pub fn capabilities(&self) -> Capabilities {
        *lock(&self.shared.caps)
    }

    /// Sets a capability; refused while a migration runs (as QEMU does). `dirty-limit`
    /// needs the dirty ring, and it and `auto-converge` exclude each other (QEMU's
    /// errors).
    pub fn set_capability(&self, cap: Capability, on: bool) -> Result<()> {
        if self.is_active() {
            return Err(Error::Busy(
                "There's a migration process in progress".into(),
            ));
        }
        let mut caps = lock(&self.shared.caps);
        if on {
            let conflict = match cap {
                Capability::DirtyLimit => caps.auto_converge,
                Capability::AutoConverge => caps.dirty_limit,
                _ => false,
            };
            if conflict {
                return Err(Error::InvalidParameter(
                    "dirty-limit conflicts with auto-converge either enabled previously or \
                     currently"
                        .into(),
                ));
            }
            if cap == Capability::DirtyLimit && self.vm.vcpu_dirty_entries().is_none() {
                return Err(Error::InvalidParameter(
                    "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set"
                        .into(),
                ));
            }
        }
        caps.set(cap, on);
        Ok(())
    }

    /// The guest's per-vCPU dirty limits (QMP's `set-vcpu-dirty-limit`,
    /// `cancel-vcpu-dirty-limit`, `query-vcpu-dirty-limit`); a migration with the
    /// `dirty-limit` capability sets and lifts them through the same limiter.
    pub fn dirty_limiter(&self) -> &Arc<crate::DirtyLimiter> {
        &self.shared.limiter
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
        let params = self.parameters();
        let tls = self
            .shared
            .tls_objects
            .resolve(&params, transport::TlsEndpoint::Client)?;
        if let (Some(_), Uri::Unix(_) | Uri::File(_) | Uri::Mem(_)) = (&tls, &uri) {
            return Err(Error::InvalidParameter(format!(
                "tls-creds is set but {uri} is not a tcp: URI (TLS runs on TCP only)"
            )));
        }
        if let Some(old) = thread.take() {
            let _ = old.join();
        }
        let stats = Arc::new(MigStats::new());
        stats.set_status(MigrationStatus::Setup);
        *self.shared.stats.write().unwrap_or_else(|p| p.into_inner()) = stats.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        *lock(&self.shared.cancel) = cancel.clone();
        self.shared.start_postcopy.store(false, Ordering::Release);
        self.shared.pause_requested.store(false, Ordering::Release);
        while self.shared.resume.1.try_recv().is_ok() {}
        let run = Run {
            ram: GuestRam::new(self.vm.clone()),
            space: self.vm.address_space().clone(),
            vm: self.vm.clone(),
            run: self.run.clone(),
            stats,
            params,
            tls,
            caps: self.capabilities(),
            live: self.shared.live.clone(),
            cancel,
            shared: self.shared.clone(),
            busy_ns: AtomicU64::new(0),
            unsent_zero_pages: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            committing: AtomicBool::new(false),
            in_postcopy: AtomicBool::new(false),
            dirty_limited: AtomicBool::new(false),
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

    /// QEMU's `migrate-start-postcopy`: the running migration switches to postcopy at
    /// its next chance (within a chunk of pages). Needs the `postcopy-ram` capability;
    /// QEMU's errors otherwise.
    pub fn start_postcopy(&self) -> Result<()> {
        if !self.capabilities().postcopy_ram {
            return Err(Error::InvalidParameter(
                "Enable postcopy with migrate_set_capability before the start of migration".into(),
            ));
        }
        if self.stats().status() == MigrationStatus::None {
            return Err(Error::InvalidParameter(
                "Postcopy must be started after migration has been started".into(),
            ));
        }
        info!("switch to postcopy requested");
        self.shared.start_postcopy.store(true, Ordering::Release);
        Ok(())
    }

    /// QEMU's `migrate` with `resume`: continues a paused postcopy migration over a
    /// new connection to `uri`, where the destination listens after its
    /// `migrate-recover`. Returns once the migration thread has the address; the
    /// status is postcopy-recover until the destination answers, then postcopy-active
    /// (or postcopy-paused again, with the reason in error-desc).
    pub fn resume(&self, uri: &str) -> Result<()> {
        let uri: Uri = uri
            .parse()
            .map_err(|e: transport::Error| Error::InvalidParameter(e.to_string()))?;
        let stats = self.stats();
        if !stats.transition(
            MigrationStatus::PostcopyPaused,
            MigrationStatus::PostcopyRecover,
        ) {
            return Err(Error::InvalidParameter(
                "Cannot resume if there is no paused migration".into(),
            ));
        }
        self.run
            .emit(MigrationEvent::Status(MigrationStatus::PostcopyRecover));
        info!(uri = %uri, "postcopy: resume requested");
        let _ = self.shared.resume.0.send(ResumeCmd::Resume(uri));
        Ok(())
    }

    /// QEMU's `migrate-pause` on the source: breaks the postcopy stream on purpose
    /// (postcopy-paused on both sides, every page kept), e.g. to move it to another
    /// network. Only in postcopy-active or postcopy-recover.
    pub fn pause(&self) -> Result<()> {
        let status = self.stats().status();
        let abort = lock(&self.shared.abort);
        match (&*abort, status) {
            (Some(a), MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover) => {
                info!("postcopy: paused by the user");
                self.shared.pause_requested.store(true, Ordering::Release);
                a.abort();
                Ok(())
            }
            _ => Err(Error::InvalidParameter(
                "migrate-pause is currently only supported during postcopy-active or \
                 postcopy-recover state"
                    .into(),
            )),
        }
    }

    /// QEMU's `migrate-continue`: a migration paused before its switch-over
    /// (capability `pause-before-switchover`) goes on. `state` is the status the caller
    /// expects it to be in (`pre-switchover`); any other than the current one is
    /// refused with QEMU's text. In another status that matches, nothing waits and
    /// nothing happens (QEMU's wake-up would be dropped at the next pause too).
    pub fn continue_migration(&self, state: MigrationStatus) -> Result<()> {
        let status = self.stats().status();
        if status != state {
            return Err(Error::InvalidParameter(format!(
                "Migration not in expected state: {}",
                status.as_str()
            )));
        }
        if status == MigrationStatus::PreSwitchover {
            info!("migrate-continue: the switch-over goes on");
            let _ = self.shared.proceed.0.send(());
        }
        Ok(())
    }

    /// Asks the running migration to stop; the guest keeps running on the source.
    /// Ignored in postcopy: the guest runs on the destination then, and needs the
    /// pages only this source holds (QEMU's `migrate_cancel` refuses it too).
    pub fn cancel(&self) {
        let stats = self.stats();
        info!(status = ?stats.status(), "migration cancel requested");
        let cancelling = [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::PreSwitchover,
            MigrationStatus::Device,
        ]
        .into_iter()
        .any(|from| stats.transition(from, MigrationStatus::Cancelling));
        if !cancelling && stats.status().is_postcopy() {
            warn!("a postcopy migration cannot be cancelled: the guest runs on the destination");
            return;
        }
        if cancelling {
            // QEMU's MIGRATION event for the cancel's own step.
            self.run
                .emit(MigrationEvent::Status(MigrationStatus::Cancelling));
        }
        lock(&self.shared.cancel).store(true, Ordering::Release);
        lock(&self.shared.cancel_token).cancel();
        // A migration waiting in pre-switchover sees the cancel flag once woken.
        let _ = self.shared.proceed.0.send(());
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
        // A paused postcopy migration waits for a resume that can no longer come.
        let _ = self.shared.resume.0.send(ResumeCmd::Shutdown);
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
    /// TLS on every connection (from `tls-creds`, `tls-hostname`), or plaintext.
    tls: Option<transport::TlsConfig>,
    caps: Capabilities,
    live: Arc<LiveParams>,
    cancel: Arc<AtomicBool>,
    shared: Arc<Shared>,
    /// Nanoseconds the workers spent inside send calls (sum over workers).
    busy_ns: AtomicU64,
    /// Pages the bulk stage counted as zero without sending them (never touched).
    /// The pages sent are the transport's count ([`Run::publish_pages`]).
    unsent_zero_pages: AtomicU64,
    /// The vCPUs are paused for the final pass (pages go out as they are, not live).
    paused: AtomicBool,
    /// The run state went to finish-migrate: the end of the run must leave it.
    switching: AtomicBool,
    /// The switch-over's commit may have gone out: a panic from here on leaves the
    /// source paused, as a lost acknowledgement does.
    committing: AtomicBool,
    /// The destination acknowledged the switch to postcopy: it runs the guest, and
    /// this source holds the only copy of the pages it still lacks.
    in_postcopy: AtomicBool,
    /// This migration put the `vcpu-dirty-limit` on every vCPU (`dirty-limit`): its end
    /// lifts it.
    dirty_limited: AtomicBool,
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
    /// With a lazily clearing dirty log: the samples the rate is counted on.
    lazy: Option<LazySamples>,
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
    /// The stream's session id: a paused postcopy stream resumes under it.
    session_id: u64,
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
        let stats = self.stats.clone();
        let _listed = stats.list_thread("mig/src");
        info!("migration started");
        let result = catch_unwind(AssertUnwindSafe(|| self.migrate(&uri)))
            .unwrap_or_else(|p| Err(Error::panicked("the migration thread", &*p)));
        lock(&self.shared.abort).take();
        if self.dirty_limited.swap(false, Ordering::AcqRel) {
            // QEMU lifts every limit at the end of a dirty-limit migration, however it
            // ended.
            if let Err(e) = self.shared.limiter.cancel(None) {
                warn!(error = %e, "lifting the migration's dirty limit failed");
            }
            self.stats.set_dirty_limit(None);
        }
        let stats = &self.stats;
        stats
            .total_time_ms
            .store(stats.elapsed_ms(), Ordering::Relaxed);
        let in_postcopy = self.in_postcopy.load(Ordering::Acquire);
        let in_doubt = match &result {
            Err(Error::Transport(transport::Error::InDoubt(_))) => true,
            Err(Error::Panicked(_)) => self.committing.load(Ordering::Acquire),
            Err(_) => in_postcopy,
            Ok(()) => false,
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
                if in_postcopy {
                    error!(
                        error = %e,
                        "postcopy failed: the guest runs on the destination, which lacks \
                         pages only this source holds; the source stays paused and keeps them"
                    );
                    stats.set_error(format!(
                        "postcopy failed after the switch: {e}; the guest runs on the \
                         destination, which lacks pages only this source holds; the source \
                         guest stays paused (postmigrate) and keeps its copy"
                    ));
                    self.set_status(MigrationStatus::Failed);
                } else if in_doubt {
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
}
