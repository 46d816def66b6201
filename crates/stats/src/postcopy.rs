//! Postcopy on the destination: the faults its vCPUs take on missing pages, the
//! requests they become, what is still missing, and how long a vCPU waits for a page.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Bucket count of [`LatencyHistogram`]: `2^i` µs up to about 67 s.
pub const LATENCY_BUCKETS: usize = 27;

/// A histogram of latencies in power-of-two buckets of microseconds: bucket `i` counts
/// latencies in `[2^(i-1), 2^i)` µs (bucket 0: under 1 µs), without a lock.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = (u64::BITS - us.leading_zeros()) as usize;
        self.buckets[i.min(LATENCY_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts per bucket.
    pub fn counts(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }

    /// The upper bound (µs) of the bucket that holds quantile `q` (0..=1), or `None`
    /// when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(1u64 << i);
            }
        }
        None
    }
}

/// The destination's postcopy counters, written by its fault and receive threads.
#[derive(Debug, Default)]
pub struct PostcopyStats {
    /// Faults read (several vCPUs on one page count once each).
    pub faults: AtomicU64,
    /// Requests sent to the source (one per page at most while it is missing).
    pub requests: AtomicU64,
    /// Pages installed.
    pub landed_pages: AtomicU64,
    /// Installs of a page that was already there (a requested page racing its copy
    /// from the background stream; the later one is dropped).
    pub already_present: AtomicU64,
    /// Pages still missing.
    pub missing_pages: AtomicU64,
    /// From a fault read to its page installed (the vCPU resumed).
    pub fault_latency: LatencyHistogram,
    /// When the guest could first run here with pages missing.
    started: OnceLock<Instant>,
    /// From then to the last missing page installed, ms (set once).
    full_residency_ms: OnceLock<u64>,
}

impl PostcopyStats {
    /// Marks the start of the postcopy phase with `missing_pages` pages to come.
    pub fn start(&self, missing_pages: u64) {
        self.missing_pages.store(missing_pages, Ordering::Relaxed);
        let _ = self.started.set(Instant::now());
        if missing_pages == 0 {
            let _ = self.full_residency_ms.set(0);
        }
    }

    /// Counts one missing page installed; the last one sets the time to full
    /// residency.
    pub fn page_arrived(&self) {
        if self.missing_pages.fetch_sub(1, Ordering::Relaxed) == 1 {
            let ms = self
                .started
                .get()
                .map_or(0, |t| t.elapsed().as_millis() as u64);
            let _ = self.full_residency_ms.set(ms);
        }
    }

    /// Whether a postcopy phase started.
    pub fn started(&self) -> bool {
        self.started.get().is_some()
    }

    /// The `x-ferry.postcopy` figures.
    pub fn snapshot(&self, page_size_bytes: u64) -> FerryPostcopyInfo {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let faults = ld(&self.faults);
        let elapsed_ms = self
            .started
            .get()
            .map_or(0, |t| t.elapsed().as_millis() as u64);
        let full = self.full_residency_ms.get().copied();
        let window_ms = full.unwrap_or(elapsed_ms).max(1);
        let missing = ld(&self.missing_pages);
        FerryPostcopyInfo {
            faults,
            faults_per_sec: faults * 1000 / window_ms,
            requests: ld(&self.requests),
            landed_pages: ld(&self.landed_pages),
            duplicate_pages: ld(&self.already_present),
            missing_pages: missing,
            missing_bytes: missing * page_size_bytes,
            fault_latency_p50_us: self.fault_latency.quantile_us(0.5),
            fault_latency_p99_us: self.fault_latency.quantile_us(0.99),
            fault_latency_us_log2: self.fault_latency.counts().to_vec(),
            full_residency_ms: full,
        }
    }
}

/// `x-ferry.postcopy` of a destination's `query-migrate`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FerryPostcopyInfo {
    /// Faults on missing pages read so far.
    pub faults: u64,
    /// Faults per second over the postcopy phase (until full residency).
    pub faults_per_sec: u64,
    /// Pages requested from the source.
    pub requests: u64,
    /// Pages installed.
    pub landed_pages: u64,
    /// Copies of a page that arrived after it was installed (dropped).
    pub duplicate_pages: u64,
    /// Pages still missing.
    pub missing_pages: u64,
    /// Bytes still missing.
    pub missing_bytes: u64,
    /// Fault latency (fault read to page installed), median, as the upper bound of
    /// its power-of-two bucket, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_latency_p50_us: Option<u64>,
    /// As `fault-latency-p50-us`, the 99th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_latency_p99_us: Option<u64>,
    /// The latency histogram: element `i` counts faults served in `[2^(i-1), 2^i)` µs.
    pub fault_latency_us_log2: Vec<u64>,
    /// From the guest's start here to the last missing page installed, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_residency_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), None);
        for us in [0, 1, 3, 100, 100, 100, 5000] {
            h.record(Duration::from_micros(us));
        }
        let c = h.counts();
        assert_eq!((c[0], c[1], c[2], c[7], c[13]), (1, 1, 1, 3, 1));
        assert_eq!(h.quantile_us(0.5), Some(128));
        assert_eq!(h.quantile_us(1.0), Some(8192));
        h.record(Duration::from_secs(1 << 20));
        assert_eq!(h.counts()[LATENCY_BUCKETS - 1], 1);
    }

    #[test]
    fn residency_is_set_by_the_last_page() {
        let s = PostcopyStats::default();
        assert!(!s.started());
        s.start(2);
        s.page_arrived();
        assert_eq!(s.snapshot(4096).full_residency_ms, None);
        assert_eq!(s.snapshot(4096).missing_bytes, 4096);
        s.page_arrived();
        let snap = s.snapshot(4096);
        assert!(snap.full_residency_ms.is_some());
        assert_eq!(snap.missing_pages, 0);
    }
}
