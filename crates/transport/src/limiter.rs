//! Rate limiting of the sender to a maximum bandwidth.
//!
//! A virtual clock advances by `bytes / rate` for every write; a writer that gets
//! ahead of the wall clock sleeps until the wall clock catches up. Idle time is
//! credited for at most [`BURST`], so over any window of length `T` at most
//! `rate × (T + BURST) + quantum` bytes go out: with `BURST` = 10 ms and a quantum
//! of 10 ms of bytes, within 2 % of the limit over any 1 s window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;

/// Idle credit a writer may burst after a pause.
pub const BURST: Duration = Duration::from_millis(10);
/// Smallest write step when limited.
const MIN_QUANTUM_BYTES: u64 = 4096;

/// A shared bandwidth limiter (all channels of a sender draw on one budget).
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: AtomicU64,
    virtual_now: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter at `bytes_per_sec` (0 = unlimited).
    pub fn new(bytes_per_sec: u64) -> Self {
        RateLimiter {
            bytes_per_sec: AtomicU64::new(bytes_per_sec),
            virtual_now: Mutex::new(None),
        }
    }

    /// Changes the limit (0 = unlimited); takes effect on the next write.
    pub fn set_bytes_per_sec(&self, bytes_per_sec: u64) {
        self.bytes_per_sec.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The current limit in bytes/s (0 = unlimited).
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec.load(Ordering::Relaxed)
    }

    /// Largest single write while limited: 10 ms worth of bytes (unbounded if unlimited).
    pub fn quantum_bytes(&self) -> usize {
        match self.bytes_per_sec() {
            0 => usize::MAX,
            r => (r / 100).max(MIN_QUANTUM_BYTES) as usize,
        }
    }

    /// Charges `bytes` just written and sleeps as long as the sender is ahead.
    pub fn pace(&self, bytes: u64) {
        if let Some(t) = self.charge_now(bytes) {
            std::thread::sleep(t.saturating_duration_since(Instant::now()));
        }
    }

    /// Like [`RateLimiter::pace`], but the sleep ends at once when `cancel` fires:
    /// returns `false` if it did (the caller should stop writing).
    pub fn pace_or_cancel(&self, bytes: u64, cancel: &Cancel) -> bool {
        match self.charge_now(bytes) {
            Some(t) => cancel.sleep(t.saturating_duration_since(Instant::now())),
            None => !cancel.is_cancelled(),
        }
    }

    fn charge_now(&self, bytes: u64) -> Option<Instant> {
        let now = Instant::now();
        let mut v = self.virtual_now.lock().unwrap_or_else(|p| p.into_inner());
        charge(&mut v, now, bytes, self.bytes_per_sec())
    }
}

/// Advances the virtual clock `v` for `bytes` written at `now`; returns the instant
/// to sleep until, if the writer is ahead of the wall clock.
pub(crate) fn charge(
    v: &mut Option<Instant>,
    now: Instant,
    bytes: u64,
    rate: u64,
) -> Option<Instant> {
    if rate == 0 {
        *v = None;
        return None;
    }
    let floor = now.checked_sub(BURST).unwrap_or(now);
    let start = match *v {
        Some(t) if t > floor => t,
        _ => floor,
    };
    let end = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
    *v = Some(end);
    (end > now).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates a greedy writer on a fake clock and checks every 1 s window.
    fn worst_window_ratio(rate: u64, write_bytes: u64, pause_every: usize) -> f64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut v = None;
        let mut sends: Vec<(Duration, u64)> = Vec::new();
        for k in 0..20_000usize {
            if pause_every > 0 && k % pause_every == 0 {
                now += Duration::from_millis(300); // idle, then burst
            }
            sends.push((now - t0, write_bytes));
            if let Some(t) = charge(&mut v, now, write_bytes, rate) {
                now = t;
            }
            if now - t0 > Duration::from_secs(20) {
                break;
            }
        }
        let mut worst: f64 = 0.0;
        let (mut lo, mut sum) = (0usize, 0u64);
        for hi in 0..sends.len() {
            sum += sends[hi].1;
            while sends[hi].0 - sends[lo].0 >= Duration::from_secs(1) {
                sum -= sends[lo].1;
                lo += 1;
            }
            worst = worst.max(sum as f64 / rate as f64);
        }
        worst
    }

    #[test]
    fn any_one_second_window_is_within_5_percent() {
        for &(rate, pause) in &[
            (100u64 << 20, 0usize),
            (10 << 20, 7),
            (1 << 30, 50),
            (1 << 20, 3),
        ] {
            let q = (rate / 100).max(MIN_QUANTUM_BYTES);
            let r = worst_window_ratio(rate, q, pause);
            assert!(r <= 1.05, "rate {rate}: worst window {r}");
        }
    }

    #[test]
    fn a_cancel_cuts_a_long_pace_short() {
        // 1 byte/s: one 4 KiB quantum is over an hour of sleep.
        let l = std::sync::Arc::new(RateLimiter::new(1));
        let c = Cancel::new();
        let (l2, c2) = (l.clone(), c.clone());
        let t = std::thread::spawn(move || {
            let went_on = l2.pace_or_cancel(4096, &c2);
            let t0 = Instant::now();
            (went_on, t0)
        });
        std::thread::sleep(Duration::from_millis(100));
        let cancelled_at = Instant::now();
        c.cancel();
        let (went_on, _) = t.join().unwrap();
        assert!(!went_on);
        assert!(cancelled_at.elapsed() < Duration::from_secs(5));
        // Already cancelled: no sleep at all.
        assert!(!l.pace_or_cancel(4096, &c));
    }

    #[test]
    fn zero_means_unlimited() {
        let mut v = None;
        assert_eq!(charge(&mut v, Instant::now(), 1 << 40, 0), None);
        assert_eq!(RateLimiter::new(0).quantum_bytes(), usize::MAX);
    }
}
