//! What the end-to-end benchmarks share: a fresh `ferry receive` destination process
//! and the median of a few runs.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};

use minivm::VmConfig;
use serde_json::Value;

/// A fresh destination process on loopback TCP; its JSON lines.
pub struct Dest {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Dest {
    /// Spawns `ferry receive` for a guest like `cfg` (with `--verify`: the completed
    /// line carries the RAM digest); returns it and the URI it listens on.
    pub fn spawn(cfg: &VmConfig, verify: bool) -> (Dest, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.args(["receive", "--uri", "tcp:127.0.0.1:0"])
            .args(["--mem", &cfg.mem_bytes.to_string()])
            .args(["--vcpus", &cfg.vcpus.to_string()])
            .args(["--workload", &cfg.workload.to_string()])
            .stdout(Stdio::piped());
        if verify {
            cmd.arg("--verify");
        }
        let mut child = cmd.spawn().expect("spawn ferry receive");
        let stdout = child.stdout.take().expect("stdout");
        let mut d = Dest {
            child,
            lines: BufReader::new(stdout).lines(),
        };
        let l = d.next().expect("the destination's first line");
        assert_eq!(l["event"], "listening", "{l}");
        let uri = l["uri"].as_str().expect("uri").to_string();
        (d, uri)
    }

    /// The next line, past the postcopy progress lines (`postcopy-active`, ...); None
    /// once the process exited.
    pub fn next(&mut self) -> Option<Value> {
        loop {
            let line = self.lines.next()?.ok()?;
            let v: Value = serde_json::from_str(&line).ok()?;
            if !v["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("postcopy-"))
            {
                return Some(v);
            }
        }
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The median (the upper one of an even count); NaNs sort as equal.
pub fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}
