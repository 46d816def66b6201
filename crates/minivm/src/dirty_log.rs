//! Wiring the guest into Ferry's dirty-log plane: its slots as RAM blocks, and the
//! listeners that track writes to them.

use std::sync::Arc;

use dirty_sync::kvm::{KickFn, KvmBitmapConfig, KvmBitmapListener, KvmRingConfig, KvmRingListener};
use dirty_sync::{AddressSpace, RamBlock, VmmWritesListener};

use crate::{vcpu, Error, ExitHandler, MiniVm, Result};

/// How the guest's writes are tracked.
#[derive(Clone, Copy, Debug)]
pub enum DirtyTracking {
    /// The KVM dirty bitmap (per slot), with its options.
    Bitmap(KvmBitmapConfig),
    /// The KVM dirty ring (per vCPU); the VM must have been created with
    /// `dirty_ring_entries` equal to the config's `entries`.
    Ring(KvmRingConfig),
}

impl DirtyTracking {
    /// The tracking `--dirty-ring ENTRIES` selects: 0 is the bitmap, else a ring of that
    /// many entries with the default reaper settings.
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

/// Hands KVM_EXIT_DIRTY_RING_FULL to the ring listener on the vCPU thread.
struct RingFull(Arc<KvmRingListener>);

impl ExitHandler for RingFull {
    fn dirty_ring_full(&self, vcpu: u32) {
        self.0.handle_ring_full(vcpu);
    }
}

impl Default for DirtyTracking {
    fn default() -> Self {
        DirtyTracking::Bitmap(KvmBitmapConfig::default())
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
    pub fn kick_fn(&self) -> KickFn {
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

    /// Builds the dirty-ring listener over this VM's vCPU rings, installs it as the
    /// ring-full exit handler and starts its reaper thread.
    /// Fails on a VM made without a ring, or with a ring of another size.
    pub fn ring_listener(&self, cfg: KvmRingConfig) -> Result<Arc<KvmRingListener>> {
        let (Some(vm), Some(_cap)) = (self.vm_fd(), self.dirty_ring_cap()) else {
            return Err(Error::DirtyRing(
                "this VM was created without a dirty ring (dirty_ring_entries = 0)".into(),
            ));
        };
        if cfg.entries != self.cfg.dirty_ring_entries {
            return Err(Error::DirtyRing(format!(
                "listener ring of {} entries, but the VM's rings have {}",
                cfg.entries, self.cfg.dirty_ring_entries
            )));
        }
        let l = KvmRingListener::new(vm, &self.vcpu_raw_fds(), cfg, self.kick_fn())
            .map_err(Error::DirtyLog)?;
        let l = Arc::new(l);
        self.set_exit_handler(Arc::new(RingFull(Arc::clone(&l))));
        l.start_reaper().map_err(Error::DirtyLog)?;
        *self.ring.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&l));
        Ok(l)
    }

    /// The dirty-ring listener last made for this VM (per-vCPU counts, stats).
    pub fn dirty_ring_listener(&self) -> Option<Arc<KvmRingListener>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
                DirtyTracking::Ring(cfg) => {
                    let l = self.ring_listener(cfg)?;
                    space.register_listener(l).map_err(Error::DirtyLog)?;
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
