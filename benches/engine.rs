//! The engine's own cost: precopy between two real KVM guests (host threads without
//! /dev/kvm) in this one process, over loopback TCP, with no QMP, no second process
//! and no link in between. Prints a table of medians. What a user gets (separate
//! `ferry vm` processes driven over QMP, over loopback and rate-limited links) is
//! `cargo bench --bench migration`.
//!
//! `cargo bench --bench engine` (set `FERRY_BENCH_REPS` to change the 3 repetitions,
//! `FERRY_BENCH_ONLY=TEXT` to run only the scenarios whose name contains TEXT;
//! `FERRY_BENCH_ONLY=throughput` runs only the dense-page throughput measures and the
//! polling cost, `FERRY_BENCH_ONLY=polling` only the polling cost, over
//! `FERRY_BENCH_POLL_PAIRS` rounds, default the repetitions).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::migration_core::{incoming, Capability, MigrationSource, ParametersUpdate};
use ferry::stats::{Convergence, MigrationInfo, MigrationStatus};
use ferry::GuestVm;
use minivm::{DirtyTracking, VmConfig, Workload};

/// One row of the table.
struct Scenario {
    name: &'static str,
    mem_bytes: u64,
    workload: Workload,
    channels: u8,
    max_bandwidth: u64,
    auto_converge: bool,
    /// Send pages with a few non-zero words as those words (`x-ferry-sparse-pages`).
    /// Off, every page the guest writes travels whole, as in QEMU.
    sparse_pages: bool,
    /// MiB of guest RAM (from 256 MiB up) the host fills with random bytes before the
    /// migration: dense pages that cross the wire whole.
    dense_mib: u64,
    /// The destination faults its RAM in when it is built (`-mem-prealloc`), so
    /// incoming pages cost it no page fault (~2 µs each here).
    dest_prealloc: bool,
}

impl Scenario {
    /// One channel, unlimited bandwidth, sparse pages, nothing else on.
    fn new(name: &'static str, mem_bytes: u64, workload: Workload) -> Scenario {
        Scenario {
            name,
            mem_bytes,
            workload,
            channels: 1,
            max_bandwidth: 0,
            auto_converge: false,
            sparse_pages: true,
            dense_mib: 0,
            dest_prealloc: false,
        }
    }
}

/// What one migration measured.
#[derive(Clone, Default)]
struct Run {
    status: String,
    total_ms: u64,
    downtime_ms: u64,
    setup_ms: u64,
    transferred: u64,
    passes: u64,
    gib_per_s: f64,
    not_converging_ms: Option<u64>,
    query_max_us: u64,
    query_p99_us: u64,
    /// Downtime phases, ms: pause / sync / pages / devices / ack.
    phases: String,
}

fn config(mem_bytes: u64, workload: Workload) -> VmConfig {
    VmConfig {
        mem_bytes,
        vcpus: 2,
        workload,
        ..Default::default()
    }
}

/// How a thread beside the migration wakes up.
#[derive(Clone, Copy, PartialEq)]
enum Poll {
    /// No such thread.
    Off,
    /// Wakes at this rate and calls query-migrate, recording its latency.
    Query(u64),
    /// Wakes at this rate and does nothing (the cost of the wake-ups alone).
    WakeOnly(u64),
}

/// Migrates once, with a polling thread per `poll`. Gives up (cancels) after `limit`.
fn migrate(s: &Scenario, poll: Poll, limit: Duration) -> Run {
    let cfg = config(s.mem_bytes, s.workload);
    let src = Arc::new(GuestVm::boot(cfg.clone(), DirtyTracking::default()).expect("boot"));
    for v in 0..cfg.vcpus {
        src.vm()
            .wait_rounds(v, 2, Duration::from_secs(30))
            .expect("guest runs");
    }
    if s.dense_mib > 0 {
        fill_random(&src, 256 << 20, s.dense_mib << 20);
    }
    let dst_cfg = VmConfig {
        prealloc: s.dest_prealloc,
        ..cfg
    };
    let dst = Arc::new(GuestVm::incoming(dst_cfg, DirtyTracking::default()).expect("incoming"));
    let inc = incoming(dst.clone(), "tcp:127.0.0.1:0", false).expect("listen");
    let source = Arc::new(MigrationSource::new(src.clone()));
    source
        .set_parameters(&ParametersUpdate {
            max_bandwidth: Some(s.max_bandwidth),
            multifd_channels: Some(s.channels),
            x_ferry_sparse_pages: Some(s.sparse_pages),
            ..Default::default()
        })
        .unwrap();
    source
        .set_capability(Capability::Multifd, s.channels > 1)
        .unwrap();
    source
        .set_capability(Capability::AutoConverge, s.auto_converge)
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let poller = match poll {
        Poll::Off => None,
        Poll::Query(hz) | Poll::WakeOnly(hz) => {
            let (source, stop) = (source.clone(), stop.clone());
            Some(std::thread::spawn(move || {
                let period = Duration::from_nanos(1_000_000_000 / hz);
                let mut lat = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    let t = Instant::now();
                    if poll != Poll::WakeOnly(hz) {
                        let info = source.query();
                        lat.push(t.elapsed().as_micros() as u64);
                        std::hint::black_box(info);
                    }
                    std::thread::sleep(period.saturating_sub(t.elapsed()));
                }
                lat
            }))
        }
    };
    let t0 = Instant::now();
    source.migrate(&inc.uri().to_string()).expect("migrate");
    let mut not_converging_ms = None;
    let info: MigrationInfo = loop {
        let info = source.query();
        if info.status.is_finished() {
            break info;
        }
        if not_converging_ms.is_none() {
            if let Some(f) = &info.ferry {
                if matches!(f.convergence, Convergence::NotConverging { .. }) {
                    not_converging_ms = Some(t0.elapsed().as_millis() as u64);
                }
            }
        }
        if t0.elapsed() > limit {
            source.cancel();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    stop.store(true, Ordering::Release);
    let mut lat = poller.map(|p| p.join().unwrap()).unwrap_or_default();
    lat.sort_unstable();
    if info.status == MigrationStatus::Completed {
        inc.wait().expect("destination");
    }
    let ram = info.ram.clone().unwrap_or_default();
    let total_ms = info.total_time.unwrap_or(0);
    Run {
        status: info.status.as_str().to_string(),
        total_ms,
        downtime_ms: info.downtime.unwrap_or(0),
        setup_ms: info.setup_time.unwrap_or(0),
        transferred: ram.transferred,
        passes: info.ferry.as_ref().map_or(0, |f| f.iterations),
        gib_per_s: ram.transferred as f64 / (1u64 << 30) as f64 / (total_ms.max(1) as f64 / 1000.0),
        not_converging_ms,
        query_max_us: lat.last().copied().unwrap_or(0),
        query_p99_us: lat.get(lat.len() * 99 / 100).copied().unwrap_or(0),
        phases: info
            .ferry
            .and_then(|f| f.downtime_phases_us)
            .map_or("-".into(), |p| {
                [p.pause, p.sync, p.pages, p.device, p.ack]
                    .map(|us| format!("{:.1}", us as f64 / 1000.0))
                    .join(" / ")
            }),
    }
}

/// Fills `len` bytes of guest RAM at `gpa` with xorshift noise (incompressible,
/// never zero words), through the host mapping.
fn fill_random(vm: &GuestVm, gpa: u64, len: u64) {
    use vm_memory::{Bytes, GuestAddress};
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = vec![0u8; 1 << 20];
    for off in (0..len).step_by(chunk.len()) {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&(x | 1).to_le_bytes());
        }
        vm.vm()
            .memory()
            .write_slice(&chunk, GuestAddress(gpa + off))
            .expect("fill guest RAM");
    }
}

/// The median of `v` and a distribution-free 95 % interval for it (order
/// statistics: the ranks n/2 ± 0.98·√n). Sorts `v`.
fn median_with_interval(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let k = ((n as f64 - 1.96 * (n as f64).sqrt()) / 2.0)
        .floor()
        .max(0.0) as usize;
    (v[n / 2], v[k.min(n - 1)], v[(n - 1).saturating_sub(k)])
}

fn median_by<F: Fn(&Run) -> u64>(runs: &[Run], f: F) -> Run {
    let mut v: Vec<Run> = runs.to_vec();
    v.sort_by_key(|r| f(r));
    v[v.len() / 2].clone()
}

/// A raw loopback TCP copy of `bytes` of random data, read from memory and written
/// into prefaulted memory (or fresh, `into_fresh`) with 1 MiB writes and reads: the
/// ceiling for the stream into a destination of the same kind.
/// Like the migration it reads a buffer far larger than the caches; the copy it is
/// compared with reads guest RAM the same way.
fn raw_tcp_gib_per_s(bytes: u64, into_fresh: bool) -> f64 {
    let len = bytes as usize;
    let mut src = vec![1u8; len];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for w in src.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        // Faulted in before the clock starts, as a preallocated destination is; or
        // fresh (calloc maps it untouched), as a destination that did not preallocate.
        let mut dst = if into_fresh {
            vec![0u8; len]
        } else {
            vec![1u8; len]
        };
        ready_tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut n = 0usize;
        while n < len {
            let end = (n + (1 << 20)).min(len);
            match c.read(&mut dst[n..end]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        std::hint::black_box(&dst);
    });
    ready_rx.recv().unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    let t = Instant::now();
    for chunk in src.chunks(1 << 20) {
        c.write_all(chunk).unwrap();
    }
    drop(c);
    reader.join().unwrap();
    bytes as f64 / (1u64 << 30) as f64 / t.elapsed().as_secs_f64()
}

/// Prints a line and keeps it for the markdown file.
macro_rules! emit {
    ($md:ident, $($arg:tt)*) => {{
        let line = format!($($arg)*);
        println!("{line}");
        $md.push(line);
    }};
}

fn main() {
    // Everything printed also goes to target/bench/engine.md, for README (scripts/numbers).
    let mut md: Vec<String> = vec![
        "`cargo bench --bench engine`: the engine's own cost, destination in the same process, \
         loopback TCP, unlimited bandwidth unless the row says, medians."
            .to_string(),
        String::new(),
    ];
    let reps: usize = std::env::var("FERRY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let gib = 1u64 << 30;
    let ws = |pages| Workload::WorkingSet { pages };
    let scenarios = [
        Scenario::new("idle 4 GiB", 4 * gib, Workload::Idle),
        Scenario::new("1 GiB, ws 4096", gib, ws(4096)),
        Scenario::new("1 GiB, ws 65536, 1 ch", gib, ws(65536)),
        Scenario {
            channels: 2,
            ..Scenario::new("1 GiB, ws 65536, 2 ch", gib, ws(65536))
        },
        Scenario {
            max_bandwidth: 128 << 20,
            sparse_pages: false,
            ..Scenario::new("1 GiB, ws 65536, 128 MiB/s, whole pages", gib, ws(65536))
        },
        Scenario {
            max_bandwidth: 128 << 20,
            sparse_pages: false,
            auto_converge: true,
            ..Scenario::new(
                "1 GiB, ws 65536, 128 MiB/s, whole pages, auto-converge",
                gib,
                ws(65536),
            )
        },
        Scenario {
            sparse_pages: false,
            ..Scenario::new("1 GiB, ws 65536, 1 ch, whole pages", gib, ws(65536))
        },
        Scenario {
            dense_mib: 512,
            ..Scenario::new("1 GiB idle, 512 MiB random data, 1 ch", gib, Workload::Idle)
        },
        Scenario {
            dense_mib: 512,
            dest_prealloc: true,
            ..Scenario::new("same, destination preallocated", gib, Workload::Idle)
        },
        Scenario {
            dense_mib: 512,
            dest_prealloc: true,
            channels: 2,
            ..Scenario::new("same, destination preallocated, 2 ch", gib, Workload::Idle)
        },
        Scenario {
            max_bandwidth: 128 << 20,
            sparse_pages: false,
            auto_converge: true,
            ..Scenario::new(
                "1 GiB, random, 128 MiB/s, whole pages, auto-converge",
                gib,
                Workload::Random {
                    seed: 7,
                    hot_percent: 0,
                },
            )
        },
    ];
    emit!(md, "| scenario | status | total ms | downtime ms | setup ms | transferred MiB | passes | GiB/s | 'not converging' at ms | downtime: pause / sync / pages / devices / ack ms |");
    emit!(md, "|---|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("FERRY_BENCH_ONLY").unwrap_or_default();
    for s in scenarios.iter().filter(|s| s.name.contains(only.as_str())) {
        let limit = if s.max_bandwidth > 0 && !s.auto_converge {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(60)
        };
        let runs: Vec<Run> = (0..reps).map(|_| migrate(s, Poll::Off, limit)).collect();
        let m = median_by(&runs, |r| r.total_ms);
        let d = median_by(&runs, |r| r.downtime_ms);
        emit!(
            md,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {:.2} | {} | {} |",
            s.name,
            m.status,
            m.total_ms,
            d.downtime_ms,
            m.setup_ms,
            m.transferred as f64 / (1 << 20) as f64,
            m.passes,
            m.gib_per_s,
            m.not_converging_ms
                .map_or("-".to_string(), |v| v.to_string()),
            d.phases,
        );
    }
    if !only.is_empty() && only != "throughput" && only != "polling" {
        write_md(&md);
        return;
    }
    // Throughput of dense pages beside a raw socket copy, and the cost of polling.
    emit!(md, "");
    emit!(md, "| measure | value |");
    emit!(md, "|---|---|");
    let dense: Vec<&Scenario> = scenarios.iter().filter(|s| s.dense_mib > 0).collect();
    // Paired: each repetition runs the raw copy right before the migration, and the
    // ratio is taken per pair (the machine's speed drifts more than the two differ).
    for s in dense.iter().filter(|_| only != "polling") {
        let (mut runs, mut raws, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let raw = raw_tcp_gib_per_s(s.dense_mib << 20, !s.dest_prealloc);
            let run = migrate(s, Poll::Off, Duration::from_secs(60));
            ratios.push(run.gib_per_s / raw);
            raws.push(raw);
            runs.push(run);
        }
        let mid = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let q = median_by(&runs, |r| (r.gib_per_s * 1000.0) as u64);
        emit!(md,
            "| migration '{}' beside a raw TCP copy of the same bytes (memory to {} memory) | {:.2} GiB/s beside {:.2} GiB/s: {:.0} % of raw |",
            s.name,
            if s.dest_prealloc { "faulted" } else { "fresh" },
            q.gib_per_s,
            mid(raws),
            mid(ratios) * 100.0
        );
    }
    // Polling cost, paired the same way: each round runs the migration unpolled,
    // polled and with a thread that only wakes, in an order that rotates, so the
    // machine's drift falls on all three alike. One pair can differ by 15 % here
    // from noise alone, so the cost is given with a 95 % interval for its median.
    let heavy = dense[1];
    let pairs: usize = std::env::var("FERRY_BENCH_POLL_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(reps);
    let modes = [Poll::Off, Poll::Query(10_000), Poll::WakeOnly(10_000)];
    let mut ratios = [Vec::new(), Vec::new()];
    let mut polled = Vec::new();
    for round in 0..pairs {
        let mut gib_per_s = [0.0; 3];
        for k in 0..modes.len() {
            let m = (round + k) % modes.len();
            let run = migrate(heavy, modes[m], Duration::from_secs(60));
            gib_per_s[m] = run.gib_per_s;
            if m == 1 {
                polled.push(run);
            }
        }
        ratios[0].push(gib_per_s[1] / gib_per_s[0]);
        ratios[1].push(gib_per_s[2] / gib_per_s[0]);
    }
    let [query, wake] = &mut ratios;
    for (what, r) in [
        ("query-migrate polled at 10 kHz", query),
        (
            "a thread waking at 10 kHz that does not query (the wake-ups' own cost)",
            wake,
        ),
    ] {
        let (median, low, high) = median_with_interval(r);
        emit!(md,
            "| '{}', {what}: throughput cost, median of {pairs} rounds [95 % interval] | {:+.1} % [{:+.1}, {:+.1}] |",
            heavy.name,
            (1.0 - median) * 100.0,
            (1.0 - high) * 100.0,
            (1.0 - low) * 100.0,
        );
    }
    let p = median_by(&polled, |r| r.query_max_us);
    emit!(
        md,
        "| query-migrate latency during it (in-process) | p99 {} µs, max {} µs |",
        p.query_p99_us,
        p.query_max_us
    );
    write_md(&md);
}

/// Writes the table to target/bench/engine.md.
fn write_md(md: &[String]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let r = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("engine.md"), md.join("\n") + "\n"));
    if let Err(e) = r {
        eprintln!("writing target/bench/engine.md: {e}");
    }
}
