//! Recording a skipped test (no /dev/kvm, no userfaultfd), shared by the test helpers
//! of the root package (tests/common), of minivm (crates/minivm/tests/common) and of
//! uffd, which include this file with `#[path]`.

/// Records the running test as skipped for lack of /dev/kvm: `SKIPPED (no /dev/kvm):
/// <crate>::<test>` on stderr, and the name appended to the file `$FERRY_SKIP_LOG`
/// names (scripts/test counts them).
#[allow(dead_code)] // not every includer skips for KVM
pub fn record_skip() {
    record_skip_because("no /dev/kvm");
}

/// Records the running test as skipped because of `why` (see [`record_skip`]).
pub fn record_skip_because(why: &str) {
    // libtest runs each test on a thread named after it.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("(unnamed test)");
    let name = format!("{}::{test}", env!("CARGO_CRATE_NAME"));
    // Straight to the process's stderr, past libtest's capture of passing tests' output.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED ({why}): {name}");
    if let Some(path) = std::env::var_os("FERRY_SKIP_LOG") {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{name}"));
        if let Err(e) = appended {
            panic!("cannot append to FERRY_SKIP_LOG {path:?}: {e}");
        }
    }
}
