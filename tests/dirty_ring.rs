//! The KVM dirty ring on a real guest: exact dirty sets, no lost writes under ring-full
//! pressure, per-vCPU counts.
//!
//! Runs on KVM wherever /dev/kvm exists (FERRY_REQUIRE_KVM=1 makes that mandatory); the
//! ring has no host-thread fallback, so without KVM these tests have nothing to check
//! and record themselves skipped.

mod common;

use std::collections::BTreeSet;

use common::{
    assert_no_lost_write, assert_same_pages, config, expected_working_set, guest_lock, kvm_or_skip,
    start, wait_all,
};
use dirty_sync::kvm::KvmRingConfig;
use dirty_sync::{DirtyReason, PAGE_SIZE};
use minivm::{DirtyTracking, MiniVm, VmConfig, Workload};

fn ring_config(mem: u64, vcpus: u32, workload: Workload, entries: u32) -> VmConfig {
    VmConfig {
        dirty_ring_entries: entries,
        ..config(mem, vcpus, workload)
    }
}

fn tracking(entries: u32) -> DirtyTracking {
    DirtyTracking::Ring(KvmRingConfig {
        entries,
        ..Default::default()
    })
}

fn exact_set(w: u64, vcpus: u32, entries: u32) {
    let _g = guest_lock();
    let vm = start(ring_config(
        1 << 30,
        vcpus,
        Workload::WorkingSet { pages: w },
        entries,
    ));
    let space = vm.address_space(tracking(entries)).unwrap();
    let ring = vm.dirty_ring_listener().expect("ring listener");
    let bitmap = space
        .global_dirty_log_start(DirtyReason::DirtyRate)
        .unwrap();
    wait_all(&vm, 2);
    space.global_dirty_log_sync(None).unwrap();
    bitmap.clear_all();
    let before = ring.vcpu_dirty_entries();
    wait_all(&vm, 3);
    let report = space.global_dirty_log_sync(None).unwrap();
    let got: BTreeSet<u64> = bitmap.iter_set().collect();
    let want = expected_working_set(&vm);
    assert_same_pages(&got, &want, &format!("W={w} vcpus={vcpus}"));
    assert_eq!(report.new_pages(DirtyReason::DirtyRate), want.len() as u64);
    let stats = ring.stats();
    assert_eq!(stats.last_sync_unique_pages, want.len() as u64);
    assert!(stats.last_sync_entries >= stats.last_sync_unique_pages);
    assert_eq!(stats.rejected_entries, 0);
    let after = ring.vcpu_dirty_entries();
    for v in 0..vcpus as usize {
        let (_, pages) = vm.workload_region(v as u32);
        // Each vCPU's own pages + counter page at least once in the window.
        assert!(
            after[v] - before[v] > pages,
            "vCPU {v}: {} entries for {pages} pages",
            after[v] - before[v]
        );
    }
    space.global_dirty_log_stop(DirtyReason::DirtyRate).unwrap();
    assert!(!space.logging());
}

fn exact_sets(vcpus: u32) {
    if !kvm_or_skip() {
        return;
    }
    for w in [1u64, 4096, 65536] {
        // A ring that holds the working set, so the window has no ring-full exit to lose
        // nothing through (the stress test covers the other case).
        exact_set(w.max(u64::from(vcpus)), vcpus, 65536);
    }
}

#[test]
fn ring_exact_dirty_set_1_vcpu() {
    exact_sets(1);
}

#[test]
fn ring_exact_dirty_set_2_vcpus() {
    exact_sets(2);
}

#[test]
fn ring_exact_dirty_set_small_ring_with_ring_full() {
    if !kvm_or_skip() {
        return;
    }
    // W = 65536 through 4096-entry rings: ring-full exits and reaper reaps between syncs.
    exact_set(65536, 2, 4096);
}

#[test]
fn ring_full_stress_no_lost_write() {
    if !kvm_or_skip() {
        return;
    }
    let _g = guest_lock();
    let entries = 512;
    let vcpus = 2;
    let w = 65536u64;
    let mem = minivm::DATA_GPA + (w + 1024) * PAGE_SIZE;
    let mem = mem.div_ceil(2 << 20) * (2 << 20);
    let mut vm = start(ring_config(
        mem,
        vcpus,
        Workload::WorkingSet { pages: w },
        entries,
    ));
    let space = vm.address_space(tracking(entries)).unwrap();
    let ring = vm.dirty_ring_listener().unwrap();
    assert_no_lost_write(&vm, &space, mem, 30, false, "ring of 512 entries");
    let stats = ring.stats();
    eprintln!("ring stats: {stats:?}");
    assert!(
        stats.ring_full_exits > 0,
        "the 512-entry ring filled: {stats:?}"
    );
    assert_eq!(stats.rejected_entries, 0);
    vm.shutdown();
}

#[test]
fn ring_needs_a_ring_vm_of_the_same_size() {
    if !kvm_or_skip() {
        return;
    }
    let _g = guest_lock();
    let plain = MiniVm::new(config(64 << 20, 1, Workload::Idle)).unwrap();
    assert!(plain.address_space(tracking(4096)).is_err());
    let ringed = MiniVm::new(ring_config(64 << 20, 1, Workload::Idle, 4096)).unwrap();
    assert!(ringed.address_space(tracking(8192)).is_err());
    assert!(ringed.address_space(DirtyTracking::default()).is_err());
    assert!(ringed.address_space(tracking(4096)).is_ok());
    // Beyond the kernel's maximum (1 MiB of entries here): a clear error at VM creation.
    let err = MiniVm::new(ring_config(64 << 20, 1, Workload::Idle, 1 << 20))
        .err()
        .expect("too large");
    assert!(err.to_string().contains("maximum"), "{err}");
}
