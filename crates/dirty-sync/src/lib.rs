//! The dirty-log plane: which guest pages changed since the last look.
//!
//! An [`AddressSpace`] holds the guest's [`RamBlock`]s and the [`MemoryListener`]s that
//! track writes to them (the KVM dirty bitmap per slot, the KVM dirty ring per vCPU, the
//! VMM's own writes). Users start the log for a [`DirtyReason`], sync it, and read the
//! pages out of their own [`DirtyBitmap`]. Modelled on QEMU's memory API
//! (`memory_global_dirty_log_*`) and KVM accelerator (`kvm_log_sync*`).
//!
//! # For a VMM
//!
//! Guest RAM reaches Ferry as [`HostMemory`] handles inside [`RamBlock`]s: built
//! safely by [`ram_blocks`] from a vm-memory `GuestMemoryMmap` (which keeps the
//! mappings alive), or by the `unsafe` [`HostMemory::from_raw`] for memory of another
//! kind. A KVM VMM then builds its address space with [`kvm::KvmDirtyLog`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use dirty_sync::kvm::{KvmBitmapConfig, KvmDirtyLog};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! let memory: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)])?;
//! // ... register region i as KVM slot i (KVM_SET_USER_MEMORY_REGION), create vCPUs ...
//! let log = KvmDirtyLog::bitmap(vm, dirty_sync::ram_blocks(&memory)?, KvmBitmapConfig::default())?;
//! // `log.space` is what the VMM's `MigratableVm::address_space` returns.
//! # Ok(()) }
//! ```
//!
//! With the dirty ring, [`kvm::enable_dirty_ring`] comes before the first vCPU, and
//! [`kvm::KvmDirtyLog::ring`] takes the vCPUs' fds and a kick that makes every vCPU
//! leave KVM_RUN (the VMM's), and the VMM sends its ring-full exits to the listener.

mod address_space;
mod bitmap;
mod block;
mod error;
pub mod kvm;
mod listener;
mod memory;
mod reason;
mod sample;
mod vmm_writes;

pub use address_space::{AddressSpace, SyncReport};
pub use bitmap::{DirtyBitmap, SetBits, BITS_PER_WORD};
pub use block::RamBlock;
pub use error::{Error, Result};
pub use listener::{DirtySink, MemoryListener, SyncMode};
pub use memory::{ram_blocks, DetachedPages, HostMemory, HostPage};
pub use reason::{DirtyReason, ReasonMask};
pub use sample::RateSample;
pub use vmm_writes::VmmWritesListener;

/// Guest page size tracked by every bitmap (x86 target page).
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
