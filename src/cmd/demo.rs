//! `ferry demo`: the main job. Boots a source guest, starts a `ferry receive` process,
//! migrates over loopback, and checks that the destination's RAM equals the source's
//! at switch-over and that the guest runs on there.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use clap::Args;
use ferry::stats::MigrationStatus;
use serde_json::{json, Value};

use super::send::{boot, migrate, report, write_json, Plot};
use super::{MigrateArgs, VmArgs};

/// Migrate a running guest to a second process on this machine and verify it.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// tcp:127.0.0.1:0 (any free port) or unix:PATH.
    #[arg(long, default_value = "tcp:127.0.0.1:0")]
    pub uri: String,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub migrate: MigrateArgs,
    /// Write the report (query-migrate and the checks) as JSON to FILE.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw the migration over time as an SVG picture in FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// The destination process and its JSON lines.
struct Destination {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Destination {
    fn start(args: &DemoArgs) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("receive")
            .args(["--uri", &args.uri, "--verify"])
            .args(args.vm.to_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the destination: {e}"))?;
        let stdout = child.stdout.take().ok_or("no destination stdout")?;
        Ok(Destination {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next JSON line of `event`, or the failure the destination reported.
    fn expect(&mut self, event: &str) -> Result<Value, String> {
        for line in self.lines.by_ref() {
            let line = line.map_err(|e| e.to_string())?;
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["event"] == event {
                return Ok(v);
            }
            if v["event"] == "failed" {
                return Err(format!("destination failed: {}", v["error"]));
            }
        }
        Err(format!("the destination exited before `{event}`"))
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ferry demo`.
pub fn run(args: DemoArgs) -> Result<(), String> {
    let plot = match &args.plot {
        Some(path) => Some(Plot::new(path, "demo", &args.vm, &args.migrate)?),
        None => None,
    };
    let mut dst = Destination::start(&args)?;
    let listening = dst.expect("listening")?;
    let uri = listening["uri"]
        .as_str()
        .ok_or("bad listening line")?
        .to_string();
    eprintln!("destination: pid {} listening on {uri}", dst.child.id());
    // Preallocation serves the destination: on the source it would make every page
    // look touched, and the bulk stage would read all of RAM.
    let source_vm = VmArgs {
        prealloc: false,
        ..args.vm.clone()
    };
    let guest = boot(&source_vm)?;
    let out = migrate(&guest, &args.migrate, &uri, plot.as_ref())?;
    report(&out.info);
    let mut checks = json!({});
    let mut ok = out.info.status == MigrationStatus::Completed;
    if ok {
        let completed = dst.expect("completed")?;
        let same = completed["ram-digest"].as_u64() == out.ram_digest;
        let running = dst.expect("running")?;
        let counters = |v: &Value| -> Vec<u64> {
            v["counters"]
                .as_array()
                .map_or(Vec::new(), |a| a.iter().filter_map(Value::as_u64).collect())
        };
        let (before, after) = (counters(&completed), counters(&running));
        let advanced = !after.is_empty()
            && after.len() == before.len()
            && before.iter().zip(&after).all(|(b, a)| a > b);
        println!(
            "check: destination RAM equals source RAM at switch-over: {}",
            if same { "yes" } else { "NO" }
        );
        println!(
            "check: guest runs on the destination (counters {before:?} -> {after:?}): {}",
            if advanced { "yes" } else { "NO" }
        );
        checks = json!({"ram-equal": same, "guest-runs-on-destination": advanced,
            "source-counters-at-switch-over": out.counters, "destination-counters": after});
        ok = same && advanced;
    }
    if let Some(path) = &args.json {
        write_json(path, &json!({"query-migrate": out.info, "checks": checks}))?;
    }
    if ok {
        Ok(())
    } else {
        Err("the demo migration did not verify".into())
    }
}
