//! A `ferry receive` destination in a process of its own, for the end-to-end tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use minivm::VmConfig;
use serde_json::Value;

/// `ferry SUBCOMMAND` with the guest flags of `cfg`, in network namespace `ns` if
/// given; the caller adds the others.
pub fn ferry(ns: Option<&str>, subcommand: &str, cfg: &VmConfig) -> Command {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry")]);
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_ferry")),
    };
    cmd.arg(subcommand)
        .args(["--mem", &cfg.mem_bytes.to_string()])
        .args(["--vcpus", &cfg.vcpus.to_string()])
        .args(["--workload", &cfg.workload.to_string()]);
    if cfg.backend == minivm::Backend::Threads {
        cmd.arg("--threads");
    }
    cmd
}

/// A `ferry receive --verify` child and its JSON lines; killed on drop.
pub struct Dest {
    /// The process.
    pub child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
    /// Where it listens (its `listening` line's `uri`).
    pub uri: String,
}

impl Dest {
    /// Listening at `uri` (port 0: any).
    pub fn spawn(cfg: &VmConfig, uri: &str) -> Dest {
        Self::spawn_in(None, cfg, uri, &[])
    }

    /// With more `ferry receive` flags.
    pub fn spawn_with(cfg: &VmConfig, uri: &str, extra: &[&str]) -> Dest {
        Self::spawn_in(None, cfg, uri, extra)
    }

    /// In network namespace `ns` (if given), with more flags.
    pub fn spawn_in(ns: Option<&str>, cfg: &VmConfig, uri: &str, extra: &[&str]) -> Dest {
        let mut child = ferry(ns, "receive", cfg)
            .args(["--verify", "--uri", uri])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ferry receive");
        let stdout = child.stdout.take().unwrap();
        let mut d = Dest {
            child,
            lines: BufReader::new(stdout).lines(),
            uri: String::new(),
        };
        let l = d.next_event();
        assert_eq!(l["event"], "listening", "{l}");
        d.uri = l["uri"].as_str().unwrap().to_string();
        d
    }

    /// The next line, past the postcopy progress lines (`postcopy-active`, ...).
    pub fn next_event(&mut self) -> Value {
        loop {
            let v = self.next_line();
            if !v["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("postcopy-"))
            {
                return v;
            }
        }
    }

    /// The next line, whatever it is.
    pub fn next_line(&mut self) -> Value {
        let line = self
            .lines
            .next()
            .expect("destination exited")
            .expect("read");
        serde_json::from_str(&line).expect("json line")
    }

    /// The next line of `event`, skipping any other.
    pub fn expect_event(&mut self, event: &str) -> Value {
        loop {
            let v = self.next_line();
            if v["event"] == event {
                return v;
            }
            assert_ne!(v["event"], "failed", "waiting for {event}: {v}");
        }
    }

    /// Ends the process.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// After a completed migration: the digest before resume, then counters advancing.
    pub fn check_completed(&mut self, src_digest: u64) {
        let done = self.next_event();
        assert_eq!(done["event"], "completed", "{done}");
        assert_eq!(
            done["ram-digest"].as_u64(),
            Some(src_digest),
            "destination RAM equals source RAM"
        );
        let running = self.next_event();
        assert_eq!(
            running["event"], "running",
            "the guest runs on the destination: {running}"
        );
    }

    /// After a failed migration: the destination reports failure and never resumes.
    pub fn check_failed(&mut self) {
        let l = self.next_event();
        assert_eq!(l["event"], "failed", "{l}");
        let status = self.child.wait().unwrap();
        assert!(!status.success());
    }

    /// Still listening: it has neither completed nor failed (nothing started).
    pub fn assert_still_waiting(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the destination exited"
        );
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        self.kill();
    }
}
