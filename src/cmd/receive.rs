//! `ferry receive`: an empty guest waiting for a migration; resumes it when it arrives.
//!
//! Talks to a parent process in JSON lines on stdout: `listening` (with the real URI),
//! in postcopy `postcopy-active`, `postcopy-paused` (with why, and the recovery
//! address with `--recover`) and `postcopy-resumed`, then `completed` (with the RAM digest taken before resuming and what it cost, and
//! after a postcopy migration its `x-ferry.postcopy` figures), then
//! `running` once every vCPU has done two more rounds on this side. Any error, from
//! the flags on, is a `failed` line (with `error`, the same text as on stderr).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry::migration_core::{incoming_with, Incoming, IncomingOptions};
use ferry::stats::MigrationStatus;
use ferry::GuestVm;
use serde_json::json;

use super::{parse_uri, VmArgs};

/// Wait for a migration on URI and run the guest it brings.
#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Where to listen: tcp:HOST:PORT (port 0 = any) | unix:PATH | file:PATH.
    #[arg(long)]
    pub uri: String,
    #[command(flatten)]
    pub vm: VmArgs,
    /// Digest guest RAM before resuming, for checking. Taken after the switch-over is
    /// acknowledged, so it is not in the source's downtime; the guest stays paused
    /// for it (`ram-digest-ms` in the `completed` line).
    #[arg(long)]
    pub verify: bool,
    /// Keep the guest running after it was seen running (until killed).
    #[arg(long)]
    pub stay: bool,
    /// When a postcopy migration pauses (its stream broke), listen on URI for the
    /// source to resume it (QMP's `migrate-recover`, done at once); the
    /// `postcopy-paused` line carries the real address.
    #[arg(long, value_name = "URI")]
    pub recover: Option<String>,
    #[command(flatten)]
    pub tls: super::TlsArgs,
}

fn say(v: serde_json::Value) {
    println!("{v}");
}

/// Says `postcopy-active` when the guest starts here with pages still on the source,
/// `postcopy-paused` (with why) each time postcopy pauses, and with `recover` listens
/// there for the source at once; `postcopy-resumed` when it resumed.
fn watch_postcopy_pauses(inc: &Incoming, recover: Option<String>) {
    let (stats, control) = (inc.stats().clone(), inc.control());
    let watch = move || {
        // Every status in order, however briefly it lasted (the stats keep a log).
        let (mut count, mut last) = (0, MigrationStatus::None);
        while !last.is_finished() {
            let (n, changes) = stats.wait_status_changes(count, Duration::from_secs(1));
            count = n;
            for now in changes {
                match now {
                    MigrationStatus::PostcopyPaused => {
                        let error = stats.snapshot().error_desc;
                        let recover_uri = recover.as_deref().map(|u| {
                            control
                                .recover(u)
                                .map(|l| l.to_string())
                                .map_err(|e| e.to_string())
                        });
                        say(json!({
                            "event": "postcopy-paused",
                            "error": error,
                            "recover-uri": recover_uri.as_ref().and_then(|r| r.as_ref().ok()),
                            "recover-error": recover_uri.as_ref().and_then(|r| r.as_ref().err()),
                        }));
                    }
                    MigrationStatus::PostcopyActive
                        if matches!(
                            last,
                            MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover
                        ) =>
                    {
                        say(json!({"event": "postcopy-resumed"}));
                    }
                    MigrationStatus::PostcopyActive => say(json!({"event": "postcopy-active"})),
                    _ => {}
                }
                last = now;
            }
        }
    };
    // Ends with the migration; a thread left behind at exit is of no harm.
    let _ = std::thread::Builder::new()
        .name("postcopy-watch".into())
        .spawn(watch);
}

/// Runs `ferry receive`.
pub fn run(args: ReceiveArgs) -> Result<(), String> {
    let r = serve(&args);
    if let Err(e) = &r {
        say(json!({"event": "failed", "error": e}));
    }
    r
}

fn serve(args: &ReceiveArgs) -> Result<(), String> {
    parse_uri("--uri", &args.uri)?;
    args.vm.validate()?;
    let guest = Arc::new(
        GuestVm::incoming(args.vm.config(), args.vm.tracking()).map_err(|e| e.to_string())?,
    );
    let opts = IncomingOptions {
        verify: args.verify,
        accept: ferry::transport::AcceptOptions {
            tls: args.tls.server_config()?,
            ..Default::default()
        },
        ..Default::default()
    };
    let inc = incoming_with(guest.clone(), &args.uri, opts)
        .map_err(|e| format!("cannot listen on {}: {e}", args.uri))?;
    say(json!({"event": "listening", "uri": inc.uri().to_string()}));
    let stats = inc.stats().clone();
    watch_postcopy_pauses(&inc, args.recover.clone());
    let report = inc
        .wait()
        .map_err(|e| format!("incoming migration on {} failed: {e}", args.uri))?;
    let at_resume = guest.counters();
    say(json!({
        "event": "completed",
        "iterations": report.iterations,
        "received-bytes": report.received_bytes,
        "total-ms": report.total_ms,
        "ram-digest": report.ram_digest,
        "ram-digest-ms": report.ram_digest_us.map(|us| us as f64 / 1000.0),
        "counters": at_resume,
        "page-writes": guest.vcpu_page_writes(),
        "postcopy": stats.snapshot().ferry.and_then(|f| f.postcopy),
    }));
    {
        let vm = guest.vm();
        for v in 0..vm.vcpus() {
            vm.wait_rounds(v, 2, Duration::from_secs(60))
                .map_err(|e| format!("the guest does not run on the destination: {e}"))?;
        }
    }
    say(json!({"event": "running", "counters": guest.counters()}));
    if args.stay {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}
