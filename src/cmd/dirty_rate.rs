//! `ferry dirty-rate`: boot a guest, run calc-dirty-rate on it, print query-dirty-rate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use dirty_sync::kvm::{KvmRingConfig, DEFAULT_RING_ENTRIES};
use ferry::migration_core::{DirtyRateArgs, DirtyRateJob, DirtyRateMode, TimeUnit};
use ferry::GuestVm;
use minivm::{DirtyTracking, VmConfig, Workload};

use super::VmArgs;

/// Boot a guest and measure how fast it dirties memory (calc-dirty-rate).
#[derive(Args, Debug)]
pub struct DirtyRateCmdArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// page-sampling | dirty-bitmap | dirty-ring.
    #[arg(long, default_value = "page-sampling")]
    pub mode: DirtyRateMode,
    /// Window: `1s`, `200ms`, or a number of seconds (50 ms to 60 s).
    #[arg(long, default_value = "1s", value_parser = calc_time)]
    pub calc_time: (i64, TimeUnit),
    /// Sample pages per GiB (page-sampling only, 128..16384; default 512).
    #[arg(long)]
    pub sample_pages: Option<i64>,
    /// Dirty-ring entries per vCPU (0: the KVM dirty bitmap; dirty-ring mode picks
    /// 65536 when 0).
    #[arg(long, default_value_t = 0)]
    pub dirty_ring: u32,
    /// Print only the query-dirty-rate JSON (one line), no summary, with the guest's
    /// own work around the window under `x-ferry-guest`: each vCPU's counter
    /// before the request and after the reply, and the page writes in between.
    #[arg(long)]
    pub json: bool,
}

/// Parses `1s`, `250ms` or `2` (seconds) into calc-time and its unit.
fn calc_time(s: &str) -> Result<(i64, TimeUnit), String> {
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, TimeUnit::Millisecond)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, TimeUnit::Second)
    } else {
        (s, TimeUnit::Second)
    };
    let v = num
        .trim()
        .parse::<i64>()
        .map_err(|e| format!("calc-time '{s}': {e}"))?;
    Ok((v, unit))
}

/// Pages a working-set or idle guest dirties per window of at least one round.
fn working_set_truth_pages(cfg: &VmConfig) -> Option<u64> {
    let counters = u64::from(cfg.vcpus);
    match cfg.workload {
        Workload::Idle => Some(counters),
        Workload::WorkingSet { pages } => Some(pages + counters),
        _ => None,
    }
}

/// The guest's own account of its work around the measurement, read from each vCPU's
/// counter page (a u64 in guest memory) just before the request and just after the
/// reply, so the span holds the window.
#[derive(Debug)]
pub struct GuestWork {
    /// What one counter step is for this workload (`round`, `page`, `write`, `yield`).
    pub counter_unit: &'static str,
    /// Per vCPU: the counter before the request.
    pub counters_before: Vec<u64>,
    /// Per vCPU: the counter after the reply.
    pub counters_after: Vec<u64>,
    /// Per vCPU: page writes in between (counter steps × page writes per step), not
    /// distinct pages; None for idle, which writes only its counter.
    pub page_writes: Option<Vec<u64>>,
    /// Host time from the first read to the last, µs.
    pub span_us: u64,
}

impl GuestWork {
    /// As JSON: `counter-unit`, `counters-before`, `counters-after`, `page-writes` (when
    /// known), `span-us`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "counter-unit": self.counter_unit,
            "counters-before": self.counters_before,
            "counters-after": self.counters_after,
            "span-us": self.span_us,
        });
        if let (Some(w), Some(obj)) = (&self.page_writes, v.as_object_mut()) {
            obj.insert("page-writes".into(), serde_json::json!(w));
        }
        v
    }
}

/// The counter's unit and page writes per counter step of vCPU `v`'s workload.
fn counter_step(vm: &minivm::MiniVm, v: u32) -> (&'static str, Option<u64>) {
    match vm.config().workload {
        Workload::Idle => ("yield", None),
        Workload::WorkingSet { .. } | Workload::Dense { .. } | Workload::Lopsided { .. } => {
            ("round", Some(vm.workload_region(v).1))
        }
        Workload::Sweep { .. } => ("page", Some(1)),
        Workload::Zipf { .. } => ("write", Some(1)),
        Workload::Random { .. } => ("round", Some(4096)),
    }
}

/// Runs the command.
pub fn run(a: DirtyRateCmdArgs) -> Result<(), String> {
    let mut cfg = a.vm.config();
    let entries = match (a.mode, a.dirty_ring) {
        (DirtyRateMode::DirtyRing, 0) => DEFAULT_RING_ENTRIES,
        (_, e) => e,
    };
    cfg.dirty_ring_entries = entries;
    let tracking = if entries == 0 {
        a.vm.tracking()
    } else {
        DirtyTracking::Ring(KvmRingConfig {
            entries,
            ..Default::default()
        })
    };
    let guest = GuestVm::boot(cfg.clone(), tracking).map_err(|e| e.to_string())?;
    let guest = Arc::new(guest);
    {
        let vm = guest.vm();
        if !a.json {
            eprintln!(
                "guest: {} MiB RAM, {} vCPU(s), workload {}, backend {}",
                cfg.mem_bytes >> 20,
                cfg.vcpus,
                cfg.workload,
                vm.backend_name()
            );
        }
        for v in 0..vm.vcpus() {
            vm.wait_rounds(v, 2, Duration::from_secs(60))
                .map_err(|e| format!("guest did not start: {e}"))?;
        }
    }
    let job = DirtyRateJob::new(guest.clone());
    let t0 = Instant::now();
    let counters_before = guest.counters();
    job.calc(&DirtyRateArgs {
        calc_time: a.calc_time.0,
        calc_time_unit: Some(a.calc_time.1),
        sample_pages: a.sample_pages,
        mode: Some(a.mode),
    })
    .map_err(|e| e.to_string())?;
    let info = job.wait(Some(a.calc_time.1));
    let counters_after = guest.counters();
    let span_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    let work = {
        let vm = guest.vm();
        let steps: Vec<_> = (0..vm.vcpus()).map(|v| counter_step(&vm, v)).collect();
        let page_writes = steps
            .iter()
            .zip(counters_before.iter().zip(&counters_after))
            .map(|((_, per), (b, a))| per.map(|p| a.saturating_sub(*b) * p))
            .collect::<Option<Vec<u64>>>();
        GuestWork {
            counter_unit: steps.first().map_or("round", |s| s.0),
            counters_before,
            counters_after,
            page_writes,
            span_us,
        }
    };
    let json = if a.json {
        let mut v = serde_json::to_value(&info).map_err(|e| e.to_string())?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("x-ferry-guest".into(), work.to_json());
        }
        serde_json::to_string(&v)
    } else {
        serde_json::to_string_pretty(&info)
    }
    .map_err(|e| e.to_string())?;
    println!("{json}");
    if !a.json {
        eprintln!(
            "guest work around the window ({} µs): counters {:?} -> {:?} ({}s), page writes {:?}",
            work.span_us,
            work.counters_before,
            work.counters_after,
            work.counter_unit,
            work.page_writes
        );
    }
    if !a.json {
        if let (Some(x), Some(truth)) = (&info.ferry, working_set_truth_pages(&cfg)) {
            let secs = x.window_us as f64 / 1e6;
            let truth_mib = truth as f64 * 4096.0 / f64::from(1 << 20) / secs;
            let err = (x.dirty_rate_mib_per_sec - truth_mib) / truth_mib.max(1e-9) * 100.0;
            eprintln!(
                "estimate {:.2} MiB/s, truth {truth_mib:.2} MiB/s ({truth} pages in {:.1} ms), error {err:+.2} %",
                x.dirty_rate_mib_per_sec,
                secs * 1e3
            );
        }
    }
    Ok(())
}
