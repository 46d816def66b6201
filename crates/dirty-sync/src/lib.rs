//! The dirty-log plane: which guest pages changed since the last look.
//!
//! An [`AddressSpace`] holds the guest's [`RamBlock`]s and the [`MemoryListener`]s that
//! track writes to them (the KVM dirty bitmap per slot, the KVM dirty ring per vCPU, the
//! VMM's own writes). Users start the log for a [`DirtyReason`], sync it, and read the
//! pages out of their own [`DirtyBitmap`]. Modelled on QEMU's memory API
//! (`memory_global_dirty_log_*`) and KVM accelerator (`kvm_log_sync*`).

mod address_space;
mod bitmap;
mod block;
mod error;
pub mod kvm;
mod listener;
mod memory;
mod reason;
mod vmm_writes;

pub use address_space::{AddressSpace, SyncReport};
pub use bitmap::{DirtyBitmap, SetBits, BITS_PER_WORD};
pub use block::RamBlock;
pub use error::{Error, Result};
pub use listener::{DirtySink, MemoryListener, SyncMode};
pub use memory::{ram_blocks, HostMemory, HostPage};
pub use reason::{DirtyReason, ReasonMask};
pub use vmm_writes::VmmWritesListener;

/// Guest page size tracked by every bitmap (x86 target page).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
