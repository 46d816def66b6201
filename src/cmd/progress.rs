//! A live progress line for a running migration, drawn from `query-migrate`.
//!
//! On a terminal the line is fitted to its width and redrawn in place ten times a
//! second; otherwise (a pipe, a file) a plain line is printed at most once a second,
//! fitted to `COLUMNS` (80 when unset). The most useful fields come first and the
//! ones that do not fit are left off.

use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ferry::migration_core::{Capabilities, MigrationParameters, MigrationSource};
use ferry::plot::Timeline;
use ferry::stats::{Convergence, MigrationInfo};

use super::interrupted;

/// Columns assumed when the width is not known.
pub const DEFAULT_COLUMNS: usize = 80;

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

/// The fields of a progress line, most useful first: status, pass, remaining,
/// throughput, dirty rate, expected downtime, convergence, throttle, transferred.
pub fn fields(info: &MigrationInfo) -> Vec<String> {
    let mut v = vec![format!("[{}]", info.status.as_str())];
    if let Some(ram) = &info.ram {
        let pass = info.ferry.as_ref().map_or(0, |f| f.iterations);
        v.push(format!("pass {pass}"));
        v.push(format!("remaining {}", bytes(ram.remaining)));
        v.push(format!("{:.0} Mbit/s", ram.mbps));
        v.push(format!("dirty {} pages/s", ram.dirty_pages_rate));
    }
    if let Some(ms) = info.expected_downtime {
        v.push(format!("exp. downtime {ms} ms"));
    }
    if let Some(f) = &info.ferry {
        match f.convergence {
            Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec,
            } => v.push(format!(
                "NOT CONVERGING (needs {}/s)",
                bytes(needed_bandwidth_bytes_per_sec)
            )),
            Convergence::Converging {
                expected_completion_ms,
            } => v.push(format!(
                "done in ~{:.1} s",
                expected_completion_ms as f64 / 1000.0
            )),
            Convergence::Unknown => {}
        }
    }
    if let Some(p) = info.cpu_throttle_percentage {
        v.push(format!("throttle {p}%"));
    }
    if let Some(ram) = &info.ram {
        v.push(format!(
            "sent {} of {}",
            bytes(ram.transferred),
            bytes(ram.total)
        ));
    }
    v
}

/// One progress line from a snapshot, at most `columns - 1` characters (a line that
/// fills the last column makes some terminals wrap): the leading fields that fit.
pub fn line(info: &MigrationInfo, columns: usize) -> String {
    let max = columns.saturating_sub(1).max(1);
    let mut s = String::new();
    for (i, f) in fields(info).iter().enumerate() {
        let sep = match i {
            0 => "",
            1 => " ",
            _ => " | ",
        };
        if s.chars().count() + sep.len() + f.chars().count() > max {
            if i == 0 {
                s = f.chars().take(max).collect();
            }
            break;
        }
        s += sep;
        s += f;
    }
    s
}

/// The width of the terminal on stderr (TIOCGWINSZ) when `tty`, else `COLUMNS`,
/// else [`DEFAULT_COLUMNS`].
pub fn columns(tty: bool) -> usize {
    if tty {
        // SAFETY: winsize is plain data; TIOCGWINSZ writes at most one winsize into it
        // and fails without writing on a descriptor that is not a terminal.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the pointer is to a live, writable winsize.
        let r = unsafe {
            libc::ioctl(
                std::io::stderr().as_raw_fd(),
                libc::TIOCGWINSZ,
                &mut ws as *mut libc::winsize,
            )
        };
        if r == 0 && ws.ws_col > 0 {
            return usize::from(ws.ws_col);
        }
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&c| c > 0)
        .unwrap_or(DEFAULT_COLUMNS)
}

/// What to tell a user whose migration the engine predicts will not converge: the
/// flags that would help, given what is set now.
pub fn not_converging_advice(
    needed_bytes_per_sec: u64,
    params: &MigrationParameters,
    caps: &Capabilities,
) -> String {
    if caps.postcopy_ram && params.x_ferry_postcopy_auto {
        return format!(
            "ferry: this migration is not converging (it needs about {}/s): switching to \
             postcopy at the end of this pass.",
            bytes(needed_bytes_per_sec)
        );
    }
    let mut tips = Vec::new();
    if !caps.postcopy_ram {
        tips.push("--postcopy (move the guest now, fetch its pages after)".to_string());
    }
    if !caps.auto_converge {
        tips.push("--auto-converge (slow the guest's vCPUs down)".to_string());
    }
    if params.max_bandwidth != 0 {
        tips.push(format!(
            "a higher --max-bandwidth (now {}/s; needs about {}/s)",
            bytes(params.max_bandwidth),
            bytes(needed_bytes_per_sec)
        ));
    }
    tips.push(format!(
        "a larger --downtime-limit (now {} ms)",
        params.downtime_limit
    ));
    format!(
        "ferry: this migration is not converging: the guest dirties memory faster than \
         it can be sent. Try {}.",
        tips.join(", or ")
    )
}

/// Polls `source` every 100 ms until the migration ends, drawing the progress line on
/// stderr; returns the final snapshot. Says once when the engine predicts the
/// migration will not converge, and what to do. A Ctrl-C (see
/// [`super::catch_sigint`]) cancels the migration; the source guest keeps running and
/// the final snapshot says `cancelled`. With a `timeline` it records every snapshot
/// there, polling every 2 ms at first and every 100 ms after 10 s (a short migration
/// still gets a curve, a long one ~1000 samples), drawing the line at the same 100 ms
/// pace.
pub fn watch(source: &MigrationSource, mut timeline: Option<&mut Timeline>) -> MigrationInfo {
    let tty = std::io::stderr().is_terminal();
    let start = Instant::now();
    let tick = |sampling: bool| match sampling {
        true => (start.elapsed() / 100).clamp(Duration::from_millis(2), Duration::from_millis(100)),
        false => Duration::from_millis(100),
    };
    let mut last_draw: Option<Instant> = None;
    let mut last_print: Option<Instant> = None;
    let mut advised = false;
    let mut cancelled = false;
    loop {
        if interrupted() && !cancelled {
            cancelled = true;
            source.cancel();
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "{}ferry: interrupted: cancelling the migration (the source guest keeps \
                 running); Ctrl-C again to quit at once",
                if tty { "\r\x1b[K" } else { "" }
            );
        }
        let info = source.query();
        if let Some(t) = timeline.as_deref_mut() {
            // The snapshot is the engine's own: it always has query-migrate's shape.
            let _ = t.record(&info);
        }
        let done = info.status.is_finished();
        if !done && last_draw.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            std::thread::sleep(tick(timeline.is_some()));
            continue;
        }
        last_draw = Some(Instant::now());
        let cols = columns(tty);
        let mut err = std::io::stderr().lock();
        if !advised && !done {
            if let Some(Convergence::NotConverging {
                needed_bandwidth_bytes_per_sec,
            }) = info.ferry.as_ref().map(|f| f.convergence)
            {
                advised = true;
                let _ = writeln!(
                    err,
                    "{}{}",
                    if tty { "\r\x1b[K" } else { "" },
                    not_converging_advice(
                        needed_bandwidth_bytes_per_sec,
                        &source.parameters(),
                        &source.capabilities()
                    )
                );
            }
        }
        if tty {
            let _ = write!(err, "\r{}\x1b[K", line(&info, cols));
            if done {
                let _ = writeln!(err);
            }
        } else if done || last_print.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            let _ = writeln!(err, "{}", line(&info, cols));
            last_print = Some(Instant::now());
        }
        let _ = err.flush();
        drop(err);
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry::stats::{FerryMigrationInfo, MigrationStats, MigrationStatus};

    fn busy_info() -> MigrationInfo {
        MigrationInfo {
            status: MigrationStatus::Active,
            ram: Some(MigrationStats {
                transferred: 3 << 30,
                remaining: 900 << 20,
                total: 64 << 30,
                mbps: 9876.0,
                dirty_pages_rate: 1_234_567,
                ..Default::default()
            }),
            expected_downtime: Some(12345),
            cpu_throttle_percentage: Some(99),
            ferry: Some(FerryMigrationInfo {
                true_dirty_pages_rate: 0,
                new_dirty_pages_rate: 0,
                bandwidth_bytes_per_sec: 0,
                iterations: 123,
                sparse_pages: 0,
                downtime_phases_us: None,
                convergence: Convergence::NotConverging {
                    needed_bandwidth_bytes_per_sec: 5 << 30,
                },
                first_pass_convergence: None,
                postcopy: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_line_fits_the_width_and_keeps_the_first_fields() {
        let info = busy_info();
        let f = fields(&info);
        let full = format!("{} {}", f[0], f[1..].join(" | "));
        assert!(full.len() > 160, "the test needs a long line: {full}");
        for cols in [20, 40, 60, 80, 120, 160, 300] {
            let l = line(&info, cols);
            assert!(l.chars().count() < cols, "{cols}: {l:?}");
            assert!(l.starts_with("[active]"), "{l}");
        }
        assert!(line(&info, 80).contains("remaining 900.0 MiB"));
        assert!(line(&info, 80).contains("Mbit/s"));
        assert_eq!(line(&info, 300), full);
        assert_eq!(line(&info, 5), "[act");
    }

    #[test]
    fn advice_names_only_the_flags_that_help() {
        let params = MigrationParameters {
            max_bandwidth: 0,
            downtime_limit: 300,
            ..Default::default()
        };
        let mut caps = Capabilities::default();
        let a = not_converging_advice(1 << 30, &params, &caps);
        assert!(a.contains("--auto-converge") && a.contains("--downtime-limit (now 300 ms)"));
        assert!(
            !a.contains("--max-bandwidth"),
            "unlimited cannot go higher: {a}"
        );
        caps.auto_converge = true;
        let capped = MigrationParameters {
            max_bandwidth: 4 << 20,
            ..params
        };
        let a = not_converging_advice(1 << 30, &capped, &caps);
        assert!(!a.contains("--auto-converge"), "{a}");
        assert!(a.contains("--postcopy"), "{a}");
        assert!(a.contains("--max-bandwidth (now 4.0 MiB/s; needs about 1.0 GiB/s)"));
        // With --postcopy the engine switches by itself: the line says so.
        caps.postcopy_ram = true;
        let auto = MigrationParameters {
            x_ferry_postcopy_auto: true,
            ..capped
        };
        let a = not_converging_advice(1 << 30, &auto, &caps);
        assert!(a.contains("switching to postcopy"), "{a}");
        assert!(!a.contains("Try"), "{a}");
    }
}
