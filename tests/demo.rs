//! `ferry demo` (and `send`/`receive`) as a user runs them: the built binary, its
//! exit status, its output and its `--json` report.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `ferry` with the guest on the test backend (`--threads` without KVM; with
/// FERRY_REQUIRE_KVM=1 a missing KVM fails the test).
fn ferry(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(args);
    if common::backend() == minivm::Backend::Threads {
        cmd.arg("--threads");
    }
    cmd.env_remove("COLUMNS");
    cmd
}

fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("run ferry");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// The lines of `ferry`'s own errors (`ferry: ...`).
fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("ferry: "))
        .collect()
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Kills the child if the test ends before it did (a failed assertion).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json report")).expect("json")
}

#[test]
fn uris_that_cannot_work_are_refused_before_anything_starts() {
    for (cmd, args, flag) in [
        ("demo", vec!["--uri", "mem:x"], "--uri mem:x: mem:"),
        ("send", vec!["--uri", "mem:x"], "--uri mem:x: mem:"),
        ("demo", vec!["--uri", "bogus:x"], "--uri bogus:x:"),
        (
            "demo",
            vec!["--uri", "file:/tmp/never-written", "--channels", "2"],
            "--channels 2 with --uri file:/tmp/never-written",
        ),
    ] {
        let mut all = vec![cmd];
        all.extend(&args);
        all.extend(["--mem", "64M"]);
        let (out, _, stderr) = run(&mut ferry(&all));
        assert!(!out.status.success(), "{all:?}: {stderr}");
        let errors = error_lines(&stderr);
        assert_eq!(errors.len(), 1, "{all:?}: one error: {stderr}");
        assert!(errors[0].contains(flag), "{all:?}: {stderr}");
        assert!(
            !stderr.contains("source guest") && !stderr.contains("destination:"),
            "{all:?}: refused before a guest or a destination started: {stderr}"
        );
    }
}

#[test]
fn errors_name_the_flag_and_the_address_once() {
    let _g = common::guest_lock();
    for (args, want) in [
        (
            vec!["demo", "--mem", "3M"],
            "ferry: --mem 3M: must be a multiple of 2 MiB and at least 4 MiB",
        ),
        (vec!["demo", "--vcpus", "0"], "ferry: --vcpus 0: must be in"),
        (
            vec!["send", "--uri", "tcp:127.0.0.1:1", "--mem", "5M"],
            "ferry: --mem 5M:",
        ),
        // 192.0.2.1 is TEST-NET-1: no host has it.
        (
            vec!["demo", "--mem", "64M", "--uri", "tcp:192.0.2.1:4444"],
            "ferry: destination: cannot listen on tcp:192.0.2.1:4444: ",
        ),
        (
            vec!["receive", "--mem", "64M", "--uri", "tcp:192.0.2.1:4444"],
            "ferry: cannot listen on tcp:192.0.2.1:4444: ",
        ),
        // Port 1 on loopback: nothing listens there.
        (
            vec!["send", "--mem", "64M", "--uri", "tcp:127.0.0.1:1"],
            "ferry: migration to tcp:127.0.0.1:1 failed: ",
        ),
    ] {
        let (out, _, stderr) = run(&mut ferry(&args));
        assert!(!out.status.success(), "{args:?}");
        let errors = error_lines(&stderr);
        assert_eq!(errors.len(), 1, "{args:?}: exactly one error: {stderr}");
        assert!(errors[0].starts_with(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("mem_bytes"), "{args:?}: {stderr}");
        assert!(!stderr.contains("exited before"), "{args:?}: {stderr}");
    }
}

/// A demo's `--json`: downtime and the RAM check's cost apart, the check passing,
/// and every progress line within `COLUMNS`.
#[test]
fn demo_reports_downtime_and_check_cost_apart_and_fits_the_width() {
    let _g = common::guest_lock();
    let json = tmp("demo.json");
    let (out, stdout, stderr) = run(ferry(&[
        "demo",
        "--mem",
        "128M",
        "--vcpus",
        "1",
        "--workload",
        "working-set=8M",
        "--json",
        json.to_str().expect("utf-8 path"),
    ])
    .env("COLUMNS", "40"));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v = read_json(&json);
    assert_eq!(v["query-migrate"]["status"], "completed", "{v}");
    let downtime = v["downtime-ms"].as_u64().expect("downtime-ms");
    assert_eq!(Some(downtime), v["query-migrate"]["downtime"].as_u64());
    let checks = &v["checks"];
    assert_eq!(checks["ram-equal"], true, "{v}");
    assert_eq!(checks["guest-runs-on-destination"], true, "{v}");
    let check_ms = checks["ram-check-ms"].as_f64().expect("ram-check-ms");
    assert!(check_ms > 0.0, "{v}");
    assert!(
        stdout.contains(&format!("downtime {downtime} ms; the RAM check took")),
        "{stdout}"
    );
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with('[')).collect();
    assert!(
        progress.iter().any(|l| l.starts_with("[completed]")),
        "{stderr}"
    );
    for l in progress {
        assert!(l.chars().count() < 40, "wider than COLUMNS=40: {l:?}");
    }
}

#[test]
fn demo_to_a_file_restores_it_and_checks() {
    let _g = common::guest_lock();
    let file = tmp("snapshot.mig");
    let json = tmp("file.json");
    let uri = format!("file:{}", file.display());
    let (out, stdout, stderr) = run(&mut ferry(&[
        "demo",
        "--mem",
        "64M",
        "--uri",
        &uri,
        "--json",
        json.to_str().expect("utf-8 path"),
    ]));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let v = read_json(&json);
    assert_eq!(v["query-migrate"]["status"], "completed", "{v}");
    assert_eq!(v["checks"]["ram-equal"], true, "{v}");
    assert_eq!(v["checks"]["guest-runs-on-destination"], true, "{v}");
}

/// Ctrl-C during a migration that cannot converge: the advice was given once, the
/// migration is cancelled, the summary printed, and the exit status is non-zero.
#[test]
fn ctrl_c_cancels_and_prints_the_summary() {
    let _g = common::guest_lock();
    let json = tmp("cancel.json");
    let mut child = KillOnDrop(
        ferry(&[
            "demo",
            "--mem",
            "256M",
            "--vcpus",
            "1",
            "--workload",
            "working-set=64M",
            "--no-sparse-pages",
            "--max-bandwidth",
            "4M",
            "--json",
            json.to_str().expect("utf-8 path"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry demo"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all += &line;
            all.push('\n');
        }
        all
    });
    // Wait for the state: the engine has said it does not converge.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("no not-converging advice within 15 s");
        if line.contains("not converging") {
            break;
        }
    }
    let pid = libc::pid_t::try_from(child.0.id()).expect("pid");
    // SAFETY: kill has no memory preconditions; pid is our running child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            panic!("ferry demo did not end within 15 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().expect("reader");
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().expect("stdout"), &mut stdout)
        .expect("stdout");
    assert!(!status.success(), "{status}");
    assert_eq!(status.code(), Some(1), "an exit, not a signal: {status}");
    assert!(
        stdout.contains("status            cancelled"),
        "{stdout}\n{stderr}"
    );
    assert_eq!(
        stderr.matches("not converging").count(),
        1,
        "advice once: {stderr}"
    );
    assert!(stderr.contains("--auto-converge") && stderr.contains("--max-bandwidth"));
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert_eq!(read_json(&json)["query-migrate"]["status"], "cancelled");
}
