//! A live progress line for a running migration, drawn from `query-migrate`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use ferry::migration_core::MigrationSource;
use ferry::stats::{Convergence, MigrationInfo};

/// Formats bytes as B/KiB/MiB/GiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One progress line from a snapshot.
pub fn line(info: &MigrationInfo) -> String {
    let mut s = format!("[{:<9}]", info.status.as_str());
    if let Some(ram) = &info.ram {
        let pass = info.ferry.as_ref().map_or(0, |f| f.iterations);
        s += &format!(
            " pass {pass:>3} | {} / {} | remaining {} | dirty {} pages/s | {:.0} Mbit/s",
            bytes(ram.transferred),
            bytes(ram.total),
            bytes(ram.remaining),
            ram.dirty_pages_rate,
            ram.mbps
        );
    }
    if let Some(ms) = info.expected_downtime {
        s += &format!(" | exp. downtime {ms} ms");
    }
    if let Some(f) = &info.ferry {
        if let Convergence::NotConverging {
            needed_bandwidth_bytes_per_sec,
        } = f.convergence
        {
            s += &format!(
                " | NOT CONVERGING (needs {}/s)",
                bytes(needed_bandwidth_bytes_per_sec)
            );
        }
    }
    if let Some(p) = info.cpu_throttle_percentage {
        s += &format!(" | throttle {p}%");
    }
    s
}

/// Polls `source` every 100 ms until the migration ends, drawing the line on stderr
/// (redrawn in place on a terminal, one line a second otherwise); returns the final
/// snapshot.
pub fn watch(source: &MigrationSource) -> MigrationInfo {
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now() - Duration::from_secs(10);
    loop {
        let info = source.query();
        let done = info.status.is_finished();
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r\x1b[2K{}", line(&info));
            if done {
                let _ = writeln!(err);
            }
        } else if done || last_print.elapsed() >= Duration::from_secs(1) {
            let _ = writeln!(err, "{}", line(&info));
            last_print = Instant::now();
        }
        let _ = err.flush();
        if done {
            return source.query();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
