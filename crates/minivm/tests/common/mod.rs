//! Shared helpers for the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

#[path = "skip.rs"]
mod skip;
use skip::record_skip;

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

/// Every workload, as (workload, counter rounds to wait for).
pub fn every_workload() -> Vec<(Workload, u64)> {
    vec![
        (Workload::Idle, 3),
        (Workload::WorkingSet { pages: 1024 }, 20),
        (
            Workload::Sweep {
                pages_per_sec: 20_000,
            },
            200,
        ),
        (
            Workload::Random {
                seed: 42,
                hot_percent: 80,
            },
            3,
        ),
        (
            Workload::Dense {
                pages: 512,
                bytes_per_page: 64,
            },
            5,
        ),
        (
            Workload::Zipf {
                pages: 1024,
                writes_per_sec: 20_000,
            },
            200,
        ),
        (Workload::Lopsided { pages: 1024 }, 20),
    ]
}

/// With the vCPUs paused: every vCPU's page-write count agrees with its counter, as
/// each workload defines the counter (rounds of its pages, pages, or 4096 writes).
/// `slack` page writes of disagreement are allowed where the two are updated apart
/// (the host-thread backend writes a chunk of pages before it counts them).
pub fn assert_page_writes_agree(vm: &MiniVm, slack: u64) {
    for v in 0..vm.vcpus() {
        let (c, pw) = (vm.counter(v), vm.page_writes(v));
        let (_, pages) = vm.workload_region(v);
        let (lo, hi) = match vm.config().workload {
            Workload::Idle => (0, 0),
            Workload::WorkingSet { .. } | Workload::Dense { .. } | Workload::Lopsided { .. } => {
                (c * pages, (c + 1) * pages)
            }
            Workload::Sweep { .. } | Workload::Zipf { .. } => (c.saturating_sub(1), c + 1 + slack),
            Workload::Random { .. } => (c * 4096, (c + 1) * 4096),
        };
        assert!(
            (lo..=hi).contains(&pw),
            "{:?} vCPU {v}: {pw} page writes, counter {c} (want {lo}..={hi})",
            vm.config().workload
        );
        if vm.config().workload != Workload::Idle {
            assert!(pw > 0, "vCPU {v} wrote no page");
        }
    }
}
