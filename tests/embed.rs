//! examples/embed.rs, the minimal embedding VMM, migrates its guest between two
//! processes on loopback. Needs /dev/kvm: without it the test is skipped, unless
//! FERRY_REQUIRE_KVM=1, which makes a missing KVM a failure.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

/// Bounds a hung process only; nothing here waits for a fixed time.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Kills the child if the test ends before it did (a failed assertion).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The example binary of this test's profile, built (or found up to date) by cargo:
/// `cargo test --test embed` alone does not build examples. This test runs from
/// target/PROFILE/deps/, the example lands in target/PROFILE/examples/.
fn embed_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/PROFILE/deps");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => panic!("no profile directory above {}", exe.display()),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--example", "embed", "--profile", profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build --example embed");
    assert!(status.success(), "cargo build --example embed: {status}");
    let bin = profile_dir.join("examples").join("embed");
    assert!(bin.exists(), "{} was not built", bin.display());
    bin
}

/// Reads stdout's JSON lines on a thread: one channel message per line.
fn json_lines(stdout: ChildStdout) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let v = serde_json::from_str(&line).unwrap_or(Value::String(line));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    rx
}

/// Kills `child` (it may hang) and returns what it wrote to stderr.
fn kill_for_stderr(child: &mut Child) -> String {
    let _ = child.kill();
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

#[test]
fn the_embedding_example_migrates_its_guest_between_two_processes() {
    if !common::kvm_or_skip() {
        return;
    }
    let bin = embed_binary();
    let spawn = |args: &[&str]| {
        let child = Command::new(&bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the example");
        KillOnDrop(child)
    };

    // Port 0: the destination binds a free port and says which.
    let mut dst = spawn(&["destination", "--listen", "tcp:127.0.0.1:0"]);
    let dst_lines = json_lines(dst.0.stdout.take().expect("stdout"));
    let listening = dst_lines.recv_timeout(TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "destination did not listen ({e}): {}",
            kill_for_stderr(&mut dst.0)
        )
    });
    let uri = listening["listening"]
        .as_str()
        .unwrap_or_else(|| panic!("a listening line: {listening}"))
        .to_string();

    let mut src = spawn(&["source", "--to", &uri]);
    let src_lines = json_lines(src.0.stdout.take().expect("stdout"));
    let s = src_lines.recv_timeout(TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "source gave no report ({e}): {}",
            kill_for_stderr(&mut src.0)
        )
    });
    let d = dst_lines.recv_timeout(TIMEOUT).unwrap_or_else(|e| {
        panic!(
            "destination gave no report ({e}): {}",
            kill_for_stderr(&mut dst.0)
        )
    });
    eprintln!("source: {s}\ndestination: {d}");

    assert_eq!(s["status"], "completed", "source: {s}");
    assert!(s["transferred_bytes"].as_u64() > Some(0), "source: {s}");
    assert!(s["ram_digest"].is_u64(), "source: {s}");
    assert_eq!(
        s["ram_digest"], d["ram_digest"],
        "RAM differs after switch-over"
    );
    // The source guest stopped at the switch-over and stays stopped ...
    assert_eq!(s["counter"], s["counter_200ms_later"], "source: {s}");
    assert_eq!(s["counter"], d["counter_at_switchover"], "{s} {d}");
    // ... and carries on from there on the destination.
    let at = d["counter_at_switchover"].as_u64().expect("counter");
    assert!(at > 0, "the guest ran on the source: {d}");
    assert!(d["counter_now"].as_u64() > Some(at), "destination: {d}");

    for (name, p) in [("source", &mut src), ("destination", &mut dst)] {
        let status = p.0.wait().expect("wait");
        assert!(status.success(), "{name}: {status}");
    }
}
