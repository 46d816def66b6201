//! Ferry's engine: the precopy source and destination, the numbers that steer them,
//! and calc-dirty-rate.
//!
//! A VMM implements [`MigratableVm`] for its guest, hands it to a [`MigrationSource`]
//! (source side) or [`incoming`] (destination side), and polls
//! [`MigrationSource::query`] for QEMU-shaped `query-migrate` answers. One
//! [`RunControl`] per guest holds its run state (QEMU's RunState): the engine and the
//! VMM's monitor pause and resume the vCPUs only through it. A
//! [`DirtyRateJob`] answers `calc-dirty-rate` / `query-dirty-rate` for the same guest.

mod destination;
mod dirtyrate;
mod error;
mod guest;
mod params;
mod rates;
mod runstate;
mod source;
#[cfg(test)]
mod test_vm;
#[cfg(test)]
mod tracing_tests;

pub use destination::{
    incoming, incoming_with, ram_digest, Incoming, IncomingOptions, IncomingReport,
};
pub use dirtyrate::{
    wilson_interval, DirtyRateArgs, DirtyRateJob, SamplePlan, SamplingResult, DEFAULT_SAMPLE_PAGES,
    MAX_CALC_TIME_MS, MAX_SAMPLE_PAGES, MIN_CALC_TIME_MS, MIN_SAMPLED_BLOCK_BYTES,
    MIN_SAMPLE_PAGES, THREAD_NAME,
};
pub use error::{Error, Result};
pub use guest::{mark_touched_pages, GuestError, GuestRam, MigratableVm};
pub use params::{
    Capabilities, Capability, CompressionParam, MigrationParameters, ParametersUpdate,
    MAX_DOWNTIME_LIMIT_MS,
};
pub use rates::{
    predict_convergence, AutoConverge, BandwidthEstimator, DirtyGrowth, DirtyRatePeriod, PassCost,
    SendWindow,
};
pub use runstate::{MigrationEvent, RunControl, RunState};
pub use source::MigrationSource;
pub use stats::{DirtyRateInfo, DirtyRateMode, DirtyRateStatus, TimeUnit};
