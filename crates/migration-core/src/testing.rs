//! A guest for tests (feature `testing`; always in this crate's own tests): an
//! address space over memory the test owns, with vCPUs and device state that do
//! nothing. It is the fake VM of migration-core's engine tests and of the crates
//! above it (qmp), so there is one.
//!
//! ```
//! # #[cfg(feature = "testing")] {
//! use migration_core::testing::TestVm;
//! use migration_core::{incoming, MigrationSource};
//!
//! let src = TestVm::filled(1 << 20, 0xab);
//! let dst = TestVm::new(1 << 20);
//! let inc = incoming(dst.clone(), "mem:doc-testing", false).unwrap();
//! let source = MigrationSource::new(src.clone());
//! source.migrate(&inc.uri().to_string()).unwrap();
//! source.wait();
//! assert!(inc.wait().unwrap().resumed);
//! assert_eq!(dst.ram(), src.ram());
//! # }
//! ```

use std::sync::Arc;

use dirty_sync::{AddressSpace, HostMemory, RamBlock};

use crate::guest::{GuestError, MigratableVm};

/// An address space and the memory (`M`) its blocks point into, kept alive with it.
/// Pausing, resuming and device state do nothing.
pub struct TestVm<M = HostMemory> {
    /// The guest's address space (no listeners unless the test registers some).
    pub space: Arc<AddressSpace>,
    /// What the blocks point into.
    pub mem: M,
}

impl TestVm<HostMemory> {
    /// `size_bytes` of fresh anonymous memory (zero, mapped on first touch) as one
    /// block `ram0` at guest address 0, KVM slot 0.
    pub fn new(size_bytes: u64) -> Arc<Self> {
        let mem = HostMemory::anonymous(size_bytes).expect("anonymous test RAM");
        let block = RamBlock::new("ram0", 0, mem.clone(), 0, 0);
        let space = AddressSpace::new(vec![block]).expect("one page-aligned block");
        Arc::new(TestVm {
            space: Arc::new(space),
            mem,
        })
    }

    /// [`TestVm::new`] with every byte set to `fill`.
    pub fn filled(size_bytes: u64, fill: u8) -> Arc<Self> {
        let vm = Self::new(size_bytes);
        let bytes = usize::try_from(size_bytes).expect("test RAM fits in memory");
        assert!(vm.mem.write_volatile(0, &vec![fill; bytes]));
        vm
    }

    /// A copy of guest RAM.
    pub fn ram(&self) -> Vec<u8> {
        let bytes = usize::try_from(self.mem.size_bytes()).expect("test RAM fits in memory");
        let mut out = vec![0u8; bytes];
        assert!(self.mem.read_volatile(0, &mut out));
        out
    }
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
