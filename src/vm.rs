//! A minivm as a migratable guest: the glue between the test guest and the engine.

use std::sync::{Arc, Mutex, MutexGuard};

use dirty_sync::AddressSpace;
use migration_core::{GuestError, MigratableVm};
use minivm::{DirtyTracking, MiniVm, VmConfig};

/// A [`MiniVm`] and its address space, implementing [`MigratableVm`].
pub struct GuestVm {
    vm: Mutex<MiniVm>,
    space: Arc<AddressSpace>,
}

impl GuestVm {
    /// Boots a source guest (running) with dirty tracking `tracking`.
    pub fn boot(cfg: VmConfig, tracking: DirtyTracking) -> minivm::Result<Self> {
        let mut vm = MiniVm::new(cfg)?;
        let space = vm.address_space(tracking)?;
        vm.start()?;
        Ok(GuestVm {
            vm: Mutex::new(vm),
            space,
        })
    }

    /// Creates a destination guest: same layout, empty memory, not running.
    pub fn incoming(cfg: VmConfig, tracking: DirtyTracking) -> minivm::Result<Self> {
        let vm = MiniVm::new_incoming(cfg)?;
        let space = vm.address_space(tracking)?;
        Ok(GuestVm {
            vm: Mutex::new(vm),
            space,
        })
    }

    /// The guest itself (counters, workload regions, backend).
    pub fn vm(&self) -> MutexGuard<'_, MiniVm> {
        self.vm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The round counters of every vCPU.
    pub fn counters(&self) -> Vec<u64> {
        let vm = self.vm();
        (0..vm.vcpus()).map(|v| vm.counter(v)).collect()
    }

    /// Pages written by all vCPUs so far ([`MiniVm::page_writes`] summed): the guest's
    /// work, whose rate is its speed.
    pub fn page_writes(&self) -> u64 {
        self.vcpu_page_writes().iter().sum()
    }

    /// Pages written by each vCPU so far ([`MiniVm::page_writes`]).
    pub fn vcpu_page_writes(&self) -> Vec<u64> {
        let vm = self.vm();
        (0..vm.vcpus()).map(|v| vm.page_writes(v)).collect()
    }
}

impl MigratableVm for GuestVm {
    fn address_space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    fn pause_vcpus(&self) -> Result<(), GuestError> {
        Ok(self.vm().pause()?)
    }

    fn resume_vcpus(&self) -> Result<(), GuestError> {
        let mut vm = self.vm();
        // A destination guest has no vCPU threads until its first resume.
        match vm.start() {
            Ok(()) => Ok(()),
            Err(minivm::Error::AlreadyStarted) => Ok(vm.resume()?),
            Err(e) => Err(e.into()),
        }
    }

    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(self.vm().save_state()?)
    }

    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
        Ok(self.vm().restore_state(state)?)
    }

    fn set_throttle_percent(&self, percent: u8) {
        self.vm().set_throttle_percent(percent);
    }

    fn set_vcpu_throttle_ppm(&self, vcpu: usize, ppm: u32) -> bool {
        self.vm().set_vcpu_throttle_ppm(vcpu, ppm)
    }

    fn untouched_ram_is_zero(&self) -> bool {
        // minivm maps guest RAM as private anonymous memory.
        true
    }

    fn vcpu_dirty_entries(&self) -> Option<Vec<u64>> {
        let ring = self.vm().dirty_ring_listener()?;
        Some(ring.vcpu_dirty_entries())
    }

    fn dirty_ring_entries(&self) -> Option<u32> {
        Some(self.vm().dirty_ring_listener()?.entries())
    }

    fn vcpu_dirty_pages_start(&self) -> bool {
        let Some(ring) = self.vm().dirty_ring_listener() else {
            return false;
        };
        ring.vcpu_pages_start();
        true
    }

    fn vcpu_dirty_pages_take(&self) -> Option<Vec<u64>> {
        self.vm().dirty_ring_listener()?.vcpu_pages_take()
    }
}
