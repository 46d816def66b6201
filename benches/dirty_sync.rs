//! Cost of one global dirty-log sync on a real guest (KVM where /dev/kvm exists):
//! 1 GiB and 8 GiB of RAM, 0 / 4096 / 65536 pages dirtied since the last sync,
//! classic KVM_GET_DIRTY_LOG vs manual protect (GET + KVM_CLEAR_DIRTY_LOG).
//!
//! `cargo bench --bench dirty_sync`

#![allow(missing_docs)] // criterion_group! generates undocumented public items

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use dirty_sync::kvm::KvmBitmapConfig;
use dirty_sync::DirtyReason;
use minivm::{DirtyTracking, MiniVm, VmConfig, Workload};

fn sync_cost(c: &mut Criterion) {
    let mut g = c.benchmark_group("global_dirty_log_sync");
    for mem_gib in [1u64, 8] {
        for w in [0u64, 4096, 65536] {
            for manual in [false, true] {
                let workload = if w == 0 {
                    Workload::Idle
                } else {
                    Workload::WorkingSet { pages: w }
                };
                let mut vm = MiniVm::new(VmConfig {
                    mem_bytes: mem_gib << 30,
                    vcpus: 1,
                    workload,
                    ..Default::default()
                })
                .expect("guest");
                let space = vm
                    .address_space(DirtyTracking::Bitmap(KvmBitmapConfig {
                        manual_protect: manual,
                        ..Default::default()
                    }))
                    .expect("address space");
                vm.start().expect("start");
                let bitmap = space
                    .global_dirty_log_start(DirtyReason::Migration)
                    .unwrap();
                space.global_dirty_log_sync(None).unwrap();
                let mode = if manual { "manual" } else { "classic" };
                let id = BenchmarkId::new(format!("{mem_gib}GiB/{mode}"), w);
                g.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            // Let the guest dirty its whole working set again.
                            if w > 0 {
                                vm.wait_rounds(0, 1, Duration::from_secs(10)).unwrap();
                            }
                            let t = Instant::now();
                            space.global_dirty_log_sync(None).unwrap();
                            total += t.elapsed();
                            bitmap.clear_all();
                        }
                        total
                    })
                });
                space.global_dirty_log_stop(DirtyReason::Migration).unwrap();
                vm.shutdown();
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    targets = sync_cost
}
criterion_main!(benches);
