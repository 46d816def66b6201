//! The host-thread backend runs the same workloads through vm-memory (no /dev/kvm needed).

mod common;

use std::time::Duration;

use common::{assert_all_advance, assert_page_writes_agree, cfg, every_workload, started};
use minivm::{Backend, Error, MiniVm, VmConfig, Workload, PAGE_SIZE};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const THREADS: Backend = Backend::Threads;

fn read_u64(vm: &MiniVm, gpa: u64) -> u64 {
    vm.memory()
        .read_obj::<u64>(GuestAddress(gpa))
        .expect("read guest memory")
}

/// Every workload counts its page writes beside its counter (the guest's speed).
#[test]
fn threads_every_workload_counts_its_page_writes() {
    for (w, rounds) in every_workload() {
        let vm = started(cfg(THREADS, w, 2));
        assert_all_advance(&vm, rounds);
        vm.pause().expect("pause");
        assert_page_writes_agree(&vm, 1 << 12);
    }
}

#[test]
fn threads_every_workload_advances() {
    for vcpus in [1, 2] {
        for (w, rounds) in every_workload() {
            let vm = started(cfg(THREADS, w, vcpus));
            assert!(!vm.is_kvm());
            assert_eq!(vm.backend_name(), "host-threads (no /dev/kvm)");
            assert!(vm.vm_fd().is_none());
            assert_all_advance(&vm, rounds);
            assert!(vm.errors().is_empty(), "{:?}", vm.errors());
        }
    }
}

#[test]
fn threads_working_set_writes_exactly_its_pages_and_marks_bitmap() {
    let vm = started(cfg(THREADS, Workload::WorkingSet { pages: 301 }, 2));
    assert_all_advance(&vm, 5);
    vm.pause().expect("pause");
    for v in 0..2 {
        let c = vm.counter(v);
        let (gpa, pages) = vm.workload_region(v);
        for i in 0..pages {
            let val = read_u64(&vm, gpa + i * PAGE_SIZE);
            assert!(
                val == c || val == c + 1,
                "vCPU {v} page {i}: {val} vs counter {c}"
            );
        }
        let (_, share_pages) = vm.share_region(v);
        for i in pages..share_pages {
            assert_eq!(read_u64(&vm, gpa + i * PAGE_SIZE), 0);
        }
    }
    // vm-memory's dirty bitmap saw the writes: each working-set page and counter page is dirty,
    // the page just past the working set is not.
    let region = vm.memory().find_region(GuestAddress(0)).expect("region 0");
    let (gpa, pages) = vm.workload_region(0);
    assert!(region.bitmap().dirty_at(gpa as usize));
    assert!(region
        .bitmap()
        .dirty_at((gpa + (pages - 1) * PAGE_SIZE) as usize));
    assert!(region.bitmap().dirty_at(vm.counter_gpa(1) as usize));
    assert!(!region.bitmap().dirty_at((gpa + pages * PAGE_SIZE) as usize));
}

#[test]
fn threads_pause_stops_and_resume_restarts() {
    let vm = started(cfg(THREADS, Workload::WorkingSet { pages: 64 }, 2));
    assert_all_advance(&vm, 3);
    vm.pause().expect("pause");
    let before: Vec<u64> = (0..2).map(|v| vm.counter(v)).collect();
    let r = vm.wait_rounds(0, 1, Duration::from_millis(50));
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    let after: Vec<u64> = (0..2).map(|v| vm.counter(v)).collect();
    assert_eq!(before, after);
    vm.resume().expect("resume");
    assert_all_advance(&vm, 3);
    assert!(matches!(vm.save_state(), Err(Error::NotPaused)));
}

#[test]
fn threads_save_restore_continues() {
    for w in [
        Workload::WorkingSet { pages: 4000 },
        Workload::Random {
            seed: 3,
            hot_percent: 90,
        },
    ] {
        let c = cfg(THREADS, w, 2);
        let src = started(c.clone());
        assert_all_advance(&src, 3);
        src.pause().expect("pause");
        let blob = src.save_state().expect("save");
        let mut dst = MiniVm::new_incoming(c).expect("incoming");
        for (s, d) in src.slots().iter().zip(dst.slots()) {
            let mut buf = vec![0u8; s.size_bytes as usize];
            src.memory()
                .read_slice(&mut buf, GuestAddress(s.gpa))
                .expect("read");
            dst.memory()
                .write_slice(&buf, GuestAddress(d.gpa))
                .expect("write");
        }
        dst.restore_state(&blob).expect("restore");
        let at_switch = dst.counter(0);
        dst.start().expect("start");
        assert_all_advance(&dst, 3);
        assert!(dst.counter(0) > at_switch);
        let kvm_blob_for_threads = MiniVm::new_incoming(cfg(THREADS, w, 1)).expect("vm");
        assert!(matches!(
            kvm_blob_for_threads.restore_state(&blob),
            Err(Error::VcpuCountMismatch { blob: 2, vm: 1 })
        ));
    }
}

#[test]
fn threads_throttle_keeps_running() {
    let vm = started(cfg(THREADS, Workload::WorkingSet { pages: 1024 }, 1));
    vm.set_throttle_percent(90);
    assert_all_advance(&vm, 20);
    vm.set_throttle_percent(0);
    assert_all_advance(&vm, 20);
    vm.kick_all().expect("kick is a no-op here");
}

#[test]
fn threads_eight_gib_creates_and_bad_configs_fail() {
    let c = VmConfig {
        mem_bytes: 8 << 30,
        ..cfg(THREADS, Workload::Idle, 2)
    };
    let vm = MiniVm::new(c).expect("8 GiB");
    assert_eq!(vm.slots().len(), 8);
    assert_eq!(vm.memory().iter().map(|r| r.len()).sum::<u64>(), 8 << 30);
    for bad in [
        VmConfig {
            mem_bytes: 5 << 20,
            ..cfg(THREADS, Workload::Idle, 1)
        },
        VmConfig {
            vcpus: 65,
            ..cfg(THREADS, Workload::Idle, 1)
        },
        VmConfig {
            ..cfg(THREADS, Workload::WorkingSet { pages: 1 << 20 }, 1)
        },
    ] {
        assert!(matches!(MiniVm::new(bad), Err(Error::Config(_))));
    }
}
