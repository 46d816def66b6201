//! A panic in the VMM's code on the migration thread, with a real guest: the
//! migration ends failed saying it panicked, the source guest runs on, the first
//! destination never starts it, and a second migration completes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{config, guest_lock, wait_all};
use ferry::dirty_sync::AddressSpace;
use ferry::migration_core::{
    incoming_with, ram_digest, GuestError, GuestRam, Incoming, IncomingOptions, MigratableVm,
    MigrationSource, RunState,
};
use ferry::stats::MigrationStatus;
use ferry::GuestVm;
use minivm::{DirtyTracking, VmConfig, Workload};

const PANIC_MESSAGE: &str = "device model bug (injected by the test)";

/// The guest, whose `save_device_state` panics once while armed: a VMM bug as the
/// engine sees it, through the public trait.
struct PanicOnce {
    guest: Arc<GuestVm>,
    armed: AtomicBool,
}

impl MigratableVm for PanicOnce {
    fn address_space(&self) -> &Arc<AddressSpace> {
        self.guest.address_space()
    }
    fn pause_vcpus(&self) -> Result<(), GuestError> {
        self.guest.pause_vcpus()
    }
    fn resume_vcpus(&self) -> Result<(), GuestError> {
        self.guest.resume_vcpus()
    }
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            panic!("{PANIC_MESSAGE}");
        }
        self.guest.save_device_state()
    }
    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
        self.guest.load_device_state(state)
    }
    fn set_throttle_percent(&self, percent: u8) {
        self.guest.set_throttle_percent(percent);
    }
    fn untouched_ram_is_zero(&self) -> bool {
        self.guest.untouched_ram_is_zero()
    }
    fn vcpu_dirty_entries(&self) -> Option<Vec<u64>> {
        self.guest.vcpu_dirty_entries()
    }
}

/// A destination guest in this process, receiving on loopback TCP.
fn destination(cfg: &VmConfig) -> (Arc<GuestVm>, Incoming) {
    let dst = Arc::new(GuestVm::incoming(cfg.clone(), DirtyTracking::default()).expect("guest"));
    let inc = incoming_with(
        dst.clone(),
        "tcp:127.0.0.1:0",
        IncomingOptions {
            verify: true,
            ..Default::default()
        },
    )
    .expect("listen");
    (dst, inc)
}

#[test]
fn a_panic_in_save_device_state_leaves_the_source_running_and_a_second_migration_succeeds() {
    let _g = guest_lock();
    let cfg = config(256 << 20, 2, Workload::WorkingSet { pages: 4096 });
    let tracking = DirtyTracking::from_ring_entries(cfg.dirty_ring_entries);
    let guest = Arc::new(GuestVm::boot(cfg.clone(), tracking).expect("boot"));
    wait_all(&guest.vm(), 2);
    let vm = Arc::new(PanicOnce {
        guest: guest.clone(),
        armed: AtomicBool::new(true),
    });
    let source = MigrationSource::new(vm.clone());

    let (_dst, inc) = destination(&cfg);
    source.migrate(&inc.uri().to_string()).expect("migrate");
    let status = source.wait();
    let info = source.query();
    assert!(!vm.armed.load(Ordering::SeqCst), "the panic happened");
    assert_eq!(status, MigrationStatus::Failed, "{info:?}");
    let desc = info.error_desc.unwrap_or_default();
    assert!(
        desc.contains("panicked") && desc.contains(PANIC_MESSAGE),
        "error-desc {desc:?}"
    );
    assert!(inc.wait().is_err(), "the first destination got the guest");
    assert_eq!(source.run_control().state(), RunState::Running);
    wait_all(&guest.vm(), 2);
    assert!(
        !guest.address_space().logging(),
        "the MIGRATION reason was dropped"
    );

    let (dst, inc) = destination(&cfg);
    source
        .migrate(&inc.uri().to_string())
        .expect("migrate again");
    assert_eq!(
        source.wait(),
        MigrationStatus::Completed,
        "{:?}",
        source.query()
    );
    let report = inc.wait().expect("the second destination completes");
    assert_eq!(
        report.ram_digest,
        Some(ram_digest(&GuestRam::new(guest.clone()))),
        "the destination has the source's RAM"
    );
    assert!(report.resumed);
    wait_all(&dst.vm(), 2);
}
