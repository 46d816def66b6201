//! calc-dirty-rate accuracy benchmark: workload × mode → estimate, truth, error %,
//! measurement cost (host CPU ms of the measuring thread) and guest slowdown % (guest
//! rounds/s during the measurement against the mean of an unmeasured window before and
//! after it; working sets only, sweeps and idle are paced).
//!
//! `cargo bench -p ferry --bench dirty_rate_accuracy` (FERRY_BENCH_REPEATS=N windows
//! per cell, default 3; FERRY_BENCH_WINDOW_MS, default 1000). Each cell boots a 1 GiB,
//! 2-vCPU minivm, measures the guest's speed over one window without measuring, then
//! runs calc-dirty-rate windows. Truth: a working set W dirties W + 2 counter pages in
//! every window of ≥ 1 round, and so does dense; a sweep's truth is its own page
//! counter over the window; zipf's is the unique pages of the writes in the window,
//! replayed from the guest's seed between the counters at the window's ends.
//!
//! Then (KVM only) the guest's speed right after a dirty-bitmap or dirty-ring
//! measurement returns, working set 65536: the guest's counters sampled every 5 ms from
//! 500 ms before the request to 2 s after the reply, its speed per bin
//! (FERRY_BENCH_STALL_BIN_MS, default 10) relative to the 500 ms before, the time until
//! it is back at ≥ 80 % and the guest time lost (FERRY_BENCH_STALL_REPEATS runs, default
//! 3; FERRY_BENCH_STALL_ONLY=1 runs only this section).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dirty_sync::kvm::KvmRingConfig;
use ferry::migration_core::{DirtyRateArgs, DirtyRateJob, DirtyRateMode};
use ferry::GuestVm;
use minivm::{Backend, DirtyTracking, VmConfig, Workload};

const GIB: u64 = 1 << 30;
const VCPUS: u32 = 2;

/// One way of measuring.
#[derive(Clone, Copy)]
struct Method {
    name: &'static str,
    mode: DirtyRateMode,
    ring_entries: u32,
    sample_pages: Option<i64>,
}

impl Method {
    /// calc-dirty-rate's arguments for a window of `window_ms`.
    fn args(&self, window_ms: u64) -> DirtyRateArgs {
        DirtyRateArgs {
            sample_pages: self.sample_pages,
            ..DirtyRateArgs::millis(window_ms as i64, self.mode)
        }
    }
}

const METHODS: [Method; 5] = [
    Method {
        name: "dirty-bitmap",
        mode: DirtyRateMode::DirtyBitmap,
        ring_entries: 0,
        sample_pages: None,
    },
    Method {
        name: "dirty-ring 65536",
        mode: DirtyRateMode::DirtyRing,
        ring_entries: 65536,
        sample_pages: None,
    },
    Method {
        name: "dirty-ring 4096",
        mode: DirtyRateMode::DirtyRing,
        ring_entries: 4096,
        sample_pages: None,
    },
    Method {
        name: "sampling 512",
        mode: DirtyRateMode::PageSampling,
        ring_entries: 0,
        sample_pages: Some(512),
    },
    Method {
        name: "sampling 16384",
        mode: DirtyRateMode::PageSampling,
        ring_entries: 0,
        sample_pages: Some(16384),
    },
];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn boot(workload: Workload, ring_entries: u32) -> Result<Arc<GuestVm>, String> {
    let cfg = VmConfig {
        mem_bytes: GIB,
        vcpus: VCPUS,
        workload,
        backend: Backend::Auto,
        dirty_ring_entries: ring_entries,
        ..Default::default()
    };
    let tracking = if ring_entries == 0 {
        DirtyTracking::default()
    } else {
        DirtyTracking::Ring(KvmRingConfig {
            entries: ring_entries,
            ..Default::default()
        })
    };
    let guest = GuestVm::boot(cfg, tracking).map_err(|e| e.to_string())?;
    {
        let vm = guest.vm();
        for v in 0..VCPUS {
            vm.wait_rounds(v, 2, Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(Arc::new(guest))
}

fn total(c: &[u64]) -> u64 {
    c.iter().sum()
}

/// (unix µs, every vCPU's counter) samples.
type Samples = Vec<(u64, Vec<u64>)>;

/// Records (time, the guest's counters) every millisecond until dropped, so a paced
/// workload's truth can be read at the job's own window boundaries.
struct CounterLog {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<Samples>>,
}

impl CounterLog {
    fn start(guest: &Arc<GuestVm>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (Arc::clone(guest), Arc::clone(&stop));
        let handle = std::thread::spawn(move || {
            let mut v = Vec::new();
            while !s.load(Ordering::Relaxed) {
                v.push((unix_us(), g.counters()));
                std::thread::sleep(Duration::from_millis(1));
            }
            v
        });
        CounterLog {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

/// Now on the host wall clock, µs since the Unix epoch (the job's window timestamps).
fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Each vCPU's counter at `t_us`, interpolated between the records around it.
fn counters_at(log: &[(u64, Vec<u64>)], t_us: u64) -> Vec<f64> {
    let i = log.partition_point(|(at, _)| *at <= t_us);
    let f = |c: &[u64]| c.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    match (i.checked_sub(1).and_then(|j| log.get(j)), log.get(i)) {
        (Some((ta, a)), Some((tb, b))) if tb > ta => {
            let w = t_us.saturating_sub(*ta) as f64 / (tb - ta) as f64;
            a.iter()
                .zip(b)
                .map(|(&x, &y)| x as f64 + (y as f64 - x as f64) * w)
                .collect()
        }
        (Some((_, a)), _) => f(a),
        (None, Some((_, b))) => f(b),
        (None, None) => vec![0.0; VCPUS as usize],
    }
}

/// Unique pages the zipf guest's writes `(from[v], to[v]]` of each vCPU touched,
/// replayed from its seed (minivm's ground truth).
fn zipf_unique_pages(pages: u64, from: &[f64], to: &[f64]) -> f64 {
    let vcpus = u64::from(VCPUS);
    let mut unique = 0;
    for v in 0..VCPUS {
        let mine = pages / vcpus + u64::from(u64::from(v) < pages % vcpus);
        let levels = minivm::zipf_levels(mine);
        let (a, b) = (
            from[v as usize].round() as u64,
            to[v as usize].round() as u64,
        );
        let mut x = minivm::xorshift_seed(minivm::ZIPF_SEED, v);
        let mut seen = std::collections::HashSet::new();
        for n in 1..=b {
            x = minivm::xorshift_next(x);
            if n > a {
                seen.insert(minivm::zipf_page(x, levels, mine));
            }
        }
        unique += seen.len();
    }
    unique as f64
}

/// One cell's result.
struct Cell {
    estimate_mib: f64,
    truth_mib: f64,
    mean_abs_err_pct: f64,
    job_cpu_ms: f64,
    slowdown_pct: Option<f64>,
    note: String,
}

fn run_cell(workload: Workload, m: Method, repeats: u64, window_ms: u64) -> Result<Cell, String> {
    let guest = boot(workload, m.ring_entries)?;
    let job = DirtyRateJob::new(guest.clone());
    let paced = matches!(workload, Workload::Sweep { .. } | Workload::Zipf { .. });
    let mut estimates = Vec::new();
    let mut truths = Vec::new();
    let mut errs = Vec::new();
    let mut job_cpu = Vec::new();
    let mut slowdowns = Vec::new();
    let mut entries_mib = Vec::new();
    let mut ci_hits = 0;
    let mut starved = 0;
    let mut done = 0;
    while done < repeats {
        // The guest's speed over an unmeasured window before and after the measured one.
        let base = |secs: &mut f64| {
            let c0 = guest.counters();
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_millis(window_ms));
            *secs = t0.elapsed().as_secs_f64();
            (total(&guest.counters()) - total(&c0)) as f64 / *secs
        };
        let mut secs = 0.0;
        let before_rate = base(&mut secs);

        // Only the paced workloads need the counter log (its 1 ms polling would count
        // as measurement cost in the working sets' slowdown).
        let log = paced.then(|| CounterLog::start(&guest));
        let c1 = guest.counters();
        let t1 = Instant::now();
        job.calc(&m.args(window_ms)).map_err(|e| e.to_string())?;
        let info = job.wait(None);
        let span_secs = t1.elapsed().as_secs_f64();
        let c2 = guest.counters();
        let records = log.map(CounterLog::finish).unwrap_or_default();
        let after_rate = base(&mut secs);
        let base_rate = (before_rate + after_rate) / 2.0;
        let x = info
            .ferry
            .clone()
            .ok_or_else(|| format!("no result: {info:?}"))?;
        if let Some(e) = &x.error {
            return Err(e.clone());
        }
        // A working set's truth needs a whole round in the window: a window in which
        // the shared host starved a vCPU (< 3 rounds over the job) is measured again.
        if !paced && c2.iter().zip(&c1).any(|(b, a)| b - a < 3) && starved < 3 * repeats {
            starved += 1;
            continue;
        }
        done += 1;
        let during_rate = (total(&c2) - total(&c1)) as f64 / span_secs;
        let window_secs = x.window_us as f64 / 1e6;
        let truth_pages = match workload {
            Workload::Idle => f64::from(VCPUS),
            Workload::WorkingSet { pages } | Workload::Dense { pages, .. } => {
                (pages + u64::from(VCPUS)) as f64
            }
            Workload::Zipf { pages, .. } => {
                let start = x.window_start_unix_us;
                let (a, b) = (
                    counters_at(&records, start),
                    counters_at(&records, start + x.window_us),
                );
                zipf_unique_pages(pages, &a, &b) + f64::from(VCPUS)
            }
            _ => {
                let start = x.window_start_unix_us;
                let (a, b) = (
                    counters_at(&records, start),
                    counters_at(&records, start + x.window_us),
                );
                b.iter().sum::<f64>() - a.iter().sum::<f64>() + f64::from(VCPUS)
            }
        };
        let truth = truth_pages / window_secs / 256.0;
        let est = x.dirty_rate_mib_per_sec;
        if let Some(ci) = x.confidence_95 {
            if ci.low_mib_per_sec <= truth && truth <= ci.high_mib_per_sec {
                ci_hits += 1;
            }
        }
        if let Some(e) = x.ring_entries_mib_per_sec {
            entries_mib.push(e);
        }
        estimates.push(est);
        truths.push(truth);
        errs.push(((est - truth) / truth * 100.0).abs());
        job_cpu.push(x.cpu_ms);
        if !paced && base_rate > 0.0 {
            slowdowns.push((1.0 - during_rate / base_rate) * 100.0);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut note = String::new();
    if m.mode == DirtyRateMode::PageSampling {
        note = format!("95% CI held truth {ci_hits}/{repeats}");
    }
    if !entries_mib.is_empty() {
        note = format!(
            "ring entries {:.1} MiB/s (QEMU's number)",
            med(&mut entries_mib)
        );
    }
    let n = errs.len() as f64;
    Ok(Cell {
        estimate_mib: med(&mut estimates),
        truth_mib: med(&mut truths),
        mean_abs_err_pct: errs.iter().sum::<f64>() / n,
        job_cpu_ms: med(&mut job_cpu),
        slowdown_pct: (!slowdowns.is_empty()).then(|| med(&mut slowdowns)),
        note,
    })
}

/// One run of the guest-speed-after-a-measurement section.
struct StallRun {
    /// Guest rounds/s over the 500 ms before the request.
    base_rounds_per_sec: f64,
    /// Per bin after the reply, from the reply on: the guest's speed over the bin
    /// relative to `base_rounds_per_sec`.
    after: Vec<f64>,
    /// ms from the reply to the start of the first bin at ≥ 80 % speed.
    first_back_ms: f64,
    /// ms from the reply to the end of the last bin below 80 % speed (0: none; host
    /// noise later in the 2 s shows here too).
    recovery_ms: f64,
    /// Guest time lost in the 2 s after the reply, ms (sum of (1 - speed) × bin).
    lost_ms: f64,
}

/// Guest speed after a measurement returns: samples the guest's counters every
/// `sample_ms` from 500 ms before the request to 2 s after the reply.
fn stall_run(
    guest: &Arc<GuestVm>,
    job: &DirtyRateJob,
    m: Method,
    window_ms: u64,
    bin_ms: u64,
) -> Result<StallRun, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (g, s) = (Arc::clone(guest), Arc::clone(&stop));
    let epoch = Instant::now();
    let sampler = std::thread::spawn(move || {
        let mut v: Vec<(f64, u64)> = Vec::new();
        while !s.load(Ordering::Relaxed) {
            v.push((epoch.elapsed().as_secs_f64() * 1e3, total(&g.counters())));
            std::thread::sleep(Duration::from_millis(5));
        }
        v
    });
    std::thread::sleep(Duration::from_millis(500));
    let t_req = epoch.elapsed().as_secs_f64() * 1e3;
    job.calc(&m.args(window_ms)).map_err(|e| e.to_string())?;
    let info = job.wait(None);
    let t_ret = epoch.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_millis(2000));
    stop.store(true, Ordering::Relaxed);
    let log = sampler.join().map_err(|_| "sampler panicked".to_string())?;
    if let Some(e) = info.ferry.as_ref().and_then(|x| x.error.clone()) {
        return Err(e);
    }
    // The counter at time t (ms since epoch), interpolated between samples.
    let at = |t: f64| -> f64 {
        let i = log.partition_point(|(ts, _)| *ts <= t);
        match (i.checked_sub(1).and_then(|j| log.get(j)), log.get(i)) {
            (Some(&(ta, a)), Some(&(tb, b))) if tb > ta => {
                a as f64 + (b as f64 - a as f64) * (t - ta) / (tb - ta)
            }
            (Some(&(_, a)), _) => a as f64,
            (None, Some(&(_, b))) => b as f64,
            (None, None) => 0.0,
        }
    };
    let base = (at(t_req) - at(t_req - 500.0)) / 0.5;
    let bins = 2000 / bin_ms;
    let after: Vec<f64> = (0..bins)
        .map(|i| {
            let (a, b) = (
                t_ret + (i * bin_ms) as f64,
                t_ret + ((i + 1) * bin_ms) as f64,
            );
            (at(b) - at(a)) / (bin_ms as f64 / 1e3) / base.max(1e-9)
        })
        .collect();
    let first_back_ms = after
        .iter()
        .position(|r| *r >= 0.8)
        .map_or(2000.0, |i| (i as u64 * bin_ms) as f64);
    let recovery_ms = after
        .iter()
        .rposition(|r| *r < 0.8)
        .map_or(0.0, |i| ((i as u64 + 1) * bin_ms) as f64);
    let lost_ms = after
        .iter()
        .map(|r| (1.0 - r).max(0.0) * bin_ms as f64)
        .sum();
    Ok(StallRun {
        base_rounds_per_sec: base,
        after,
        first_back_ms,
        recovery_ms,
        lost_ms,
    })
}

/// The guest's speed right after a bitmap or ring measurement returns (working set
/// 65536): time back to ≥ 80 % speed and guest time lost, per run, with the speed per
/// bin for the first 400 ms of the median run.
fn stall_section(window_ms: u64, md: &mut Vec<String>) {
    let repeats = env_u64("FERRY_BENCH_STALL_REPEATS", 3).max(1);
    let bin_ms = env_u64("FERRY_BENCH_STALL_BIN_MS", 10).clamp(2, 500);
    let workload = Workload::WorkingSet { pages: 65536 };
    println!(
        "\nguest speed after the measurement returns: {workload}, {window_ms} ms windows, \
         {bin_ms} ms bins (counters sampled every 5 ms), {repeats} runs"
    );
    md.push(String::new());
    md.push(format!(
        "Guest speed after the measurement returns ({workload}, {window_ms} ms windows, \
         {bin_ms} ms bins): ms until the guest is back at ≥ 80 % of its speed before the \
         request, and guest time lost in the 2 s after the reply."
    ));
    md.push(String::new());
    md.push("| mode | first bin ≥ 80 % at ms (each run) | no bin < 80 % after ms | lost ms (each run) | speed per bin after the reply, median run (× before) |".into());
    md.push("|---|---|---|---|---|".into());
    for m in METHODS.iter().take(2).copied() {
        let run = || -> Result<Vec<StallRun>, String> {
            let guest = boot(workload, m.ring_entries)?;
            let job = DirtyRateJob::new(guest.clone());
            (0..repeats)
                .map(|_| stall_run(&guest, &job, m, window_ms, bin_ms))
                .collect()
        };
        match run() {
            Ok(mut runs) => {
                runs.sort_by(|a, b| a.lost_ms.total_cmp(&b.lost_ms));
                let first: Vec<String> = runs
                    .iter()
                    .map(|r| format!("{:.0}", r.first_back_ms))
                    .collect();
                let rec: Vec<String> = runs
                    .iter()
                    .map(|r| format!("{:.0}", r.recovery_ms))
                    .collect();
                let lost: Vec<String> = runs.iter().map(|r| format!("{:.0}", r.lost_ms)).collect();
                let med = &runs[runs.len() / 2];
                let shown = (400 / bin_ms) as usize;
                let series: Vec<String> = med
                    .after
                    .iter()
                    .take(shown)
                    .map(|r| format!("{r:.2}"))
                    .collect();
                println!(
                    "{:<17} first bin >= 80 % at {} ms; none < 80 % after {} ms; lost {} ms; base {:.0} rounds/s",
                    m.name,
                    first.join(", "),
                    rec.join(", "),
                    lost.join(", "),
                    med.base_rounds_per_sec
                );
                println!(
                    "{:<17} median run, speed per {bin_ms} ms bin: {}",
                    "",
                    series.join(" ")
                );
                md.push(format!(
                    "| {} | {} | {} | {} | {} |",
                    m.name,
                    first.join(", "),
                    rec.join(", "),
                    lost.join(", "),
                    series.join(" ")
                ));
            }
            Err(e) => {
                println!("{:<17} failed: {e}", m.name);
                md.push(format!("| {} | failed: {e} | | | |", m.name));
            }
        }
    }
}

fn main() {
    let repeats = env_u64("FERRY_BENCH_REPEATS", 3).max(1);
    let window_ms = env_u64("FERRY_BENCH_WINDOW_MS", 1000).clamp(50, 60_000);
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let title = format!(
        "calc-dirty-rate accuracy: 1 GiB, {VCPUS} vCPUs, {window_ms} ms windows, {repeats} per cell, backend {}",
        if kvm { "kvm" } else { "host threads" }
    );
    println!("{title}");
    // The same table in markdown, for README (scripts/numbers).
    let mut md = vec![
        format!("`cargo bench --bench dirty_rate_accuracy`: {title}."),
        String::new(),
        "| workload | mode | estimate MiB/s | truth MiB/s | err % | mean \\|err\\| % | cpu ms | guest slowed % | note |".to_string(),
        "|---|---|---|---|---|---|---|---|---|".to_string(),
    ];
    println!(
        "{:<18} {:<17} {:>10} {:>10} {:>8} {:>8} {:>8} {:>7}  note",
        "workload", "mode", "est MiB/s", "true MiB/s", "err %", "|err| %", "cpu ms", "slow %"
    );
    let workloads = [
        Workload::Idle,
        Workload::WorkingSet { pages: 4096 },
        Workload::WorkingSet { pages: 65536 },
        Workload::Sweep {
            pages_per_sec: 25600,
        },
        Workload::Dense {
            pages: 65536,
            bytes_per_page: 256,
        },
        Workload::Zipf {
            pages: 65536,
            writes_per_sec: 200_000,
        },
    ];
    // FERRY_BENCH_STALL_ONLY=1: only the guest-speed-after section.
    let stall_only = env_u64("FERRY_BENCH_STALL_ONLY", 0) == 1;
    for w in workloads.into_iter().filter(|_| !stall_only) {
        for m in METHODS {
            if m.ring_entries > 0 && !kvm {
                continue;
            }
            match run_cell(w, m, repeats, window_ms) {
                Ok(c) => {
                    let err_pct = (c.estimate_mib - c.truth_mib) / c.truth_mib * 100.0;
                    let slow = c
                        .slowdown_pct
                        .map_or("-".to_string(), |s| format!("{s:+.1}"));
                    println!(
                        "{:<18} {:<17} {:>10.2} {:>10.2} {:>+8.2} {:>8.2} {:>8.2} {:>7}  {}",
                        w.to_string(),
                        m.name,
                        c.estimate_mib,
                        c.truth_mib,
                        err_pct,
                        c.mean_abs_err_pct,
                        c.job_cpu_ms,
                        slow,
                        c.note
                    );
                    md.push(format!(
                        "| {w} | {} | {:.2} | {:.2} | {err_pct:+.2} | {:.2} | {:.2} | {slow} | {} |",
                        m.name, c.estimate_mib, c.truth_mib, c.mean_abs_err_pct, c.job_cpu_ms, c.note
                    ));
                }
                Err(e) => {
                    println!("{:<18} {:<17} failed: {e}", w.to_string(), m.name);
                    md.push(format!("| {w} | {} | failed: {e} | | | | | | |", m.name));
                }
            }
        }
    }
    println!(
        "est/true: medians over the windows; err %: of the medians; |err| %: mean absolute \
         error per window; cpu ms: CPU time of the mig/dirtyrate thread per window; slow %: \
         guest rounds/s lost while measuring (working sets; noisy on a shared host)"
    );
    md.push(String::new());
    md.push(
        "estimate/truth: medians over the windows; err %: of the medians; mean |err| %: per \
         window; cpu ms: CPU time of the measuring thread per window; guest slowed %: guest \
         rounds/s lost while measuring (noisy on a shared host)."
            .to_string(),
    );
    if kvm {
        stall_section(window_ms, &mut md);
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let written = std::fs::create_dir_all(&out)
        .and_then(|()| std::fs::write(out.join("dirty_rate_accuracy.md"), md.join("\n") + "\n"));
    if let Err(e) = written {
        eprintln!("writing target/bench/dirty_rate_accuracy.md: {e}");
    }
}
