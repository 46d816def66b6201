//! `ferry demo`: the main job. Boots a source guest, starts a `ferry receive` process,
//! migrates over loopback, and checks that the destination's RAM equals the source's
//! at switch-over and that the guest runs on there.
//!
//! The RAM check is not in the downtime it reports: the destination acknowledges the
//! switch-over first and digests RAM after, holding its guest paused until then (the
//! check's cost, reported beside the downtime). With `file:` the source writes the
//! file first and the destination then restores from it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

use clap::Args;
use ferry::stats::MigrationStatus;
use ferry::transport::Uri;
use serde_json::{json, Value};

use super::send::{boot, check_uri, migrate, not_completed, report, write_json, Outcome, Plot};
use super::{catch_sigint, MigrateArgs, VmArgs};

/// Migrate a running guest to a second process on this machine and verify it.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// tcp:127.0.0.1:0 (any free port), unix:PATH, or file:PATH (the source writes
    /// a snapshot there, then the destination restores it). Not mem: (in-process).
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
    /// Starts `ferry receive --verify` on `uri`. It runs in a process group of its
    /// own, so a Ctrl-C on the terminal reaches the demo alone (which cancels the
    /// migration and ends the destination). Its stderr is passed on, prefixed,
    /// without its last `ferry: ...` line: its `failed` event says the same, once.
    fn start(args: &DemoArgs, uri: &str) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(exe);
        cmd.arg("receive")
            .args(super::logging::verbose_args())
            .args(["--uri", uri, "--verify"])
            .args(args.vm.to_args())
            .args(args.migrate.tls.to_args())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: between fork and exec the closure makes one system call (prctl is
        // async-signal-safe) and allocates nothing. Outside the terminal's process
        // group the destination must still end with the demo (a second Ctrl-C kills
        // the demo at once): the kernel sends it SIGKILL when its parent dies.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting the destination: {e}"))?;
        let stdout = child.stdout.take().ok_or("no destination stdout")?;
        if let Some(stderr) = child.stderr.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if !line.starts_with("ferry: ") {
                        eprintln!("destination: {line}");
                    }
                }
            });
        }
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
                let e = v["error"]
                    .as_str()
                    .map_or(v["error"].to_string(), str::to_string);
                return Err(format!("destination: {e}"));
            }
        }
        let status = self
            .child
            .wait()
            .map_or_else(|e| e.to_string(), |s| s.to_string());
        Err(format!(
            "the destination exited ({status}) before `{event}`"
        ))
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
    let parsed = check_uri(&args.uri, &args.migrate)?;
    args.vm.validate()?;
    let plot = match &args.plot {
        Some(path) => Some(Plot::new(path, "demo", &args.vm, &args.migrate)?),
        None => None,
    };
    catch_sigint();
    // Preallocation serves the destination: on the source it would make every page
    // look touched, and the bulk stage would read all of RAM.
    let source_vm = VmArgs {
        prealloc: false,
        ..args.vm.clone()
    };
    let (out, uri, dst) = if let Uri::File(_) = parsed {
        // A snapshot: the source writes the file, and once it is complete a
        // destination restores from it.
        let guest = boot(&source_vm)?;
        let out = migrate(&guest, &args.migrate, &args.uri, plot.as_ref())?;
        let dst = if out.info.status == MigrationStatus::Completed {
            let mut dst = Destination::start(&args, &args.uri)?;
            dst.expect("listening")?;
            eprintln!(
                "destination: pid {} restoring from {}",
                dst.child.id(),
                args.uri
            );
            Some(dst)
        } else {
            None
        };
        (out, args.uri.clone(), dst)
    } else {
        let mut dst = Destination::start(&args, &args.uri)?;
        let listening = dst.expect("listening")?;
        let uri = listening["uri"]
            .as_str()
            .ok_or("bad listening line")?
            .to_string();
        eprintln!("destination: pid {} listening on {uri}", dst.child.id());
        let guest = boot(&source_vm)?;
        let out = migrate(&guest, &args.migrate, &uri, plot.as_ref())?;
        (out, uri, Some(dst))
    };
    report(&out.info);
    let completed = out.info.status == MigrationStatus::Completed;
    let (checks, verified) = match dst {
        Some(mut dst) if completed => check(&mut dst, &out)?,
        _ => (json!({}), false),
    };
    if let Some(path) = &args.json {
        write_json(
            path,
            &json!({
                "query-migrate": out.info,
                "downtime-ms": out.info.downtime,
                "checks": checks,
            }),
        )?;
    }
    if !completed {
        Err(not_completed(&out.info, &uri))
    } else if verified {
        Ok(())
    } else {
        Err("the demo migration did not verify".into())
    }
}

/// The destination's side of a completed migration: its RAM digest at switch-over
/// against the source's, what the digest cost, and its guest running on.
fn check(dst: &mut Destination, out: &Outcome) -> Result<(Value, bool), String> {
    let completed = dst.expect("completed")?;
    let same = completed["ram-digest"].as_u64() == out.ram_digest;
    let check_ms = completed["ram-digest-ms"].as_f64();
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
    println!(
        "downtime {} ms; the RAM check took {} after it (the destination's guest \
         stayed paused for it; a migration without the check does not pay it)",
        out.info.downtime.unwrap_or(0),
        check_ms.map_or("?".to_string(), |ms| format!("{ms:.1} ms"))
    );
    let checks = json!({"ram-equal": same, "ram-check-ms": check_ms,
        "guest-runs-on-destination": advanced,
        "source-counters-at-switch-over": out.counters, "destination-counters": after});
    Ok((checks, same && advanced))
}
