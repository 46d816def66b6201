//! Postcopy against the guest precopy cannot finish (issue #16's case): a 1 GiB guest
//! with 2 vCPUs rewriting a working set of 65536 pages, precopy at `max-bandwidth`
//! 128 MiB/s, `migrate-start-postcopy` after 1 s of precopy, the background stream
//! uncapped (QEMU's `max-postcopy-bandwidth` 0). The source runs in this process; the
//! destination is a fresh `ferry receive` process on loopback TCP. One row runs the
//! same guest with auto-converge instead, for the time postcopy saves. Prints a table
//! of medians and writes it to target/bench/postcopy.md (scripts/numbers).
//!
//! `cargo bench --bench postcopy` (`FERRY_BENCH_REPS`, default 3).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median, Dest};
use ferry::migration_core::{Capability, MigrationSource, ParametersUpdate};
use ferry::stats::MigrationStatus;
use ferry::GuestVm;
use minivm::{DirtyTracking, VmConfig, Workload};
use serde_json::Value;

/// One row.
struct Scenario {
    name: &'static str,
    workload: Workload,
    channels: u8,
    /// Switch to postcopy this long after precopy turned active; `None`: auto-converge.
    postcopy_after: Option<Duration>,
}

/// What one migration measured.
#[derive(Clone, Default)]
struct Run {
    ok: bool,
    total_ms: u64,
    downtime_ms: u64,
    /// From the switch (the status turning postcopy-active) to completed.
    postcopy_ms: u64,
    full_residency_ms: u64,
    requests: u64,
    fault_p50_us: u64,
    fault_p99_us: u64,
    /// The destination guest's page writes per second during postcopy, as a share of
    /// the source guest's before the migration.
    guest_speed_pct: f64,
    postcopy_mib: f64,
}

fn run_once(s: &Scenario) -> Run {
    let cfg = VmConfig {
        mem_bytes: 1 << 30,
        vcpus: 2,
        workload: s.workload,
        ..Default::default()
    };
    let guest = Arc::new(GuestVm::boot(cfg.clone(), DirtyTracking::default()).expect("boot"));
    for v in 0..cfg.vcpus {
        guest
            .vm()
            .wait_rounds(v, 2, Duration::from_secs(30))
            .expect("guest runs");
    }
    // The guest's undisturbed speed, over a second.
    let w0 = guest.page_writes();
    std::thread::sleep(Duration::from_secs(1));
    let undisturbed = (guest.page_writes() - w0) as f64;
    let (mut dest, uri) = Dest::spawn(&cfg, false);
    let source = MigrationSource::new(guest.clone());
    source
        .set_parameters(&ParametersUpdate {
            max_bandwidth: Some(128 << 20),
            multifd_channels: Some(s.channels),
            x_ferry_sparse_pages: Some(false),
            ..Default::default()
        })
        .unwrap();
    source
        .set_capability(Capability::Multifd, s.channels > 1)
        .unwrap();
    source
        .set_capability(Capability::PostcopyRam, s.postcopy_after.is_some())
        .unwrap();
    source
        .set_capability(Capability::AutoConverge, s.postcopy_after.is_none())
        .unwrap();
    let start = Instant::now();
    source.migrate(&uri).unwrap();
    let mut active_at = None;
    let mut switched_at = None;
    let limit = Duration::from_secs(120);
    loop {
        let st = source.query().status;
        if st == MigrationStatus::Active && active_at.is_none() {
            active_at = Some(Instant::now());
        }
        if let (Some(after), Some(t), None) = (s.postcopy_after, active_at, switched_at) {
            if t.elapsed() >= after && st == MigrationStatus::Active {
                source.start_postcopy().unwrap();
                switched_at = Some(Instant::now());
            }
        }
        if st == MigrationStatus::PostcopyActive && switched_at.is_none() {
            switched_at = Some(Instant::now());
        }
        if st.is_finished() || start.elapsed() > limit {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if !source.query().status.is_finished() {
        source.cancel();
    }
    let status = source.wait();
    let info = source.query();
    let mut r = Run {
        ok: status == MigrationStatus::Completed,
        total_ms: info.total_time.unwrap_or(0),
        downtime_ms: info.downtime.unwrap_or(0),
        ..Default::default()
    };
    if !r.ok {
        eprintln!("{}: {status:?} {:?}", s.name, info.error_desc);
        return r;
    }
    let frozen = guest.page_writes();
    let done = dest.next().expect("destination exited");
    assert_eq!(done["event"], "completed", "{done}");
    if let Some(sw) = switched_at {
        r.postcopy_ms = sw.elapsed().as_millis() as u64;
        let ram = info.ram.as_ref().expect("ram");
        r.postcopy_mib = ram.postcopy_bytes as f64 / f64::from(1 << 20);
        let pc = &done["postcopy"];
        let u = |k: &str| pc[k].as_u64().unwrap_or(0);
        r.full_residency_ms = u("full-residency-ms");
        r.requests = u("requests");
        r.fault_p50_us = u("fault-latency-p50-us");
        r.fault_p99_us = u("fault-latency-p99-us");
        // The guest ran here from the switch's end to the last page: its writes since
        // the source froze, over that time.
        let at_end: u64 = done["page-writes"]
            .as_array()
            .map_or(0, |a| a.iter().filter_map(Value::as_u64).sum());
        let secs = (r.full_residency_ms.max(1)) as f64 / 1000.0;
        r.guest_speed_pct = (at_end.saturating_sub(frozen)) as f64 / secs / undisturbed * 100.0;
    }
    r
}

fn main() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("postcopy bench: skipped, no /dev/kvm");
        return;
    }
    let reps: usize = std::env::var("FERRY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let ws = Workload::WorkingSet { pages: 65536 };
    let scenarios = [
        Scenario {
            name: "working set 65536, postcopy after 1 s",
            workload: ws,
            channels: 1,
            postcopy_after: Some(Duration::from_secs(1)),
        },
        Scenario {
            name: "same, 2 channels",
            workload: ws,
            channels: 2,
            postcopy_after: Some(Duration::from_secs(1)),
        },
        Scenario {
            name: "dense 65536 × 4 KiB, postcopy after 1 s",
            workload: Workload::Dense {
                pages: 65536,
                bytes_per_page: 4096,
            },
            channels: 1,
            postcopy_after: Some(Duration::from_secs(1)),
        },
        Scenario {
            name: "working set 65536, auto-converge (no postcopy)",
            workload: ws,
            channels: 1,
            postcopy_after: None,
        },
    ];
    let mut md = vec![
        "| row | completed | total ms | downtime ms | postcopy ms | full residency ms | requests | fault p50 / p99 µs | guest speed in postcopy | MiB after the switch |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for s in &scenarios {
        let runs: Vec<Run> = (0..reps).map(|_| run_once(s)).collect();
        let ok = runs.iter().filter(|r| r.ok).count();
        let good: Vec<&Run> = runs.iter().filter(|r| r.ok).collect();
        let line = if good.is_empty() {
            format!("| {} | 0/{reps} | | | | | | | | |", s.name)
        } else {
            let m = |f: fn(&Run) -> u64| median(good.iter().map(|r| f(r)).collect());
            let mf = |f: fn(&Run) -> f64| median(good.iter().map(|r| f(r)).collect());
            if s.postcopy_after.is_some() {
                format!(
                    "| {} | {ok}/{reps} | {} | {} | {} | {} | {} | {} / {} | {:.0} % | {:.0} |",
                    s.name,
                    m(|r| r.total_ms),
                    m(|r| r.downtime_ms),
                    m(|r| r.postcopy_ms),
                    m(|r| r.full_residency_ms),
                    m(|r| r.requests),
                    m(|r| r.fault_p50_us),
                    m(|r| r.fault_p99_us),
                    mf(|r| r.guest_speed_pct),
                    mf(|r| r.postcopy_mib),
                )
            } else {
                format!(
                    "| {} | {ok}/{reps} | {} | {} | | | | | | |",
                    s.name,
                    m(|r| r.total_ms),
                    m(|r| r.downtime_ms),
                )
            }
        };
        println!("{line}");
        md.push(line);
    }
    md.push(String::new());
    md.push(format!(
        "Medians of {reps} runs on loopback TCP; source in the bench process, destination a fresh `ferry receive`. postcopy ms: from the status turning postcopy-active to completed. full residency: the destination's time from the guest starting there to its last missing page. fault p50 / p99: upper bounds of the power-of-two buckets of the destination's fault-latency histogram (fault read to page installed). guest speed: the destination guest's page writes per second from the switch to full residency over the source guest's before the migration."
    ));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let r = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("postcopy.md"), md.join("\n") + "\n"));
    if let Err(e) = r {
        eprintln!("writing target/bench/postcopy.md: {e}");
    }
}
