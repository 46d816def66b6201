//! Shared helpers for the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use minivm::{Backend, MiniVm, VmConfig, Workload};

/// Generous: tests wait on guest rounds, this only bounds a hung guest.
pub const TIMEOUT: Duration = Duration::from_secs(30);

static KVM_LOCK: Mutex<()> = Mutex::new(());

/// Serializes KVM guests across test threads. Returns None (skip) when KVM is unusable,
/// unless FERRY_REQUIRE_KVM=1, in which case the test fails; a skip is recorded: the
/// line `SKIPPED (no /dev/kvm): <test>` on stderr, and the test's name appended to the
/// file `$FERRY_SKIP_LOG` names (scripts/test counts them).
pub fn kvm_guard() -> Option<MutexGuard<'static, ()>> {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        let required = std::env::var("FERRY_REQUIRE_KVM")
            .map(|v| v == "1")
            .unwrap_or(false);
        assert!(
            !required,
            "FERRY_REQUIRE_KVM=1 but /dev/kvm cannot be opened"
        );
        record_skip();
        return None;
    }
    Some(KVM_LOCK.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Records the running test as skipped for lack of /dev/kvm (see [`kvm_guard`]).
fn record_skip() {
    // libtest runs each test on a thread named after it.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("(unnamed test)");
    let name = format!("{}::{test}", env!("CARGO_CRATE_NAME"));
    // Straight to the process's stderr, past libtest's capture of passing tests' output.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED (no /dev/kvm): {name}");
    if let Some(path) = std::env::var_os("FERRY_SKIP_LOG") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{name}"));
        if let Err(e) = appended {
            panic!("cannot append to FERRY_SKIP_LOG {path:?}: {e}");
        }
    }
}

/// A small config (64 MiB) for the given backend, workload and vCPUs.
pub fn cfg(backend: Backend, workload: Workload, vcpus: u32) -> VmConfig {
    VmConfig {
        mem_bytes: 64 << 20,
        vcpus,
        workload,
        backend,
        ..Default::default()
    }
}

/// Builds and starts a VM.
pub fn started(c: VmConfig) -> MiniVm {
    let mut vm = MiniVm::new(c).expect("build VM");
    vm.start().expect("start VM");
    vm
}

/// Asserts every vCPU's counter advances by `rounds`.
pub fn assert_all_advance(vm: &MiniVm, rounds: u64) {
    for v in 0..vm.vcpus() {
        if let Err(e) = vm.wait_rounds(v, rounds, TIMEOUT) {
            panic!("vCPU {v} did not advance: {e} (errors: {:?})", vm.errors());
        }
    }
}
