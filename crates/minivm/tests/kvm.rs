//! Real KVM guests (run whenever /dev/kvm exists; FERRY_REQUIRE_KVM=1 makes a missing KVM fail).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    assert_all_advance, assert_page_writes_agree, cfg, every_workload, kvm_guard, started, TIMEOUT,
};
use minivm::{Backend, Error, ExitHandler, MiniVm, VmConfig, Workload, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const KVM: Backend = Backend::Kvm;

fn read_u64(vm: &MiniVm, gpa: u64) -> u64 {
    vm.memory()
        .read_obj::<u64>(GuestAddress(gpa))
        .expect("read guest memory")
}

/// Every workload counts its page writes beside its counter (the guest's speed).
#[test]
fn kvm_every_workload_counts_its_page_writes() {
    let Some(_g) = kvm_guard() else { return };
    for (w, rounds) in every_workload() {
        let vm = started(cfg(KVM, w, 2));
        assert_all_advance(&vm, rounds);
        vm.pause().expect("pause");
        assert_page_writes_agree(&vm, 0);
    }
}

#[test]
fn kvm_idle_advances() {
    let Some(_g) = kvm_guard() else { return };
    for vcpus in [1, 2] {
        let vm = started(cfg(KVM, Workload::Idle, vcpus));
        assert!(vm.is_kvm());
        assert_eq!(vm.backend_name(), "kvm");
        assert_all_advance(&vm, 3);
        assert!(vm.errors().is_empty());
    }
}

#[test]
fn kvm_working_set_advances() {
    let Some(_g) = kvm_guard() else { return };
    for vcpus in [1, 2] {
        let vm = started(cfg(KVM, Workload::WorkingSet { pages: 1024 }, vcpus));
        assert_all_advance(&vm, 100);
    }
}

#[test]
fn kvm_sweep_advances() {
    let Some(_g) = kvm_guard() else { return };
    for vcpus in [1, 2] {
        let vm = started(cfg(
            KVM,
            Workload::Sweep {
                pages_per_sec: 20_000,
            },
            vcpus,
        ));
        assert!(vm.tsc_hz() > 0);
        // The sweep counter counts pages written.
        assert_all_advance(&vm, 200);
    }
}

#[test]
fn kvm_random_advances() {
    let Some(_g) = kvm_guard() else { return };
    for vcpus in [1, 2] {
        let vm = started(cfg(
            KVM,
            Workload::Random {
                seed: 42,
                hot_percent: 80,
            },
            vcpus,
        ));
        assert_all_advance(&vm, 5);
    }
}

/// Page i of each vCPU's working set holds the round number (the current or the previous
/// round if paused mid-round); every other data page is untouched.
#[test]
fn kvm_working_set_writes_exactly_its_pages() {
    let Some(_g) = kvm_guard() else { return };
    let vm = started(cfg(KVM, Workload::WorkingSet { pages: 301 }, 2));
    assert_all_advance(&vm, 5);
    vm.pause().expect("pause");
    for v in 0..2 {
        let c = vm.counter(v);
        let (gpa, pages) = vm.workload_region(v);
        assert_eq!(pages, if v == 0 { 151 } else { 150 });
        for i in 0..pages {
            let val = read_u64(&vm, gpa + i * PAGE_SIZE);
            assert!(
                val == c || val == c + 1,
                "vCPU {v} page {i}: {val} vs counter {c}"
            );
        }
        let (share_gpa, share_pages) = vm.share_region(v);
        assert_eq!(share_gpa, gpa);
        for i in pages..share_pages {
            assert_eq!(
                read_u64(&vm, gpa + i * PAGE_SIZE),
                0,
                "vCPU {v} page {i} outside the set"
            );
        }
    }
}

#[test]
fn kvm_pause_stops_and_resume_restarts() {
    let Some(_g) = kvm_guard() else { return };
    for w in [Workload::WorkingSet { pages: 64 }, Workload::Idle] {
        let vm = started(cfg(KVM, w, 2));
        assert_all_advance(&vm, 3);
        vm.pause().expect("pause");
        eprintln!("{w:?}: pause latency {:?}", vm.last_pause_latency());
        let before: Vec<u64> = (0..2).map(|v| vm.counter(v)).collect();
        // While paused, the counter must not move: wait_rounds times out.
        let r = vm.wait_rounds(0, 1, std::time::Duration::from_millis(50));
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        let after: Vec<u64> = (0..2).map(|v| vm.counter(v)).collect();
        assert_eq!(before, after);
        assert!(vm.save_state().is_ok());
        vm.resume().expect("resume");
        assert_all_advance(&vm, 3);
        // Saving while running is refused.
        assert!(matches!(vm.save_state(), Err(Error::NotPaused)));
    }
}

fn copy_memory(src: &MiniVm, dst: &MiniVm) {
    for (s, d) in src.slots().iter().zip(dst.slots()) {
        assert_eq!((s.gpa, s.size_bytes), (d.gpa, d.size_bytes));
        let mut buf = vec![0u8; s.size_bytes as usize];
        src.memory()
            .read_slice(&mut buf, GuestAddress(s.gpa))
            .expect("read slot");
        dst.memory()
            .write_slice(&buf, GuestAddress(d.gpa))
            .expect("write slot");
    }
}

#[test]
fn kvm_save_restore_into_incoming_continues() {
    let Some(_g) = kvm_guard() else { return };
    for w in [
        Workload::WorkingSet { pages: 256 },
        Workload::Sweep {
            pages_per_sec: 20_000,
        },
        Workload::Random {
            seed: 7,
            hot_percent: 50,
        },
        Workload::Idle,
    ] {
        let c = cfg(KVM, w, 2);
        let mut src = started(c.clone());
        assert_all_advance(&src, 3);
        src.pause().expect("pause");
        let blob = src.save_state().expect("save");
        let mut dst = MiniVm::new_incoming(c).expect("incoming");
        // new_incoming writes nothing: counters are zero, low memory is empty.
        assert_eq!(dst.counter(0), 0);
        assert_eq!(read_u64(&dst, minivm::COUNTER_GPA), 0);
        copy_memory(&src, &dst);
        dst.restore_state(&blob).expect("restore");
        let at_switch: Vec<u64> = (0..2).map(|v| dst.counter(v)).collect();
        dst.start().expect("start destination");
        assert_all_advance(&dst, 3);
        for v in 0..2 {
            assert!(
                dst.counter(v) > at_switch[v as usize],
                "{w:?} vCPU {v} did not continue"
            );
        }
        assert!(dst.errors().is_empty(), "{:?}", dst.errors());
        // Rollback: the source can be resumed too.
        src.resume().expect("resume source");
        assert_all_advance(&src, 1);
        src.shutdown();
        dst.shutdown();
    }
}

#[test]
fn kvm_restore_rejects_bad_blobs() {
    let Some(_g) = kvm_guard() else { return };
    let src = MiniVm::new(cfg(KVM, Workload::Idle, 2)).expect("vm");
    let blob = src.save_state().expect("save before start");
    let one = MiniVm::new_incoming(cfg(KVM, Workload::Idle, 1)).expect("vm");
    assert!(matches!(
        one.restore_state(&blob),
        Err(Error::VcpuCountMismatch { blob: 2, vm: 1 })
    ));
    let two = MiniVm::new_incoming(cfg(KVM, Workload::Idle, 2)).expect("vm");
    assert!(matches!(
        two.restore_state(&blob[..blob.len() / 2]),
        Err(Error::Truncated(_))
    ));
    assert!(matches!(
        two.restore_state(b"nonsense-blob-here"),
        Err(Error::BadMagic)
    ));
    let mut v2 = blob.clone();
    v2[8] = 2;
    assert!(matches!(
        two.restore_state(&v2),
        Err(Error::UnsupportedVersion { found: 2, .. })
    ));
    let threads = MiniVm::new_incoming(cfg(Backend::Threads, Workload::Idle, 2)).expect("vm");
    assert!(matches!(
        threads.restore_state(&blob),
        Err(Error::BackendMismatch { .. })
    ));
    two.restore_state(&blob).expect("good blob restores");
}

#[test]
fn kvm_throttle_keeps_running() {
    let Some(_g) = kvm_guard() else { return };
    let vm = started(cfg(KVM, Workload::WorkingSet { pages: 1024 }, 1));
    assert_all_advance(&vm, 10);
    vm.set_throttle_percent(80);
    // Let a few throttle slices pass (counted in rounds), then check it still runs.
    assert_all_advance(&vm, 50);
    vm.set_throttle_percent(0);
    assert_all_advance(&vm, 10);
    vm.pause().expect("pause while throttled works");
    vm.resume().expect("resume");
}

#[test]
fn kvm_kick_all_returns_and_guest_continues() {
    let Some(_g) = kvm_guard() else { return };
    for w in [Workload::WorkingSet { pages: 64 }, Workload::Idle] {
        let vm = started(cfg(KVM, w, 2));
        for _ in 0..20 {
            vm.kick_all().expect("kick");
        }
        assert_all_advance(&vm, 3);
        vm.pause().expect("pause");
        vm.kick_all().expect("kick while paused returns");
    }
}

/// Ground truth through KVM's dirty bitmap: a steady window dirties exactly W + 1 pages
/// (the working set and the counter page); idle dirties only the counter page.
#[test]
fn kvm_dirty_log_matches_ground_truth() {
    let Some(_g) = kvm_guard() else { return };
    for (w, expect) in [
        (Workload::WorkingSet { pages: 500 }, 501u64),
        (Workload::Idle, 1),
    ] {
        let c = VmConfig {
            dirty_log: true,
            ..cfg(KVM, w, 1)
        };
        let vm = started(c);
        let fd = vm.vm_fd().expect("kvm vm fd");
        let count = |vm: &MiniVm| -> u64 {
            vm.slots()
                .iter()
                .map(|s| {
                    let bm = fd
                        .get_dirty_log(s.slot, s.size_bytes as usize)
                        .expect("dirty log");
                    bm.iter().map(|w| u64::from(w.count_ones())).sum::<u64>()
                })
                .sum()
        };
        assert_all_advance(&vm, 3);
        let _first = count(&vm);
        assert_all_advance(&vm, 3);
        let n = count(&vm);
        assert_eq!(n, expect, "{w:?}");
    }
}

struct CountingHandler(AtomicU64);

impl ExitHandler for CountingHandler {
    fn dirty_ring_full(&self, _vcpu: u32) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn kvm_dirty_ring_config() {
    let Some(_g) = kvm_guard() else { return };
    let ok = VmConfig {
        dirty_log: true,
        dirty_ring_entries: 4096,
        ..cfg(KVM, Workload::Idle, 2)
    };
    let mut vm = MiniVm::new(ok).expect("dirty ring VM");
    assert_eq!(vm.vcpu_fds().len(), 2);
    assert!(matches!(vm.dirty_ring_cap(), Some(192 | 223)));
    vm.set_exit_handler(Arc::new(CountingHandler(AtomicU64::new(0))));
    vm.start().expect("start");
    assert_all_advance(&vm, 2);
    let too_big = VmConfig {
        dirty_ring_entries: 1 << 24,
        ..cfg(KVM, Workload::Idle, 1)
    };
    assert!(matches!(MiniVm::new(too_big), Err(Error::DirtyRing(_))));
    let not_pow2 = VmConfig {
        dirty_ring_entries: 1000,
        ..cfg(KVM, Workload::Idle, 1)
    };
    assert!(matches!(MiniVm::new(not_pow2), Err(Error::Config(_))));
}

#[test]
fn kvm_eight_gib_creates_without_touching() {
    let Some(_g) = kvm_guard() else { return };
    let c = VmConfig {
        mem_bytes: 8 << 30,
        ..cfg(KVM, Workload::WorkingSet { pages: 4096 }, 2)
    };
    let vm = MiniVm::new(c).expect("8 GiB VM");
    assert_eq!(vm.slots().len(), 8);
    assert_eq!(vm.memory().num_regions(), 8);
    assert_eq!(vm.memory().iter().map(|r| r.len()).sum::<u64>(), 8 << 30);
    assert_eq!(vm.mem_bytes(), 8 << 30);
}

#[test]
fn kvm_backend_errors() {
    let Some(_g) = kvm_guard() else { return };
    let bad = VmConfig {
        vcpus: 0,
        ..cfg(KVM, Workload::Idle, 1)
    };
    assert!(matches!(MiniVm::new(bad), Err(Error::Config(_))));
    let mut vm = started(cfg(KVM, Workload::Idle, 1));
    assert!(matches!(vm.start(), Err(Error::AlreadyStarted)));
    assert!(matches!(
        vm.wait_rounds(5, 1, TIMEOUT),
        Err(Error::NoSuchVcpu { .. })
    ));
}

#[test]
fn kvm_auto_backend_picks_kvm() {
    let Some(_g) = kvm_guard() else { return };
    let vm = MiniVm::new(cfg(Backend::Auto, Workload::Idle, 1)).expect("auto");
    assert!(vm.is_kvm());
}

/// Many pause/resume/kick cycles: no lost wakeup may hang `pause` or `kick_all`.
#[test]
fn kvm_pause_resume_kick_stress() {
    let Some(_g) = kvm_guard() else { return };
    for w in [
        Workload::WorkingSet { pages: 16 },
        Workload::Idle,
        Workload::Sweep {
            pages_per_sec: 50_000,
        },
    ] {
        let vm = started(cfg(KVM, w, 2));
        vm.set_throttle_percent(30);
        for i in 0..100 {
            vm.pause().expect("pause");
            assert!(vm.save_state().is_ok());
            vm.resume().expect("resume");
            if i % 3 == 0 {
                vm.kick_all().expect("kick");
            }
        }
        vm.set_throttle_percent(0);
        assert_all_advance(&vm, 2);
    }
}

/// A working set larger than the dirty ring fills it: KVM_EXIT_DIRTY_RING_FULL reaches the
/// exit handler on the vCPU thread (which here does not reset the ring).
#[test]
fn kvm_dirty_ring_full_calls_handler() {
    let Some(_g) = kvm_guard() else { return };
    let c = VmConfig {
        dirty_log: true,
        dirty_ring_entries: 1024,
        ..cfg(KVM, Workload::WorkingSet { pages: 4096 }, 1)
    };
    let mut vm = MiniVm::new(c).expect("ring VM");
    let h = Arc::new(CountingHandler(AtomicU64::new(0)));
    vm.set_exit_handler(h.clone());
    vm.start().expect("start");
    let t0 = std::time::Instant::now();
    while h.0.load(Ordering::Relaxed) == 0 {
        assert!(
            t0.elapsed() < TIMEOUT,
            "no ring-full exit: {:?}",
            vm.errors()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    vm.pause().expect("pause with a full ring");
    vm.shutdown();
    assert!(vm.errors().is_empty(), "{:?}", vm.errors());
}

/// A vCPU's page writes per second over `window`.
fn write_rate(vm: &MiniVm, vcpu: u32, window: Duration) -> f64 {
    let (w0, t0) = (vm.page_writes(vcpu), Instant::now());
    std::thread::sleep(window);
    (vm.page_writes(vcpu) - w0) as f64 / t0.elapsed().as_secs_f64()
}

/// Both throttles really slow the vCPU (its slice timer ends each run slice, so the
/// sleeps happen even when the guest never exits on its own): at 90 % it writes well
/// under half its free rate, measured just before, whatever the host's load.
#[test]
fn kvm_throttles_slow_the_vcpu_they_hold() {
    let Some(_g) = kvm_guard() else { return };
    let w = Workload::Random {
        seed: 3,
        hot_percent: 0,
    };
    let vm = started(cfg(KVM, w, 2));
    assert_all_advance(&vm, 2);
    let window = Duration::from_millis(1500);
    let free = write_rate(&vm, 0, window);
    vm.set_throttle_percent(90);
    std::thread::sleep(Duration::from_millis(100));
    let global = write_rate(&vm, 0, window);
    vm.set_throttle_percent(0);
    let free_again = write_rate(&vm, 0, window);
    assert!(vm.set_vcpu_throttle_ppm(0, 900_000));
    std::thread::sleep(Duration::from_millis(100));
    let own = write_rate(&vm, 0, window);
    let other = write_rate(&vm, 1, window);
    assert!(vm.set_vcpu_throttle_ppm(0, 0));
    let slept = vm.vcpu_throttled_us();
    assert!(
        global < 0.5 * free && own < 0.5 * free_again,
        "free {free:.0}, global 90 % {global:.0}, free {free_again:.0}, own 90 % {own:.0} pages/s"
    );
    assert!(other > 0.0, "vCPU 1 runs");
    assert!(slept[0] > 0, "{slept:?}");
}
