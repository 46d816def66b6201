//! What a VMM does once to give Ferry the dirty log of its KVM VM: enable the dirty
//! ring (if it wants one) before creating vCPUs, then build the address space over
//! its RAM with the listener of its choice.
//!
//! ```text
//!   VMM                                    dirty-sync
//!   ───                                    ──────────
//!   create VM, map RAM (vm-memory),
//!   register slots 0..n
//!   [enable_dirty_ring(vm, entries)]  ──►  KVM_ENABLE_CAP(DIRTY_LOG_RING[_ACQ_REL])
//!   create vCPUs
//!   KvmDirtyLog::bitmap(vm, blocks, cfg)   KvmBitmapListener (KVM_GET/CLEAR_DIRTY_LOG)
//!   or KvmDirtyLog::ring(vm, blocks,  ──►  KvmRingListener (one mmap'd ring per vCPU)
//!        vcpu fds, cfg, kick)
//!   vCPU loop: KVM_EXIT_DIRTY_RING_FULL
//!        → ring.handle_ring_full(vcpu)
//!   ring.start_reaper()
//!   hand `space` to the engine (MigratableVm::address_space)
//! ```

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::VmFd;

use super::{
    KvmBitmapConfig, KvmBitmapListener, KvmRingConfig, KvmRingListener, VcpuKick, DIRTY_GFN_BYTES,
};
use crate::{AddressSpace, Error, RamBlock, Result};

/// `KVM_CAP_DIRTY_LOG_RING`.
pub const CAP_DIRTY_LOG_RING: u32 = kvm_bindings::KVM_CAP_DIRTY_LOG_RING;
/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`.
pub const CAP_DIRTY_LOG_RING_ACQ_REL: u32 = kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL;

/// How a KVM guest's writes are tracked.
#[derive(Clone, Copy, Debug)]
pub enum DirtyTracking {
    /// The KVM dirty bitmap (per slot), with its options.
    Bitmap(KvmBitmapConfig),
    /// The KVM dirty ring (per vCPU); the VM must have been given rings of the
    /// config's `entries` with [`enable_dirty_ring`].
    Ring(KvmRingConfig),
}

impl DirtyTracking {
    /// The tracking a ring size selects: 0 is the bitmap, else a ring of that many
    /// entries with the default reaper settings.
    pub fn from_ring_entries(entries: u32) -> Self {
        if entries == 0 {
            DirtyTracking::default()
        } else {
            DirtyTracking::Ring(KvmRingConfig {
                entries,
                ..Default::default()
            })
        }
    }
}

impl Default for DirtyTracking {
    fn default() -> Self {
        DirtyTracking::Bitmap(KvmBitmapConfig::default())
    }
}

/// Gives every vCPU of `vm` a dirty ring of `entries` entries (the ACQ_REL flavour
/// when offered). KVM accepts this only before the first vCPU is created. Returns the
/// capability enabled ([`CAP_DIRTY_LOG_RING_ACQ_REL`] or [`CAP_DIRTY_LOG_RING`]).
pub fn enable_dirty_ring(vm: &VmFd, entries: u32) -> Result<u32> {
    let bytes = u64::from(entries) * DIRTY_GFN_BYTES;
    let acq_rel_max = vm.check_extension_raw(u64::from(CAP_DIRTY_LOG_RING_ACQ_REL));
    let (cap, max_bytes) = if acq_rel_max > 0 {
        (CAP_DIRTY_LOG_RING_ACQ_REL, acq_rel_max)
    } else {
        (
            CAP_DIRTY_LOG_RING,
            vm.check_extension_raw(u64::from(CAP_DIRTY_LOG_RING)),
        )
    };
    if max_bytes <= 0 {
        return Err(Error::Unsupported("the KVM dirty ring"));
    }
    if entries == 0 || !entries.is_power_of_two() || bytes > max_bytes as u64 {
        return Err(Error::InvalidParameter(format!(
            "a dirty ring of {entries} entries: it must be a power of two, and the kernel's maximum is {} entries",
            max_bytes as u64 / DIRTY_GFN_BYTES
        )));
    }
    let mut req = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    req.args[0] = bytes;
    vm.enable_cap(&req).map_err(|e| Error::Kvm {
        op: "KVM_ENABLE_CAP(dirty ring)",
        source: e.into(),
    })?;
    tracing::debug!(entries, cap, "KVM dirty ring enabled");
    Ok(cap)
}

/// A KVM VM's dirty log: the address space the engine syncs, and the ring listener
/// when there is one.
pub struct KvmDirtyLog {
    /// The guest's RAM and its listener (what `MigratableVm::address_space` returns).
    pub space: Arc<AddressSpace>,
    /// With the dirty ring: its listener. The VMM routes KVM_EXIT_DIRTY_RING_FULL to
    /// [`KvmRingListener::handle_ring_full`] on the vCPU's thread, then starts the
    /// reaper with [`KvmRingListener::start_reaper`].
    pub ring: Option<Arc<KvmRingListener>>,
}

impl KvmDirtyLog {
    /// Tracks writes with the KVM dirty bitmap. `blocks` describe the VM's registered
    /// slots (for example [`crate::ram_blocks`] of its vm-memory guest memory).
    pub fn bitmap(vm: Arc<VmFd>, blocks: Vec<RamBlock>, cfg: KvmBitmapConfig) -> Result<Self> {
        let space = AddressSpace::new(blocks)?;
        space.register_listener(Arc::new(KvmBitmapListener::new(vm, cfg)?))?;
        Ok(KvmDirtyLog {
            space: Arc::new(space),
            ring: None,
        })
    }

    /// Tracks writes with the dirty ring of every vCPU in `vcpu_fds` (the VM made with
    /// [`enable_dirty_ring`] at `cfg.entries`). `kick` must make every vCPU leave
    /// KVM_RUN and return once each has (KVM flushes a vCPU's buffered entries to its
    /// ring on the way out); it is never called on a vCPU thread.
    pub fn ring(
        vm: Arc<VmFd>,
        blocks: Vec<RamBlock>,
        vcpu_fds: &[BorrowedFd<'_>],
        cfg: KvmRingConfig,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<Self> {
        let space = AddressSpace::new(blocks)?;
        let ring = Arc::new(KvmRingListener::new(vm, vcpu_fds, cfg, kick)?);
        space.register_listener(ring.clone())?;
        Ok(KvmDirtyLog {
            space: Arc::new(space),
            ring: Some(ring),
        })
    }

    /// Either, as `tracking` says (`vcpu_fds` and `kick` are used by the ring only).
    pub fn new(
        vm: Arc<VmFd>,
        blocks: Vec<RamBlock>,
        tracking: DirtyTracking,
        vcpu_fds: &[BorrowedFd<'_>],
        kick: Arc<dyn VcpuKick>,
    ) -> Result<Self> {
        match tracking {
            DirtyTracking::Bitmap(cfg) => KvmDirtyLog::bitmap(vm, blocks, cfg),
            DirtyTracking::Ring(cfg) => KvmDirtyLog::ring(vm, blocks, vcpu_fds, cfg, kick),
        }
    }
}
