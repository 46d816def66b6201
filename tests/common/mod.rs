//! Helpers shared by the end-to-end tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use minivm::{Backend, MiniVm, VmConfig, Workload};

/// Bounds a hung guest only; tests wait on guest rounds, not on time.
pub const TIMEOUT: Duration = Duration::from_secs(60);

static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// The backend these tests run on: KVM when /dev/kvm opens, else the host-thread
/// fallback. With FERRY_REQUIRE_KVM=1 a missing KVM fails the test instead.
pub fn backend() -> Backend {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let required = std::env::var("FERRY_REQUIRE_KVM").is_ok_and(|v| v == "1");
    assert!(
        usable || !required,
        "FERRY_REQUIRE_KVM=1 but /dev/kvm cannot be opened"
    );
    if usable {
        Backend::Kvm
    } else {
        eprintln!("no /dev/kvm: running on the host-thread fallback");
        Backend::Threads
    }
}

/// One guest at a time per test binary, so vCPU threads do not starve each other.
pub fn guest_lock() -> MutexGuard<'static, ()> {
    GUEST_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A config on the test backend.
pub fn config(mem_bytes: u64, vcpus: u32, workload: Workload) -> VmConfig {
    VmConfig {
        mem_bytes,
        vcpus,
        workload,
        backend: backend(),
        ..Default::default()
    }
}

/// Builds and starts a guest.
pub fn start(cfg: VmConfig) -> MiniVm {
    let mut vm = MiniVm::new(cfg).expect("build guest");
    vm.start().expect("start guest");
    vm
}

/// Waits until every vCPU has done `rounds` more rounds.
pub fn wait_all(vm: &MiniVm, rounds: u64) {
    for v in 0..vm.vcpus() {
        if let Err(e) = vm.wait_rounds(v, rounds, TIMEOUT) {
            panic!("vCPU {v} stalled: {e} (errors: {:?})", vm.errors());
        }
    }
}
