//! Boots a minivm, turns its dirty log on, and prints what each sync found.
//!
//! ```sh
//! cargo run --release --example dirty_log -- --mem 1G --vcpus 1 \
//!     --workload working-set=4096 --syncs 5 --interval-ms 1000 --json
//! cargo run --release --example dirty_log -- --dirty-ring 65536 --reap-period-ms 1000
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use dirty_sync::kvm::{KvmBitmapConfig, KvmRingConfig};
use dirty_sync::DirtyReason;
use minivm::{parse_size_bytes, Backend, DirtyTracking, MiniVm, VmConfig, Workload};

/// Print the dirty pages a real guest produces, one line per dirty-log sync.
#[derive(Parser, Debug)]
struct Args {
    /// Guest RAM (bytes, or with a K/M/G suffix).
    #[arg(long, default_value = "1G", value_parser = |s: &str| parse_size_bytes(s).map_err(|e| e.to_string()))]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// idle | working-set=W | dense=N[,BYTES] | zipf=N[,WRITES/S] | sweep=R | random=SEED,HOT%.
    #[arg(long, default_value = "working-set=4096")]
    workload: Workload,
    /// Syncs to print.
    #[arg(long, default_value_t = 5)]
    syncs: u32,
    /// Time between syncs, ms.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Use the classic KVM_GET_DIRTY_LOG (no manual protect).
    #[arg(long)]
    classic: bool,
    /// KVM_CLEAR_DIRTY_LOG chunk (bytes, K/M/G).
    #[arg(long, default_value = "1G", value_parser = |s: &str| parse_size_bytes(s).map_err(|e| e.to_string()))]
    clear_chunk: u64,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Force the host-thread fallback.
    #[arg(long)]
    threads: bool,
    /// Track with the KVM dirty ring of this many entries per vCPU (0: the bitmap).
    #[arg(long, default_value_t = 0)]
    dirty_ring: u32,
    /// Dirty ring: the reaper's period, ms (0: only on ring-full and fill level).
    #[arg(long, default_value_t = 1000)]
    reap_period_ms: u64,
    /// Dirty ring: the reaper reaps once a ring is this many percent full (0: off).
    #[arg(long, default_value_t = 0)]
    fill_wake_percent: u8,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut vm = MiniVm::new(VmConfig {
        mem_bytes: args.mem,
        vcpus: args.vcpus,
        workload: args.workload,
        backend: if args.threads {
            Backend::Threads
        } else {
            Backend::Auto
        },
        dirty_ring_entries: args.dirty_ring,
        ..Default::default()
    })?;
    let tracking = if args.dirty_ring > 0 {
        DirtyTracking::Ring(KvmRingConfig {
            entries: args.dirty_ring,
            reap_period_ms: args.reap_period_ms,
            fill_wake_percent: args.fill_wake_percent,
            ..Default::default()
        })
    } else {
        DirtyTracking::Bitmap(KvmBitmapConfig {
            manual_protect: !args.classic,
            clear_chunk_bytes: args.clear_chunk,
            ..Default::default()
        })
    };
    let space = vm.address_space(tracking)?;
    let ring = vm.dirty_ring_listener();
    let mode = match (vm.is_kvm(), args.classic, args.dirty_ring) {
        (false, _, _) => "vmm-writes (host threads, no /dev/kvm)",
        (true, _, 1..) => "kvm-ring",
        (true, true, 0) => "kvm-bitmap classic",
        (true, false, 0) => "kvm-bitmap manual-protect",
    };
    if !args.json {
        eprintln!(
            "guest: {} MiB, {} vCPU(s), workload {:?}, backend {}, mode {mode}",
            args.mem >> 20,
            args.vcpus,
            args.workload,
            vm.backend_name()
        );
        println!(
            "{:>5} {:>12} {:>10} {:>12}",
            "sync", "dirty_pages", "sync_us", "window_ms"
        );
    }
    vm.start()?;
    let bitmap = space.global_dirty_log_start(DirtyReason::DirtyRate)?;
    space.global_dirty_log_sync(None)?; // baseline (absorbs KVM's INITIALLY_SET)
    bitmap.clear_all();
    let mut last = Instant::now();
    let mut last_rounds: Vec<u64> = (0..vm.vcpus()).map(|v| vm.counter(v)).collect();
    let mut last_entries = ring
        .as_ref()
        .map(|r| r.vcpu_dirty_entries())
        .unwrap_or_default();
    for sync in 1..=args.syncs {
        std::thread::sleep(Duration::from_millis(args.interval_ms));
        let report = space.global_dirty_log_sync(None)?;
        let window_ms = last.elapsed().as_secs_f64() * 1000.0;
        last = Instant::now();
        let dirty = bitmap.count();
        bitmap.clear_all();
        let rounds: Vec<u64> = (0..vm.vcpus()).map(|v| vm.counter(v)).collect();
        let rounds_per_s: Vec<f64> = rounds
            .iter()
            .zip(&last_rounds)
            .map(|(n, o)| ((n - o) as f64 * 1000.0 / window_ms).round())
            .collect();
        last_rounds.clone_from(&rounds);
        let ring_json = ring.as_ref().map(|r| {
            let now = r.vcpu_dirty_entries();
            let per_vcpu: Vec<u64> = now.iter().zip(&last_entries).map(|(n, o)| n - o).collect();
            last_entries = now;
            let st = r.stats();
            serde_json::json!({
                "vcpu_dirty_entries": per_vcpu,
                "entries": st.last_sync_entries,
                "unique_pages": st.last_sync_unique_pages,
                "ring_full_exits_total": st.ring_full_exits,
                "reaper_reaps_total": st.reaper_reaps,
                "resets_total": st.resets,
                "rejected_entries_total": st.rejected_entries,
            })
        });
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "sync": sync,
                    "dirty_pages": dirty,
                    "reported_pages": report.reported_pages,
                    "sync_us": report.sync_ns / 1000,
                    "window_ms": (window_ms * 10.0).round() / 10.0,
                    "mode": mode,
                    "guest_rounds": rounds,
                    "guest_rounds_per_s": rounds_per_s,
                    "ring": ring_json,
                })
            );
        } else {
            println!(
                "{sync:>5} {dirty:>12} {:>10} {window_ms:>12.1}",
                report.sync_ns / 1000
            );
            if let Some(r) = &ring_json {
                println!("      ring {r} guest_rounds_per_s {rounds_per_s:?}");
            }
        }
    }
    space.global_dirty_log_stop(DirtyReason::DirtyRate)?;
    vm.shutdown();
    Ok(())
}
