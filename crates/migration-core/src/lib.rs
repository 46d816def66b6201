//! Ferry's engine: the precopy source and destination, the numbers that steer them,
//! and calc-dirty-rate.
//!
//! A VMM implements [`MigratableVm`] for its guest, hands it to a [`MigrationSource`]
//! (source side) or [`incoming`] (destination side), and polls
//! [`MigrationSource::query`] for QEMU-shaped `query-migrate` answers. One
//! [`RunControl`] per guest holds its run state (QEMU's RunState): the engine and the
//! VMM's monitor pause and resume the vCPUs only through it. A
//! [`DirtyRateJob`] answers `calc-dirty-rate` / `query-dirty-rate` for the same guest.
//!
//! # Embedding
//!
//! What a VMM writes: an `impl MigratableVm` (its RAM as a
//! [`dirty_sync::AddressSpace`], pause and resume of its vCPUs, its device state),
//! then a few calls on each side. `examples/embed.rs` in the repository is a whole
//! VMM (its own KVM VM, vm-memory RAM, one vCPU) that does exactly this between two
//! processes; docs/unsafe.md lists the one `unsafe` contract memory comes with.
//!
//! ```no_run
//! use std::sync::Arc;
//! use migration_core::{incoming, MigratableVm, MigrationSource};
//! use stats::MigrationStatus;
//!
//! fn send(vm: Arc<dyn MigratableVm>) -> migration_core::Result<()> {
//!     let source = MigrationSource::new(vm);
//!     source.migrate("tcp:192.0.2.7:4444")?; // returns once the thread started
//!     while !source.stats().status().is_finished() {
//!         // A management tool would poll `source.query()` (QMP's query-migrate).
//!         std::thread::sleep(std::time::Duration::from_millis(100));
//!     }
//!     assert_eq!(source.wait(), MigrationStatus::Completed);
//!     Ok(())
//! }
//!
//! fn receive(vm: Arc<dyn MigratableVm>) -> migration_core::Result<()> {
//!     // Loads pages and device state into `vm`, starts its vCPUs after the commit.
//!     let report = incoming(vm, "tcp:0.0.0.0:4444", false)?.wait()?;
//!     println!("received {} bytes", report.received_bytes);
//!     Ok(())
//! }
//! ```
//!
//! On a KVM VM, [`dirty_sync::kvm::KvmDirtyLog`] builds the address space with the
//! dirty bitmap or the dirty ring, and [`dirty_sync::ram_blocks`] the blocks from a
//! vm-memory guest memory.
//!
//! # Logging
//!
//! The engine logs through [`tracing`] and prints nothing; install a subscriber to see
//! it. Spans (made on the caller's thread, so they nest under the caller's span, and
//! entered on the engine's threads):
//! - `migration` (`uri`, `channels`): one per [`MigrationSource::migrate`];
//! - `incoming` (`uri`, `channels` once the stream is accepted): one per [`incoming`];
//! - `dirty_rate` (`mode`, `calc_time_ms`, `sample_pages`): one per
//!   [`DirtyRateJob::calc`].
//!
//! Inside them, info events mark every phase: setup, `pass start` / `pass end`
//! (`pass`, `sent_pages`, `sent_bytes`, `duration_ms`, `dirty_pages`), the switch-over
//! decision (`remaining_bytes`, `expected_downtime_ms`, `downtime_limit_ms`,
//! `bandwidth_bytes_per_sec`), the pause, the final pass, device state saved and
//! loaded (`device_state_bytes`), Ready/Commit/Ack (from `transport`), throttle
//! changes, and `migration completed` (`total_ms`, `downtime_ms`,
//! `transferred_bytes`). Each dirty-log sync is a debug event (`found_pages`,
//! `new_pages`, `duration_us`). Failures are warn or error events whose `error` field
//! is the error's text (the same as `query-migrate`'s `error-desc`). Nothing is
//! logged per page.

mod destination;
pub mod dirtylimit;
mod dirtyrate;
mod error;
mod guest;
#[cfg(test)]
mod panic_tests;
mod params;
pub mod postcopy;
mod rates;
mod runstate;
mod source;
#[cfg(test)]
mod switchover_tests;
#[cfg(test)]
mod test_vm;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod tls;
#[cfg(test)]
mod tracing_tests;

pub use destination::{
    incoming, incoming_with, ram_digest, Incoming, IncomingControl, IncomingOptions, IncomingReport,
};
pub use dirtylimit::{DirtyLimiter, VcpuDirtyLimit};
pub use dirtyrate::{
    wilson_interval, DirtyRateArgs, DirtyRateJob, SamplePlan, SamplingResult, DEFAULT_SAMPLE_PAGES,
    MAX_CALC_TIME_MS, MAX_SAMPLE_PAGES, MIN_CALC_TIME_MS, MIN_SAMPLED_BLOCK_BYTES,
    MIN_SAMPLE_PAGES, THREAD_NAME,
};
pub use error::{Error, Result};
pub use guest::{mark_touched_pages, GuestError, GuestRam, MigratableVm};
pub use params::{
    BitmapAlias, BitmapAliasTransform, BitmapNodeAlias, Capabilities, Capability, CompressionParam,
    MigrationParameters, ParametersUpdate, MAX_DOWNTIME_LIMIT_MS,
};
pub use rates::{
    predict_convergence, AutoConverge, BandwidthEstimator, DirtyGrowth, DirtyRatePeriod,
    LazySamples, PassCost, SendWindow,
};
pub use runstate::{MigrationEvent, RunControl, RunState};
pub use source::MigrationSource;
pub use stats::{DirtyRateInfo, DirtyRateMode, DirtyRateStatus, TimeUnit};
pub use tls::{TlsObject, TlsObjects};
