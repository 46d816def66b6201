//! A migration's course, recorded from `query-migrate` snapshots.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stats::MigrationInfo;
pub use stats::{Convergence, DowntimePhasesUs};

use crate::Error;

/// Bytes per page until a snapshot says otherwise (`ram.page-size`).
pub const DEFAULT_PAGE_SIZE_BYTES: u64 = 4096;

/// Throughput is the transferred bytes' growth over at least this long (the engine
/// refreshes `ram.transferred` every 100 ms, so a shorter span reads 0 or a jump).
const THROUGHPUT_WINDOW_MS: u64 = 300;

/// One `query-migrate` snapshot that carried RAM statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Sample {
    /// Milliseconds since `migrate` (the snapshot's `total-time`).
    pub t_ms: u64,
    /// `status`, as QMP spells it (`active`, `device`, `completed`, ...).
    pub status: String,
    /// `ram.remaining`, bytes.
    pub remaining_bytes: u64,
    /// `ram.transferred`, bytes.
    pub transferred_bytes: u64,
    /// Growth of `transferred_bytes` over the last ≥ 300 ms (or since the first
    /// sample), bytes/s; `ram.mbps` where no earlier sample exists.
    pub throughput_bytes_per_sec: u64,
    /// Ferry's dirty rate (`ram.dirty-pages-rate`: unique pages per ≥ 1 s period), pages/s.
    pub dirty_pages_rate: u64,
    /// QEMU's rule (`x-ferry.new-dirty-pages-rate`: pages dirtied since sent, counted
    /// once per sync), pages/s.
    pub qemu_rule_dirty_pages_rate: u64,
    /// Passes over the dirty bitmap done (`x-ferry.iterations`).
    pub pass: u64,
    /// The convergence prediction (`x-ferry.convergence`).
    pub prediction: Convergence,
    /// `expected-downtime`, ms (absent once completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime_ms: Option<u64>,
    /// `cpu-throttle-percentage` (auto-converge), while throttling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u64>,
}

/// How the migration ended (from the first finished snapshot).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Outcome {
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
    /// `total-time`, ms (the last sample's time where the snapshot has none).
    pub total_time_ms: u64,
    /// `downtime`, ms (completed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// `x-ferry.downtime-phases-us` (completed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_phases_us: Option<DowntimePhasesUs>,
    /// `error-desc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
}

/// A migration over time: the samples of its `query-migrate` snapshots and its end.
///
/// Feed it every snapshot a poller reads ([`Timeline::record`] for a
/// [`MigrationInfo`], [`Timeline::record_value`] for the JSON a QMP client reads;
/// both take the same path), then draw it with [`crate::render_svg`] or store it as
/// JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Timeline {
    /// Bytes per page (`ram.page-size`), for drawing page rates as bytes/s.
    pub page_size_bytes: u64,
    /// Guest RAM (`ram.total`), bytes.
    pub total_bytes: u64,
    /// `setup-time`, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_time_ms: Option<u64>,
    /// The downtime limit the migration ran with, ms, if the recorder knows it
    /// (`query-migrate` does not carry it; it is drawn next to the expected downtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
    /// The samples, oldest first.
    pub samples: Vec<Sample>,
    /// How it ended, once a finished snapshot was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    /// An empty timeline.
    pub fn new() -> Self {
        Timeline {
            page_size_bytes: DEFAULT_PAGE_SIZE_BYTES,
            total_bytes: 0,
            setup_time_ms: None,
            downtime_limit_ms: None,
            samples: Vec::new(),
            outcome: None,
        }
    }

    /// Records a snapshot from [`stats`] (through its JSON, as [`Self::record_value`]).
    pub fn record(&mut self, info: &MigrationInfo) -> Result<(), Error> {
        self.record_value(&serde_json::to_value(info)?)
    }

    /// Records a `query-migrate` reply (its `return` object).
    ///
    /// A snapshot without `ram` (setup, failed) adds no sample; a finished one sets
    /// [`Self::outcome`] (the first one wins); a repeat of the last sample is dropped.
    pub fn record_value(&mut self, v: &Value) -> Result<(), Error> {
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .ok_or(Error::Snapshot("no `status` string"))?;
        let num = |at: &str| v.pointer(at).and_then(Value::as_u64);
        if let Some(ms) = num("/setup-time") {
            self.setup_time_ms = Some(ms);
        }
        let last_t_ms = self.samples.last().map_or(0, |s| s.t_ms);
        let t_ms = num("/total-time").unwrap_or(last_t_ms).max(last_t_ms);
        if v.get("ram").is_some_and(Value::is_object) {
            if let Some(page) = num("/ram/page-size").filter(|&p| p > 0) {
                self.page_size_bytes = page;
            }
            if let Some(total) = num("/ram/total") {
                self.total_bytes = total;
            }
            let transferred_bytes = num("/ram/transferred").unwrap_or(0);
            let mbps = v
                .pointer("/ram/mbps")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            let throughput_bytes_per_sec = self
                .throughput_since_window(t_ms, transferred_bytes)
                .unwrap_or((mbps.max(0.0) * 1e6 / 8.0) as u64);
            let prediction = match v.pointer("/x-ferry/convergence") {
                Some(c) => serde_json::from_value(c.clone())?,
                None => Convergence::Unknown,
            };
            let sample = Sample {
                t_ms,
                status: status.to_owned(),
                remaining_bytes: num("/ram/remaining").unwrap_or(0),
                transferred_bytes,
                throughput_bytes_per_sec,
                dirty_pages_rate: num("/ram/dirty-pages-rate").unwrap_or(0),
                qemu_rule_dirty_pages_rate: num("/x-ferry/new-dirty-pages-rate").unwrap_or(0),
                pass: num("/x-ferry/iterations").unwrap_or(0),
                prediction,
                expected_downtime_ms: num("/expected-downtime"),
                cpu_throttle_percentage: num("/cpu-throttle-percentage"),
            };
            if !self.samples.last().is_some_and(|last| {
                last.t_ms == sample.t_ms
                    && last.status == sample.status
                    && last.transferred_bytes == sample.transferred_bytes
                    && last.remaining_bytes == sample.remaining_bytes
            }) {
                self.samples.push(sample);
            }
        }
        let finished = matches!(status, "completed" | "failed" | "cancelled");
        if finished && self.outcome.is_none() {
            let phases = match v.pointer("/x-ferry/downtime-phases-us") {
                Some(p) => Some(serde_json::from_value(p.clone())?),
                None => None,
            };
            self.outcome = Some(Outcome {
                status: status.to_owned(),
                total_time_ms: t_ms,
                downtime_ms: num("/downtime"),
                downtime_phases_us: phases,
                error_desc: v
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            });
        }
        Ok(())
    }

    /// Bytes/s the transferred count grew by over the last ≥ [`THROUGHPUT_WINDOW_MS`]
    /// (or since the first sample), `None` without an earlier sample.
    ///
    /// The engine refreshes the count at its own ticks, not at the poller's, so both
    /// ends are taken where a count was first seen: a window from one poll to another
    /// would count one refresh more or less than its length holds and saw-tooth. Once
    /// no refresh came for two windows (a stall), the end is now and the rate decays.
    fn throughput_since_window(&self, t_ms: u64, transferred_bytes: u64) -> Option<u64> {
        // Times at which each count was first seen, oldest first.
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        for s in &self.samples {
            if !matches!(fresh.last(), Some(&(_, x)) if x == s.transferred_bytes) {
                fresh.push((s.t_ms, s.transferred_bytes));
            }
        }
        let first = *fresh.first()?;
        let end = match fresh.last() {
            Some(&(t, x)) if x == transferred_bytes && t + 2 * THROUGHPUT_WINDOW_MS > t_ms => {
                (t, x)
            }
            _ => (t_ms, transferred_bytes),
        };
        let from = fresh
            .iter()
            .rev()
            .find(|&&(t, _)| t + THROUGHPUT_WINDOW_MS <= end.0)
            .copied()
            .unwrap_or(first);
        let dt_ms = end.0.checked_sub(from.0).filter(|&d| d > 0)?;
        Some(end.1.saturating_sub(from.1) * 1000 / dt_ms)
    }

    /// The prediction made at the end of the first pass: the first sample after pass 1
    /// whose prediction is known, as (its time ms, the prediction).
    pub fn first_pass_prediction(&self) -> Option<(u64, Convergence)> {
        self.samples
            .iter()
            .find(|s| s.pass >= 1 && s.prediction != Convergence::Unknown)
            .map(|s| (s.t_ms, s.prediction))
    }

    /// Times (ms) at which a pass ended: the first sample showing each higher pass
    /// count, with the count it showed.
    pub fn pass_boundaries(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pass = 0;
        for s in &self.samples {
            if s.pass > pass {
                out.push((s.t_ms, s.pass));
                pass = s.pass;
            }
        }
        out
    }

    /// The time of the last sample or the end, ms.
    pub fn end_ms(&self) -> u64 {
        let last = self.samples.last().map_or(0, |s| s.t_ms);
        self.outcome
            .as_ref()
            .map_or(last, |o| o.total_time_ms.max(last))
    }

    /// Converts a page rate to bytes/s with this timeline's page size.
    pub fn pages_to_bytes(&self, pages_per_sec: u64) -> u64 {
        pages_per_sec.saturating_mul(self.page_size_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use stats::{MigStats, MigrationStatus};
    use std::sync::atomic::Ordering;

    fn active(t: u64, transferred: u64, remaining: u64, pass: u64) -> Value {
        json!({
            "status": "active",
            "total-time": t,
            "setup-time": 3,
            "expected-downtime": 40,
            "ram": {"transferred": transferred, "remaining": remaining, "total": 1 << 30,
                    "dirty-pages-rate": 1000, "mbps": 800.0, "page-size": 4096},
            "x-ferry": {"new-dirty-pages-rate": 1500, "iterations": pass,
                        "convergence": {"state": "converging", "expected-completion-ms": 250}}
        })
    }

    #[test]
    fn reads_qmp_names_and_units() {
        let mut tl = Timeline::new();
        tl.record_value(&json!({"status": "setup"})).unwrap();
        assert!(tl.samples.is_empty(), "setup carries no ram");
        tl.record_value(&active(10, 1_000_000, 5_000_000, 0))
            .unwrap();
        let s = &tl.samples[0];
        assert_eq!(s.t_ms, 10);
        assert_eq!(s.status, "active");
        assert_eq!(
            (s.transferred_bytes, s.remaining_bytes),
            (1_000_000, 5_000_000)
        );
        // No earlier sample: throughput from mbps (800 Mbit/s = 100 MB/s).
        assert_eq!(s.throughput_bytes_per_sec, 100_000_000);
        assert_eq!(s.dirty_pages_rate, 1000);
        assert_eq!(s.qemu_rule_dirty_pages_rate, 1500);
        assert_eq!(
            s.prediction,
            Convergence::Converging {
                expected_completion_ms: 250
            }
        );
        assert_eq!(s.expected_downtime_ms, Some(40));
        assert_eq!(tl.setup_time_ms, Some(3));
        assert_eq!(tl.total_bytes, 1 << 30);
        // From transferred deltas once there is history.
        tl.record_value(&active(110, 3_000_000, 3_000_000, 1))
            .unwrap();
        assert_eq!(tl.samples[1].throughput_bytes_per_sec, 20_000_000);
        assert_eq!(tl.pass_boundaries(), vec![(110, 1)]);
        assert_eq!(tl.first_pass_prediction().map(|p| p.0), Some(110));
        // A repeat is dropped; a finished snapshot sets the outcome.
        tl.record_value(&active(110, 3_000_000, 3_000_000, 1))
            .unwrap();
        assert_eq!(tl.samples.len(), 2);
        tl.record_value(
            &json!({"status": "completed", "total-time": 130, "downtime": 12,
            "ram": {"transferred": 3_500_000, "remaining": 0},
            "x-ferry": {"iterations": 1, "convergence": {"state": "unknown"},
                "downtime-phases-us": {"pause": 1, "sync": 2, "pages": 3, "device": 4, "ack": 5}}}),
        )
        .unwrap();
        let o = tl.outcome.as_ref().unwrap();
        assert_eq!((o.total_time_ms, o.downtime_ms), (130, Some(12)));
        assert_eq!(o.downtime_phases_us.as_ref().unwrap().ack, 5);
        assert_eq!(tl.end_ms(), 130);
    }

    #[test]
    fn throughput_follows_the_engines_refreshes_not_the_polls() {
        // The engine refreshes `transferred` every 100 ms at 50 MB/s; polls every 30 ms.
        let mut tl = Timeline::new();
        for t in (0..3000).step_by(30) {
            let refreshed = (t / 100) * 100;
            tl.record_value(&active(t, refreshed * 50_000, 1, 0))
                .unwrap();
        }
        for s in tl.samples.iter().filter(|s| s.t_ms >= 400) {
            let r = s.throughput_bytes_per_sec as f64 / 50e6;
            assert!(
                (0.9..=1.1).contains(&r),
                "{} ms: {r:.2} of the rate",
                s.t_ms
            );
        }
        // Then the engine stalls: the rate decays instead of holding.
        for t in (3000..5000).step_by(30) {
            tl.record_value(&active(t, 2900 * 50_000, 1, 0)).unwrap();
        }
        let last = tl.samples.last().unwrap();
        assert!(last.throughput_bytes_per_sec < 10_000_000, "{last:?}");
    }

    #[test]
    fn failed_without_ram_still_ends_the_timeline() {
        let mut tl = Timeline::new();
        tl.record_value(&active(50, 10, 10, 0)).unwrap();
        tl.record_value(&json!({"status": "failed", "error-desc": "connection reset"}))
            .unwrap();
        let o = tl.outcome.unwrap();
        assert_eq!(o.status, "failed");
        assert_eq!(o.total_time_ms, 50);
        assert_eq!(o.error_desc.as_deref(), Some("connection reset"));
    }

    #[test]
    fn a_snapshot_without_status_is_refused() {
        let mut tl = Timeline::new();
        assert!(tl.record_value(&json!({"ram": {}})).is_err());
        assert!(tl
            .record_value(
                &json!({"status": "active", "x-ferry": {"convergence": {"state": "?"}},
                "ram": {}})
            )
            .is_err());
    }

    #[test]
    fn records_a_stats_snapshot_like_its_json() {
        let s = MigStats::new();
        s.set_status(MigrationStatus::Active);
        s.remaining_bytes.store(8192, Ordering::Relaxed);
        s.new_dirty_pages_rate.store(77, Ordering::Relaxed);
        s.iterations.store(2, Ordering::Relaxed);
        s.set_convergence(stats::Convergence::NotConverging {
            needed_bandwidth_bytes_per_sec: 5,
        });
        let info = s.snapshot();
        let (mut a, mut b) = (Timeline::new(), Timeline::new());
        a.record(&info).unwrap();
        b.record_value(&serde_json::to_value(&info).unwrap())
            .unwrap();
        assert_eq!(a, b);
        let x = &a.samples[0];
        assert_eq!(x.remaining_bytes, 8192);
        assert_eq!(x.qemu_rule_dirty_pages_rate, 77);
        assert_eq!(x.pass, 2);
        assert_eq!(
            x.prediction,
            Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec: 5
            }
        );
    }

    #[test]
    fn json_round_trip() {
        let mut tl = Timeline::new();
        tl.downtime_limit_ms = Some(300);
        tl.record_value(&active(10, 1, 2, 0)).unwrap();
        tl.record_value(&json!({"status": "cancelled", "total-time": 20, "ram": {}}))
            .unwrap();
        let text = serde_json::to_string(&tl).unwrap();
        let back: Timeline = serde_json::from_str(&text).unwrap();
        assert_eq!(back, tl);
        assert!(text.contains("\"qemu-rule-dirty-pages-rate\""));
    }
}
