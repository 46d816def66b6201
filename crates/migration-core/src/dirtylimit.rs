//! Dirty limit (QEMU's `set-vcpu-dirty-limit`): each vCPU with a limit is held to at
//! most that many MiB/s of dirtied pages, measured from the dirty ring's per-vCPU
//! counts, by throttling that vCPU alone; a vCPU without a limit, or under it, is
//! never slowed.
//!
//! One thread (`mig/dirtylimit`) holds the dirty log on (reason
//! [`DirtyReason::DirtyLimit`]), and every period syncs it (which reaps the rings),
//! turns each vCPU's new ring entries into a rate, and sets the vCPU's throttle
//! ([`MigratableVm::set_vcpu_throttle_ppm`]). The controller: a vCPU that ran a
//! fraction `run` of the period and dirtied `r` MiB/s would dirty `r / run` running
//! freely, so running `limit / (r / run)` of the time holds it at the limit; the new
//! fraction moves there by a damped step, which keeps measurement noise from making it
//! oscillate.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dirty_sync::{DirtyReason, PAGE_SIZE};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::guest::MigratableVm;
use crate::{Error, Result};

/// QEMU's default period (`x-vcpu-dirty-limit-period`), ms.
pub const DEFAULT_PERIOD_MS: u64 = 1000;
/// Shortest period, ms (QEMU's bound; each period costs a ring reap of every vCPU).
pub const MIN_PERIOD_MS: u64 = 1;
/// Longest period, ms (QEMU's bound).
pub const MAX_PERIOD_MS: u64 = 1000;
/// The first period after the limiter starts is at most this long, ms: a vCPU far over
/// its limit (a migration's trigger, a new limit) is held within about this time rather
/// than a whole period; later periods are as set.
const FIRST_PERIOD_MS: u64 = 100;
/// The least a limited vCPU runs: 0.1 % of its time.
const MIN_RUN_FRACTION: f64 = 0.001;
/// How far one period moves the running fraction toward its target (on a log scale):
/// 1 would jump there at once and amplify noise, small values converge slowly.
const STEP: f64 = 0.7;
/// The integral term: of the MiB dirtied over the limit (or under it) so far, this much
/// carries to the next period. It removes a steady bias (the damped log-scale step
/// settles above the limit when the rate is noisy, and a vCPU's rate need not follow
/// its running time exactly); older periods fade.
const EXCESS_KEEP: f64 = 0.75;
/// The carried excess is paid back over this many periods.
const PAYBACK_PERIODS: f64 = 2.0;
/// The integral starts once a period's rate is within this factor of the limit: the
/// approach from a free-running rate is the proportional step's business, and counting
/// it would wind the integral up.
const SETTLED_BAND: f64 = 1.2;
/// QEMU's error when the guest has no dirty ring.
const NEEDS_RING: &str =
    "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'";

/// One vCPU's row of `query-vcpu-dirty-limit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VcpuDirtyLimit {
    /// The vCPU's index.
    pub cpu_index: usize,
    /// Its limit, MiB/s.
    pub limit_rate: u64,
    /// Its dirty rate over the last period, MiB/s.
    pub current_rate: u64,
}

#[derive(Default)]
struct State {
    /// Per vCPU: the limit, MiB/s.
    limits: Vec<Option<u64>>,
    /// Per vCPU: the rate over the last period, MiB/s (fractional).
    current: Vec<f64>,
    /// Per vCPU: the fraction of its time it is let run.
    run: Vec<f64>,
    /// Per vCPU: the controller's integral, MiB dirtied over the limit (decayed); None
    /// until its rate first came near the limit.
    excess_mib: Vec<Option<f64>>,
    period_ms: u64,
    /// The thread runs (and holds the dirty log).
    running: bool,
    stop: bool,
}

struct Shared {
    vm: Arc<dyn MigratableVm>,
    state: Mutex<State>,
    changed: Condvar,
}

/// The dirty limits of one VM's vCPUs (QEMU's `dirtylimit` state).
pub struct DirtyLimiter {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DirtyLimiter {
    /// A limiter for `vm`, with no limit set (nothing runs until one is).
    pub fn new(vm: Arc<dyn MigratableVm>) -> Self {
        DirtyLimiter {
            shared: Arc::new(Shared {
                vm,
                state: Mutex::new(State {
                    period_ms: DEFAULT_PERIOD_MS,
                    ..Default::default()
                }),
                changed: Condvar::new(),
            }),
            thread: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vcpus(&self) -> Result<usize> {
        match self.shared.vm.vcpu_dirty_entries() {
            Some(v) => Ok(v.len()),
            None => Err(Error::InvalidParameter(NEEDS_RING.into())),
        }
    }

    fn targets(&self, cpu_index: Option<usize>) -> Result<std::ops::Range<usize>> {
        let n = self.vcpus()?;
        match cpu_index {
            Some(i) if i >= n => Err(Error::InvalidParameter(
                "incorrect cpu index specified".into(),
            )),
            Some(i) => Ok(i..i + 1),
            None => Ok(0..n),
        }
    }

    /// QEMU's `set-vcpu-dirty-limit`: limits vCPU `cpu_index` (every vCPU when None)
    /// to `dirty_rate_mib_s` MiB/s; 0 cancels, as in QEMU. Needs the dirty ring.
    pub fn set(&self, cpu_index: Option<usize>, dirty_rate_mib_s: u64) -> Result<()> {
        if dirty_rate_mib_s == 0 {
            return self.cancel(cpu_index);
        }
        let targets = self.targets(cpu_index)?;
        let n = self.vcpus()?;
        {
            let mut st = self.lock();
            st.limits.resize(n, None);
            st.current.resize(n, 0.0);
            st.run.resize(n, 1.0);
            st.excess_mib.resize(n, None);
            for i in targets {
                st.limits[i] = Some(dirty_rate_mib_s);
                st.excess_mib[i] = None;
            }
        }
        info!(
            cpu_index = ?cpu_index,
            dirty_rate_mib_s, "dirty limit set"
        );
        self.ensure_running()
    }

    /// QEMU's `cancel-vcpu-dirty-limit`: lifts the limit of `cpu_index` (every vCPU
    /// when None); the vCPU runs at full speed from now on. The thread stops with the
    /// last limit.
    pub fn cancel(&self, cpu_index: Option<usize>) -> Result<()> {
        if self.shared.vm.vcpu_dirty_entries().is_none() {
            // Nothing can be limited without the ring: nothing to lift (QEMU's no-op).
            return Ok(());
        }
        let targets = self.targets(cpu_index)?;
        let none_left = {
            let mut st = self.lock();
            for i in targets {
                if let Some(l) = st.limits.get_mut(i) {
                    *l = None;
                }
                if let Some(r) = st.run.get_mut(i) {
                    *r = 1.0;
                }
                self.shared.vm.set_vcpu_throttle_ppm(i, 0);
            }
            st.limits.iter().all(Option::is_none)
        };
        info!(cpu_index = ?cpu_index, "dirty limit cancelled");
        if none_left {
            self.stop();
        }
        Ok(())
    }

    /// QEMU's `query-vcpu-dirty-limit`: the vCPUs with a limit.
    pub fn query(&self) -> Vec<VcpuDirtyLimit> {
        let st = self.lock();
        st.limits
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                l.map(|limit| VcpuDirtyLimit {
                    cpu_index: i,
                    limit_rate: limit,
                    current_rate: st.current.get(i).copied().unwrap_or(0.0).round() as u64,
                })
            })
            .collect()
    }

    /// QEMU's `dirty-limit-throttle-time-per-round` and `dirty-limit-ring-full-time`,
    /// µs, in Ferry's terms: a round is a period; the first is the longest a limited
    /// vCPU was held asleep in the last period, the second how long the limited vCPUs
    /// take on average to fill their dirty ring at their current rate (0 when none
    /// dirties, or the ring's size is unknown).
    pub fn round_times_us(&self) -> (u64, u64) {
        let st = self.lock();
        let period_us = st.period_ms as f64 * 1000.0;
        let limited = || st.limits.iter().enumerate().filter(|(_, l)| l.is_some());
        let throttle = limited()
            .map(|(i, _)| (1.0 - st.run.get(i).copied().unwrap_or(1.0)) * period_us)
            .fold(0.0, f64::max);
        let entries = self.shared.vm.dirty_ring_entries().unwrap_or(0);
        let fills: Vec<f64> = limited()
            .filter_map(|(i, _)| {
                let pages_per_s = st.current.get(i)? * f64::from(1 << 20) / PAGE_SIZE as f64;
                (pages_per_s > 0.0 && entries > 0).then(|| f64::from(entries) / pages_per_s * 1e6)
            })
            .collect();
        let fill = if fills.is_empty() {
            0.0
        } else {
            fills.iter().sum::<f64>() / fills.len() as f64
        };
        (throttle.round() as u64, fill.round() as u64)
    }

    /// Per vCPU: the fraction of its time the limiter lets it run (1 = not slowed).
    pub fn run_fractions(&self) -> Vec<f64> {
        self.lock().run.clone()
    }

    /// The measurement period (QEMU's `x-vcpu-dirty-limit-period`), ms, within
    /// [`MIN_PERIOD_MS`]..=[`MAX_PERIOD_MS`].
    pub fn set_period_ms(&self, period_ms: u64) -> Result<()> {
        if !(MIN_PERIOD_MS..=MAX_PERIOD_MS).contains(&period_ms) {
            return Err(Error::InvalidParameter(format!(
                "Parameter 'x-vcpu-dirty-limit-period' expects a value between \
                 {MIN_PERIOD_MS} and {MAX_PERIOD_MS}"
            )));
        }
        self.lock().period_ms = period_ms;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// True while some vCPU has a limit.
    pub fn in_service(&self) -> bool {
        self.lock().running
    }

    fn ensure_running(&self) -> Result<()> {
        let mut thread = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        if self.lock().running {
            return Ok(());
        }
        if let Some(old) = thread.take() {
            let _ = old.join();
        }
        let space = self.shared.vm.address_space().clone();
        space.global_dirty_log_start(DirtyReason::DirtyLimit)?;
        {
            let mut st = self.lock();
            st.running = true;
            st.stop = false;
        }
        let shared = self.shared.clone();
        let spawned = std::thread::Builder::new()
            .name("mig/dirtylimit".into())
            .spawn(move || shared.run());
        match spawned {
            Ok(h) => {
                *thread = Some(h);
                Ok(())
            }
            Err(e) => {
                self.lock().running = false;
                let _ = space.global_dirty_log_stop(DirtyReason::DirtyLimit);
                Err(Error::Guest(format!(
                    "cannot start the dirty-limit thread: {e}"
                )))
            }
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(h) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for DirtyLimiter {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The thread: a sync per period, rates, throttles; until stopped. Leaves every
    /// vCPU at full speed and the dirty log's DirtyLimit reason dropped.
    fn run(&self) {
        let space = self.vm.address_space().clone();
        let mut last = self.vm.vcpu_dirty_entries().unwrap_or_default();
        let mut last_at = Instant::now();
        let mut first = true;
        loop {
            let period = {
                let st = self.lock();
                let period_ms = if first {
                    st.period_ms.min(FIRST_PERIOD_MS)
                } else {
                    st.period_ms
                };
                first = false;
                let period = Duration::from_millis(period_ms);
                let deadline = last_at + period;
                let mut st = st;
                while !st.stop {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    st = self
                        .changed
                        .wait_timeout(st, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                if st.stop {
                    break;
                }
                period
            };
            // Reaps every ring, so the counts are current.
            if let Err(e) = space.global_dirty_log_sync(None) {
                warn!(error = %e, "dirty limit: the dirty-log sync failed");
            }
            let now = self.vm.vcpu_dirty_entries().unwrap_or_default();
            let secs = last_at
                .elapsed()
                .as_secs_f64()
                .max(period.as_secs_f64() / 2.0);
            last_at = Instant::now();
            let mut st = self.lock();
            let n = now.len().min(st.limits.len());
            for (i, &entries) in now.iter().enumerate().take(n) {
                let pages = entries.saturating_sub(last.get(i).copied().unwrap_or(0));
                let rate = pages as f64 * PAGE_SIZE as f64 / f64::from(1 << 20) / secs;
                st.current[i] = rate;
                let Some(limit) = st.limits[i] else {
                    continue;
                };
                let (aim, excess) = aim_rate(st.excess_mib[i], rate, limit as f64, secs);
                st.excess_mib[i] = excess;
                let run = next_run_fraction(st.run[i], rate, aim);
                st.run[i] = run;
                let ppm = ((1.0 - run) * 1e6).round() as u32;
                self.vm.set_vcpu_throttle_ppm(i, ppm);
                debug!(
                    vcpu = i,
                    rate_mib_s = rate,
                    limit_mib_s = limit,
                    run_fraction = run,
                    "dirty limit: period"
                );
            }
            last = now;
        }
        let n = self.lock().limits.len();
        for i in 0..n {
            self.vm.set_vcpu_throttle_ppm(i, 0);
        }
        if let Err(e) = space.global_dirty_log_stop(DirtyReason::DirtyLimit) {
            warn!(error = %e, "dirty limit: stopping the dirty log failed");
        }
        self.lock().running = false;
        info!("dirty limit: stopped, every vCPU at full speed");
    }
}

/// The controller: the running fraction for the next period of a vCPU that ran `run`
/// of the last one and dirtied `rate` MiB/s, to hold it at `limit`. Under its limit
/// unthrottled, it stays unthrottled.
/// The integral term: adds a period's excess (`rate` over `limit` for `secs`) to the
/// carried `excess_mib` (None: not settled yet) and returns the rate to aim at next,
/// the limit less what is to be paid back (within a quarter of the limit), and the new
/// excess.
fn aim_rate(excess_mib: Option<f64>, rate: f64, limit: f64, secs: f64) -> (f64, Option<f64>) {
    let settled = excess_mib.is_some() || (rate <= limit * SETTLED_BAND && rate > 0.0);
    if !settled {
        return (limit, None);
    }
    let excess = excess_mib.unwrap_or(0.0) * EXCESS_KEEP + (rate - limit) * secs;
    let bound = limit * secs * PAYBACK_PERIODS / 4.0;
    let excess = excess.clamp(-bound, bound);
    (limit - excess / (PAYBACK_PERIODS * secs), Some(excess))
}

fn next_run_fraction(run: f64, rate: f64, limit: f64) -> f64 {
    if rate <= 0.0 {
        // Nothing dirtied (idle, or all its pages were already dirty): no evidence that
        // it needs holding back; ease off.
        return (run / STEP).min(1.0);
    }
    let target = (run * limit / rate).clamp(MIN_RUN_FRACTION, 1.0);
    // A damped step on a log scale: ratios, not differences, are what the rate follows.
    (run.ln() + STEP * (target.ln() - run.ln()))
        .exp()
        .clamp(MIN_RUN_FRACTION, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU that dirties `free` MiB/s running freely, measured exactly.
    fn converge(free: f64, limit: f64) -> (f64, f64) {
        let mut run = 1.0;
        let mut rate = free;
        for _ in 0..30 {
            run = next_run_fraction(run, rate, limit);
            rate = free * run;
        }
        (run, rate)
    }

    #[test]
    fn the_controller_holds_the_limit_across_three_decades() {
        for (free, limit) in [(1000.0, 1.0), (1000.0, 100.0), (200.0, 150.0), (50.0, 49.0)] {
            let (_, rate) = converge(free, limit);
            assert!(
                (rate - limit).abs() / limit < 0.01,
                "free {free}, limit {limit}: {rate}"
            );
        }
    }

    #[test]
    fn a_vcpu_under_its_limit_is_never_slowed() {
        assert_eq!(converge(10.0, 20.0).0, 1.0);
        assert_eq!(next_run_fraction(1.0, 5.0, 5.0), 1.0);
        assert_eq!(next_run_fraction(1.0, 0.0, 5.0), 1.0);
    }

    /// The controller as the thread runs it (1 s periods): `plant` gives the measured
    /// rate for a running fraction and the period's number.
    fn control(limit: f64, periods: usize, plant: impl Fn(f64, usize) -> f64) -> Vec<f64> {
        let (mut run, mut excess) = (1.0, None);
        let mut rates = Vec::new();
        for k in 0..periods {
            let rate = plant(run, k);
            rates.push(rate);
            let (aim, e) = aim_rate(excess, rate, limit, 1.0);
            excess = e;
            run = next_run_fraction(run, rate, aim);
        }
        rates
    }

    #[test]
    fn the_controller_does_not_oscillate_on_a_steady_vcpu() {
        // From far above: down without swinging back up past the limit, a dip of a few
        // percent at most (the integral paying back the last periods above), settled.
        let (free, limit) = (400.0, 40.0);
        let rates = control(limit, 30, |run, _| free * run);
        let first_under = rates.iter().position(|&r| r < limit).unwrap_or(rates.len());
        assert!(
            rates[..first_under].windows(2).all(|w| w[1] <= w[0] + 1e-9),
            "{rates:?}"
        );
        assert!(rates.iter().all(|&r| r >= limit * 0.95), "{rates:?}");
        assert!(
            rates[first_under..].iter().all(|&r| r <= limit * 1.01),
            "{rates:?}"
        );
        assert!((rates[29] - limit).abs() / limit < 0.005, "{rates:?}");
    }

    #[test]
    fn a_noisy_vcpu_is_held_to_its_limit_on_average() {
        // Each period's rate off by up to ±40 % (a vCPU that works in a few slices per
        // period), and one that dirties 8 % more than its running time says: without
        // the integral the log-scale step settles several percent high.
        let (free, limit) = (300.0, 1.0);
        let noise = |k: usize| {
            let x = (k as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(17)
                % 1000;
            0.6 + 0.8 * x as f64 / 1000.0
        };
        for bias in [1.0, 1.08] {
            let rates = control(limit, 400, |run, k| free * run * bias * noise(k));
            let mean = rates[20..].iter().sum::<f64>() / (rates.len() - 20) as f64;
            assert!(
                (mean - limit).abs() / limit < 0.03,
                "bias {bias}: mean {mean}"
            );
        }
    }

    #[test]
    fn limits_need_the_dirty_ring() {
        let vm = crate::testing::TestVm::new(64 * PAGE_SIZE);
        let l = DirtyLimiter::new(vm);
        let e = l.set(Some(0), 10).unwrap_err().to_string();
        assert_eq!(e, NEEDS_RING);
        assert!(l.query().is_empty());
        assert!(l.cancel(None).is_ok(), "nothing to lift: QEMU's no-op");
        assert!(l.set(Some(0), 0).is_ok(), "a rate of 0 cancels");
        assert!(l.set_period_ms(0).is_err());
        assert!(l.set_period_ms(1001).is_err());
        assert!(l.set_period_ms(500).is_ok());
    }
}
