//! A cancellation token: one flag many waits look at, and a condition variable
//! that wakes every sleeper of the token at once when it is cancelled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Inner {
    cancelled: AtomicBool,
    lock: Mutex<()>,
    woken: Condvar,
}

/// A cancellation token: clones share one flag. [`Cancel::cancel`] sets it and wakes
/// every [`Cancel::sleep`] of every clone at once; the wire's waits (connect, the
/// rate limiter) look at it.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    inner: Arc<Inner>,
}

impl Cancel {
    /// A fresh token, not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels: sets the flag (for good) and wakes every sleeper.
    pub fn cancel(&self) {
        let _g = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.cancelled.store(true, Ordering::Release);
        self.inner.woken.notify_all();
    }

    /// Whether [`Cancel::cancel`] was called on this token or a clone.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::Acquire)
    }

    /// Sleeps for `d`, or until the token is cancelled, whichever comes first.
    /// Returns `true` if the whole time passed, `false` if cancelled (at once if
    /// it already was).
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now().checked_add(d);
        let mut g = self.inner.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.is_cancelled() {
                return false;
            }
            let left = match deadline {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return true;
            }
            g = self
                .inner
                .woken
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_runs_out_or_is_cut_short() {
        let c = Cancel::new();
        assert!(c.sleep(Duration::from_millis(5)));
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let t0 = Instant::now();
            let full = c2.sleep(Duration::from_secs(60));
            (full, t0.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        c.cancel();
        let (full, took) = t.join().unwrap();
        assert!(!full);
        assert!(took < Duration::from_secs(30), "{took:?}");
        assert!(c.is_cancelled());
        assert!(!c.sleep(Duration::from_secs(60)));
    }
}
