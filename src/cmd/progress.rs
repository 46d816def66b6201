//! A live progress line for a running migration, drawn from `query-migrate`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use ferry::migration_core::MigrationSource;
use ferry::plot::Timeline;
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
/// snapshot. With a `timeline` it records every snapshot there, polling every 2 ms at
/// first and every 100 ms after 10 s (a short migration still gets a curve, a long
/// one ~1000 samples), drawing the line at the same 100 ms pace.
pub fn watch(source: &MigrationSource, mut timeline: Option<&mut Timeline>) -> MigrationInfo {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let tick = |sampling: bool| match sampling {
        true => (start.elapsed() / 100).clamp(Duration::from_millis(2), Duration::from_millis(100)),
        false => Duration::from_millis(100),
    };
    let mut last_draw = Instant::now() - Duration::from_secs(10);
    let mut last_print = Instant::now() - Duration::from_secs(10);
    loop {
        let info = source.query();
        if let Some(t) = timeline.as_deref_mut() {
            // The snapshot is the engine's own: it always has query-migrate's shape.
            let _ = t.record(&info);
        }
        let done = info.status.is_finished();
        if !done && last_draw.elapsed() < Duration::from_millis(100) {
            std::thread::sleep(tick(timeline.is_some()));
            continue;
        }
        last_draw = Instant::now();
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
            let info = source.query();
            if let Some(t) = timeline.as_deref_mut() {
                let _ = t.record(&info);
            }
            return info;
        }
        std::thread::sleep(tick(timeline.is_some()));
    }
}
