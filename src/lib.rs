//! Ferry: a live-migration engine for KVM virtual machine monitors.
//!
//! This facade re-exports the workspace crates so an embedding VMM depends on one package.
pub use dirty_sync;
pub use minivm;
pub use stats;
pub use transport;
