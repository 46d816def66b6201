//! Wiring the guest into Ferry's dirty-log plane: its slots as RAM blocks, and the
//! listeners that track writes to them.

use std::sync::Arc;

use dirty_sync::kvm::{KvmBitmapConfig, KvmBitmapListener};
use dirty_sync::{AddressSpace, RamBlock, VmmWritesListener};

use crate::{Error, MiniVm, Result, PAGE_SIZE};

/// How the guest's writes are tracked.
#[derive(Clone, Copy, Debug)]
pub enum DirtyTracking {
    /// The KVM dirty bitmap (per slot), with its options.
    Bitmap(KvmBitmapConfig),
}

impl Default for DirtyTracking {
    fn default() -> Self {
        DirtyTracking::Bitmap(KvmBitmapConfig::default())
    }
}

impl MiniVm {
    /// The guest's memory slots as RAM blocks `ram0`, `ram1`, ... laid end to end.
    pub fn ram_blocks(&self) -> Vec<RamBlock> {
        self.slots()
            .into_iter()
            .enumerate()
            .map(|(i, s)| RamBlock {
                id: format!("ram{i}"),
                gpa: s.gpa,
                size_bytes: s.size_bytes,
                host_addr: s.host_addr,
                kvm_slot: s.slot,
                first_page: s.gpa / PAGE_SIZE,
            })
            .collect()
    }

    /// An address space over the guest's RAM with its listeners registered: the KVM
    /// listener chosen by `tracking` (KVM backend), or the VMM-writes listener (the
    /// host-thread fallback, whose writes go through vm-memory).
    pub fn address_space(&self, tracking: DirtyTracking) -> Result<Arc<AddressSpace>> {
        let space = AddressSpace::new(self.ram_blocks()).map_err(Error::DirtyLog)?;
        if let Some(vm) = self.vm_fd() {
            match tracking {
                DirtyTracking::Bitmap(cfg) => {
                    if self.dirty_ring_cap().is_some() {
                        return Err(Error::DirtyLog(dirty_sync::Error::Conflict(
                            "this VM has a dirty ring; KVM_GET_DIRTY_LOG is not available beside it"
                                .into(),
                        )));
                    }
                    let l = KvmBitmapListener::new(vm, cfg).map_err(Error::DirtyLog)?;
                    space
                        .register_listener(Arc::new(l))
                        .map_err(Error::DirtyLog)?;
                }
            }
        }
        // The host-thread fallback writes through vm-memory, so its bitmap is the log.
        // A KVM guest's VMM writes nothing here; a VMM that DMA-writes through vm-memory
        // registers `VmmWritesListener` itself (one atomic swap per 64 pages per sync).
        if !self.is_kvm() {
            space
                .register_listener(Arc::new(VmmWritesListener::new(self.memory().clone())))
                .map_err(Error::DirtyLog)?;
        }
        Ok(Arc::new(space))
    }
}
