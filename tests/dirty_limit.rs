//! Dirty limit on a real guest with a dirty ring: a limited vCPU is held near its
//! limit, the other vCPU is never throttled, and a cancel gives the limited one its
//! speed back.
//!
//! Runs on KVM wherever /dev/kvm exists (FERRY_REQUIRE_KVM=1 makes that mandatory);
//! without the ring there is nothing to measure, and the test records itself skipped.
//! The accuracy asserted here is loose (the machine may be loaded); the benchmark
//! measures it closely.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, guest_lock, kvm_or_skip, TIMEOUT};
use dirty_sync::kvm::KvmRingConfig;
use dirty_sync::PAGE_SIZE;
use ferry::GuestVm;
use migration_core::{DirtyLimiter, MigratableVm};
use minivm::{DirtyTracking, VmConfig, Workload};

const RING_ENTRIES: u32 = 4096;
const PERIOD_MS: u64 = 250;
/// The limit under test, MiB/s: far below what a vCPU writing random pages dirties.
const LIMIT_MIB_S: u64 = 16;

fn boot() -> Arc<GuestVm> {
    let cfg = VmConfig {
        dirty_ring_entries: RING_ENTRIES,
        ..config(
            1 << 30,
            2,
            Workload::Random {
                seed: 11,
                hot_percent: 0,
            },
        )
    };
    let tracking = DirtyTracking::Ring(KvmRingConfig {
        entries: RING_ENTRIES,
        ..Default::default()
    });
    let guest = Arc::new(GuestVm::boot(cfg, tracking).expect("boot guest"));
    let vm = guest.vm();
    for v in 0..vm.vcpus() {
        vm.wait_rounds(v, 2, TIMEOUT).expect("guest runs");
    }
    drop(vm);
    guest
}

/// Per vCPU: pages written per second over `window`, in MiB/s (random pages over a
/// 512 MiB share: nearly every write dirties a page not dirty since the last sync).
fn write_rates(guest: &GuestVm, window: Duration) -> Vec<f64> {
    let before = guest.vcpu_page_writes();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let after = guest.vcpu_page_writes();
    let secs = t0.elapsed().as_secs_f64();
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 * PAGE_SIZE as f64 / f64::from(1 << 20) / secs)
        .collect()
}

#[test]
fn a_limited_vcpu_is_held_at_its_limit_and_the_other_runs_free() {
    if !kvm_or_skip() {
        return;
    }
    let _g = guest_lock();
    let guest = boot();
    let free = write_rates(&guest, Duration::from_millis(500));
    assert!(
        free[0] > 2.0 * LIMIT_MIB_S as f64,
        "the guest must dirty more than twice the limit to test it: {free:?}"
    );
    let limiter = DirtyLimiter::new(guest.clone());
    limiter.set_period_ms(PERIOD_MS).unwrap();
    let e = limiter.set(Some(2), LIMIT_MIB_S).unwrap_err().to_string();
    assert_eq!(e, "incorrect cpu index specified");
    assert!(limiter.query().is_empty(), "nothing limited yet");
    limiter.set(Some(0), LIMIT_MIB_S).unwrap();
    assert!(limiter.in_service());
    // Let the controller settle, then measure over 3 s by the guest's own counters.
    std::thread::sleep(Duration::from_millis(PERIOD_MS * 10));
    let held = write_rates(&guest, Duration::from_secs(3));
    let q = limiter.query();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!((q[0].cpu_index, q[0].limit_rate), (0, LIMIT_MIB_S));
    let err = (held[0] - LIMIT_MIB_S as f64).abs() / LIMIT_MIB_S as f64;
    eprintln!(
        "dirty limit {LIMIT_MIB_S} MiB/s: vCPU 0 free {:.0} MiB/s, held at {:.1} MiB/s \
         ({:.1} % off), last period {} MiB/s; vCPU 1 {:.0} → {:.0} MiB/s",
        free[0],
        held[0],
        err * 100.0,
        q[0].current_rate,
        free[1],
        held[1]
    );
    // A ceiling, held: not much above the limit, and not throttled far below it.
    assert!(
        held[0] <= 1.3 * LIMIT_MIB_S as f64 && held[0] >= 0.5 * LIMIT_MIB_S as f64,
        "vCPU 0 at {:.1} MiB/s under a limit of {LIMIT_MIB_S}",
        held[0]
    );
    let run = limiter.run_fractions();
    assert!(run[0] < 1.0, "vCPU 0 is throttled: {run:?}");
    assert_eq!(run[1], 1.0, "vCPU 1 has no limit");
    let slept = guest.vm().vcpu_throttled_us();
    assert!(slept[0] > 0, "vCPU 0 took throttle sleeps: {slept:?}");
    assert_eq!(slept[1], 0, "vCPU 1 never slept for the limit: {slept:?}");
    // Cancel: full speed within a period or two.
    limiter.cancel(Some(0)).unwrap();
    assert!(
        !limiter.in_service(),
        "the last limit gone, the thread stops"
    );
    assert!(limiter.query().is_empty());
    let after = write_rates(&guest, Duration::from_millis(500));
    assert!(
        after[0] > 2.0 * LIMIT_MIB_S as f64,
        "vCPU 0 back to full speed after the cancel: {after:?} (free {free:?})"
    );
    assert!(
        !guest
            .address_space()
            .reasons()
            .contains(dirty_sync::DirtyReason::DirtyLimit),
        "the dirty log's DirtyLimit reason is dropped"
    );
}
