//! calc-dirty-rate / query-dirty-rate: how fast the guest dirties memory, measured by
//! page sampling, through the dirty log (bitmap), or per vCPU through the dirty ring.
//!
//! One [`DirtyRateJob`] per guest runs one measurement at a time on a thread named
//! `mig/dirtyrate`, with QEMU's arguments, limits and error texts. Beyond QEMU: the
//! job can be cancelled; the log-based modes use their own dirty-log reason
//! ([`DirtyReason::DirtyRate`]) and own bitmap, so they run beside a migration without
//! taking its pages; windows go down to 50 ms with the actual window measured; and the
//! reply carries the exact rate, a 95 % interval (sampling) and, in ring mode, unique
//! pages per vCPU as `vcpu-dirty-rate` (the unit of `dirty-rate`) with QEMU's ring-entry
//! counts under `x-ferry`. The measurement's syncs are its own
//! ([`AddressSpace::global_dirty_log_sync_for`]): a migration beside it counts exactly
//! what it would count without it. Its last sync re-protects nothing when no other
//! reason logs, so the guest does not fault on its working set again after the reply.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dirty_sync::{AddressSpace, DirtyReason, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use stats::{
    ConfidenceInterval, DirtyRateInfo, DirtyRateMode, DirtyRateResult, DirtyRateStats,
    DirtyRateStatus, DirtyRateVcpu, FerryDirtyRateInfo, TimeUnit,
};
use tracing::{info, info_span, warn};

use crate::{Error, GuestRam, MigratableVm, Result};

/// Shortest window, ms (QEMU's MIN_CALC_TIME_MS).
pub const MIN_CALC_TIME_MS: i64 = 50;
/// Longest window, ms (QEMU's MAX_CALC_TIME_MS).
pub const MAX_CALC_TIME_MS: i64 = 60_000;
/// Fewest sample pages per GiB (QEMU's MIN_SAMPLE_PAGE_COUNT).
pub const MIN_SAMPLE_PAGES: i64 = 128;
/// Most sample pages per GiB (QEMU's MAX_SAMPLE_PAGE_COUNT).
pub const MAX_SAMPLE_PAGES: i64 = 16384;
/// Sample pages per GiB when none are given (QEMU's DIRTYRATE_DEFAULT_SAMPLE_PAGES).
pub const DEFAULT_SAMPLE_PAGES: i64 = 512;
/// Blocks smaller than this are not sampled (QEMU's MIN_RAMBLOCK_SIZE << 10).
pub const MIN_SAMPLED_BLOCK_BYTES: u64 = 128 << 10;
/// The measurement thread's name (QEMU's MIGRATION_THREAD_DIRTY_RATE).
pub const THREAD_NAME: &str = "mig/dirtyrate";

/// z for a two-sided 95 % interval.
const Z_95: f64 = 1.959_963_984_540_054;

/// `calc-dirty-rate`'s arguments, with QEMU's names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DirtyRateArgs {
    /// Window length, in `calc-time-unit`.
    pub calc_time: i64,
    /// Unit of `calc-time` (default second).
    #[serde(default)]
    pub calc_time_unit: Option<TimeUnit>,
    /// Sample pages per GiB (page-sampling only; default 512, range 128..=16384).
    #[serde(default)]
    pub sample_pages: Option<i64>,
    /// How to measure (default page-sampling).
    #[serde(default)]
    pub mode: Option<DirtyRateMode>,
}

impl DirtyRateArgs {
    /// A window of `ms` milliseconds in `mode`, default sample pages.
    pub fn millis(ms: i64, mode: DirtyRateMode) -> Self {
        DirtyRateArgs {
            calc_time: ms,
            calc_time_unit: Some(TimeUnit::Millisecond),
            sample_pages: None,
            mode: Some(mode),
        }
    }
}

/// A validated request.
#[derive(Clone, Copy, Debug)]
struct Request {
    mode: DirtyRateMode,
    calc_time_ms: i64,
    sample_pages: u64,
    seed: u64,
}

/// Cancellation flag the measurement thread sleeps on.
#[derive(Default)]
struct Cancel {
    flag: Mutex<bool>,
    cv: Condvar,
}

impl Cancel {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.flag.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self) {
        *self.lock() = true;
        self.cv.notify_all();
    }

    /// Sleeps until `ms` have passed since `t0` (re-reading the clock after the sleep,
    /// which may overshoot); returns the actual elapsed time, or None when cancelled.
    fn wait_window(&self, t0: Instant, ms: i64) -> Option<Duration> {
        let want = Duration::from_millis(u64::try_from(ms).unwrap_or(0));
        let mut flag = self.lock();
        loop {
            if *flag {
                return None;
            }
            let elapsed = t0.elapsed();
            if elapsed >= want {
                return Some(elapsed);
            }
            flag = self
                .cv
                .wait_timeout(flag, want - elapsed)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The running (or last) measurement thread.
struct Running {
    /// Taken by whoever joins it first (`wait`, `cancel`, the next `calc`).
    handle: Option<JoinHandle<()>>,
    cancel: Arc<Cancel>,
}

/// One guest's calc-dirty-rate job: request with [`DirtyRateJob::calc`], poll with
/// [`DirtyRateJob::query`], stop early with [`DirtyRateJob::cancel`].
pub struct DirtyRateJob {
    vm: Arc<dyn MigratableVm>,
    stats: Arc<DirtyRateStats>,
    running: Mutex<Option<Running>>,
    seed: AtomicU64,
}

impl DirtyRateJob {
    /// A job for `vm`, status `unstarted`.
    pub fn new(vm: Arc<dyn MigratableVm>) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        DirtyRateJob {
            vm,
            stats: Arc::new(DirtyRateStats::default()),
            running: Mutex::new(None),
            seed: AtomicU64::new(now ^ 0x5eed_f3a7_d1e7_0bad),
        }
    }

    /// Seeds the page-sampling generator (each later request draws its own seed from
    /// it), for reproducible samples.
    pub fn set_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Option<Running>> {
        // Holds only a join handle; nothing to repair after a panic.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job's state, shared with readers.
    pub fn stats(&self) -> &Arc<DirtyRateStats> {
        &self.stats
    }

    /// The current status.
    pub fn status(&self) -> DirtyRateStatus {
        self.stats.status()
    }

    /// `query-dirty-rate`: the last request and, once measured, its result, with
    /// `calc-time` in `unit` (default second).
    pub fn query(&self, unit: Option<TimeUnit>) -> DirtyRateInfo {
        self.stats.snapshot(unit.unwrap_or_default())
    }

    /// Checks `args` as QEMU does, in QEMU's order and with its texts.
    fn validate(&self, args: &DirtyRateArgs) -> Result<Request> {
        if self.stats.status() == DirtyRateStatus::Measuring {
            return Err(Error::Busy(
                "the dirty rate is already being measured.".into(),
            ));
        }
        let unit = args.calc_time_unit.unwrap_or_default();
        let calc_time_ms = args
            .calc_time
            .checked_mul(unit.ms_per_unit())
            .filter(|ms| (MIN_CALC_TIME_MS..=MAX_CALC_TIME_MS).contains(ms))
            .ok_or_else(|| {
                Error::InvalidParameter(format!(
                    "Calculation time is out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms]."
                ))
            })?;
        let mode = args.mode.unwrap_or_default();
        if args.sample_pages.is_some() && mode != DirtyRateMode::PageSampling {
            return Err(Error::InvalidParameter(
                "sample-pages is used only in page-sampling mode".into(),
            ));
        }
        let sample_pages = args.sample_pages.unwrap_or(DEFAULT_SAMPLE_PAGES);
        if !(MIN_SAMPLE_PAGES..=MAX_SAMPLE_PAGES).contains(&sample_pages) {
            return Err(Error::InvalidParameter(format!(
                "sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}]."
            )));
        }
        // Ferry counts dirty-bitmap mode through whichever listener feeds the log (ring
        // or bitmap), so only the ring mode needs a particular one.
        if mode == DirtyRateMode::DirtyRing && self.vm.vcpu_dirty_entries().is_none() {
            return Err(Error::InvalidParameter(format!(
                "mode {} is not enabled, use other method instead.",
                mode.as_str()
            )));
        }
        let seed = splitmix64(
            &mut self
                .seed
                .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed),
        );
        Ok(Request {
            mode,
            calc_time_ms,
            sample_pages: sample_pages as u64,
            seed,
        })
    }

    /// `calc-dirty-rate`: validates `args`, starts the measurement thread and returns
    /// once the status is `measuring` (so a query right after never reads `unstarted`).
    /// A refused request leaves the job's state as it was.
    pub fn calc(&self, args: &DirtyRateArgs) -> Result<()> {
        let mut running = self.lock();
        let req = self.validate(args)?;
        if let Some(prev) = running.take().and_then(|r| r.handle) {
            // Its status is `measured`, so it has stored its result and is returning.
            let _ignored = prev.join();
        }
        let start_time_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.stats
            .begin(req.mode, start_time_s, req.calc_time_ms, req.sample_pages);
        let cancel = Arc::new(Cancel::default());
        let worker = Worker {
            vm: Arc::clone(&self.vm),
            stats: Arc::clone(&self.stats),
            cancel: Arc::clone(&cancel),
            req,
            span: info_span!(
                "dirty_rate",
                mode = req.mode.as_str(),
                calc_time_ms = req.calc_time_ms,
                sample_pages = req.sample_pages
            ),
        };
        match std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || worker.run())
        {
            Ok(handle) => {
                *running = Some(Running {
                    handle: Some(handle),
                    cancel,
                });
                Ok(())
            }
            Err(e) => {
                let msg = format!("cannot start the dirty-rate thread: {e}");
                warn!(error = %msg, "calc-dirty-rate failed");
                self.stats
                    .finish(failed(req.calc_time_ms, msg.clone(), false));
                Err(Error::Guest(msg))
            }
        }
    }

    /// Ends a running measurement early: it stops its dirty logging and ends `measured`
    /// with `dirty-rate` -1 and `x-ferry.cancelled`. Returns once the thread is done;
    /// false when nothing was measuring.
    pub fn cancel(&self) -> bool {
        let was_measuring = self.stats.status() == DirtyRateStatus::Measuring;
        let handle = {
            let mut running = self.lock();
            running.as_mut().and_then(|r| {
                r.cancel.set();
                r.handle.take()
            })
        };
        if let Some(h) = handle {
            let _ignored = h.join();
        }
        // Someone else may be joining it (`wait`): the status says when it is done.
        while self.stats.status() == DirtyRateStatus::Measuring {
            std::thread::sleep(Duration::from_millis(1));
        }
        was_measuring
    }

    /// Waits for the running measurement (if any) to finish and returns the query reply.
    /// A `cancel` from another thread still ends it early.
    pub fn wait(&self, unit: Option<TimeUnit>) -> DirtyRateInfo {
        let handle = self.lock().as_mut().and_then(|r| r.handle.take());
        if let Some(h) = handle {
            let _ignored = h.join();
        }
        while self.stats.status() == DirtyRateStatus::Measuring {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.query(unit)
    }
}

impl Drop for DirtyRateJob {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A result that measured nothing.
fn failed(window_ms: i64, error: String, cancelled: bool) -> DirtyRateResult {
    DirtyRateResult {
        dirty_rate_mib_per_sec: -1,
        window_ms,
        vcpu_dirty_rate: None,
        ferry: FerryDirtyRateInfo {
            cancelled,
            error: (!error.is_empty()).then_some(error),
            ..Default::default()
        },
    }
}

/// Why a measurement ended without a rate.
enum Stop {
    Cancelled,
    Failed(String),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e.to_string())
    }
}

impl From<dirty_sync::Error> for Stop {
    fn from(e: dirty_sync::Error) -> Self {
        Stop::Failed(format!("dirty log: {e}"))
    }
}

/// What the measurement thread owns.
struct Worker {
    vm: Arc<dyn MigratableVm>,
    stats: Arc<DirtyRateStats>,
    cancel: Arc<Cancel>,
    req: Request,
    /// The measurement's `dirty_rate` span, entered on its thread.
    span: tracing::Span,
}

/// A panic on the measurement thread (a VMM callback's, a listener's), as the error
/// `query-dirty-rate` reports.
fn panicked(payload: &(dyn std::any::Any + Send)) -> Stop {
    Stop::from(Error::panicked(
        "the dirty-rate measurement thread",
        payload,
    ))
}

/// Ends the job `measured` (with an error) if the measurement thread unwinds past
/// `Worker::run`'s own catch, so the state never stays `measuring`.
struct PanicGuard(Arc<DirtyRateStats>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .finish(failed(0, "the measurement thread panicked".into(), false));
        }
    }
}

/// A measured window: unique dirty pages (estimated when sampled) over `window`.
struct Measured {
    dirty_pages: f64,
    /// When the window began.
    start: Instant,
    window: Duration,
    vcpu_entries: Option<Vec<u64>>,
    /// Distinct pages per vCPU (ring mode, when the VMM counts them).
    vcpu_pages: Option<Vec<u64>>,
    sampling: Option<SamplingResult>,
    /// Page sampling: how long the first and the second hash pass took.
    hash_passes: Option<[Duration; 2]>,
}

impl Worker {
    fn run(self) {
        let _guard = PanicGuard(Arc::clone(&self.stats));
        let span = self.span.clone();
        let _entered = span.enter();
        info!("dirty-rate measurement started");
        let cpu0 = thread_cpu_ns();
        // A panic ends the measurement with an error, and the next one can start.
        let outcome = catch_unwind(AssertUnwindSafe(|| match self.req.mode {
            DirtyRateMode::PageSampling => self.sampling(),
            DirtyRateMode::DirtyBitmap => self.log_based(false),
            DirtyRateMode::DirtyRing => self.log_based(true),
        }))
        .unwrap_or_else(|p| Err(panicked(&*p)));
        let cpu_ms = thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e6;
        let mut result = match outcome {
            Ok(m) => result_of(m),
            Err(Stop::Cancelled) => failed(self.req.calc_time_ms, String::new(), true),
            Err(Stop::Failed(e)) => failed(self.req.calc_time_ms, e, false),
        };
        result.ferry.cpu_ms = cpu_ms;
        match (&result.ferry.error, result.ferry.cancelled) {
            (Some(e), _) => warn!(error = %e, cpu_ms, "dirty-rate measurement failed"),
            (None, true) => info!(cpu_ms, "dirty-rate measurement cancelled"),
            (None, false) => info!(
                dirty_rate_mib_per_sec = result.dirty_rate_mib_per_sec,
                dirty_pages = result.ferry.dirty_pages,
                window_ms = result.window_ms,
                cpu_ms,
                "dirty-rate measured"
            ),
        }
        self.stats.finish(result);
    }

    /// Bitmap and ring modes: start the log for DirtyRate, sync to a baseline, wait the
    /// window, sync once more (one-shot: stops only DirtyRate) and count our own bitmap.
    /// Both syncs are DirtyRate's own (`global_dirty_log_sync_for`): what they harvest
    /// for a migration beside is held back for its next sync, so the migration counts
    /// exactly what it would have counted without the measurement.
    fn log_based(&self, ring: bool) -> std::result::Result<Measured, Stop> {
        let space = self.vm.address_space();
        let bitmap = space.global_dirty_log_start(DirtyReason::DirtyRate)?;
        let r = catch_unwind(AssertUnwindSafe(|| self.log_window(space, &bitmap, ring)))
            .unwrap_or_else(|p| Err(panicked(&*p)));
        if ring && r.is_err() {
            // Stop a per-vCPU page count the window left running.
            let _ignored = self.vm.vcpu_dirty_pages_take();
        }
        if space.reasons().contains(DirtyReason::DirtyRate) {
            // Failed, cancelled or panicked before the one-shot sync: stop only our
            // reason (a reason left on would refuse the next measurement).
            if let Err(e) = space.global_dirty_log_stop(DirtyReason::DirtyRate) {
                warn!(error = %e, "stopping the dirty-rate dirty log failed");
            }
        }
        r
    }

    fn log_window(
        &self,
        space: &AddressSpace,
        bitmap: &dirty_sync::DirtyBitmap,
        ring: bool,
    ) -> std::result::Result<Measured, Stop> {
        // Baseline: absorbs what was dirty before (and KVM's INITIALLY_SET all-ones).
        let s0 = Instant::now();
        // Per-vCPU distinct pages, counted from this sync on (ring mode).
        let counting_pages = ring && self.vm.vcpu_dirty_pages_start();
        // While a measurement logs, no listener defers its re-protect (the address space
        // says so in the sink): the baseline re-arms everything it found, pages the
        // migration's lazy clear left pending included (QEMU's
        // dirtyrate_manual_reset_protect), so the window counts every write.
        let report = space.global_dirty_log_sync_for(DirtyReason::DirtyRate, false)?;
        let t0 = s0 + Duration::from_nanos(report.sync_ns / 2);
        bitmap.clear_all();
        let e0 = if ring { Some(self.entries()?) } else { None };
        let remaining_ms = self.req.calc_time_ms;
        self.cancel
            .wait_window(t0, remaining_ms)
            .ok_or(Stop::Cancelled)?;
        let s1 = Instant::now();
        let report = space.global_dirty_log_sync_for(DirtyReason::DirtyRate, true)?;
        let t1 = s1 + Duration::from_nanos(report.sync_ns / 2);
        let vcpu_pages = if counting_pages {
            self.vm.vcpu_dirty_pages_take()
        } else {
            None
        };
        let vcpu_entries = match e0 {
            Some(e0) => {
                let e1 = self.entries()?;
                Some(
                    e1.iter()
                        .zip(e0.iter().chain(std::iter::repeat(&0)))
                        .map(|(b, a)| b.saturating_sub(*a))
                        .collect(),
                )
            }
            None => None,
        };
        Ok(Measured {
            dirty_pages: bitmap.count() as f64,
            start: t0,
            window: t1.saturating_duration_since(t0),
            vcpu_entries,
            vcpu_pages,
            sampling: None,
            hash_passes: None,
        })
    }

    fn entries(&self) -> std::result::Result<Vec<u64>, Stop> {
        self.vm
            .vcpu_dirty_entries()
            .ok_or_else(|| Stop::Failed("the guest's dirty ring went away".into()))
    }

    /// Page sampling: hash randomly chosen pages, wait, hash them again, count changes.
    fn sampling(&self) -> std::result::Result<Measured, Stop> {
        let ram = GuestRam::new(Arc::clone(&self.vm));
        let plan = SamplePlan::new(ram.blocks(), self.req.sample_pages, self.req.seed);
        let t0 = Instant::now();
        let before = plan.hash_all(&ram);
        let pass0 = t0.elapsed();
        self.cancel
            .wait_window(t0, self.req.calc_time_ms)
            .ok_or(Stop::Cancelled)?;
        let t1 = Instant::now();
        let after = plan.hash_all(&ram);
        let pass1 = t1.elapsed();
        // Each page's own window runs from its first hash to its second. The passes
        // hash in the same order, so at a steady hashing speed the mean of those
        // windows runs from the first pass's midpoint to the second's; a pass the host
        // preempted is longer, and start-to-start would misstate the window by up to
        // the difference.
        let start = t0 + pass0 / 2;
        let window = (t1 + pass1 / 2) - start;
        let dirty = before.iter().zip(&after).filter(|(a, b)| a != b).count() as u64;
        let s = SamplingResult::new(dirty, plan.samples.len() as u64, plan.sampled_block_pages);
        Ok(Measured {
            dirty_pages: s.estimate_pages,
            start,
            window,
            vcpu_entries: None,
            vcpu_pages: None,
            sampling: Some(s),
            hash_passes: Some([pass0, pass1]),
        })
    }
}

/// The reply fields of a measured window.
fn result_of(m: Measured) -> DirtyRateResult {
    let secs = m.window.as_secs_f64().max(1e-9);
    let window_ms = i64::try_from(m.window.as_millis()).unwrap_or(i64::MAX);
    let mib = |pages: f64| pages * PAGE_SIZE as f64 / (1u64 << 20) as f64 / secs;
    let mut ferry = FerryDirtyRateInfo {
        dirty_rate_mib_per_sec: mib(m.dirty_pages),
        dirty_pages_per_sec: m.dirty_pages / secs,
        dirty_pages: m.dirty_pages,
        window_us: u64::try_from(m.window.as_micros()).unwrap_or(u64::MAX),
        window_start_unix_us: unix_us(m.start),
        hash_pass_us: m
            .hash_passes
            .map(|p| p.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))),
        ..Default::default()
    };
    let mut rate = ferry.dirty_rate_mib_per_sec.floor() as i64;
    if let Some(s) = &m.sampling {
        ferry.sampled_pages = Some(s.samples);
        ferry.dirty_samples = Some(s.dirty);
        ferry.confidence_95 = Some(ConfidenceInterval {
            low_mib_per_sec: mib(s.low_pages),
            high_mib_per_sec: mib(s.high_pages),
        });
        if s.samples == 0 {
            rate = -1;
        }
    }
    let vcpu_dirty_rate = m.vcpu_entries.map(|entries| {
        let total: u64 = entries.iter().sum();
        ferry.ring_entries = Some(total);
        ferry.ring_entries_mib_per_sec = Some(mib(total as f64));
        ferry.vcpu_ring_entries_mib_per_sec =
            Some(entries.iter().map(|e| mib(*e as f64)).collect());
        ferry.vcpu_ring_entries = Some(entries.clone());
        // Distinct pages per vCPU, the unit of `dirty-rate`; ring entries only when the
        // VMM does not count pages.
        let per_vcpu = match m.vcpu_pages {
            Some(pages) => {
                let rates: Vec<f64> = pages.iter().map(|p| mib(*p as f64)).collect();
                ferry.vcpu_dirty_pages = Some(pages);
                ferry.vcpu_dirty_rate_mib_per_sec = Some(rates.clone());
                rates
            }
            None => entries.iter().map(|e| mib(*e as f64)).collect(),
        };
        per_vcpu
            .iter()
            .enumerate()
            .map(|(id, r)| DirtyRateVcpu {
                id: id as u64,
                dirty_rate: r.floor() as i64,
            })
            .collect()
    });
    DirtyRateResult {
        dirty_rate_mib_per_sec: rate,
        window_ms,
        vcpu_dirty_rate,
        ferry,
    }
}

/// `t` on the host wall clock, microseconds since the Unix epoch.
fn unix_us(t: Instant) -> u64 {
    let now = SystemTime::now();
    let wall = now
        .checked_sub(t.elapsed())
        .unwrap_or(now)
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(wall.as_micros()).unwrap_or(u64::MAX)
}

/// Which pages page sampling hashes: per block of at least 128 KiB,
/// `size × sample_pages_per_GiB >> 30` distinct pages, uniform over the whole block.
#[derive(Debug)]
pub struct SamplePlan {
    /// (block index, page in block), sorted.
    pub samples: Vec<(usize, u64)>,
    /// Pages of the blocks that got samples (what the sampled fraction scales to).
    pub sampled_block_pages: u64,
}

impl SamplePlan {
    /// Draws the samples with a splitmix64 generator seeded by `seed`.
    pub fn new(blocks: &[dirty_sync::RamBlock], per_gib: u64, seed: u64) -> Self {
        let mut state = seed;
        let mut samples = Vec::new();
        let mut sampled_block_pages = 0;
        for (bi, b) in blocks.iter().enumerate() {
            if b.size_bytes < MIN_SAMPLED_BLOCK_BYTES {
                continue;
            }
            let pages = b.pages();
            let n = ((u128::from(b.size_bytes) * u128::from(per_gib)) >> 30) as u64;
            let n = n.min(pages);
            if n == 0 {
                continue;
            }
            sampled_block_pages += pages;
            let mut chosen = HashSet::with_capacity(n as usize);
            while (chosen.len() as u64) < n {
                chosen.insert(uniform(&mut state, pages));
            }
            let mut v: Vec<u64> = chosen.into_iter().collect();
            v.sort_unstable();
            samples.extend(v.into_iter().map(|p| (bi, p)));
        }
        SamplePlan {
            samples,
            sampled_block_pages,
        }
    }

    /// xxh3-64 of every sampled page, in sample order.
    pub fn hash_all(&self, ram: &GuestRam) -> Vec<u64> {
        self.samples
            .iter()
            .map(|&(b, p)| {
                ram.page(b, p).map_or(0, |page| {
                    // SAFETY: the guest may write the page while it is hashed; a torn
                    // read is a changed page either way, which is what sampling counts
                    // (the page was written in the window).
                    xxhash_rust::xxh3::xxh3_64(unsafe { page.as_bytes() })
                })
            })
            .collect()
    }
}

/// A sampled window: the changed fraction scaled to the sampled blocks, with its
/// continuity-corrected Wilson score 95 % interval (binomial).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingResult {
    /// Sampled pages whose hash changed.
    pub dirty: u64,
    /// Pages sampled.
    pub samples: u64,
    /// Estimated dirty pages in the sampled blocks.
    pub estimate_pages: f64,
    /// Lower end of the 95 % interval, pages.
    pub low_pages: f64,
    /// Upper end of the 95 % interval, pages.
    pub high_pages: f64,
}

impl SamplingResult {
    /// The estimate and interval for `dirty` of `samples` over `population` pages.
    pub fn new(dirty: u64, samples: u64, population: u64) -> Self {
        let (low, high) = wilson_interval(dirty, samples, Z_95);
        let pop = population as f64;
        let p = if samples == 0 {
            0.0
        } else {
            dirty as f64 / samples as f64
        };
        SamplingResult {
            dirty,
            samples,
            estimate_pages: p * pop,
            low_pages: low * pop,
            high_pages: high * pop,
        }
    }
}

/// Wilson score interval of a binomial proportion `k / n`, with continuity correction
/// (Newcombe 1998, method 4): at least the nominal coverage for small counts too.
/// `[0, 1]` when n = 0.
pub fn wilson_interval(k: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let k = k.min(n);
    let nf = n as f64;
    let p = k as f64 / nf;
    let z2 = z * z;
    let denom = 2.0 * (nf + z2);
    let low = if k == 0 {
        0.0
    } else {
        let r = z2 - 2.0 - 1.0 / nf + 4.0 * p * (nf * (1.0 - p) + 1.0);
        (2.0 * nf * p + z2 - 1.0 - z * r.max(0.0).sqrt()) / denom
    };
    let high = if k == n {
        1.0
    } else {
        let r = z2 + 2.0 - 1.0 / nf + 4.0 * p * (nf * (1.0 - p) - 1.0);
        (2.0 * nf * p + z2 + 1.0 + z * r.max(0.0).sqrt()) / denom
    };
    (low.clamp(0.0, 1.0), high.clamp(0.0, 1.0))
}

/// splitmix64: the next value of the sequence whose state is `state`.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform integer in `[0, n)` (n > 0), by Lemire's multiply-shift with rejection.
fn uniform(state: &mut u64, n: u64) -> u64 {
    let threshold = n.wrapping_neg() % n;
    loop {
        let m = u128::from(splitmix64(state)) * u128::from(n);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// CPU time of the calling thread, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; the clock id is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use dirty_sync::{DirtySink, MemoryListener, RamBlock};
    use std::sync::Mutex;

    /// Reports pages `0..pages` on every sync, like a working-set guest.
    struct EverySync(u64);

    impl MemoryListener for EverySync {
        fn name(&self) -> &'static str {
            "every-sync"
        }
        fn log_sync(&self, b: &RamBlock, sink: &mut DirtySink<'_>) -> dirty_sync::Result<()> {
            for p in 0..self.0.min(b.pages()) {
                sink.set_page(b.first_page + p);
            }
            Ok(())
        }
    }

    /// 4 MiB of heap "RAM" in one block.
    type FakeVm = crate::testing::TestVm<()>;

    /// A guest whose listener reports pages `0..pages_per_sync` on every sync.
    fn fake_vm(pages_per_sync: u64) -> Arc<FakeVm> {
        let ram = dirty_sync::HostMemory::anonymous(4 << 20).unwrap();
        let block = RamBlock::new("ram0", 0, ram, 0, 0);
        let space = AddressSpace::new(vec![block]).unwrap();
        space
            .register_listener(Arc::new(EverySync(pages_per_sync)))
            .unwrap();
        Arc::new(FakeVm {
            space: Arc::new(space),
            mem: (),
        })
    }

    fn refused(job: &DirtyRateJob, args: DirtyRateArgs, text: &str) {
        let before = job.query(None);
        match job.calc(&args) {
            Err(Error::InvalidParameter(t)) | Err(Error::Busy(t)) => assert_eq!(t, text),
            other => panic!("{args:?}: expected an error, got {other:?}"),
        }
        assert_eq!(job.query(None), before, "a refused request changes nothing");
    }

    #[test]
    fn bad_arguments_get_qemus_errors() {
        let job = DirtyRateJob::new(fake_vm(0));
        let range = "Calculation time is out of range [50ms, 60000ms].";
        refused(
            &job,
            DirtyRateArgs::millis(49, DirtyRateMode::PageSampling),
            range,
        );
        refused(
            &job,
            DirtyRateArgs::millis(60_001, DirtyRateMode::DirtyBitmap),
            range,
        );
        let mut a = DirtyRateArgs {
            calc_time: 61,
            ..Default::default()
        };
        refused(&job, a.clone(), range);
        a.calc_time = i64::MAX;
        refused(&job, a.clone(), range);
        a.calc_time = -1;
        refused(&job, a, range);
        let mut a = DirtyRateArgs::millis(100, DirtyRateMode::DirtyBitmap);
        a.sample_pages = Some(512);
        refused(&job, a, "sample-pages is used only in page-sampling mode");
        let mut a = DirtyRateArgs::millis(100, DirtyRateMode::PageSampling);
        a.sample_pages = Some(127);
        refused(&job, a.clone(), "sample-pages is out of range[128, 16384].");
        a.sample_pages = Some(16385);
        refused(&job, a, "sample-pages is out of range[128, 16384].");
        refused(
            &job,
            DirtyRateArgs::millis(100, DirtyRateMode::DirtyRing),
            "mode dirty-ring is not enabled, use other method instead.",
        );
        assert_eq!(job.status(), DirtyRateStatus::Unstarted);
    }

    #[test]
    fn one_at_a_time_and_cancel() {
        let job = DirtyRateJob::new(fake_vm(0));
        job.calc(&DirtyRateArgs {
            calc_time: 60,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            job.status(),
            DirtyRateStatus::Measuring,
            "reply after measuring"
        );
        refused(
            &job,
            DirtyRateArgs::millis(100, DirtyRateMode::DirtyBitmap),
            "the dirty rate is already being measured.",
        );
        let q = job.query(None);
        assert_eq!((q.calc_time, q.sample_pages), (60, 512));
        assert!(job.cancel());
        let q = job.query(None);
        assert_eq!(q.status, DirtyRateStatus::Measured);
        assert_eq!(q.dirty_rate, Some(-1));
        assert!(q.ferry.unwrap().cancelled);
        assert!(!job.cancel(), "nothing left to cancel");
    }

    #[test]
    fn cancel_ends_a_wait_from_another_thread() {
        let job = DirtyRateJob::new(fake_vm(0));
        job.calc(&DirtyRateArgs::millis(60_000, DirtyRateMode::DirtyBitmap))
            .unwrap();
        let q = std::thread::scope(|s| {
            let waiter = s.spawn(|| job.wait(None));
            while !waiter.is_finished() {
                job.cancel();
                std::thread::sleep(Duration::from_millis(5));
            }
            waiter.join().unwrap()
        });
        assert_eq!(q.status, DirtyRateStatus::Measured);
        assert!(q.ferry.unwrap().cancelled);
        assert!(!job.vm.address_space().logging(), "the log stopped");
    }

    #[test]
    fn bitmap_mode_counts_the_log_beside_a_migration() {
        let vm = fake_vm(256);
        let space = Arc::clone(vm.address_space());
        let mig = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        let job = DirtyRateJob::new(vm);
        job.calc(&DirtyRateArgs::millis(50, DirtyRateMode::DirtyBitmap))
            .unwrap();
        let q = job.wait(Some(TimeUnit::Millisecond));
        let x = q.ferry.clone().unwrap();
        assert_eq!(x.dirty_pages, 256.0, "{q:?}");
        assert!(q.calc_time >= 50);
        assert_eq!(q.sample_pages, 0);
        assert!(space.reasons().contains(DirtyReason::Migration));
        assert!(!space.reasons().contains(DirtyReason::DirtyRate));
        assert_eq!(mig.count(), 0, "held back for the migration's own sync");
        let r = space.global_dirty_log_sync(None).unwrap();
        assert_eq!(r.new_pages(DirtyReason::Migration), 256);
        assert_eq!(mig.count(), 256, "the migration's bitmap keeps every page");
        // Again: a second request after the first one finished.
        job.calc(&DirtyRateArgs::millis(50, DirtyRateMode::DirtyBitmap))
            .unwrap();
        assert_eq!(job.wait(None).ferry.unwrap().dirty_pages, 256.0);
    }

    /// Reports the pages the test queued, once, at the next sync.
    #[derive(Default)]
    struct Script(Mutex<Vec<u64>>);

    impl MemoryListener for Script {
        fn name(&self) -> &'static str {
            "script"
        }
        fn log_sync(&self, b: &RamBlock, sink: &mut DirtySink<'_>) -> dirty_sync::Result<()> {
            let mut q = self.0.lock().unwrap();
            for p in q.drain(..).filter(|p| *p < b.pages()) {
                sink.set_page(b.first_page + p);
            }
            Ok(())
        }
    }

    /// A migration's per-sync figures (reported, new pages, its bitmap, its period's
    /// unique pages) over a scripted guest, with a bitmap-mode measurement between
    /// syncs 1 and 2 or not.
    fn migration_figures(measure: bool) -> Vec<(u64, u64, u64, u64)> {
        let script = Arc::new(Script::default());
        let ram = dirty_sync::HostMemory::anonymous(4 << 20).unwrap();
        let space = AddressSpace::new(vec![RamBlock::new("ram0", 0, ram, 0, 0)]).unwrap();
        space.register_listener(script.clone()).unwrap();
        let vm = Arc::new(FakeVm {
            space: Arc::new(space),
            mem: (),
        });
        let space = Arc::clone(vm.address_space());
        let job = DirtyRateJob::new(vm);
        let mig = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        let period = space.observe(DirtyReason::Migration).unwrap();
        let mut out = Vec::new();
        for sync in 0..4u64 {
            script
                .0
                .lock()
                .unwrap()
                .extend((0..100).map(|p| p * (sync + 1)));
            if measure && sync == 1 {
                job.calc(&DirtyRateArgs::millis(50, DirtyRateMode::DirtyBitmap))
                    .unwrap();
                let q = job.wait(None);
                assert!(q.ferry.unwrap().error.is_none());
                script.0.lock().unwrap().extend(500..600);
            } else if sync == 1 {
                script.0.lock().unwrap().extend(500..600);
            }
            let r = space.global_dirty_log_sync(None).unwrap();
            out.push((
                r.reported_pages,
                r.new_pages(DirtyReason::Migration),
                mig.count(),
                period.count(),
            ));
            // The sender takes half of what it has; a period closes at sync 2.
            for p in mig.iter_set().step_by(2).collect::<Vec<_>>() {
                mig.test_and_clear(p);
            }
            if sync == 2 {
                period.clear_all();
            }
        }
        out
    }

    #[test]
    fn a_measurement_beside_a_migration_changes_none_of_its_figures() {
        let without = migration_figures(false);
        // Sync 1: the even pages below 200 (the sender took those below 100) and 500..600.
        assert_eq!((without[1].0, without[1].1), (200, 200));
        assert_eq!(migration_figures(true), without);
    }

    /// Defers its clear when a sync lets it; records, per sync, whether it could.
    #[derive(Default)]
    struct Lazy(Mutex<Vec<bool>>);

    impl MemoryListener for Lazy {
        fn name(&self) -> &'static str {
            "lazy"
        }
        fn defers_clear(&self) -> bool {
            true
        }
        fn log_sync(&self, _b: &RamBlock, sink: &mut DirtySink<'_>) -> dirty_sync::Result<()> {
            self.0.lock().unwrap().push(sink.may_defer_clear());
            Ok(())
        }
    }

    /// A measurement's syncs never let a listener leave pages armed for a lazy clear
    /// (nobody would clear them, and its window would miss their writes), not even
    /// beside a migration, whose own lazy syncs may defer again once it is done.
    #[test]
    fn no_sync_defers_clears_while_a_measurement_logs() {
        let lazy = Arc::new(Lazy::default());
        let ram = dirty_sync::HostMemory::anonymous(4 << 20).unwrap();
        let space = Arc::new(AddressSpace::new(vec![RamBlock::new("ram0", 0, ram, 0, 0)]).unwrap());
        space.register_listener(lazy.clone()).unwrap();
        let job = DirtyRateJob::new(Arc::new(FakeVm {
            space: space.clone(),
            mem: (),
        }));
        let all = dirty_sync::RateSample::ALL;
        space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        space.global_dirty_log_sync_lazy(all, all).unwrap();
        job.calc(&DirtyRateArgs::millis(50, DirtyRateMode::DirtyBitmap))
            .unwrap();
        assert!(job.wait(None).ferry.unwrap().error.is_none());
        space.global_dirty_log_sync_lazy(all, all).unwrap();
        // The migration's, the measurement's two, the migration's again.
        assert_eq!(*lazy.0.lock().unwrap(), vec![true, false, false, true]);
    }

    #[test]
    fn sampling_static_memory_reads_zero() {
        let job = DirtyRateJob::new(fake_vm(0));
        let mut a = DirtyRateArgs::millis(50, DirtyRateMode::PageSampling);
        a.sample_pages = Some(16384);
        job.calc(&a).unwrap();
        let q = job.wait(None);
        assert_eq!(q.dirty_rate, Some(0));
        let x = q.ferry.unwrap();
        assert_eq!(x.sampled_pages, Some(64), "4 MiB at 16384/GiB");
        assert_eq!(x.dirty_samples, Some(0));
        let ci = x.confidence_95.unwrap();
        assert_eq!(ci.low_mib_per_sec, 0.0);
        assert!(ci.high_mib_per_sec > 0.0);
    }

    #[test]
    fn wilson_covers_the_edges() {
        let (lo, hi) = wilson_interval(0, 512, Z_95);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.0 && hi < 0.01);
        let (lo, hi) = wilson_interval(512, 512, Z_95);
        assert!(lo > 0.99 && (hi - 1.0).abs() < 1e-12);
        // Newcombe's worked example: 81/263 → 0.2535 .. 0.3682.
        let (lo, hi) = wilson_interval(81, 263, Z_95);
        assert!(
            (lo - 0.2535).abs() < 5e-4 && (hi - 0.3682).abs() < 5e-4,
            "{lo} {hi}"
        );
        assert_eq!(wilson_interval(0, 0, Z_95), (0.0, 1.0));
    }

    #[test]
    fn uniform_stays_in_range_and_spreads() {
        let mut s = 42;
        let mut hist = [0u32; 10];
        for _ in 0..100_000 {
            let v = uniform(&mut s, 10);
            hist[v as usize] += 1;
        }
        assert!(
            hist.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hist:?}"
        );
    }

    #[test]
    fn plan_follows_qemus_allocation() {
        let blocks = vec![
            dirty_sync::RamBlock::new(
                "big",
                0,
                dirty_sync::HostMemory::anonymous(1 << 30).unwrap(),
                0,
                0,
            ),
            dirty_sync::RamBlock::new(
                "tiny",
                1 << 30,
                dirty_sync::HostMemory::anonymous(64 << 10).unwrap(),
                1,
                1 << 18,
            ),
        ];
        let plan = SamplePlan::new(&blocks, 512, 7);
        assert_eq!(plan.samples.len(), 512);
        assert_eq!(
            plan.sampled_block_pages,
            1 << 18,
            "the tiny block is skipped"
        );
        let distinct: HashSet<_> = plan.samples.iter().collect();
        assert_eq!(distinct.len(), 512);
        assert!(plan.samples.iter().all(|&(b, p)| b == 0 && p < 1 << 18));
    }

    #[test]
    fn sampling_scales_the_fraction() {
        let s = SamplingResult::new(8, 512, 1 << 18);
        assert!((s.estimate_pages - 4096.0).abs() < 1e-6);
        assert!(s.low_pages < 4096.0 && s.high_pages > 4096.0);
    }
}
