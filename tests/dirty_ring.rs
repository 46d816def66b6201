//! The KVM dirty ring on a real guest: exact dirty sets, no lost writes under ring-full
//! pressure, per-vCPU counts.
//!
//! Runs on KVM wherever /dev/kvm exists (FERRY_REQUIRE_KVM=1 makes that mandatory); the
//! ring has no host-thread fallback, so without KVM these tests have nothing to check.

mod common;

use std::collections::BTreeSet;

use common::{backend, config, guest_lock, start, wait_all};
use dirty_sync::kvm::KvmRingConfig;
use dirty_sync::{AddressSpace, DirtyReason, PAGE_SIZE};
use minivm::{Backend, DirtyTracking, MiniVm, VmConfig, Workload};

fn kvm() -> bool {
    backend() == Backend::Kvm
}

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

fn expected_set(vm: &MiniVm) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for v in 0..vm.vcpus() {
        let (gpa, pages) = vm.workload_region(v);
        set.extend((0..pages).map(|p| gpa / PAGE_SIZE + p));
        set.insert(vm.counter_gpa(v) / PAGE_SIZE);
    }
    set
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
    let want = expected_set(&vm);
    assert!(
        got == want,
        "W={w} vcpus={vcpus}: {} pages, want {}: extra {:?} missing {:?}",
        got.len(),
        want.len(),
        got.difference(&want).take(5).collect::<Vec<_>>(),
        want.difference(&got).take(5).collect::<Vec<_>>()
    );
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
    if !kvm() {
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
    if !kvm() {
        return;
    }
    // W = 65536 through 4096-entry rings: ring-full exits and reaper reaps between syncs.
    exact_set(65536, 2, 4096);
}

fn copy_page(space: &AddressSpace, page: u64, shadow: &mut [u8]) {
    let (bi, off) = space.locate_page(page).expect("page in RAM");
    let b = &space.blocks()[bi];
    let src = (b.host_addr + off * PAGE_SIZE) as *const u8;
    let dst = &mut shadow[(page * PAGE_SIZE) as usize..((page + 1) * PAGE_SIZE) as usize];
    // SAFETY: src is inside the block's live mapping (the VM outlives this call); the
    // guest may write it concurrently, which is what the test races on purpose.
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), PAGE_SIZE as usize) };
}

fn copy_dirty(space: &AddressSpace, bitmap: &dirty_sync::DirtyBitmap, shadow: &mut [u8]) {
    for w in 0..bitmap.words().len() {
        let mut bits = bitmap.take_word(w);
        while bits != 0 {
            let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            copy_page(space, page, shadow);
        }
    }
}

#[test]
fn ring_full_stress_no_lost_write() {
    if !kvm() {
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
    let bitmap = space
        .global_dirty_log_start(DirtyReason::Migration)
        .unwrap();
    space.global_dirty_log_sync(None).unwrap();
    bitmap.set_all();
    let mut shadow = vec![0u8; mem as usize];
    let rounds_at_start = vm.counter(0);
    for round in 0..30 {
        copy_dirty(&space, &bitmap, &mut shadow);
        space.global_dirty_log_sync(None).unwrap();
        if round % 6 == 0 {
            wait_all(&vm, 1);
        }
    }
    vm.pause().unwrap();
    space.global_dirty_log_sync(None).unwrap();
    copy_dirty(&space, &bitmap, &mut shadow);
    for b in space.blocks() {
        // SAFETY: the block's mapping is live and the guest is paused.
        let ram =
            unsafe { std::slice::from_raw_parts(b.host_addr as *const u8, b.size_bytes as usize) };
        let sh = &shadow[b.gpa as usize..(b.gpa + b.size_bytes) as usize];
        if ram != sh {
            let bad = (0..b.pages()).find(|p| {
                let r = (p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize;
                ram[r.clone()] != sh[r]
            });
            panic!("shadow differs from guest RAM at page {bad:?} of {}", b.id);
        }
    }
    let stats = ring.stats();
    eprintln!("ring stats: {stats:?}");
    assert!(
        vm.counter(0) - rounds_at_start >= 5,
        "the guest wrote while the syncs ran"
    );
    assert!(
        stats.ring_full_exits > 0,
        "the 512-entry ring filled: {stats:?}"
    );
    assert_eq!(stats.rejected_entries, 0);
    vm.shutdown();
}

#[test]
fn ring_needs_a_ring_vm_of_the_same_size() {
    if !kvm() {
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
