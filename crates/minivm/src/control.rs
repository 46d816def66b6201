//! The run/pause/stop/kick state machine shared by the VM handle and its vCPU workers.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
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
    /// Per vCPU: inside KVM_RUN (set just before the ioctl, cleared once it returned).
    in_guest: Box<[AtomicBool]>,
}

/// A throttle slice: vCPUs run this long between throttle sleeps.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

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

    /// Throttle: once per [`THROTTLE_SLICE`] of running, sleep pct/(100-pct) slices.
    pub fn throttle(&self, id: usize, slice_start: &mut Instant) {
        let pct = u32::from(self.throttle_pct.load(Ordering::Relaxed).min(99));
        if pct == 0 {
            *slice_start = Instant::now();
            return;
        }
        if slice_start.elapsed() >= THROTTLE_SLICE {
            let deadline = Instant::now() + THROTTLE_SLICE * pct / (100 - pct);
            let mut g = self.lock();
            // Sleep until the deadline; pause/stop end the sleep, kicks are acknowledged
            // (the worker is out of the guest) without ending it.
            loop {
                if g.kick_acked[id] != g.kick_epoch {
                    g.kick_acked[id] = g.kick_epoch;
                    self.cv.notify_all();
                }
                let now = Instant::now();
                if g.request != Request::Run || now >= deadline {
                    break;
                }
                g = self
                    .cv
                    .wait_timeout(g, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            *slice_start = Instant::now();
        }
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
        self.throttle_pct.store(pct.min(99), Ordering::Relaxed);
    }

    /// The throttle percentage.
    pub fn throttle_percent(&self) -> u8 {
        self.throttle_pct.load(Ordering::Relaxed)
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
