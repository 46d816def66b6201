//! The floor under a QMP server on this machine: a responder that does no work.
//!
//! It greets like QMP and answers every request it reads with one canned
//! `query-migrate`-sized reply, a thread per client, as Ferry's server does, but
//! with no parsing, no locks and no serialization. `tests/qmp/poll_bench.py
//! --floor` polls it under the same load as Ferry's server (a migration between
//! two `ferry vm`): what its clients see is the latency and the CPU cost any QMP
//! server pays on this machine, before it does anything.
//!
//!     cargo run --release -p ferry-qmp --example floor -- /tmp/floor.sock

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

/// A reply shaped and sized like Ferry's `query-migrate` during a migration.
const REPLY: &str = concat!(
    r#"{"return":{"status":"active","setup-time":5,"total-time":812,"expected-downtime":12,"#,
    r#""ram":{"transferred":812345678,"remaining":123456789,"total":1073741824,"duplicate":1234,"#,
    r#""skipped":0,"normal":198765,"normal-bytes":814141440,"dirty-pages-rate":32768,"mbps":8123.45,"#,
    r#""dirty-sync-count":3,"postcopy-requests":0,"page-size":4096,"multifd-bytes":0,"#,
    r#""pages-per-second":262144,"precopy-bytes":812345678,"downtime-bytes":0,"postcopy-bytes":0,"#,
    r#""dirty-sync-missed-zero-copy":0},"cpu-throttle-percentage":0,"#,
    r#""x-ferry":{"dirty-pages-rate":32768,"new-dirty-pages-rate":32768,"bandwidth-bytes-per-sec":1234567890,"#,
    r#""convergence":{"state":"converging","expected-completion-ms":120},"sparse-pages":0,"#,
    r#""downtime-phases-us":null}}}"#,
    "\r\n"
);

fn main() -> std::io::Result<()> {
    let path = std::env::args().nth(1).expect("usage: floor SOCKET_PATH");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    println!("listening on {path}");
    for conn in listener.incoming() {
        let mut s = conn?;
        std::thread::spawn(move || {
            let greeting = concat!(
                r#"{"QMP":{"version":{"qemu":{"major":7,"minor":2,"micro":0},"package":"floor"},"capabilities":[]}}"#,
                "\r\n"
            );
            if s.write_all(greeting.as_bytes()).is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            // One reply per read: each client sends a request and waits for its answer.
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(REPLY.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
    Ok(())
}
