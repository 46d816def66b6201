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

/// A throttle slice: vCPUs run this long between throttle sleeps.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// The most a vCPU is throttled: asleep 99.9 % of the time (10 s per 10 ms slice).
pub const MAX_THROTTLE_PPM: u32 = 999_000;

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

    /// Throttle: once per [`THROTTLE_SLICE`] of running, sleep f/(1-f) slices, f the
    /// fraction of [`Control::throttle_ppm`].
    pub fn throttle(&self, id: usize, slice_start: &mut Instant) {
        let ppm = u64::from(self.throttle_ppm(id));
        if ppm == 0 {
            *slice_start = Instant::now();
            return;
        }
        if slice_start.elapsed() >= THROTTLE_SLICE {
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
                let ppm = u64::from(self.throttle_ppm(id));
                let deadline = started
                    + THROTTLE_SLICE.mul_f64(ppm as f64 / (1_000_000 - ppm.min(999_999)) as f64);
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
        }
    }

    /// The throttle vCPU `id` takes, in millionths of its time asleep: the larger of
    /// the global percentage and its own.
    pub fn throttle_ppm(&self, id: usize) -> u32 {
        let global = u32::from(self.throttle_pct.load(Ordering::Relaxed).min(99)) * 10_000;
        let own = self
            .vcpu_throttle_ppm
            .get(id)
            .map_or(0, |p| p.load(Ordering::Relaxed));
        global.max(own).min(MAX_THROTTLE_PPM)
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

    /// The current request.
    pub fn request(&self) -> Request {
        self.lock().request
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

    /// Waits up to `dur` or until stop is requested; returns false on stop.
    pub fn sleep_unless_stopped(&self, dur: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, dur, |s| s.request != Request::Stop)
            .unwrap_or_else(|p| p.into_inner());
        g.request != Request::Stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker in a long throttle sleep (99.9 %: 10 s per 10 ms slice).
    fn sleeping_worker(c: &std::sync::Arc<Control>) -> std::thread::JoinHandle<Duration> {
        let c = c.clone();
        std::thread::spawn(move || {
            let mut slice_start = Instant::now() - THROTTLE_SLICE * 2;
            let t0 = Instant::now();
            c.throttle(0, &mut slice_start);
            t0.elapsed()
        })
    }

    #[test]
    fn lifting_a_vcpu_throttle_ends_its_sleep_at_once() {
        let c = std::sync::Arc::new(Control::new(2));
        assert!(c.set_vcpu_throttle_ppm(0, MAX_THROTTLE_PPM));
        assert!(!c.set_vcpu_throttle_ppm(2, 1), "no vCPU 2");
        assert_eq!(c.throttle_ppm(1), 0, "vCPU 1 is not throttled");
        assert!(c.any_throttled());
        let worker = sleeping_worker(&c);
        std::thread::sleep(Duration::from_millis(50));
        c.set_vcpu_throttle_ppm(0, 0);
        let slept = worker.join().unwrap();
        assert!(
            slept < Duration::from_secs(5),
            "slept {slept:?} of a 10 s sleep"
        );
        assert!(c.throttled_us()[0] > 0, "{:?}", c.throttled_us());
        assert_eq!(c.throttled_us()[1], 0);
        assert!(!c.any_throttled());
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
