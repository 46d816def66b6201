//! Ferry: a live-migration engine for KVM virtual machine monitors.
//!
//! This facade re-exports the workspace crates so an embedding VMM depends on one
//! package, and holds the glue the `ferry` command uses (a minivm as a migratable guest).

pub use dirty_sync;
pub use migration_core;
pub use minivm;
pub use plot;
pub use stats;
pub use transport;

mod vm;

pub use vm::GuestVm;
