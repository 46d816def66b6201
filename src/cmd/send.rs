//! `ferry send`: boot a guest and migrate it to a `ferry receive` elsewhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry::migration_core::{ram_digest, GuestRam, MigrationSource};
use ferry::plot::{render_svg, Timeline};
use ferry::stats::{MigrationInfo, MigrationStatus};
use ferry::GuestVm;

use super::progress::{bytes, watch};
use super::{catch_sigint, parse_uri, MigrateArgs, VmArgs};

/// Boot a guest and migrate it to URI.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// Where `ferry receive` listens: tcp:HOST:PORT | unix:PATH | file:PATH.
    #[arg(long)]
    pub uri: String,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub migrate: MigrateArgs,
    /// Write the final query-migrate JSON (and the source RAM digest) to FILE.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the migration over time as an SVG picture in FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// Where `--plot` draws the migration, and the picture's title.
pub struct Plot<'a> {
    /// The SVG file.
    pub path: &'a Path,
    /// The title.
    pub title: String,
}

impl<'a> Plot<'a> {
    /// Checks that `--plot FILE` can be written before anything starts.
    pub fn new(path: &'a Path, cmd: &str, vm: &VmArgs, args: &MigrateArgs) -> Result<Self, String> {
        std::fs::File::create(path).map_err(|e| format!("--plot {}: {e}", path.display()))?;
        let mut title = format!(
            "ferry {cmd}: {} RAM, {} vCPU(s), workload {}",
            bytes(vm.mem),
            vm.vcpus,
            vm.workload
        );
        if args.max_bandwidth > 0 {
            title += &format!(", max-bandwidth {}/s", bytes(args.max_bandwidth));
        }
        if args.auto_converge {
            title += ", auto-converge";
        }
        Ok(Plot { path, title })
    }
}

/// What a finished migration left on the source.
pub struct Outcome {
    /// The final `query-migrate` snapshot.
    pub info: MigrationInfo,
    /// Digest of the source RAM at switch-over (the source stays paused after it).
    pub ram_digest: Option<u64>,
    /// Round counters at switch-over.
    pub counters: Vec<u64>,
}

/// Checks `--uri` for a migration to another process: it parses, is not `mem:` (an
/// in-process channel, which no other process can reach), and is not `file:` with
/// more than one `--channels`.
pub fn check_uri(uri: &str, args: &MigrateArgs) -> Result<ferry::transport::Uri, String> {
    let parsed = parse_uri("--uri", uri)?;
    if matches!(parsed, ferry::transport::Uri::File(_)) && args.channels > 1 {
        return Err(format!(
            "--channels {} with --uri {uri}: a file carries exactly one channel",
            args.channels
        ));
    }
    if let ferry::transport::Uri::Mem(_) = parsed {
        return Err(format!(
            "--uri {uri}: mem: is an in-process channel and cannot reach another process; \
             use tcp:HOST:PORT, unix:PATH or file:PATH"
        ));
    }
    Ok(parsed)
}

/// Boots the source guest and lets it run two rounds.
pub fn boot(vm: &VmArgs) -> Result<Arc<GuestVm>, String> {
    vm.validate()?;
    let guest = GuestVm::boot(vm.config(), vm.tracking()).map_err(|e| e.to_string())?;
    {
        let g = guest.vm();
        eprintln!(
            "source guest: {} RAM, {} vCPU(s), workload {}, backend {}",
            bytes(vm.mem),
            vm.vcpus,
            vm.workload,
            g.backend_name()
        );
        for v in 0..g.vcpus() {
            g.wait_rounds(v, 2, Duration::from_secs(60))
                .map_err(|e| format!("guest did not start: {e}"))?;
        }
    }
    Ok(Arc::new(guest))
}

/// Migrates `guest` to `uri` with a progress line; digests RAM once completed. A
/// Ctrl-C (after [`catch_sigint`]) cancels it: the outcome then says `cancelled`. With
/// `plot`, records the progress snapshots and draws them however the migration ended.
pub fn migrate(
    guest: &Arc<GuestVm>,
    args: &MigrateArgs,
    uri: &str,
    plot: Option<&Plot>,
) -> Result<Outcome, String> {
    let source = MigrationSource::new(guest.clone());
    args.apply(&source)?;
    source
        .migrate(uri)
        .map_err(|e| format!("cannot migrate to {uri}: {e}"))?;
    let mut timeline = plot.map(|_| Timeline {
        downtime_limit_ms: Some(args.downtime_limit),
        ..Timeline::new()
    });
    let info = watch(&source, timeline.as_mut());
    if let (Some(p), Some(t)) = (plot, &timeline) {
        match render_svg(t, &p.title, p.path) {
            Ok(()) => eprintln!("plot: {}", p.path.display()),
            Err(e) => eprintln!("ferry: --plot: {e}"),
        }
    }
    let completed = info.status == MigrationStatus::Completed;
    Ok(Outcome {
        ram_digest: completed.then(|| ram_digest(&GuestRam::new(guest.clone()))),
        counters: guest.counters(),
        info,
    })
}

/// Prints the report of a finished migration.
pub fn report(info: &MigrationInfo) {
    let ram = info.ram.clone().unwrap_or_default();
    println!("status            {}", info.status.as_str());
    if let Some(e) = &info.error_desc {
        println!("error             {e}");
    }
    println!("total-time        {} ms", info.total_time.unwrap_or(0));
    println!("setup-time        {} ms", info.setup_time.unwrap_or(0));
    println!("downtime          {} ms", info.downtime.unwrap_or(0));
    if let Some(p) = info
        .ferry
        .as_ref()
        .and_then(|f| f.downtime_phases_us.as_ref())
    {
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "  pause {:.1} | sync {:.1} | pages {:.1} | devices {:.1} | ack {:.1} ms",
            ms(p.pause),
            ms(p.sync),
            ms(p.pages),
            ms(p.device),
            ms(p.ack)
        );
    }
    println!("transferred       {}", bytes(ram.transferred));
    println!(
        "  normal pages    {} ({}), {} of them sparse",
        ram.normal,
        bytes(ram.normal_bytes),
        info.ferry.as_ref().map_or(0, |f| f.sparse_pages)
    );
    println!("  zero pages      {}", ram.duplicate);
    println!("  during downtime {}", bytes(ram.downtime_bytes));
    if ram.postcopy_bytes > 0 {
        println!(
            "  after the switch {} (postcopy: {} pages requested by the destination)",
            bytes(ram.postcopy_bytes),
            ram.postcopy_requests
        );
    }
    println!("dirty-sync-count  {}", ram.dirty_sync_count);
    println!("throughput        {:.0} Mbit/s", ram.mbps);
    if let Some(f) = &info.ferry {
        println!("passes            {}", f.iterations);
    }
}

/// Writes the outcome as JSON.
pub fn write_json(path: &PathBuf, value: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The error of a migration that did not complete, naming where it went.
pub fn not_completed(info: &MigrationInfo, uri: &str) -> String {
    match &info.error_desc {
        Some(e) => format!("migration to {uri} {}: {e}", info.status.as_str()),
        None => format!("migration to {uri} {}", info.status.as_str()),
    }
}

/// Runs `ferry send`.
pub fn run(args: SendArgs) -> Result<(), String> {
    check_uri(&args.uri, &args.migrate)?;
    args.vm.validate()?;
    let plot = match &args.plot {
        Some(path) => Some(Plot::new(path, "send", &args.vm, &args.migrate)?),
        None => None,
    };
    catch_sigint();
    let guest = boot(&args.vm)?;
    let out = migrate(&guest, &args.migrate, &args.uri, plot.as_ref())?;
    report(&out.info);
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::json!({"query-migrate": out.info, "source-ram-digest": out.ram_digest}),
        )?;
    }
    if out.info.status == MigrationStatus::Completed {
        Ok(())
    } else {
        Err(not_completed(&out.info, &args.uri))
    }
}
