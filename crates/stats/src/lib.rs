//! Ferry's read model: lock-free counters written by the engine and read by queries.
//!
//! Writers bump atomics; readers take a snapshot without a lock, so `query-migrate` and
//! dirty-log tools never stall the work they observe. QMP names live here and only here:
//! the snapshots serialize to exactly QEMU's JSON field names and units.

mod dirty_log;
mod dirty_rate;
mod migration;
mod postcopy;

pub use dirty_log::{DirtyLogSnapshot, DirtyLogStats};
pub use dirty_rate::{
    ConfidenceInterval, DirtyRateInfo, DirtyRateMode, DirtyRateResult, DirtyRateStats,
    DirtyRateStatus, DirtyRateVcpu, FerryDirtyRateInfo, TimeUnit,
};
pub use migration::{
    Convergence, DowntimePhases, DowntimePhasesUs, FerryMigrationInfo, MigStats, MigrationInfo,
    MigrationStats, MigrationStatus, MigrationThreadInfo, Prediction, SocketAddress, ThreadListing,
    STATUS_LOG_LEN,
};
pub use postcopy::{FerryPostcopyInfo, LatencyHistogram, PostcopyStats, LATENCY_BUCKETS};
