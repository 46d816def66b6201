//! Wiring the guest into Ferry's dirty-log plane: its slots as RAM blocks, and the
//! listeners that track writes to them.

use std::sync::Arc;

pub use dirty_sync::kvm::DirtyTracking;
use dirty_sync::kvm::{KvmDirtyLog, KvmRingListener, VcpuKick};
use dirty_sync::{AddressSpace, RamBlock, VmmWritesListener};

use crate::{vcpu, Error, ExitHandler, MiniVm, Result};

/// Hands KVM_EXIT_DIRTY_RING_FULL to the ring listener on the vCPU thread.
struct RingFull(Arc<KvmRingListener>);

impl ExitHandler for RingFull {
    fn dirty_ring_full(&self, vcpu: u32) {
        self.0.handle_ring_full(vcpu);
    }
}

impl MiniVm {
    /// The guest's memory slots as RAM blocks `ram0`, `ram1`, ... laid end to end.
    pub fn ram_blocks(&self) -> Vec<RamBlock> {
        // minivm's regions are its KVM slots 0.. in order, from guest address 0.
        dirty_sync::ram_blocks(self.memory()).expect("minivm's regions are page-aligned")
    }

    /// A flush for the dirty ring: kicks every running vCPU out of KVM_RUN and returns
    /// once each has left it. Must not be called on a vCPU thread.
    pub fn vcpu_kick(&self) -> Arc<dyn VcpuKick> {
        let control = Arc::clone(&self.control);
        let targets = Arc::clone(&self.kick_targets);
        Arc::new(move || {
            let threads = targets.lock().unwrap_or_else(|p| p.into_inner());
            // No vCPU in KVM_RUN: each one's last exit already flushed what it buffered.
            if threads.is_empty() || !control.any_in_guest() {
                return Ok(());
            }
            let epoch = control.begin_kick();
            for &t in threads.iter() {
                // SAFETY: `shutdown` empties the list (under this lock) before it joins
                // the threads, so every pthread_t here is a live vCPU thread.
                unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
            }
            drop(threads);
            control.wait_kick(epoch);
            Ok(())
        })
    }

    /// The dirty-ring listener last made for this VM (per-vCPU counts, stats).
    pub fn dirty_ring_listener(&self) -> Option<Arc<KvmRingListener>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// An address space over the guest's RAM with its listeners registered: the KVM
    /// listener chosen by `tracking` (KVM backend), or the VMM-writes listener (the
    /// host-thread fallback, whose writes go through vm-memory).
    pub fn address_space(&self, tracking: DirtyTracking) -> Result<Arc<AddressSpace>> {
        let Some(vm) = self.vm_fd() else {
            // The host-thread fallback writes through vm-memory, so its bitmap is the
            // log. (A KVM VMM that DMA-writes through vm-memory registers
            // `VmmWritesListener` beside its KVM listener.)
            let space = AddressSpace::new(self.ram_blocks()).map_err(Error::DirtyLog)?;
            space
                .register_listener(Arc::new(VmmWritesListener::new(self.memory().clone())))
                .map_err(Error::DirtyLog)?;
            return Ok(Arc::new(space));
        };
        match tracking {
            DirtyTracking::Bitmap(_) if self.dirty_ring_cap().is_some() => {
                return Err(Error::DirtyLog(dirty_sync::Error::Conflict(
                    "this VM has a dirty ring; KVM_GET_DIRTY_LOG is not available beside it".into(),
                )));
            }
            DirtyTracking::Ring(_) if self.dirty_ring_cap().is_none() => {
                return Err(Error::DirtyRing(
                    "this VM was created without a dirty ring (dirty_ring_entries = 0)".into(),
                ));
            }
            DirtyTracking::Ring(cfg) if cfg.entries != self.cfg.dirty_ring_entries => {
                return Err(Error::DirtyRing(format!(
                    "listener ring of {} entries, but the VM's rings have {}",
                    cfg.entries, self.cfg.dirty_ring_entries
                )));
            }
            _ => {}
        }
        let log = KvmDirtyLog::new(
            vm,
            self.ram_blocks(),
            tracking,
            &self.vcpu_fds(),
            self.vcpu_kick(),
        )
        .map_err(Error::DirtyLog)?;
        if let Some(ring) = &log.ring {
            // Ring-full exits go to the listener before its reaper starts.
            self.set_exit_handler(Arc::new(RingFull(Arc::clone(ring))));
            ring.start_reaper().map_err(Error::DirtyLog)?;
            *self.ring.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(ring));
        }
        Ok(log.space)
    }
}
