//! `mig_stats` and the `query-migrate` snapshot (QEMU's MigrationInfo / MigrationStats).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use atomic::Atomic;
use serde::{Deserialize, Serialize};

/// Where a migration is (QEMU's MigrationStatus, the subset Ferry uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum MigrationStatus {
    /// No migration has run.
    None = 0,
    /// Connecting, starting the dirty log.
    Setup = 1,
    /// Iterating: sending pages while the guest runs.
    Active = 2,
    /// Stop and copy: vCPUs paused, sending the rest and the device state.
    Device = 3,
    /// Done; the destination acknowledged that it runs.
    Completed = 4,
    /// Failed; see error-desc. The source guest runs.
    Failed = 5,
    /// Cancel requested, stopping.
    Cancelling = 6,
    /// Cancelled; the source guest runs.
    Cancelled = 7,
    /// Postcopy: the guest runs on the destination, which fetches the pages it still
    /// lacks from the source.
    PostcopyActive = 8,
    /// Postcopy with its connection broken: the guest runs on the destination, whose
    /// vCPUs wait on the pages only the source holds, until `migrate-recover` and
    /// `migrate` with `resume` continue it over a new connection.
    PostcopyPaused = 9,
    /// A paused postcopy migration reconnecting (QEMU's `postcopy-recover`).
    PostcopyRecover = 10,
    /// The guest is paused for the switch-over and the source waits for
    /// `migrate-continue` (capability `pause-before-switchover`).
    PreSwitchover = 11,
}

impl MigrationStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Setup,
            2 => Self::Active,
            3 => Self::Device,
            4 => Self::Completed,
            5 => Self::Failed,
            6 => Self::Cancelling,
            7 => Self::Cancelled,
            8 => Self::PostcopyActive,
            9 => Self::PostcopyPaused,
            10 => Self::PostcopyRecover,
            11 => Self::PreSwitchover,
            _ => Self::None,
        }
    }

    /// True in postcopy-active, -paused and -recover: the guest runs on the
    /// destination, and the source holds pages only it has.
    pub fn is_postcopy(self) -> bool {
        matches!(
            self,
            Self::PostcopyActive | Self::PostcopyPaused | Self::PostcopyRecover
        )
    }

    /// True for completed, failed and cancelled.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// The status QMP spells `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        (0..=u8::MAX)
            .map(Self::from_u8)
            .find(|s| s.as_str() == name)
    }

    /// The QMP spelling (`"active"`, `"completed"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Active => "active",
            Self::Device => "device",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecover => "postcopy-recover",
            Self::PreSwitchover => "pre-switchover",
        }
    }
}

/// Whether the migration can finish at the current rates (Ferry's prediction).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum Convergence {
    /// Not enough data yet (first pass).
    #[default]
    Unknown,
    /// Bandwidth beats the dirty rate; expected milliseconds until switch-over.
    Converging {
        /// Expected time to switch-over, ms.
        #[serde(rename = "expected-completion-ms")]
        expected_completion_ms: u64,
    },
    /// The guest dirties memory at least as fast as it can be sent.
    NotConverging {
        /// Bandwidth that would let it converge, bytes/s.
        #[serde(rename = "needed-bandwidth-bytes-per-sec")]
        needed_bandwidth_bytes_per_sec: u64,
    },
}

/// The engine's counters for one migration (QEMU's `mig_stats` plus the state around it).
///
/// Every field is an atomic written by the migration thread and read by any number of
/// `query-migrate` callers without a lock.
#[derive(Debug)]
pub struct MigStats {
    status: AtomicU8,
    /// Taken by a status change around the store, and by a waiter around its check, so
    /// `wait_status_change` misses no change; holds the recent changes in order
    /// ([`MigStats::wait_status_changes`]).
    status_lock: std::sync::Mutex<StatusLog>,
    status_changed: std::sync::Condvar,
    started: Instant,
    /// Bytes put on the wire (all channels, headers included).
    pub transferred_bytes: AtomicU64,
    /// Bytes still dirty (remaining pages × page size).
    pub remaining_bytes: AtomicU64,
    /// Guest RAM size, bytes.
    pub total_bytes: AtomicU64,
    /// Zero pages sent as offsets only (QMP `duplicate`).
    pub zero_pages: AtomicU64,
    /// Full pages sent (QMP `normal`).
    pub normal_pages: AtomicU64,
    /// QEMU's dirty-pages-rate: pages newly dirtied per second over the last ≥ 1 s period.
    pub dirty_pages_rate: AtomicU64,
    /// Global dirty-log syncs done.
    pub dirty_sync_count: AtomicU64,
    /// Postcopy: pages the destination requested (faults that reached the source).
    pub postcopy_requests: AtomicU64,
    /// Postcopy: bytes sent after the switch to postcopy.
    pub postcopy_bytes: AtomicU64,
    /// Postcopy on the destination: faults, requests, missing pages, fault latency.
    pub postcopy: std::sync::Arc<crate::PostcopyStats>,
    /// Page size, bytes.
    pub page_size_bytes: AtomicU64,
    /// Bytes sent on the parallel (multifd) channels.
    pub multifd_bytes: AtomicU64,
    /// Pages (normal + zero) sent per second over the last window.
    pub pages_per_second: AtomicU64,
    /// Bytes sent while the guest ran.
    pub precopy_bytes: AtomicU64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: AtomicU64,
    /// Throughput of the last window, Mbit/s.
    pub mbps: Atomic<f64>,
    /// Milliseconds from start to the end of setup.
    pub setup_time_ms: AtomicU64,
    /// Total time once finished, ms (while running, computed from the start instant).
    pub total_time_ms: AtomicU64,
    /// Pause → destination acknowledgement, ms.
    pub downtime_ms: AtomicU64,
    /// Predicted downtime at the current bandwidth, ms.
    pub expected_downtime_ms: AtomicU64,
    /// Current auto-converge throttle, percent (0 = not throttling).
    pub cpu_throttle_percentage: AtomicU64,
    /// Ferry: unique pages dirtied per second over the last ≥ 1 s period (all writes,
    /// not only pages dirtied since they were sent).
    pub true_dirty_pages_rate: AtomicU64,
    /// Ferry: QEMU's own rule for comparison: pages newly dirtied since they were sent,
    /// summed over the syncs of the period, per second (counts a page once per sync).
    pub new_dirty_pages_rate: AtomicU64,
    /// Ferry: smoothed link bandwidth, measured only while the sender was saturated, bytes/s.
    pub bandwidth_bytes_per_sec: AtomicU64,
    /// Ferry: passes over the dirty bitmap (iterations) done.
    pub iterations: AtomicU64,
    /// Ferry: of the normal pages, those sent as their non-zero words (sparse pages).
    pub sparse_pages: AtomicU64,
    /// Ferry: where the downtime went, µs.
    pub downtime_phases: DowntimePhases,
    /// Ferry: convergence prediction, encoded (see [`MigStats::set_convergence`]).
    convergence: AtomicU64,
    /// Ferry: the prediction as it stood at the end of the first pass.
    first_pass_convergence: OnceLock<Prediction>,
    error: OnceLock<String>,
    /// Set on a destination's counters: where it listens (None for a non-socket
    /// transport), which its `query-migrate` reports instead of the source's figures.
    incoming_address: OnceLock<Option<SocketAddress>>,
    /// Why postcopy is paused (or why its last recovery failed); cleared on recovery.
    pause_reason: std::sync::Mutex<Option<String>>,
    /// While the migration holds a dirty limit: its throttle time per round and ring
    /// full time, µs.
    dirty_limit: std::sync::Mutex<Option<(u64, u64)>>,
    /// The migration's threads alive now (`query-migrationthreads`), by a key of
    /// their own.
    threads: std::sync::Mutex<Vec<(u64, MigrationThreadInfo)>>,
    next_thread_key: AtomicU64,
}

/// One row of `query-migrationthreads`: a thread working on the migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationThreadInfo {
    /// What it does (Ferry's thread name, as `top -H` shows it).
    pub name: String,
    /// Its kernel thread id (for pinning it, as QEMU's users do).
    pub thread_id: u64,
}

/// Keeps a thread listed in [`MigStats::threads`] while it lives.
#[derive(Debug)]
#[must_use = "the thread is listed only while the guard lives"]
pub struct ThreadListing<'a> {
    stats: &'a MigStats,
    key: u64,
}

impl Drop for ThreadListing<'_> {
    fn drop(&mut self) {
        let mut t = self.stats.threads.lock().unwrap_or_else(|p| p.into_inner());
        t.retain(|(k, _)| *k != self.key);
    }
}

/// The calling thread's kernel id, from `/proc/thread-self` (0 where procfs lacks it).
fn own_thread_id() -> u64 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

impl Default for MigStats {
    fn default() -> Self {
        Self::new()
    }
}

/// How many recent status changes [`MigStats::wait_status_changes`] can return.
pub const STATUS_LOG_LEN: usize = 32;

/// The recent status changes, oldest first, and how many there were in all.
#[derive(Debug, Default)]
struct StatusLog {
    count: u64,
    recent: std::collections::VecDeque<MigrationStatus>,
}

impl StatusLog {
    fn push(&mut self, s: MigrationStatus) {
        if self.recent.len() == STATUS_LOG_LEN {
            self.recent.pop_front();
        }
        self.recent.push_back(s);
        self.count += 1;
    }
}

const CONV_UNKNOWN: u64 = u64::MAX;
const CONV_NOT: u64 = 1 << 63;

impl MigStats {
    /// Lists the calling thread as `name` among the migration's threads until the
    /// returned guard drops.
    pub fn list_thread(&self, name: &str) -> ThreadListing<'_> {
        let key = self.next_thread_key.fetch_add(1, Ordering::Relaxed);
        let info = MigrationThreadInfo {
            name: name.to_owned(),
            thread_id: own_thread_id(),
        };
        let mut t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        t.push((key, info));
        ThreadListing { stats: self, key }
    }

    /// The migration's threads alive now, in the order they started
    /// (`query-migrationthreads`).
    pub fn threads(&self) -> Vec<MigrationThreadInfo> {
        let t = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().map(|(_, i)| i.clone()).collect()
    }

    /// Fresh counters; status `none`, clock started now.
    pub fn new() -> Self {
        MigStats {
            status: AtomicU8::new(MigrationStatus::None as u8),
            status_lock: std::sync::Mutex::new(StatusLog::default()),
            status_changed: std::sync::Condvar::new(),
            started: Instant::now(),
            transferred_bytes: AtomicU64::new(0),
            remaining_bytes: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            normal_pages: AtomicU64::new(0),
            dirty_pages_rate: AtomicU64::new(0),
            dirty_sync_count: AtomicU64::new(0),
            postcopy_requests: AtomicU64::new(0),
            postcopy_bytes: AtomicU64::new(0),
            postcopy: Default::default(),
            page_size_bytes: AtomicU64::new(4096),
            multifd_bytes: AtomicU64::new(0),
            pages_per_second: AtomicU64::new(0),
            precopy_bytes: AtomicU64::new(0),
            downtime_bytes: AtomicU64::new(0),
            mbps: Atomic::new(0.0),
            setup_time_ms: AtomicU64::new(0),
            total_time_ms: AtomicU64::new(0),
            downtime_ms: AtomicU64::new(0),
            expected_downtime_ms: AtomicU64::new(0),
            cpu_throttle_percentage: AtomicU64::new(0),
            true_dirty_pages_rate: AtomicU64::new(0),
            new_dirty_pages_rate: AtomicU64::new(0),
            bandwidth_bytes_per_sec: AtomicU64::new(0),
            iterations: AtomicU64::new(0),
            sparse_pages: AtomicU64::new(0),
            downtime_phases: DowntimePhases::default(),
            convergence: AtomicU64::new(CONV_UNKNOWN),
            first_pass_convergence: OnceLock::new(),
            error: OnceLock::new(),
            incoming_address: OnceLock::new(),
            threads: std::sync::Mutex::new(Vec::new()),
            next_thread_key: AtomicU64::new(0),
            pause_reason: std::sync::Mutex::new(None),
            dirty_limit: std::sync::Mutex::new(None),
        }
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        MigrationStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Sets the status unconditionally.
    pub fn set_status(&self, s: MigrationStatus) {
        let mut log = self.status_log();
        self.status.store(s as u8, Ordering::Release);
        log.push(s);
        drop(log);
        self.status_changed.notify_all();
    }

    /// Moves `from` → `to` only if the status is still `from` (QEMU's migrate_set_state).
    pub fn transition(&self, from: MigrationStatus, to: MigrationStatus) -> bool {
        let mut log = self.status_log();
        let moved = self
            .status
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if moved {
            log.push(to);
            drop(log);
            self.status_changed.notify_all();
        }
        moved
    }

    fn status_log(&self) -> std::sync::MutexGuard<'_, StatusLog> {
        self.status_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until a status was set after the first `seen` changes (counted from
    /// these counters' creation), or `timeout` passes; returns the number of changes
    /// so far and the statuses set after the first `seen`, in order (the last
    /// [`STATUS_LOG_LEN`] at most: a watcher that fell further behind gets the latest
    /// ones). Unlike [`MigStats::wait_status_change`] it misses no status that lasted
    /// only an instant, so a watcher can report every change as QMP's `MIGRATION`
    /// events do.
    pub fn wait_status_changes(&self, seen: u64, timeout: Duration) -> (u64, Vec<MigrationStatus>) {
        let deadline = Instant::now() + timeout;
        let mut log = self.status_log();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if log.count > seen || left.is_zero() {
                let new = log.count.saturating_sub(seen).min(log.recent.len() as u64) as usize;
                let from = log.recent.len() - new;
                return (log.count, log.recent.iter().skip(from).copied().collect());
            }
            log = self
                .status_changed
                .wait_timeout(log, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until the status differs from `seen` or `timeout` passes; returns the
    /// status then. For a watcher that reports each change as it happens (QMP's
    /// `MIGRATION` events) without polling.
    pub fn wait_status_change(&self, seen: MigrationStatus, timeout: Duration) -> MigrationStatus {
        let deadline = Instant::now() + timeout;
        let mut guard = self.status_log();
        loop {
            let now = self.status();
            let left = deadline.saturating_duration_since(Instant::now());
            if now != seen || left.is_zero() {
                return now;
            }
            guard = self
                .status_changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Milliseconds since these counters were created.
    pub fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Records the failure reason (the first one wins).
    pub fn set_error(&self, desc: impl Into<String>) {
        // Already set: the first reason stands, later ones are its consequences.
        let _ = self.error.set(desc.into());
    }

    /// The failure reason, if any.
    pub fn error(&self) -> Option<&str> {
        self.error.get().map(String::as_str)
    }

    /// Sets (or with `None` clears) the dirty limit's throttle time per round and ring
    /// full time, µs, for `query-migrate` while the migration holds the limit.
    pub fn set_dirty_limit(&self, round_times_us: Option<(u64, u64)>) {
        *self.dirty_limit.lock().unwrap_or_else(|p| p.into_inner()) = round_times_us;
    }

    /// Sets (or with `None` clears) why postcopy is paused; `query-migrate`'s
    /// error-desc while no failure reason is set.
    pub fn set_pause_reason(&self, why: Option<String>) {
        *self.pause_reason.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// The failure reason, else why postcopy is paused.
    fn error_desc(&self) -> Option<String> {
        self.error().map(str::to_owned).or_else(|| {
            self.pause_reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// Stores the convergence prediction.
    pub fn set_convergence(&self, c: Convergence) {
        let v = match c {
            Convergence::Unknown => CONV_UNKNOWN,
            Convergence::Converging {
                expected_completion_ms,
            } => expected_completion_ms.min(CONV_NOT - 1),
            Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec,
            } => CONV_NOT | needed_bandwidth_bytes_per_sec.min(CONV_NOT - 2),
        };
        self.convergence.store(v, Ordering::Relaxed);
    }

    /// The convergence prediction.
    pub fn convergence(&self) -> Convergence {
        match self.convergence.load(Ordering::Relaxed) {
            CONV_UNKNOWN => Convergence::Unknown,
            v if v & CONV_NOT != 0 => Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec: v & !CONV_NOT,
            },
            v => Convergence::Converging {
                expected_completion_ms: v,
            },
        }
    }

    /// Records the current prediction as the first pass's (`x-ferry.first-pass-convergence`);
    /// only the first call counts, so the engine calls it at the end of every pass it
    /// likes without overwriting it.
    pub fn record_first_pass_convergence(&self) {
        // Already set: only the first pass's prediction is kept (see above).
        let _ = self.first_pass_convergence.set(Prediction {
            at_ms: self.elapsed_ms(),
            convergence: self.convergence(),
        });
    }

    /// The prediction recorded at the end of the first pass, if that pass ended.
    pub fn first_pass_convergence(&self) -> Option<Prediction> {
        self.first_pass_convergence.get().copied()
    }

    /// Adds `bytes` sent, to precopy or downtime by whether the guest is paused.
    pub fn add_transferred(&self, bytes: u64, guest_paused: bool) {
        self.transferred_bytes.fetch_add(bytes, Ordering::Relaxed);
        let bucket = if guest_paused {
            &self.downtime_bytes
        } else {
            &self.precopy_bytes
        };
        bucket.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Marks these as a destination's counters, listening at `address` (None: not a
    /// socket): its `query-migrate` then answers as QEMU's destination does, the status
    /// and the `socket-address` (with Ferry's own `x-ferry` figures and error-desc).
    pub fn set_incoming(&self, address: Option<SocketAddress>) {
        let _ = self.incoming_address.set(address);
    }

    /// The `query-migrate` answer, built from the atomics without a lock.
    pub fn snapshot(&self) -> MigrationInfo {
        let status = self.status();
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut info = MigrationInfo {
            status,
            ..Default::default()
        };
        if let Some(address) = self.incoming_address.get() {
            info.socket_address = address.clone().map(|a| vec![a]);
            if status != MigrationStatus::None {
                info.error_desc = self.error_desc();
                info.ferry = Some(self.ferry_info(status == MigrationStatus::Completed));
            }
            return info;
        }
        // QEMU's shapes: nothing but the status before there are figures and after a
        // cancel; a failure adds only its reason.
        match status {
            MigrationStatus::None | MigrationStatus::Setup | MigrationStatus::Cancelled => {
                return info
            }
            MigrationStatus::Failed => {
                info.error_desc = self.error().map(str::to_owned);
                return info;
            }
            _ => {}
        }
        let completed = status == MigrationStatus::Completed;
        let page = ld(&self.page_size_bytes);
        let normal = ld(&self.normal_pages);
        info.ram = Some(MigrationStats {
            transferred: ld(&self.transferred_bytes),
            remaining: if completed {
                0
            } else {
                ld(&self.remaining_bytes)
            },
            total: ld(&self.total_bytes),
            duplicate: ld(&self.zero_pages),
            normal,
            normal_bytes: normal * page,
            dirty_pages_rate: if completed {
                0
            } else {
                ld(&self.dirty_pages_rate)
            },
            mbps: self.mbps.load(Ordering::Relaxed),
            dirty_sync_count: ld(&self.dirty_sync_count),
            postcopy_requests: ld(&self.postcopy_requests),
            page_size: page,
            multifd_bytes: ld(&self.multifd_bytes),
            pages_per_second: ld(&self.pages_per_second),
            precopy_bytes: ld(&self.precopy_bytes),
            downtime_bytes: ld(&self.downtime_bytes),
            postcopy_bytes: ld(&self.postcopy_bytes),
            dirty_sync_missed_zero_copy: 0,
        });
        let finished = status.is_finished();
        info.total_time = Some(if finished {
            ld(&self.total_time_ms)
        } else {
            self.elapsed_ms()
        });
        info.setup_time = Some(ld(&self.setup_time_ms));
        if completed {
            info.downtime = Some(ld(&self.downtime_ms));
        } else {
            info.expected_downtime = Some(ld(&self.expected_downtime_ms));
        }
        let throttle = ld(&self.cpu_throttle_percentage);
        if throttle > 0 {
            info.cpu_throttle_percentage = Some(throttle);
        }
        if !finished {
            if let Some((per_round, ring_full)) =
                *self.dirty_limit.lock().unwrap_or_else(|p| p.into_inner())
            {
                info.dirty_limit_throttle_time_per_round = Some(per_round);
                info.dirty_limit_ring_full_time = Some(ring_full);
            }
        }
        info.error_desc = self.error_desc();
        info.ferry = Some(self.ferry_info(completed));
        info
    }

    /// Ferry's own figures (`x-ferry`).
    fn ferry_info(&self, completed: bool) -> FerryMigrationInfo {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let page = ld(&self.page_size_bytes);
        FerryMigrationInfo {
            true_dirty_pages_rate: ld(&self.true_dirty_pages_rate),
            new_dirty_pages_rate: ld(&self.new_dirty_pages_rate),
            bandwidth_bytes_per_sec: ld(&self.bandwidth_bytes_per_sec),
            iterations: ld(&self.iterations),
            sparse_pages: ld(&self.sparse_pages),
            downtime_phases_us: completed.then(|| self.downtime_phases.snapshot()),
            convergence: self.convergence(),
            first_pass_convergence: self.first_pass_convergence(),
            postcopy: self
                .postcopy
                .started()
                .then(|| self.postcopy.snapshot(page.max(4096))),
        }
    }
}

/// QEMU's `SocketAddress`: where a destination listens (its `query-migrate`'s
/// `socket-address`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    /// A TCP address; QEMU writes the port as a string.
    Inet {
        /// Host name or address.
        host: String,
        /// Port.
        port: String,
    },
    /// A Unix socket.
    Unix {
        /// Its path.
        path: String,
    },
}

/// QEMU's `MigrationStats` (`query-migrate`'s `ram`), field for field.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes transferred.
    pub transferred: u64,
    /// Bytes still to send.
    pub remaining: u64,
    /// Guest RAM, bytes.
    pub total: u64,
    /// Zero pages.
    pub duplicate: u64,
    /// Full pages sent.
    pub normal: u64,
    /// Full pages sent, bytes.
    pub normal_bytes: u64,
    /// Pages dirtied per second.
    pub dirty_pages_rate: u64,
    /// Throughput, Mbit/s.
    pub mbps: f64,
    /// Dirty-log syncs.
    pub dirty_sync_count: u64,
    /// Postcopy: pages the destination requested.
    pub postcopy_requests: u64,
    /// Page size, bytes.
    pub page_size: u64,
    /// Bytes on multifd channels.
    pub multifd_bytes: u64,
    /// Pages per second.
    pub pages_per_second: u64,
    /// Bytes sent while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: u64,
    /// Postcopy: bytes sent after the switch to postcopy.
    pub postcopy_bytes: u64,
    /// Always 0 (no zero-copy send).
    pub dirty_sync_missed_zero_copy: u64,
}

/// The parts of the downtime, µs, in the order they happen; set once the migration
/// completed. What they do not add up to is scheduling between them.
#[derive(Debug, Default)]
pub struct DowntimePhases {
    /// Asking the vCPUs to stop until all stopped.
    pub pause_us: AtomicU64,
    /// The final dirty-log sync.
    pub sync_us: AtomicU64,
    /// Sending the last dirty pages.
    pub pages_us: AtomicU64,
    /// Saving and sending the device state.
    pub device_us: AtomicU64,
    /// End of stream until the destination acknowledged (it loaded and resumed).
    pub ack_us: AtomicU64,
}

/// [`DowntimePhases`] as a snapshot (`x-ferry.downtime-phases-us`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DowntimePhasesUs {
    /// See [`DowntimePhases::pause_us`].
    pub pause: u64,
    /// See [`DowntimePhases::sync_us`].
    pub sync: u64,
    /// See [`DowntimePhases::pages_us`].
    pub pages: u64,
    /// See [`DowntimePhases::device_us`].
    pub device: u64,
    /// See [`DowntimePhases::ack_us`].
    pub ack: u64,
}

impl DowntimePhases {
    fn snapshot(&self) -> DowntimePhasesUs {
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DowntimePhasesUs {
            pause: ld(&self.pause_us),
            sync: ld(&self.sync_us),
            pages: ld(&self.pages_us),
            device: ld(&self.device_us),
            ack: ld(&self.ack_us),
        }
    }
}

/// Ferry's own `query-migrate` fields, under the `x-ferry` key so QEMU clients ignore them.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FerryMigrationInfo {
    /// Unique pages dirtied per second over the last window.
    pub true_dirty_pages_rate: u64,
    /// QEMU's rule: pages newly dirtied since sent, once per sync, per second.
    pub new_dirty_pages_rate: u64,
    /// Smoothed bandwidth while saturated, bytes/s.
    pub bandwidth_bytes_per_sec: u64,
    /// Passes done.
    pub iterations: u64,
    /// Of the normal pages, those sent as their non-zero words.
    pub sparse_pages: u64,
    /// Where the downtime went (once completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_phases_us: Option<DowntimePhasesUs>,
    /// Convergence prediction.
    pub convergence: Convergence,
    /// The prediction behind the engine's first switch-over decision: at the end of the
    /// first pass, or once the destination applied it when the engine waited for that
    /// (absent before), to set beside what happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_pass_convergence: Option<Prediction>,
    /// Postcopy on the destination (once its postcopy phase started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<crate::FerryPostcopyInfo>,
}

/// A convergence prediction and when it was made: a converging one predicts the
/// switch-over at `at_ms + expected_completion_ms` since the migration started.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Prediction {
    /// When the prediction was made, ms since the migration started.
    #[serde(rename = "at-ms")]
    pub at_ms: u64,
    /// What it said.
    #[serde(flatten)]
    pub convergence: Convergence,
}

/// QEMU's `MigrationInfo`, the `query-migrate` reply; absent parts are omitted as QEMU does.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Status.
    pub status: MigrationStatus,
    /// RAM statistics (active-like states and completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationStats>,
    /// ms since start (final value once finished).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Setup time, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// Predicted downtime, ms (while not completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Actual downtime, ms (completed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Auto-converge throttle, percent (while throttling).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u64>,
    /// Dirty limit (while the migration holds it): the longest a limited vCPU was held
    /// asleep in the last round (a measurement period), µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_limit_throttle_time_per_round: Option<u64>,
    /// Dirty limit: how long the limited vCPUs take on average to fill their dirty
    /// ring at their current rate, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_limit_ring_full_time: Option<u64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// A destination's listening addresses (QEMU's `socket-address`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_address: Option<Vec<SocketAddress>>,
    /// Ferry's extra fields.
    #[serde(rename = "x-ferry", skip_serializing_if = "Option::is_none")]
    pub ferry: Option<FerryMigrationInfo>,
}

impl Default for MigrationInfo {
    fn default() -> Self {
        MigrationInfo {
            status: MigrationStatus::None,
            ram: None,
            total_time: None,
            setup_time: None,
            expected_downtime: None,
            downtime: None,
            cpu_throttle_percentage: None,
            dirty_limit_throttle_time_per_round: None,
            dirty_limit_ring_full_time: None,
            error_desc: None,
            socket_address: None,
            ferry: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_thread_is_listed_while_its_guard_lives() {
        let m = MigStats::new();
        assert!(m.threads().is_empty());
        let a = m.list_thread("mig/src");
        let tid = m.threads()[0].thread_id;
        assert!(tid > 0, "the kernel's thread id, not a placeholder");
        std::thread::scope(|s| {
            s.spawn(|| {
                let _b = m.list_thread("mig/send0");
                let t = m.threads();
                assert_eq!(t.len(), 2);
                assert_eq!(t[1].name, "mig/send0");
                assert_ne!(t[1].thread_id, tid, "each thread its own id");
            });
        });
        assert_eq!(m.threads().len(), 1);
        drop(a);
        assert!(m.threads().is_empty());
        let v = serde_json::to_value(MigrationThreadInfo {
            name: "x".into(),
            thread_id: 7,
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"name": "x", "thread-id": 7}));
    }

    #[test]
    fn a_status_watcher_wakes_on_each_change_and_times_out_without_one() {
        let stats = std::sync::Arc::new(MigStats::new());
        let s2 = stats.clone();
        let setter = std::thread::spawn(move || {
            s2.set_status(MigrationStatus::Setup);
            assert!(s2.transition(MigrationStatus::Setup, MigrationStatus::Active));
            assert!(!s2.transition(MigrationStatus::Setup, MigrationStatus::Failed));
            s2.set_status(MigrationStatus::Completed);
        });
        // Each wait returns a status other than the one seen, well before its long
        // timeout, until the last one.
        let mut seen = MigrationStatus::None;
        let started = Instant::now();
        while seen != MigrationStatus::Completed {
            let now = stats.wait_status_change(seen, Duration::from_secs(60));
            assert_ne!(now, seen, "woken without a change");
            seen = now;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
        setter.join().unwrap();
        let t = Instant::now();
        let same = stats.wait_status_change(MigrationStatus::Completed, Duration::from_millis(50));
        assert_eq!(same, MigrationStatus::Completed);
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    use super::*;
    use serde_json::Value;

    #[test]
    fn setup_shows_only_status() {
        let s = MigStats::new();
        s.set_status(MigrationStatus::Setup);
        assert_eq!(
            serde_json::to_value(s.snapshot()).unwrap(),
            serde_json::json!({"status": "setup"})
        );
    }

    #[test]
    fn active_has_qemu_names_and_units() {
        let s = MigStats::new();
        s.set_status(MigrationStatus::Active);
        s.normal_pages.store(10, Ordering::Relaxed);
        s.dirty_pages_rate.store(4097, Ordering::Relaxed);
        s.add_transferred(1000, false);
        s.add_transferred(24, true);
        let v: Value = serde_json::to_value(s.snapshot()).unwrap();
        let ram = &v["ram"];
        for key in [
            "transferred",
            "remaining",
            "total",
            "duplicate",
            "normal",
            "normal-bytes",
            "dirty-pages-rate",
            "mbps",
            "dirty-sync-count",
            "postcopy-requests",
            "page-size",
            "multifd-bytes",
            "pages-per-second",
            "precopy-bytes",
            "downtime-bytes",
            "postcopy-bytes",
            "dirty-sync-missed-zero-copy",
        ] {
            assert!(ram.get(key).is_some(), "missing ram.{key}");
        }
        assert_eq!(ram["normal-bytes"], 40960);
        assert_eq!(ram["dirty-pages-rate"], 4097);
        assert_eq!(ram["transferred"], 1024);
        assert_eq!(ram["precopy-bytes"], 1000);
        assert_eq!(ram["downtime-bytes"], 24);
        assert!(ram["mbps"].is_f64());
        assert!(v.get("expected-downtime").is_some());
        assert!(v.get("downtime").is_none());
        assert!(v.get("total-time").is_some() && v.get("setup-time").is_some());
        assert_eq!(v["x-ferry"]["convergence"]["state"], "unknown");
        assert!(v.get("cpu-throttle-percentage").is_none());
    }

    #[test]
    fn failed_carries_error_desc_only() {
        let s = MigStats::new();
        s.set_status(MigrationStatus::Failed);
        s.set_error("connection reset");
        s.set_error("second error is ignored");
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"status": "failed", "error-desc": "connection reset"})
        );
    }

    #[test]
    fn cancelled_carries_the_status_only_and_cancelling_the_figures() {
        let s = MigStats::new();
        s.transferred_bytes.store(1 << 20, Ordering::Relaxed);
        s.set_status(MigrationStatus::Active);
        assert!(s.transition(MigrationStatus::Active, MigrationStatus::Cancelling));
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["ram"]["transferred"], 1 << 20, "{v}");
        assert!(s.transition(MigrationStatus::Cancelling, MigrationStatus::Cancelled));
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v, serde_json::json!({"status": "cancelled"}));
    }

    #[test]
    fn a_destination_answers_its_status_and_socket_address_as_qemu() {
        let s = MigStats::new();
        s.set_incoming(Some(SocketAddress::Inet {
            host: "127.0.0.1".into(),
            port: "4444".into(),
        }));
        s.transferred_bytes.store(1 << 20, Ordering::Relaxed);
        s.set_status(MigrationStatus::Active);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["status"], "active");
        assert_eq!(
            v["socket-address"],
            serde_json::json!([{"type": "inet", "host": "127.0.0.1", "port": "4444"}])
        );
        for absent in ["ram", "total-time", "setup-time", "expected-downtime"] {
            assert!(v.get(absent).is_none(), "{absent}: {v}");
        }
        assert!(v.get("x-ferry").is_some(), "{v}");
        let u = MigStats::new();
        u.set_incoming(Some(SocketAddress::Unix {
            path: "/run/m.sock".into(),
        }));
        u.set_status(MigrationStatus::Completed);
        let v = serde_json::to_value(u.snapshot()).unwrap();
        assert_eq!(
            v["socket-address"],
            serde_json::json!([{"type": "unix", "path": "/run/m.sock"}])
        );
    }

    #[test]
    fn completed_shows_downtime_and_zero_remaining() {
        let s = MigStats::new();
        s.remaining_bytes.store(4096, Ordering::Relaxed);
        s.downtime_ms.store(7, Ordering::Relaxed);
        s.set_status(MigrationStatus::Completed);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(v["downtime"], 7);
        assert_eq!(v["ram"]["remaining"], 0);
        assert!(v.get("expected-downtime").is_none());
    }

    #[test]
    fn status_changes_are_logged_in_order() {
        use MigrationStatus as S;
        let s = MigStats::new();
        // Nothing yet: the wait times out with no change.
        assert_eq!(s.wait_status_changes(0, Duration::ZERO), (0, vec![]));
        s.set_status(S::PostcopyActive);
        s.set_status(S::PostcopyPaused);
        assert!(s.transition(S::PostcopyPaused, S::PostcopyRecover));
        assert!(!s.transition(S::PostcopyPaused, S::Failed));
        s.set_status(S::PostcopyActive);
        // A status that lasted an instant is still there, in order.
        let (n, log) = s.wait_status_changes(1, Duration::from_secs(5));
        assert_eq!(n, 4);
        assert_eq!(
            log,
            [S::PostcopyPaused, S::PostcopyRecover, S::PostcopyActive]
        );
        // A watcher that fell behind gets the latest STATUS_LOG_LEN.
        for _ in 0..STATUS_LOG_LEN {
            s.set_status(S::Active);
        }
        s.set_status(S::Completed);
        let (n, log) = s.wait_status_changes(0, Duration::ZERO);
        assert_eq!(n, 5 + STATUS_LOG_LEN as u64);
        assert_eq!(log.len(), STATUS_LOG_LEN);
        assert_eq!(log.last(), Some(&S::Completed));
        // Woken by a change from another thread.
        let s = std::sync::Arc::new(s);
        let t = {
            let s = s.clone();
            std::thread::spawn(move || s.wait_status_changes(n, Duration::from_secs(60)))
        };
        s.set_status(S::Failed);
        let (m, log) = t.join().expect("the waiter");
        assert_eq!((m, log), (n + 1, vec![S::Failed]));
    }

    #[test]
    fn transition_is_compare_and_swap() {
        let s = MigStats::new();
        assert!(s.transition(MigrationStatus::None, MigrationStatus::Setup));
        assert!(!s.transition(MigrationStatus::None, MigrationStatus::Active));
        assert_eq!(s.status(), MigrationStatus::Setup);
    }

    #[test]
    fn convergence_round_trips() {
        let s = MigStats::new();
        for c in [
            Convergence::Unknown,
            Convergence::Converging {
                expected_completion_ms: 1234,
            },
            Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec: 1 << 30,
            },
        ] {
            s.set_convergence(c);
            assert_eq!(s.convergence(), c);
        }
    }

    #[test]
    fn first_pass_convergence_is_recorded_once() {
        let s = MigStats::new();
        s.set_status(MigrationStatus::Active);
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert!(v["x-ferry"].get("first-pass-convergence").is_none(), "{v}");
        let first = Convergence::NotConverging {
            needed_bandwidth_bytes_per_sec: 5 << 30,
        };
        s.set_convergence(first);
        s.record_first_pass_convergence();
        s.set_convergence(Convergence::Converging {
            expected_completion_ms: 40,
        });
        s.record_first_pass_convergence();
        assert_eq!(
            s.first_pass_convergence().map(|p| p.convergence),
            Some(first)
        );
        let v = serde_json::to_value(s.snapshot()).unwrap();
        assert_eq!(
            v["x-ferry"]["first-pass-convergence"],
            serde_json::json!({"state": "not-converging", "needed-bandwidth-bytes-per-sec": 5u64 << 30,
                "at-ms": s.first_pass_convergence().unwrap().at_ms})
        );
        assert_eq!(v["x-ferry"]["convergence"]["state"], "converging");
    }
}
