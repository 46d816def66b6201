//! `-v`/`-vv`/`-vvv` and `RUST_LOG`: Ferry's tracing events as text on stderr.
//!
//! Stdout carries what tools parse (`ferry vm`'s and `ferry receive`'s JSON lines,
//! reports), so logs never go there. Without `-v` and without `RUST_LOG` only
//! warnings and errors are shown, and the command's own output is as it always was.

use std::sync::atomic::{AtomicU8, Ordering};

use tracing_subscriber::EnvFilter;

/// The library crates whose events `-v` turns on (their tracing targets).
const FERRY_TARGETS: [&str; 8] = [
    "ferry",
    "migration_core",
    "transport",
    "dirty_sync",
    "qmp",
    "minivm",
    "stats",
    "plot",
];

/// The `-v` count given, for child processes (`ferry demo`'s destination).
static VERBOSE: AtomicU8 = AtomicU8::new(0);

/// The filter for `verbose` `-v` flags: warnings and errors from everything, and
/// info (1), debug (2) or trace (3 or more) from Ferry's crates.
pub fn filter_for(verbose: u8) -> String {
    let level = match verbose {
        0 => return "warn".into(),
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let mut f = String::from("warn");
    for t in FERRY_TARGETS {
        f.push_str(&format!(",{t}={level}"));
    }
    f
}

/// Installs the stderr subscriber: `RUST_LOG` when set (and valid), else the level
/// `verbose` asks for.
pub fn init(verbose: u8) {
    VERBOSE.store(verbose, Ordering::Relaxed);
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = match from_env.as_deref().map(EnvFilter::try_new) {
        Some(Ok(f)) => f,
        Some(Err(e)) => {
            eprintln!("ferry: ignoring RUST_LOG: {e}");
            EnvFilter::new(filter_for(verbose))
        }
        None => EnvFilter::new(filter_for(verbose)),
    };
    // A second subscriber cannot be installed; there is none before this one.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_thread_names(true)
        .try_init();
}

/// The `-v` flags this process was started with, to pass on to a child `ferry`.
pub fn verbose_args() -> Vec<String> {
    match VERBOSE.load(Ordering::Relaxed) {
        0 => Vec::new(),
        n => vec![format!("-{}", "v".repeat(usize::from(n)))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(filter_for(0), "warn");
        let one = filter_for(1);
        assert!(one.starts_with("warn,"), "{one}");
        assert!(one.contains("migration_core=info"), "{one}");
        assert!(filter_for(2).contains("transport=debug"));
        assert!(filter_for(7).contains("dirty_sync=trace"));
        for v in 0..4 {
            assert!(EnvFilter::try_new(filter_for(v)).is_ok());
        }
    }
}
