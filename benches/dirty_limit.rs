//! Dirty limit (issue #17) against auto-converge, and the limiter alone.
//!
//! 1. Migration: a 1 GiB, 2-vCPU guest with a dirty ring (4096 entries) running
//!    `lopsided=65536` (vCPU 0 rewrites 256 MiB, vCPU 1 only counts), every page sent
//!    whole, `max-bandwidth` 128 MiB/s, 1 channel, loopback TCP to a fresh
//!    `ferry receive --verify`; auto-converge against dirty-limit at 1 MiB/s with
//!    periods of 1000 and 250 ms. A fresh guest and destination each run.
//! 2. The limiter without a migration: a guest writing random pages, vCPU 0 limited to
//!    L MiB/s for L in 1, 10, 100, 1000; its rate by the guest's own counters and by
//!    `query-vcpu-dirty-limit`, the other vCPU's speed, and the limiter thread's CPU.
//!
//! Prints both tables and writes them to target/bench/dirty_limit.md (scripts/numbers).
//!
//! `cargo bench --bench dirty_limit [-- migration|limiter]` (`FERRY_BENCH_REPS`,
//! default 3; `FERRY_BENCH_TRACE=1` prints vCPU 1's speed per 100 ms of each migration).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{median, Dest};
use ferry::dirty_sync::kvm::KvmRingConfig;
use ferry::migration_core::{
    ram_digest, Capability, DirtyLimiter, GuestRam, MigrationSource, ParametersUpdate,
};
use ferry::stats::MigrationStatus;
use ferry::GuestVm;
use minivm::{DirtyTracking, VmConfig, Workload};

const RING_ENTRIES: u32 = 4096;
const PAGE_BYTES: f64 = 4096.0;
const MIB: f64 = (1u64 << 20) as f64;
/// The window of vCPU 1's slowest stretch in a migration.
const WORST_WINDOW: Duration = Duration::from_millis(500);
/// A limit no vCPU of the bench's guest reaches, MiB/s: puts the limiter in service
/// (the dirty log on) without slowing anyone.
const UNREACHED_MIB_S: u64 = 100_000;

fn boot(mem_bytes: u64, workload: Workload) -> Arc<GuestVm> {
    let cfg = VmConfig {
        mem_bytes,
        vcpus: 2,
        workload,
        dirty_ring_entries: RING_ENTRIES,
        ..Default::default()
    };
    let tracking = DirtyTracking::Ring(KvmRingConfig {
        entries: RING_ENTRIES,
        ..Default::default()
    });
    let guest = Arc::new(GuestVm::boot(cfg, tracking).expect("boot"));
    {
        let vm = guest.vm();
        for v in 0..2 {
            vm.wait_rounds(v, 2, Duration::from_secs(30))
                .expect("guest runs");
        }
    }
    guest
}

// ---- Table 1: migration ----

/// One row of table 1.
struct Scenario {
    name: &'static str,
    /// `None`: auto-converge; else dirty-limit at this period, ms (1 MiB/s).
    dirty_limit_period_ms: Option<u64>,
    /// vCPU 1 alone on CPU 1, everything else (vCPU 0, the sender, the destination
    /// process) on CPU 0, as libvirt's `vcpupin` / `emulatorpin` place a guest whose
    /// vCPU has a core of its own. Otherwise every thread may run on every CPU.
    own_core: bool,
}

/// What one migration measured.
#[derive(Clone, Default)]
struct Run {
    ok: bool,
    total_ms: u64,
    downtime_ms: u64,
    /// vCPU 1's counter rounds per second from migrate() to completion, as % of the
    /// second before.
    vcpu1_speed_pct: f64,
    /// vCPU 0's page writes from migrate() to completion.
    vcpu0_writes: u64,
    /// vCPU 1's throttle sleep during the migration, ms.
    vcpu1_slept_ms: f64,
    /// vCPU 1's speed over its slowest half second of the migration, % of before.
    vcpu1_worst_pct: f64,
    /// The share of the migration vCPU 1's thread was ready to run but waited for a
    /// CPU (the scheduler's run delay), %.
    vcpu1_waited_pct: f64,
}

fn migrate_once(s: &Scenario) -> Run {
    let workload = Workload::Lopsided { pages: 65536 };
    // Threads and processes started from here on inherit this thread's CPUs.
    if s.own_core {
        set_affinity(0, &[0]);
    }
    let guest = boot(1 << 30, workload);
    if s.own_core {
        set_affinity(thread_id("minivm-vcpu1").expect("vCPU 1's thread"), &[1]);
    }
    let cfg = guest.vm().config().clone();
    let (mut dest, uri) = Dest::spawn(&cfg, true);
    let r = migrate_guest(s, &guest, &mut dest, &uri);
    set_affinity(0, &all_cpus());
    r
}

fn migrate_guest(s: &Scenario, guest: &Arc<GuestVm>, dest: &mut Dest, uri: &str) -> Run {
    let source = MigrationSource::new(guest.clone());
    source
        .set_parameters(&ParametersUpdate {
            max_bandwidth: Some(128 << 20),
            multifd_channels: Some(1),
            x_ferry_sparse_pages: Some(false),
            vcpu_dirty_limit: Some(1),
            x_vcpu_dirty_limit_period: s.dirty_limit_period_ms,
            ..Default::default()
        })
        .expect("parameters");
    match s.dirty_limit_period_ms {
        Some(_) => source.set_capability(Capability::DirtyLimit, true),
        None => source.set_capability(Capability::AutoConverge, true),
    }
    .expect("capability");
    // vCPU 1's undisturbed speed, over the second before.
    let (c0, t_before) = (guest.vm().counter(1), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let c1 = guest.vm().counter(1);
    let before_per_s = (c1 - c0) as f64 / t_before.elapsed().as_secs_f64();
    let writes0 = guest.vcpu_page_writes()[0];
    let slept0 = guest.vm().vcpu_throttled_us()[1];
    let waited0 = thread_run_delay_ns("minivm-vcpu1");
    let t0 = Instant::now();
    source.migrate(uri).expect("migrate");
    let limit = Duration::from_secs(120);
    // vCPU 1's counter every 100 ms, for its slowest half second.
    // With the trace on, also its run delay and whether a throttle holds vCPU 0.
    let trace = std::env::var_os("FERRY_BENCH_TRACE").is_some();
    let throttled = || {
        source.dirty_limiter().in_service()
            || source.query().cpu_throttle_percentage.unwrap_or(0) > 0
    };
    let mut samples = vec![(Instant::now(), guest.vm().counter(1))];
    let mut waits = vec![(thread_run_delay_ns("minivm-vcpu1"), false)];
    while !source.query().status.is_finished() && t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(5));
        if samples
            .last()
            .is_some_and(|(t, _)| t.elapsed() >= Duration::from_millis(100))
        {
            samples.push((Instant::now(), guest.vm().counter(1)));
            if trace {
                waits.push((thread_run_delay_ns("minivm-vcpu1"), throttled()));
            }
        }
    }
    let worst_per_s = samples
        .iter()
        .enumerate()
        .filter_map(|(i, &(t, c))| {
            let &(t2, c2) = samples[i..]
                .iter()
                .find(|(t2, _)| *t2 - t >= WORST_WINDOW)?;
            Some((c2 - c) as f64 / (t2 - t).as_secs_f64())
        })
        .fold(f64::INFINITY, f64::min);
    if trace {
        // Per 100 ms: speed % / share of the time it waited for a CPU %, `*` where a
        // throttle held vCPU 0 at the sample's end.
        let rates: Vec<String> = samples
            .windows(2)
            .zip(waits.windows(2))
            .map(|(w, d)| {
                let dt = (w[1].0 - w[0].0).as_secs_f64();
                let r = (w[1].1 - w[0].1) as f64 / dt;
                let waited = d[1].0.saturating_sub(d[0].0) as f64 / 1e9 / dt;
                format!(
                    "{:.0}/{:.0}{}",
                    r / before_per_s.max(1e-9) * 100.0,
                    waited * 100.0,
                    if d[1].1 { "*" } else { "" }
                )
            })
            .collect();
        eprintln!(
            "{}: vCPU 1 per 100 ms, speed %/waited for a CPU %: {}",
            s.name,
            rates.join(" ")
        );
    }
    if !source.query().status.is_finished() {
        source.cancel();
    }
    let status = source.wait();
    let secs = t0.elapsed().as_secs_f64();
    let waited_ns = thread_run_delay_ns("minivm-vcpu1").saturating_sub(waited0);
    let info = source.query();
    let c2 = guest.vm().counter(1);
    let mut r = Run {
        ok: status == MigrationStatus::Completed,
        total_ms: info.total_time.unwrap_or(0),
        downtime_ms: info.downtime.unwrap_or(0),
        vcpu1_speed_pct: (c2 - c1) as f64 / secs / before_per_s.max(1e-9) * 100.0,
        vcpu1_worst_pct: if worst_per_s.is_finite() {
            worst_per_s / before_per_s.max(1e-9) * 100.0
        } else {
            f64::NAN
        },
        vcpu0_writes: guest.vcpu_page_writes()[0] - writes0,
        vcpu1_slept_ms: (guest.vm().vcpu_throttled_us()[1] - slept0) as f64 / 1000.0,
        vcpu1_waited_pct: waited_ns as f64 / 1e9 / secs * 100.0,
    };
    if !r.ok {
        eprintln!("{}: {status:?} {:?}", s.name, info.error_desc);
        return r;
    }
    let digest = ram_digest(&GuestRam::new(guest.clone()));
    match dest.next() {
        Some(done) if done["event"] == "completed" => {
            if done["ram-digest"].as_u64() != Some(digest) {
                eprintln!(
                    "{}: the destination's RAM differs: {done} (source {digest})",
                    s.name
                );
                r.ok = false;
            }
        }
        other => {
            eprintln!("{}: the destination did not complete: {other:?}", s.name);
            r.ok = false;
        }
    }
    if s.dirty_limit_period_ms.is_some() && source.dirty_limiter().in_service() {
        eprintln!("{}: the migration's end left the limit on", s.name);
    }
    r
}

fn migration_table(reps: usize) -> Vec<String> {
    let rows = [
        ("auto-converge", None),
        ("dirty-limit 1 MiB/s, period 1000 ms", Some(1000)),
        ("dirty-limit 1 MiB/s, period 250 ms", Some(250)),
    ];
    // vCPU 1 on its own core needs two CPUs this process may use.
    let own_core_rows = if all_cpus().len() >= 2 && all_cpus()[..2] == [0, 1] {
        vec![false, true]
    } else {
        eprintln!("dirty_limit bench: CPUs 0 and 1 not both usable, no own-core rows");
        vec![false]
    };
    let scenarios: Vec<Scenario> = own_core_rows
        .iter()
        .flat_map(|&own_core| {
            rows.iter().map(move |&(name, period)| Scenario {
                name,
                dirty_limit_period_ms: period,
                own_core,
            })
        })
        .collect();
    let mut md = vec![
        "| row | cores | completed | total ms | downtime ms | vCPU 1 speed in migration | slowest 0.5 s | vCPU 1 waited for a CPU | vCPU 0 page writes in migration | vCPU 1 throttle sleep ms |".to_string(),
        "|---|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    for s in &scenarios {
        let runs: Vec<Run> = (0..reps).map(|_| migrate_once(s)).collect();
        let ok = runs.iter().filter(|r| r.ok).count();
        let good: Vec<&Run> = runs.iter().filter(|r| r.ok).collect();
        let cores = if s.own_core {
            "vCPU 1 on its own"
        } else {
            "all shared"
        };
        let line = if good.is_empty() {
            format!("| {} | {cores} | 0/{reps} | | | | | | | |", s.name)
        } else {
            let m = |f: fn(&Run) -> u64| median(good.iter().map(|r| f(r)).collect());
            let mf = |f: fn(&Run) -> f64| median(good.iter().map(|r| f(r)).collect());
            format!(
                "| {} | {cores} | {ok}/{reps} | {} | {} | {:.0} % | {:.0} % | {:.0} % | {} ({:.0}/s) | {:.0} |",
                s.name,
                m(|r| r.total_ms),
                m(|r| r.downtime_ms),
                mf(|r| r.vcpu1_speed_pct),
                mf(|r| r.vcpu1_worst_pct),
                mf(|r| r.vcpu1_waited_pct),
                m(|r| r.vcpu0_writes),
                mf(|r| r.vcpu0_writes as f64 / (r.total_ms.max(1) as f64 / 1000.0)),
                mf(|r| r.vcpu1_slept_ms),
            )
        };
        println!("{line}");
        md.push(line);
    }
    md.push(String::new());
    md.push(format!(
        "Medians of {reps} runs (of those completed and verified), a fresh guest and destination each. \
         1 GiB, 2 vCPUs, dirty ring 4096 entries, `lopsided=65536`: vCPU 0 rewrites 256 MiB, vCPU 1 \
         only counts. Pages sent whole, max-bandwidth 128 MiB/s, 1 channel, loopback TCP to \
         `ferry receive --verify` (its RAM digest must equal the source's). vCPU 1 speed: its counter \
         rounds per second from migrate() to completion over the second before (on 2 cores, over \
         100 % when a throttled vCPU 0 leaves its core to vCPU 1); slowest 0.5 s: the same over \
         its slowest half second (counter sampled every 100 ms). vCPU 1 waited for a CPU: the \
         share of the migration its thread was ready to run but not running (schedstat run \
         delay). Cores: *all shared*: the guest's 2 vCPUs, the sender and the destination \
         process share this machine's 2 cores, so before the trigger vCPU 1 gives up to a fifth \
         of its time to the migration (its speed and its wait add up to about 100 % per 100 ms; \
         `FERRY_BENCH_TRACE=1` prints both); *vCPU 1 on its own*: vCPU 1 pinned to CPU 1 and \
         every other thread, the destination's too, to CPU 0 (libvirt's vcpupin and emulatorpin \
         for a vCPU with a dedicated core), which leaves only the throttle to slow it. vCPU 0 page writes: \
         the work the guest got done during the migration (in all, and per second of it). vCPU 1 throttle sleep: time it was held \
         asleep (auto-converge throttles every vCPU; dirty-limit only the one that dirties)."
    ));
    md
}

/// Every CPU this process may run on (as it started: pinning narrows what the
/// calling thread would see later).
fn all_cpus() -> Vec<usize> {
    static CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    CPUS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| (0..n.get()).collect())
            .unwrap_or_else(|_| vec![0])
    })
    .clone()
}

/// Restricts thread `tid` (0: the calling thread) to `cpus`.
fn set_affinity(tid: u64, cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: CPU_SET writes bit `c` of the set it is given; c is below
        // available_parallelism, far under CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: passes a valid, initialised cpu_set_t and its size; sched_setaffinity
    // only reads it.
    let rc =
        unsafe { libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &set) };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity({tid}, {cpus:?}): {}",
        std::io::Error::last_os_error()
    );
}

/// The thread id of the first thread named `comm` in this process.
fn thread_id(comm: &str) -> Option<u64> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .find_map(|e| {
            let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (name.trim_end() == comm).then(|| e.file_name().to_string_lossy().parse().ok())?
        })
}

// ---- Table 2: the limiter alone ----

/// CPU time of the threads named `comm` in this process, by thread id, in ns: the
/// scheduler's run time (/proc/self/task/*/schedstat, ns resolution) where the kernel
/// keeps it, else utime + stime of /proc/self/task/*/stat (clock ticks, 10 ms).
fn thread_cpu_ns(comm: &str) -> HashMap<u64, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] != comm {
            continue;
        }
        let tid = e.file_name().to_string_lossy().parse().unwrap_or(0);
        let sched = std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
        let ns = sched.unwrap_or_else(|| {
            // Fields after the comm start at field 3 (state); utime is 14, stime 15.
            let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ((tick(11) + tick(12)) as f64 / clock_ticks_per_s() * 1e9) as u64
        });
        out.insert(tid, ns);
    }
    out
}

/// The scheduler's run delay (ns spent ready to run, waiting for a CPU) of the first
/// thread named `comm` in this process; 0 where the kernel keeps no schedstat.
fn thread_run_delay_ns(comm: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for e in dir.flatten() {
        let Ok(name) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        if name.trim_end() != comm {
            continue;
        }
        return std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
    }
    0
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf reads a configuration value; no memory is passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Per vCPU: pages written per second over `window`, in MiB/s.
fn write_rates(guest: &GuestVm, window: Duration) -> Vec<f64> {
    let before = guest.vcpu_page_writes();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let after = guest.vcpu_page_writes();
    let secs = t0.elapsed().as_secs_f64();
    before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 * PAGE_BYTES / MIB / secs)
        .collect()
}

fn limiter_table() -> Vec<String> {
    const PERIOD_MS: u64 = 1000;
    let window = Duration::from_secs(10);
    let guest = boot(
        1 << 30,
        Workload::Random {
            seed: 17,
            hot_percent: 0,
        },
    );
    let limiter = DirtyLimiter::new(guest.clone());
    limiter.set_period_ms(PERIOD_MS).expect("period");
    let mut md = vec![
        "| limit MiB/s | vCPU 0 free MiB/s | measured MiB/s (guest counters) | error | query-vcpu-dirty-limit MiB/s | vCPU 1 speed | limiter thread CPU | back over 2 L after cancel |".to_string(),
        "|---|---|---|---|---|---|---|---|".to_string(),
    ];
    let mut skipped = Vec::new();
    // Both vCPUs running freely, measured once, before any limit: without the dirty
    // log, and then with it on (the limiter in service with a limit no vCPU reaches),
    // which is what every row's vCPU 1 is compared with.
    let free = write_rates(&guest, Duration::from_secs(2));
    limiter.set(Some(1), UNREACHED_MIB_S).expect("set");
    std::thread::sleep(Duration::from_millis(2 * PERIOD_MS));
    let logged = write_rates(&guest, Duration::from_secs(3));
    println!(
        "free rates without the dirty log {:.0} / {:.0} MiB/s, with it {:.0} / {:.0} MiB/s",
        free[0], free[1], logged[0], logged[1]
    );
    for limit in [1u64, 10, 100, 1000] {
        let l = limit as f64;
        if logged[0] < 2.0 * l {
            let line = format!(
                "| {limit} | {:.0} | skipped: free rate under 2 L | | | | | |",
                logged[0]
            );
            println!("{line}");
            md.push(line);
            skipped.push(limit);
            continue;
        }
        limiter.set(Some(0), limit).expect("set");
        std::thread::sleep(Duration::from_millis(3 * PERIOD_MS));
        let ticks0 = thread_cpu_ns("mig/dirtylimit");
        let before = guest.vcpu_page_writes();
        let t0 = Instant::now();
        // query()'s current rate: the last period's; sampled once a period.
        let mut queried = Vec::new();
        while t0.elapsed() < window {
            std::thread::sleep(Duration::from_millis(PERIOD_MS));
            if let Some(q) = limiter.query().iter().find(|q| q.cpu_index == 0) {
                queried.push(q.current_rate as f64);
            }
        }
        let after = guest.vcpu_page_writes();
        let secs = t0.elapsed().as_secs_f64();
        let ticks1 = thread_cpu_ns("mig/dirtylimit");
        let cpu_ns: u64 = ticks1
            .iter()
            .map(|(tid, t)| t - ticks0.get(tid).copied().unwrap_or(0))
            .sum();
        let rate = |v: usize| (after[v] - before[v]) as f64 * PAGE_BYTES / MIB / secs;
        let (held, other) = (rate(0), rate(1));
        let q_mean = if queried.is_empty() {
            0.0
        } else {
            queried.iter().sum::<f64>() / queried.len() as f64
        };
        let slept1 = guest.vm().vcpu_throttled_us()[1];
        if slept1 != 0 {
            eprintln!("limit {limit}: vCPU 1 slept {slept1} µs without a limit");
        }
        // Cancel: how long until vCPU 0 writes faster than 2 L again (100 ms windows);
        // waited for up to 15 s so the next row starts from full speed.
        limiter.cancel(Some(0)).expect("cancel");
        let tc = Instant::now();
        let mut back_ms = None;
        while tc.elapsed() < Duration::from_secs(15) {
            let r = write_rates(&guest, Duration::from_millis(100));
            if r[0] > 2.0 * l {
                back_ms = Some(tc.elapsed().as_millis());
                break;
            }
        }
        let back = match back_ms {
            Some(ms) if ms <= u128::from(2 * PERIOD_MS) => format!("{ms} ms"),
            Some(ms) => format!("{ms} ms (over 2 periods)"),
            None => "not within 15 s".to_string(),
        };
        let line = format!(
            "| {limit} | {:.0} | {held:.2} | {:+.1} % | {q_mean:.1} | {:.0} % | {:.2} % | {back} |",
            logged[0],
            (held - l) / l * 100.0,
            other / logged[1].max(1e-9) * 100.0,
            cpu_ns as f64 / 1e9 / secs * 100.0,
        );
        println!("{line}");
        md.push(line);
    }
    md.push(String::new());
    let skipped = if skipped.is_empty() {
        String::new()
    } else {
        format!(
            " Skipped: {} MiB/s, where vCPU 0 running freely dirties less than twice the limit \
             (nothing to hold it to).",
            skipped
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    md.push(format!(
        "No migration: 1 GiB, 2 vCPUs writing random pages (`random`, no hot set; each vCPU's 512 MiB \
         share, so nearly every write dirties a fresh page), dirty ring 4096 entries. vCPU 0 limited \
         with `set-vcpu-dirty-limit` at period {PERIOD_MS} ms, 3 periods to settle, then measured over \
         {} s: its rate from the guest's own page-write counters (pages × 4 KiB / s) and the mean of \
         `query-vcpu-dirty-limit`'s current-rate sampled once a period. free: vCPU 0's rate over 3 s \
         before the first limit, the dirty log on (the limiter in service, vCPU 1 limited to \
         {UNREACHED_MIB_S} MiB/s, which it never reaches; without the log: {:.0} MiB/s). vCPU 1 \
         speed: its page-write rate over the window as % of its rate in those 3 s (on 2 cores, over \
         100 % when the throttled vCPU 0 leaves its core to it; without the dirty log it wrote \
         {:.0} MiB/s, with it {:.0}). \
         limiter thread CPU: `mig/dirtylimit`'s CPU time over the window \
         (/proc/self/task/*/schedstat), % of one CPU. After cancel: until vCPU 0's rate over \
         100 ms exceeds twice the limit.{skipped}",
        window.as_secs(),
        free[0],
        free[1],
        logged[1],
    ));
    md
}

fn main() {
    all_cpus();
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("dirty_limit bench: skipped, no /dev/kvm");
        return;
    }
    let reps: usize = std::env::var("FERRY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    // `cargo bench --bench dirty_limit -- limiter` (or `migration`): one table only.
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |t: &str| only.as_deref().is_none_or(|o| o == t);
    let mut md = Vec::new();
    if want("migration") {
        md.push("**Migration, dirty-limit vs auto-converge, same guest and link**".to_string());
        md.push(String::new());
        md.extend(migration_table(reps));
        md.push(String::new());
    }
    if want("limiter") {
        md.push("**Limiter accuracy and cost** (no migration)".to_string());
        md.push(String::new());
        md.extend(limiter_table());
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let r = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("dirty_limit.md"), md.join("\n") + "\n"));
    if let Err(e) = r {
        eprintln!("writing target/bench/dirty_limit.md: {e}");
    }
}
