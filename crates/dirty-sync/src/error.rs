//! The dirty-sync error type.

use crate::DirtyReason;

/// Everything that can go wrong in the dirty-log plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The RAM block table is not usable (empty, unaligned, overlapping, not contiguous).
    #[error("invalid RAM block table: {0}")]
    InvalidBlocks(String),
    /// Host memory that cannot back guest RAM (null, unaligned, empty, unmappable).
    #[error("invalid host memory: {0}")]
    InvalidMemory(String),
    /// A section or page range names memory the address space does not have.
    #[error("no such memory: {0}")]
    NoSuchMemory(String),
    /// A reason was started twice or stopped while not started.
    #[error("dirty log reason {reason}: {what}")]
    Reason {
        /// The reason concerned.
        reason: DirtyReason,
        /// What was wrong.
        what: &'static str,
    },
    /// Two listeners that cannot share a VM (for example a dirty ring and a dirty bitmap).
    #[error("listener conflict: {0}")]
    Conflict(String),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl or operation that failed.
        op: &'static str,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// KVM lacks a capability the listener needs.
    #[error("KVM does not support {0}")]
    Unsupported(&'static str),
    /// A bad parameter (ring size, chunk size, ...).
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The kernel handed back an entry that names memory outside every slot.
    #[error("corrupt dirty ring entry on vCPU {vcpu}: slot {slot} offset {offset}")]
    CorruptRingEntry {
        /// vCPU whose ring held the entry.
        vcpu: u32,
        /// The slot field.
        slot: u32,
        /// The offset field.
        offset: u64,
    },
}

/// The dirty-sync result type.
pub type Result<T> = std::result::Result<T, Error>;
