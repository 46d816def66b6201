//! The run/pause/stop/kick state machine shared by the VM handle and its vCPU workers.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the VM handle asks of the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Run the guest.
    Run,
    /// Park and wait.
    Pause,
    /// Leave the run loop for good.
    Stop,
}

/// The shared state behind the mutex.
#[derive(Debug)]
pub struct State {
    /// Current request.
    pub request: Request,
    /// Per vCPU: parked in [`Control::checkpoint`].
    pub parked: Vec<bool>,
    /// Per vCPU: its worker has left the run loop (stopped or failed).
    pub exited: Vec<bool>,
    /// Bumped by each kick.
    pub kick_epoch: u64,
    /// Per vCPU: the last kick epoch it acknowledged.
    pub kick_acked: Vec<u64>,
}

/// Mutex + condvar state machine (Running/Paused/Stopping) plus the throttle setting.
#[derive(Debug)]
pub struct Control {
    state: Mutex<State>,
    cv: Condvar,
    throttle_pct: AtomicU8,
    /// Per vCPU: a throttle of its own (dirty limit), in millionths of its time asleep;
    /// the larger of it and the global throttle applies.
    vcpu_throttle_ppm: Box<[AtomicU32]>,
    /// Per vCPU: microseconds slept in throttle sleeps so far.
    throttled_us: Box<[AtomicU64]>,
    /// Per vCPU: inside KVM_RUN (set just before the ioctl, cleared once it returned).
    in_guest: Box<[AtomicBool]>,
}

/// A throttle slice: vCPUs run this long between throttle sleeps (QEMU's CPU
/// throttle time slice). A vCPU's own throttle (dirty limit) shortens it, see
/// [`run_slice`].
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// The longest sleep a vCPU's own throttle takes at once: deeper throttles shorten the
/// run slice instead, so a vCPU held to a low dirty rate works in small, frequent
/// pieces (5 a second) rather than one 10 ms burst every few seconds. Not shorter: each
/// slice costs an exit, and on this PVM host the ring counts pages per exit that the
/// workload never wrote: with 50 ms sleeps (20 slices a second) about 40 a second more
/// than the guest's own writes, 17 % of a 1 MiB/s (256 pages/s) limit.
pub const MAX_VCPU_THROTTLE_SLEEP: Duration = Duration::from_millis(200);
/// How much of a slice's overrun counts as work at most (see [`Control::throttle`]).
const LATE_EXIT_ALLOWANCE: Duration = Duration::from_millis(5);
/// The most a vCPU is throttled: asleep 99.9 % of the time.
pub const MAX_THROTTLE_PPM: u32 = 999_000;

/// How long a vCPU runs between throttle sleeps at `ppm` millionths asleep: the full
/// [`THROTTLE_SLICE`] for the global (auto-converge) throttle, as QEMU; for a vCPU's
/// own throttle, shortened so its sleep stays within [`MAX_VCPU_THROTTLE_SLEEP`].
pub fn run_slice(ppm: u32, own: bool) -> Duration {
    let f = f64::from(ppm.min(MAX_THROTTLE_PPM)) / 1e6;
    let full_sleep = THROTTLE_SLICE.mul_f64(f / (1.0 - f));
    if !own || full_sleep <= MAX_VCPU_THROTTLE_SLEEP {
        THROTTLE_SLICE
    } else {
        MAX_VCPU_THROTTLE_SLEEP.mul_f64((1.0 - f) / f)
    }
}

impl Control {
    /// A control block for `vcpus` workers, initially running.
    pub fn new(vcpus: u32) -> Control {
        let n = vcpus as usize;
        Control {
            state: Mutex::new(State {
                request: Request::Run,
                parked: vec![false; n],
                exited: vec![false; n],
                kick_epoch: 0,
                kick_acked: vec![0; n],
            }),
            cv: Condvar::new(),
            throttle_pct: AtomicU8::new(0),
            vcpu_throttle_ppm: (0..n).map(|_| AtomicU32::new(0)).collect(),
            throttled_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
            in_guest: (0..n).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Locks the state; a poisoned lock is recovered (the state stays consistent: plain flags).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// Marks vCPU `id` as entering (true) or having left (false) KVM_RUN.
    pub fn set_in_guest(&self, id: usize, inside: bool) {
        if let Some(f) = self.in_guest.get(id) {
            f.store(inside, Ordering::SeqCst);
        }
    }

    /// True when some vCPU may be inside KVM_RUN. A vCPU seen outside has had every
    /// exit's buffered dirty state flushed by KVM already; one that enters later
    /// dirties pages after the caller's flush point.
    pub fn any_in_guest(&self) -> bool {
        self.in_guest.iter().any(|f| f.load(Ordering::SeqCst))
    }

    // ---- worker side ----

    /// Called by a worker between guest runs: acknowledges kicks, parks while paused.
    /// Returns false when the worker must stop.
    pub fn checkpoint(&self, id: usize) -> bool {
        let mut g = self.lock();
        loop {
            if g.kick_acked[id] != g.kick_epoch {
                g.kick_acked[id] = g.kick_epoch;
                self.cv.notify_all();
            }
            match g.request {
                Request::Run => return true,
                Request::Stop => return false,
                Request::Pause => {
                    if !g.parked[id] {
                        g.parked[id] = true;
                        self.cv.notify_all();
                    }
                    g = self.wait(g);
                    if g.request != Request::Pause {
                        g.parked[id] = false;
                    }
                }
            }
        }
    }

    /// Sleeps up to `dur`, waking early on pause, stop or kick.
    pub fn nap(&self, id: usize, dur: Duration) {
        let g = self.lock();
        let _unused = self
            .cv
            .wait_timeout_while(g, dur, |s| {
                s.request == Request::Run && s.kick_acked[id] == s.kick_epoch
            })
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Throttle: after each run slice ([`run_slice`]), sleep so that the vCPU is asleep
    /// the throttle's fraction of the time. The sleep follows the slice the vCPU really
    /// ran (an exit that comes late costs it a longer sleep, so the share holds).
    /// Returns how much of the current slice is left while throttled (the worker arms
    /// its slice timer for it), None when not throttled.
    pub fn throttle(&self, id: usize, slice_start: &mut Instant) -> Option<Duration> {
        let (ppm, own) = self.throttle_of(id);
        if ppm == 0 {
            *slice_start = Instant::now();
            return None;
        }
        let run = run_slice(ppm, own);
        let ran = slice_start.elapsed();
        if ran < run {
            return Some(run - ran);
        }
        // A slice stretched by a nap or a pause is not all work: count at most 4 slices,
        // or 5 ms.
        let ran = ran.min((run * 4).max(LATE_EXIT_ALLOWANCE));
        let started = Instant::now();
        let mut g = self.lock();
        // Sleep for the current throttle's share; a change of the throttle (read
        // under the lock its setters take, so none is missed) moves the deadline,
        // and lifting it ends the sleep at once. Pause/stop end the sleep too; kicks
        // are acknowledged (the worker is out of the guest) without ending it.
        loop {
            if g.kick_acked[id] != g.kick_epoch {
                g.kick_acked[id] = g.kick_epoch;
                self.cv.notify_all();
            }
            let (ppm, _) = self.throttle_of(id);
            let ppm = u64::from(ppm);
            let deadline =
                started + ran.mul_f64(ppm as f64 / (1_000_000 - ppm.min(999_999)) as f64);
            let now = Instant::now();
            if g.request != Request::Run || ppm == 0 || now >= deadline {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(g);
        if let Some(t) = self.throttled_us.get(id) {
            t.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        *slice_start = Instant::now();
        let (ppm, own) = self.throttle_of(id);
        (ppm != 0).then(|| run_slice(ppm, own))
    }

    /// The throttle vCPU `id` takes, in millionths of its time asleep: the larger of
    /// the global percentage and its own.
    #[cfg(test)]
    pub fn throttle_ppm(&self, id: usize) -> u32 {
        self.throttle_of(id).0
    }

    /// [`Control::throttle_ppm`], and whether it is the vCPU's own throttle.
    fn throttle_of(&self, id: usize) -> (u32, bool) {
        let global = u32::from(self.throttle_pct.load(Ordering::Relaxed).min(99)) * 10_000;
        let own = self
            .vcpu_throttle_ppm
            .get(id)
            .map_or(0, |p| p.load(Ordering::Relaxed));
        (global.max(own).min(MAX_THROTTLE_PPM), own > global)
    }

    /// Sets vCPU `id`'s own throttle, in millionths of its time asleep (clamped to
    /// [`MAX_THROTTLE_PPM`]); 0 turns it off. False for a vCPU that does not exist.
    pub fn set_vcpu_throttle_ppm(&self, id: usize, ppm: u32) -> bool {
        let Some(p) = self.vcpu_throttle_ppm.get(id) else {
            return false;
        };
        // Under the lock a sleeping worker waits on, then woken: its sleep follows the
        // new throttle at once (a lifted one ends it).
        let g = self.lock();
        p.store(ppm.min(MAX_THROTTLE_PPM), Ordering::Relaxed);
        drop(g);
        self.cv.notify_all();
        true
    }

    /// True when some vCPU is throttled (globally or on its own).
    #[cfg(test)]
    pub fn any_throttled(&self) -> bool {
        (0..self.vcpu_throttle_ppm.len()).any(|id| self.throttle_ppm(id) > 0)
    }

    /// Per vCPU: microseconds it slept in throttle sleeps so far.
    pub fn throttled_us(&self) -> Vec<u64> {
        self.throttled_us
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .collect()
    }

    /// Marks a worker as gone (after its loop ends, normally or on error).
    pub fn mark_exited(&self, id: usize) {
        let mut g = self.lock();
        g.exited[id] = true;
        g.parked[id] = false;
        self.cv.notify_all();
    }

    // ---- requester side ----

    /// Sets the request and wakes every waiter.
    pub fn set_request(&self, r: Request) {
        let mut g = self.lock();
        g.request = r;
        self.cv.notify_all();
    }

    /// Waits until every worker is parked or gone.
    pub fn wait_all_parked(&self) {
        let mut g = self.lock();
        while !g.parked.iter().zip(&g.exited).all(|(p, e)| *p || *e) {
            g = self.wait(g);
        }
    }

    /// True when every worker is parked or gone and pause is requested.
    pub fn all_parked(&self) -> bool {
        let g = self.lock();
        g.request == Request::Pause && g.parked.iter().zip(&g.exited).all(|(p, e)| *p || *e)
    }

    /// Starts a kick: returns the new epoch to wait for.
    pub fn begin_kick(&self) -> u64 {
        let mut g = self.lock();
        g.kick_epoch += 1;
        self.cv.notify_all();
        g.kick_epoch
    }

    /// Waits until every live, unparked worker acknowledged `epoch`.
    pub fn wait_kick(&self, epoch: u64) {
        let mut g = self.lock();
        while !(0..g.parked.len()).all(|i| g.kick_acked[i] >= epoch || g.exited[i] || g.parked[i]) {
            g = self.wait(g);
        }
    }

    /// Sets the throttle percentage (clamped to 0..=99).
    pub fn set_throttle_percent(&self, pct: u8) {
        let g = self.lock();
        self.throttle_pct.store(pct.min(99), Ordering::Relaxed);
        drop(g);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker in a long throttle sleep: at the global 99 %, a 40 ms slice (the most
    /// counted) asks for 3.96 s asleep.
    fn sleeping_worker(c: &std::sync::Arc<Control>) -> std::thread::JoinHandle<Duration> {
        let c = c.clone();
        std::thread::spawn(move || {
            let mut slice_start = Instant::now() - THROTTLE_SLICE * 8;
            let t0 = Instant::now();
            c.throttle(0, &mut slice_start);
            t0.elapsed()
        })
    }

    #[test]
    fn lifting_the_throttle_ends_a_sleep_at_once() {
        let c = std::sync::Arc::new(Control::new(2));
        c.set_throttle_percent(99);
        assert!(!c.set_vcpu_throttle_ppm(2, 1), "no vCPU 2");
        assert!(c.any_throttled());
        let worker = sleeping_worker(&c);
        std::thread::sleep(Duration::from_millis(50));
        c.set_throttle_percent(0);
        let slept = worker.join().unwrap();
        assert!(
            slept < Duration::from_secs(3),
            "slept {slept:?} of a 3.96 s sleep"
        );
        assert!(c.throttled_us()[0] > 0, "{:?}", c.throttled_us());
        assert_eq!(c.throttled_us()[1], 0);
        assert!(!c.any_throttled());
    }

    #[test]
    fn a_vcpus_own_deep_throttle_runs_short_slices_with_bounded_sleeps() {
        // The global throttle keeps QEMU's 10 ms slice at any depth.
        assert_eq!(run_slice(990_000, false), THROTTLE_SLICE);
        // A vCPU's own: 10 ms while its sleep fits in 200 ms (f <= 20/21)...
        assert_eq!(run_slice(500_000, true), THROTTLE_SLICE);
        assert_eq!(run_slice(950_000, true), THROTTLE_SLICE);
        // ...then the slice shrinks so the sleep stays 200 ms, and the share holds.
        for ppm in [960_000u32, 990_000, MAX_THROTTLE_PPM] {
            let run = run_slice(ppm, true);
            let f = f64::from(ppm) / 1e6;
            let sleep = run.mul_f64(f / (1.0 - f));
            assert!(run < THROTTLE_SLICE, "{ppm}: {run:?}");
            let off = sleep.as_secs_f64() - MAX_VCPU_THROTTLE_SLEEP.as_secs_f64();
            assert!(off.abs() < 1e-6, "{ppm}: sleeps {sleep:?}");
        }
        assert!(run_slice(MAX_THROTTLE_PPM, true) >= Duration::from_micros(200));
    }

    #[test]
    fn a_throttled_worker_learns_how_much_of_its_slice_is_left() {
        let c = Control::new(2);
        let mut slice_start = Instant::now();
        assert_eq!(c.throttle(0, &mut slice_start), None, "not throttled");
        c.set_vcpu_throttle_ppm(0, 900_000);
        let run = run_slice(900_000, true);
        // Mid-slice (an exit of its own): the rest of the slice, no sleep.
        let left = c.throttle(0, &mut slice_start).expect("throttled");
        assert!(left <= run && left > Duration::ZERO, "{left:?} of {run:?}");
        assert_eq!(c.throttled_us()[0], 0);
        // The slice is over: it sleeps, then a whole new slice starts.
        std::thread::sleep(run);
        assert_eq!(c.throttle(0, &mut slice_start), Some(run));
        assert!(c.throttled_us()[0] > 0);
        // Lifted: no slice, no timer.
        c.set_vcpu_throttle_ppm(0, 0);
        assert_eq!(c.throttle(0, &mut slice_start), None);
        assert_eq!(
            c.throttle(1, &mut slice_start),
            None,
            "vCPU 1 never throttled"
        );
    }

    #[test]
    fn the_larger_of_the_global_and_a_vcpus_own_throttle_applies() {
        let c = Control::new(2);
        c.set_throttle_percent(20);
        c.set_vcpu_throttle_ppm(0, 500_000);
        assert_eq!(c.throttle_ppm(0), 500_000);
        assert_eq!(c.throttle_ppm(1), 200_000);
        c.set_vcpu_throttle_ppm(0, 2_000_000);
        assert_eq!(c.throttle_ppm(0), MAX_THROTTLE_PPM, "clamped");
    }
}
