//! A guest for unit tests: an address space over memory the test owns, vCPUs and
//! device state that do nothing.

use std::sync::Arc;

use dirty_sync::AddressSpace;

use crate::guest::{GuestError, MigratableVm};

/// An address space and the memory (`M`) its blocks point into, kept alive with it.
pub(crate) struct TestVm<M> {
    pub(crate) space: Arc<AddressSpace>,
    pub(crate) mem: M,
}

impl<M: Send + Sync> MigratableVm for TestVm<M> {
    fn address_space(&self) -> &Arc<AddressSpace> {
        &self.space
    }
    fn pause_vcpus(&self) -> Result<(), GuestError> {
        Ok(())
    }
    fn resume_vcpus(&self) -> Result<(), GuestError> {
        Ok(())
    }
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(Vec::new())
    }
    fn load_device_state(&self, _: &[u8]) -> Result<(), GuestError> {
        Ok(())
    }
}
