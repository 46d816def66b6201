//! The dirty-log plane on a real guest: exact dirty sets, no lost writes, reasons.
//!
//! Runs on KVM wherever /dev/kvm exists (FERRY_REQUIRE_KVM=1 makes that mandatory),
//! else on the host-thread fallback through the VMM-writes listener.

mod common;

use common::{
    assert_no_lost_write, assert_same_pages, config, dirty_window, expected_working_set,
    guest_lock, start, wait_all,
};
use dirty_sync::kvm::{KvmBitmapConfig, KvmBitmapListener, ProtectMode};
use dirty_sync::{DirtyReason, MemoryListener, RamBlock, PAGE_SIZE};
use minivm::{DirtyTracking, MiniVm, Workload};

fn tracking(manual: bool, deferred: bool) -> DirtyTracking {
    DirtyTracking::Bitmap(KvmBitmapConfig {
        manual_protect: manual,
        deferred_clear: deferred,
        ..Default::default()
    })
}

fn exact_set(w: u64, vcpus: u32, manual: bool) {
    let _g = guest_lock();
    let vm = start(config(1 << 30, vcpus, Workload::WorkingSet { pages: w }));
    let space = vm.address_space(tracking(manual, false)).unwrap();
    let bitmap = space
        .global_dirty_log_start(DirtyReason::DirtyRate)
        .unwrap();
    wait_all(&vm, 2);
    let (got, report) = dirty_window(&vm, &space, &bitmap, 3);
    let want = expected_working_set(&vm);
    assert_same_pages(&got, &want, &format!("W={w} vcpus={vcpus} manual={manual}"));
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
    let what = format!("manual={manual} deferred={deferred}");
    assert_no_lost_write(&vm, &space, mem, 40, deferred, &what);
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
    // Past the guest's start-up writes, so the windows below are steady.
    wait_all(&vm, 2);
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
        let bogus = RamBlock::new(
            "nope",
            1 << 40,
            dirty_sync::HostMemory::anonymous(1 << 20).unwrap(),
            999,
            0,
        );
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
