//! The calc-dirty-rate job's state and the `query-dirty-rate` snapshot (QEMU's
//! DirtyRateInfo), with Ferry's extra fields under `x-ferry`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Where the dirty-rate job is (QEMU's DirtyRateStatus).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum DirtyRateStatus {
    /// No measurement yet (or one requested whose thread has not begun).
    Unstarted = 0,
    /// The measurement thread runs.
    Measuring = 1,
    /// The last measurement finished (or was cancelled or failed; see `x-ferry`).
    Measured = 2,
}

impl DirtyRateStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Measuring,
            2 => Self::Measured,
            _ => Self::Unstarted,
        }
    }

    /// The QMP spelling (`"unstarted"`, `"measuring"`, `"measured"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unstarted => "unstarted",
            Self::Measuring => "measuring",
            Self::Measured => "measured",
        }
    }
}

/// How the dirty rate is measured (QEMU's DirtyRateMeasureMode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRateMode {
    /// Hash randomly chosen pages before and after the window; no dirty logging.
    #[default]
    PageSampling,
    /// Count the unique pages the dirty rings report over the window, per vCPU too
    /// (QEMU counts ring entries; Ferry keeps those under `x-ferry`).
    DirtyRing,
    /// Count the pages the dirty log reports over the window.
    DirtyBitmap,
}

impl DirtyRateMode {
    /// The QMP spelling (`"page-sampling"`, `"dirty-ring"`, `"dirty-bitmap"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PageSampling => "page-sampling",
            Self::DirtyRing => "dirty-ring",
            Self::DirtyBitmap => "dirty-bitmap",
        }
    }
}

impl std::str::FromStr for DirtyRateMode {
    type Err = String;

    /// Parses the QMP spelling.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "page-sampling" => Ok(Self::PageSampling),
            "dirty-ring" => Ok(Self::DirtyRing),
            "dirty-bitmap" => Ok(Self::DirtyBitmap),
            _ => Err(format!(
                "unknown mode '{s}' (page-sampling | dirty-ring | dirty-bitmap)"
            )),
        }
    }
}

/// Unit of `calc-time` (QEMU's TimeUnit, 8.2+).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeUnit {
    /// Seconds (QEMU's default).
    #[default]
    Second,
    /// Milliseconds.
    Millisecond,
}

impl TimeUnit {
    /// Milliseconds in one unit.
    pub fn ms_per_unit(self) -> i64 {
        match self {
            Self::Second => 1000,
            Self::Millisecond => 1,
        }
    }
}

/// One vCPU's dirty rate (QEMU's DirtyRateVcpu), MiB/s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateVcpu {
    /// vCPU index.
    pub id: u64,
    /// Distinct pages this vCPU dirtied in the window, as MiB/s (the unit of the VM's
    /// `dirty-rate`; a page dirtied by two vCPUs counts for each, so with disjoint
    /// writers the vCPUs' rates sum to the VM's). Ring entries per vCPU, QEMU's count,
    /// are under `x-ferry.vcpu-ring-entries`.
    pub dirty_rate: i64,
}

/// A two-sided 95 % confidence interval of a sampled rate, MiB/s.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConfidenceInterval {
    /// Lower bound, MiB/s.
    pub low_mib_per_sec: f64,
    /// Upper bound, MiB/s.
    pub high_mib_per_sec: f64,
}

/// Ferry's extra `query-dirty-rate` fields, under `x-ferry` so QEMU clients ignore them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FerryDirtyRateInfo {
    /// The rate unrounded, MiB/s (QEMU's `dirty-rate` is truncated to whole MiB/s).
    pub dirty_rate_mib_per_sec: f64,
    /// The rate in 4 KiB pages per second.
    pub dirty_pages_per_sec: f64,
    /// Unique pages dirtied in the window (an estimate in page-sampling mode).
    pub dirty_pages: f64,
    /// The measured window, microseconds.
    pub window_us: u64,
    /// When the window began, host wall clock, microseconds since the Unix epoch.
    pub window_start_unix_us: u64,
    /// Page sampling: how long the first and the second hash pass took, µs. Each
    /// sampled page's own window starts during the first pass and ends during the
    /// second; the reported window runs from the first pass's midpoint to the
    /// second's (the mean of the pages' windows when both passes hash steadily).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_pass_us: Option<[u64; 2]>,
    /// Page sampling: the binomial 95 % interval of the rate (Wilson score, with
    /// continuity correction).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence_95: Option<ConfidenceInterval>,
    /// Page sampling: pages hashed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled_pages: Option<u64>,
    /// Page sampling: sampled pages whose hash changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_samples: Option<u64>,
    /// Dirty ring: entries harvested from all rings in the window (QEMU's count: a page
    /// re-dirtied after a reset, or written by two vCPUs, counts again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_entries: Option<u64>,
    /// Dirty ring: entries harvested per vCPU in the window (the exact counts behind
    /// `vcpu-dirty-rate`, which QEMU truncates to whole MiB/s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_ring_entries: Option<Vec<u64>>,
    /// Dirty ring: `ring-entries` as MiB/s (QEMU's `dirty-rate` in this mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring_entries_mib_per_sec: Option<f64>,
    /// Dirty ring: `vcpu-ring-entries` as MiB/s per vCPU (QEMU's `vcpu-dirty-rate`,
    /// unrounded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_ring_entries_mib_per_sec: Option<Vec<f64>>,
    /// Dirty ring: distinct pages each vCPU dirtied in the window (the counts behind
    /// `vcpu-dirty-rate`; a page dirtied by two vCPUs counts for each).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_pages: Option<Vec<u64>>,
    /// Dirty ring: `vcpu-dirty-pages` as MiB/s, unrounded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_rate_mib_per_sec: Option<Vec<f64>>,
    /// CPU time the measurement thread used, ms.
    pub cpu_ms: f64,
    /// True when the measurement was cancelled before its window ended.
    pub cancelled: bool,
    /// Why the measurement failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// QEMU's `DirtyRateInfo`, the `query-dirty-rate` reply.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    /// Status.
    pub status: DirtyRateStatus,
    /// MiB/s, present once measured (-1 when nothing could be measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_rate: Option<i64>,
    /// Host wall clock when measuring started, seconds since the epoch.
    pub start_time: i64,
    /// The window (the actual one once measured), in `calc-time-unit`, truncated.
    pub calc_time: i64,
    /// Unit of `calc-time`.
    pub calc_time_unit: TimeUnit,
    /// Sample pages per GiB (0 once measured in the ring and bitmap modes).
    pub sample_pages: u64,
    /// Mode of the last request.
    pub mode: DirtyRateMode,
    /// Per-vCPU rates (dirty-ring mode, once measured).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_rate: Option<Vec<DirtyRateVcpu>>,
    /// Ferry's extra fields (once measured).
    #[serde(rename = "x-ferry", skip_serializing_if = "Option::is_none")]
    pub ferry: Option<FerryDirtyRateInfo>,
}

/// What a finished measurement found, handed to [`DirtyRateStats::finish`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirtyRateResult {
    /// The VM's rate, MiB/s truncated (-1: nothing measured).
    pub dirty_rate_mib_per_sec: i64,
    /// The actual window, ms.
    pub window_ms: i64,
    /// Per-vCPU rates (dirty-ring mode).
    pub vcpu_dirty_rate: Option<Vec<DirtyRateVcpu>>,
    /// Ferry's extras.
    pub ferry: FerryDirtyRateInfo,
}

#[derive(Clone, Debug, Default)]
struct Record {
    mode: DirtyRateMode,
    start_time_s: i64,
    calc_time_ms: i64,
    sample_pages: u64,
    result: Option<DirtyRateResult>,
}

/// The dirty-rate job's state: the status as an atomic, the request and result behind a
/// lock held only to copy them.
#[derive(Debug, Default)]
pub struct DirtyRateStats {
    status: AtomicU8,
    record: Mutex<Record>,
}

impl DirtyRateStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        // The record is plain data, always consistent between statements.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current status.
    pub fn status(&self) -> DirtyRateStatus {
        DirtyRateStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Records a new request (previous result dropped) and sets the status to
    /// `measuring`: QEMU's init step and its thread's first transition in one, so a
    /// query right after the request never reads `unstarted`.
    pub fn begin(
        &self,
        mode: DirtyRateMode,
        start_time_s: i64,
        calc_time_ms: i64,
        sample_pages: u64,
    ) {
        let mut r = self.lock();
        *r = Record {
            mode,
            start_time_s,
            calc_time_ms,
            sample_pages,
            result: None,
        };
        self.status
            .store(DirtyRateStatus::Measuring as u8, Ordering::Release);
    }

    /// Stores the result and sets the status to `measured`.
    pub fn finish(&self, result: DirtyRateResult) {
        let mut r = self.lock();
        if r.mode != DirtyRateMode::PageSampling {
            r.sample_pages = 0;
        }
        r.calc_time_ms = result.window_ms;
        r.result = Some(result);
        self.status
            .store(DirtyRateStatus::Measured as u8, Ordering::Release);
    }

    /// The `query-dirty-rate` reply, with `calc-time` in `unit`.
    pub fn snapshot(&self, unit: TimeUnit) -> DirtyRateInfo {
        let r = self.lock();
        let status = self.status();
        let result = r
            .result
            .as_ref()
            .filter(|_| status == DirtyRateStatus::Measured);
        DirtyRateInfo {
            status,
            dirty_rate: result.map(|x| x.dirty_rate_mib_per_sec),
            start_time: r.start_time_s,
            calc_time: r.calc_time_ms / unit.ms_per_unit(),
            calc_time_unit: unit,
            sample_pages: r.sample_pages,
            mode: r.mode,
            vcpu_dirty_rate: result.and_then(|x| x.vcpu_dirty_rate.clone()),
            ferry: result.map(|x| x.ferry.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_and_json() {
        let s = DirtyRateStats::default();
        let j = serde_json::to_value(s.snapshot(TimeUnit::Second)).unwrap();
        assert_eq!(j["status"], "unstarted");
        assert_eq!(j["mode"], "page-sampling");
        assert!(j.get("dirty-rate").is_none());
        s.begin(DirtyRateMode::DirtyRing, 1234, 1500, 512);
        let j = serde_json::to_value(s.snapshot(TimeUnit::Millisecond)).unwrap();
        assert_eq!(j["status"], "measuring");
        assert_eq!(j["calc-time"], 1500);
        assert_eq!(j["calc-time-unit"], "millisecond");
        s.finish(DirtyRateResult {
            dirty_rate_mib_per_sec: 16,
            window_ms: 1999,
            vcpu_dirty_rate: Some(vec![DirtyRateVcpu {
                id: 0,
                dirty_rate: 16,
            }]),
            ferry: FerryDirtyRateInfo::default(),
        });
        let j = serde_json::to_value(s.snapshot(TimeUnit::Second)).unwrap();
        assert_eq!(j["status"], "measured");
        assert_eq!(j["dirty-rate"], 16);
        assert_eq!(j["calc-time"], 1, "truncated to whole seconds");
        assert_eq!(j["sample-pages"], 0, "forced to 0 outside page-sampling");
        assert_eq!(j["start-time"], 1234);
        assert_eq!(j["mode"], "dirty-ring");
        assert_eq!(j["vcpu-dirty-rate"][0]["dirty-rate"], 16);
        assert!(j["x-ferry"]["dirty-rate-mib-per-sec"].is_number());
    }
}
