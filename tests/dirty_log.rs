//! The dirty-log plane on a real guest: exact dirty sets, no lost writes, reasons.
//!
//! Runs on KVM wherever /dev/kvm exists (FERRY_REQUIRE_KVM=1 makes that mandatory),
//! else on the host-thread fallback through the VMM-writes listener.

mod common;

use std::collections::BTreeSet;

use common::{config, guest_lock, start, wait_all};
use dirty_sync::kvm::{KvmBitmapConfig, KvmBitmapListener, ProtectMode};
use dirty_sync::{AddressSpace, DirtyReason, MemoryListener, RamBlock, PAGE_SIZE};
use minivm::{DirtyTracking, MiniVm, Workload};

fn tracking(manual: bool, deferred: bool) -> DirtyTracking {
    DirtyTracking::Bitmap(KvmBitmapConfig {
        manual_protect: manual,
        deferred_clear: deferred,
        ..Default::default()
    })
}

/// The pages a working-set guest dirties in a steady window: its W pages and each
/// vCPU's counter page.
fn expected_set(vm: &MiniVm) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for v in 0..vm.vcpus() {
        let (gpa, pages) = vm.workload_region(v);
        set.extend((0..pages).map(|p| gpa / PAGE_SIZE + p));
        set.insert(vm.counter_gpa(v) / PAGE_SIZE);
    }
    set
}

fn exact_set(w: u64, vcpus: u32, manual: bool) {
    let _g = guest_lock();
    let vm = start(config(1 << 30, vcpus, Workload::WorkingSet { pages: w }));
    let space = vm.address_space(tracking(manual, false)).unwrap();
    let bitmap = space
        .global_dirty_log_start(DirtyReason::DirtyRate)
        .unwrap();
    wait_all(&vm, 2);
    // Baseline: absorbs INITIALLY_SET and everything before the window.
    space.global_dirty_log_sync(None).unwrap();
    bitmap.clear_all();
    wait_all(&vm, 3);
    let report = space.global_dirty_log_sync(None).unwrap();
    let got: BTreeSet<u64> = bitmap.iter_set().collect();
    let want = expected_set(&vm);
    assert_eq!(
        got.len(),
        want.len(),
        "W={w} vcpus={vcpus} manual={manual}: count"
    );
    assert!(
        got == want,
        "W={w} vcpus={vcpus} manual={manual}: sets differ: extra {:?} missing {:?}",
        got.difference(&want).take(5).collect::<Vec<_>>(),
        want.difference(&got).take(5).collect::<Vec<_>>()
    );
    assert_eq!(report.new_pages(DirtyReason::DirtyRate), want.len() as u64);
    space.global_dirty_log_stop(DirtyReason::DirtyRate).unwrap();
    assert!(!space.logging());
}

/// Every W in {1, 4096, 65536} on 1 and 2 vCPUs (W=1 on 2 vCPUs: one page each).
fn exact_sets(manual: bool) {
    for vcpus in [1, 2] {
        for w in [1u64, 4096, 65536] {
            exact_set(w.max(u64::from(vcpus)), vcpus, manual);
        }
    }
}

#[test]
fn exact_dirty_set_classic() {
    exact_sets(false);
}

#[test]
fn exact_dirty_set_manual_protect() {
    exact_sets(true);
}

/// Copies the dirty pages of `bitmap` from guest RAM into `shadow`.
fn copy_dirty(space: &AddressSpace, bitmap: &dirty_sync::DirtyBitmap, shadow: &mut [u8]) -> u64 {
    let mut n = 0;
    for w in 0..bitmap.words().len() {
        let mut bits = bitmap.take_word(w);
        while bits != 0 {
            let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            copy_page(space, page, shadow);
            n += 1;
        }
    }
    n
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

fn no_lost_write(manual: bool, deferred: bool) {
    let _g = guest_lock();
    let mem = 64u64 << 20;
    let vcpus = 2;
    // Every data page, written with the round number round and round.
    let data_pages = (mem - minivm::DATA_GPA) / PAGE_SIZE;
    let mut vm = start(config(
        mem,
        vcpus,
        Workload::WorkingSet { pages: data_pages },
    ));
    let space = vm.address_space(tracking(manual, deferred)).unwrap();
    let bitmap = space
        .global_dirty_log_start(DirtyReason::Migration)
        .unwrap();
    space.global_dirty_log_sync(None).unwrap();
    bitmap.set_all();
    let mut shadow = vec![0u8; mem as usize];
    let rounds_at_start = vm.counter(0);
    for round in 0..40 {
        if deferred {
            space.clear_dirty_log(0, space.total_pages()).unwrap();
        }
        copy_dirty(&space, &bitmap, &mut shadow);
        space.global_dirty_log_sync(None).unwrap();
        if round % 8 == 0 {
            wait_all(&vm, 1);
        }
    }
    vm.pause().unwrap();
    space.global_dirty_log_sync(None).unwrap();
    if deferred {
        space.clear_dirty_log(0, space.total_pages()).unwrap();
    }
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
            panic!("manual={manual} deferred={deferred}: shadow differs from guest RAM at page {bad:?} of {}", b.id);
        }
    }
    assert!(
        vm.counter(0) - rounds_at_start >= 5,
        "the guest wrote while the syncs ran"
    );
    vm.shutdown();
}

#[test]
fn no_lost_write_classic() {
    no_lost_write(false, false);
}

#[test]
fn no_lost_write_manual_protect() {
    no_lost_write(true, false);
}

#[test]
fn no_lost_write_manual_protect_deferred_clear() {
    no_lost_write(true, true);
}

#[test]
fn stopping_dirty_rate_keeps_migration_logging() {
    let _g = guest_lock();
    let vm = start(config(64 << 20, 1, Workload::WorkingSet { pages: 64 }));
    let space = vm.address_space(DirtyTracking::default()).unwrap();
    let mig = space
        .global_dirty_log_start(DirtyReason::Migration)
        .unwrap();
    space
        .global_dirty_log_start(DirtyReason::DirtyRate)
        .unwrap();
    space
        .global_dirty_log_sync(Some(DirtyReason::DirtyRate))
        .unwrap();
    assert!(space.logging(), "migration still holds the log");
    mig.clear_all();
    wait_all(&vm, 2);
    space.global_dirty_log_sync(None).unwrap();
    assert_eq!(
        mig.count(),
        65,
        "64 working-set pages + the counter page still tracked"
    );
}

#[test]
fn protect_mode_follows_config() {
    let _g = guest_lock();
    let vm = MiniVm::new(config(64 << 20, 1, Workload::Idle)).unwrap();
    let Some(fd) = vm.vm_fd() else { return };
    let classic = KvmBitmapListener::new(
        fd.clone(),
        KvmBitmapConfig {
            manual_protect: false,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(classic.mode(), ProtectMode::Classic);
    let manual = KvmBitmapListener::new(fd, KvmBitmapConfig::default()).unwrap();
    assert_eq!(
        manual.mode(),
        ProtectMode::Manual,
        "this kernel offers MANUAL_DIRTY_LOG_PROTECT2"
    );
}

#[test]
fn bad_input_gives_errors() {
    let _g = guest_lock();
    let vm = MiniVm::new(config(64 << 20, 1, Workload::Idle)).unwrap();
    if let Some(fd) = vm.vm_fd() {
        // A chunk that is not a multiple of 64 pages.
        assert!(KvmBitmapListener::new(
            fd.clone(),
            KvmBitmapConfig {
                clear_chunk_bytes: 4096,
                ..Default::default()
            }
        )
        .is_err());
        // A slot that does not exist.
        let l = KvmBitmapListener::new(fd, KvmBitmapConfig::default()).unwrap();
        let bogus = RamBlock {
            id: "nope".into(),
            gpa: 1 << 40,
            size_bytes: 1 << 20,
            host_addr: 0,
            kvm_slot: 999,
            first_page: 0,
        };
        let bm = dirty_sync::DirtyBitmap::new(256);
        let mut sink = dirty_sync::DirtySink::new([Some(&bm), None, None, None, None, None]);
        assert!(l.log_sync(&bogus, &mut sink).is_err());
    }
    // A ring and a bitmap at once.
    if vm.is_kvm() {
        let mut c = config(64 << 20, 1, Workload::Idle);
        c.dirty_ring_entries = 4096;
        let ringed = MiniVm::new(c).unwrap();
        let err = ringed
            .address_space(DirtyTracking::default())
            .err()
            .expect("conflict");
        assert!(err.to_string().contains("dirty ring"), "{err}");
    }
    // Sizes the host or the config cannot take.
    assert!(MiniVm::new(config(3 << 20, 1, Workload::Idle)).is_err());
    assert!(MiniVm::new(config(1 << 50, 1, Workload::Idle)).is_err());
}
