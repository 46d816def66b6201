//! Measures the KVM dirty ring against the dirty bitmap on a real guest: full sync cost,
//! per-entry reap and reset cost, and the guest's slowdown (rounds/s) under each.
//!
//! ```sh
//! cargo run --release -p ferry-minivm --example ring_bench -- sync        # sync cost, 1 GiB and 8 GiB
//! cargo run --release -p ferry-minivm --example ring_bench -- slowdown    # guest rounds/s per reap period
//! cargo run --release -p ferry-minivm --example ring_bench -- sweep       # W past a 4096-entry ring
//! ```

use std::time::{Duration, Instant};

use dirty_sync::kvm::{KvmBitmapConfig, KvmRingConfig, RingStats};
use dirty_sync::DirtyReason;
use minivm::{DirtyTracking, MiniVm, VmConfig, Workload};

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn boot(mem: u64, w: u64, ring_entries: u32) -> BoxResult<MiniVm> {
    let workload = if w == 0 {
        Workload::Idle
    } else {
        Workload::WorkingSet { pages: w }
    };
    Ok(MiniVm::new(VmConfig {
        mem_bytes: mem,
        vcpus: 1,
        workload,
        dirty_ring_entries: ring_entries,
        ..Default::default()
    })?)
}

fn ring_tracking(entries: u32, reap_period_ms: u64, fill_wake_percent: u8) -> DirtyTracking {
    DirtyTracking::Ring(KvmRingConfig {
        entries,
        reap_period_ms,
        fill_wake_percent,
        ..Default::default()
    })
}

/// Median full-sync time with the guest dirtying W pages between syncs (one guest round
/// per window; idle: 20 ms).
fn sync_cost(mem: u64, w: u64, ring_entries: u32) -> BoxResult<(f64, Option<RingStats>)> {
    let mut vm = boot(mem, w, ring_entries)?;
    let tracking = if ring_entries > 0 {
        // No reaper activity: only the syncs reap, so the numbers are the sync's own.
        ring_tracking(ring_entries, 0, 0)
    } else {
        DirtyTracking::Bitmap(KvmBitmapConfig::default())
    };
    // A KVM guest's space has the KVM listener only, so the numbers are KVM's alone.
    let space = vm.address_space(tracking)?;
    vm.start()?;
    space.global_dirty_log_start(DirtyReason::DirtyRate)?;
    let wait = |vm: &MiniVm| -> BoxResult<()> {
        if w == 0 {
            std::thread::sleep(Duration::from_millis(20));
        } else {
            vm.wait_rounds(0, 1, Duration::from_secs(30))?;
        }
        Ok(())
    };
    for _ in 0..3 {
        wait(&vm)?;
        space.global_dirty_log_sync(None)?;
    }
    let before = vm.dirty_ring_listener().map(|r| r.stats());
    let mut us = Vec::new();
    for _ in 0..9 {
        wait(&vm)?;
        us.push(space.global_dirty_log_sync(None)?.sync_ns as f64 / 1000.0);
    }
    let stats = vm.dirty_ring_listener().map(|r| {
        let a = r.stats();
        let b = before.unwrap_or_default();
        RingStats {
            entries_reaped: a.entries_reaped - b.entries_reaped,
            reap_ns: a.reap_ns - b.reap_ns,
            reset_ns: a.reset_ns - b.reset_ns,
            reset_entries: a.reset_entries - b.reset_entries,
            flush_ns: a.flush_ns - b.flush_ns,
            syncs: a.syncs - b.syncs,
            ..a
        }
    });
    space.global_dirty_log_stop(DirtyReason::DirtyRate)?;
    vm.shutdown();
    Ok((median(&mut us), stats))
}

fn sync_table() -> BoxResult<()> {
    println!("| RAM | W | bitmap sync µs | ring sync µs | ring flush µs/sync | reap ns/entry | reset ns/entry |");
    println!("|---|---|---|---|---|---|---|");
    for mem_gib in [1u64, 8] {
        for w in [0u64, 4096, 65536] {
            let (bitmap_us, _) = sync_cost(mem_gib << 30, w, 0)?;
            let (ring_us, st) = sync_cost(mem_gib << 30, w, 65536)?;
            let st = st.unwrap_or_default();
            let per = |ns: u64, n: u64| {
                if n < 1000 {
                    "-".to_string()
                } else {
                    format!("{:.1}", ns as f64 / n as f64)
                }
            };
            println!(
                "| {mem_gib} GiB | {w} | {bitmap_us:.0} | {ring_us:.0} | {:.0} | {} | {} |",
                st.flush_ns as f64 / st.syncs.max(1) as f64 / 1000.0,
                per(st.reap_ns, st.entries_reaped),
                per(st.reset_ns, st.reset_entries),
            );
        }
    }
    Ok(())
}

/// Median guest rounds/s over `windows` 1 s windows, syncing every second.
fn rounds_per_s(w: u64, mode: &str, ring_entries: u32, period_ms: u64) -> BoxResult<(f64, String)> {
    rounds_per_s_fill(w, mode, ring_entries, period_ms, fill_arg())
}

/// The fill-wake percent from the command line's last argument `fill=N` (default 0).
fn fill_arg() -> u8 {
    std::env::args()
        .filter_map(|a| a.strip_prefix("fill=").and_then(|n| n.parse().ok()))
        .next_back()
        .unwrap_or(0)
}

fn rounds_per_s_fill(
    w: u64,
    mode: &str,
    ring_entries: u32,
    period_ms: u64,
    fill: u8,
) -> BoxResult<(f64, String)> {
    let mut vm = boot(1 << 30, w, ring_entries)?;
    let space = match mode {
        "none" | "ring-idle" => None,
        "bitmap" => Some(vm.address_space(DirtyTracking::Bitmap(KvmBitmapConfig::default()))?),
        _ => Some(vm.address_space(ring_tracking(ring_entries, period_ms, fill))?),
    };
    vm.start()?;
    if let Some(s) = &space {
        s.global_dirty_log_start(DirtyReason::DirtyRate)?;
    }
    let mut rates = Vec::new();
    for i in 0..4 {
        let r0 = vm.counter(0);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(1000));
        if let Some(s) = &space {
            s.global_dirty_log_sync(None)?;
        }
        let rate = (vm.counter(0) - r0) as f64 / t0.elapsed().as_secs_f64();
        if i > 0 {
            rates.push(rate);
        }
    }
    let extra = vm
        .dirty_ring_listener()
        .map(|r| {
            let s = r.stats();
            format!(
                "full exits {}, resets {}, entries/s {:.0}",
                s.ring_full_exits,
                s.resets,
                s.entries_reaped as f64 / 4.0
            )
        })
        .unwrap_or_default();
    vm.shutdown();
    Ok((median(&mut rates), extra))
}

fn slowdown_table() -> BoxResult<()> {
    println!("| W | tracking | reap period | rounds/s | vs none | ring |");
    println!("|---|---|---|---|---|---|");
    for w in [4096u64, 65536] {
        let (none, _) = rounds_per_s(w, "none", 0, 0)?;
        println!("| {w} | none | - | {none:.0} | 1.00 | |");
        let (bm, _) = rounds_per_s(w, "bitmap", 0, 0)?;
        println!("| {w} | bitmap | 1 s sync | {bm:.0} | {:.2} | |", bm / none);
        for period in [1000u64, 100, 10, 0] {
            let (r, extra) = rounds_per_s(w, "ring", 65536, period)?;
            let p = if period == 0 {
                "none (sync only)".to_string()
            } else {
                format!("{period} ms")
            };
            println!(
                "| {w} | ring 65536 | {p} | {r:.0} | {:.2} | {extra} |",
                r / none
            );
        }
    }
    Ok(())
}

fn sweep_table() -> BoxResult<()> {
    println!("| W | ring entries | none rounds/s | ring rounds/s | ratio | ring |");
    println!("|---|---|---|---|---|---|");
    for entries in [4096u32, 65536] {
        for w in [
            1024u64, 2048, 3072, 3584, 4000, 4096, 8192, 16384, 60000, 65536,
        ] {
            if entries == 65536 && w < 16384 || entries == 4096 && w > 8192 {
                continue;
            }
            let (none, _) = rounds_per_s(w, "none", 0, 0)?;
            let (r, extra) = rounds_per_s(w, "ring", entries, 1000)?;
            println!(
                "| {w} | {entries} | {none:.0} | {r:.0} | {:.2} | {extra} |",
                r / none
            );
        }
    }
    Ok(())
}

/// A/B of the same W, repeated, so a shared machine's drift shows.
fn ab_table(w: u64) -> BoxResult<()> {
    println!("| W | none | ring VM, log off | bitmap | ring 1 s | ring fill only |");
    println!("|---|---|---|---|---|---|");
    for _ in 0..2 {
        let (a, _) = rounds_per_s(w, "none", 0, 0)?;
        let (b, _) = rounds_per_s(w, "ring-idle", 65536, 0)?;
        let (c, _) = rounds_per_s(w, "bitmap", 0, 0)?;
        let (d, _) = rounds_per_s(w, "ring", 65536, 1000)?;
        let (e, _) = rounds_per_s(w, "ring", 65536, 0)?;
        println!("| {w} | {a:.0} | {b:.0} | {c:.0} | {d:.0} | {e:.0} |");
    }
    Ok(())
}

fn main() -> BoxResult<()> {
    match std::env::args().nth(1).as_deref() {
        Some("ab") => ab_table(
            std::env::args()
                .nth(2)
                .and_then(|s| s.parse().ok())
                .unwrap_or(4096),
        ),
        Some("sync") => sync_table(),
        Some("slowdown") => slowdown_table(),
        Some("sweep") => sweep_table(),
        _ => {
            eprintln!("usage: ring_bench sync|slowdown|sweep");
            Ok(())
        }
    }
}
