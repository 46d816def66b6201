//! Paired ferry-vs-raw throughput, robust to a shared, noisy machine: each
//! round runs one raw-socket copy and one ferry stream of the same 64 MiB back
//! to back (alternating which goes first), and the report gives the median of
//! the per-round ratios beside the median rates.
//! Run: `CARGO_TARGET_DIR=/work/target-transport cargo bench -p ferry-transport --bench paired`

mod support;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use support::*;
use transport::{Compression, Uri};

const ROUNDS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn gib_per_s(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    REGION_BYTES as f64 / (1u64 << 30) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let src = source(REGION_BYTES, false);
    let dest = Dest::new(REGION_BYTES);

    let tcp = ferry_server(&"tcp:127.0.0.1:0".parse().unwrap(), dest.clone());
    let raw_tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let raw_tcp_port = raw_tcp.local_addr().unwrap().port();
    raw_server(move || raw_tcp.accept().unwrap().0, dest.clone());
    let tcp_connect = move || TcpStream::connect(("127.0.0.1", raw_tcp_port)).unwrap();

    let upath = std::env::temp_dir().join(format!("ferry-paired-{}.sock", std::process::id()));
    let unix = ferry_server(&Uri::Unix(upath.clone()), dest.clone());
    let rpath = std::env::temp_dir().join(format!("ferry-paired-raw-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&rpath);
    let raw_unix = UnixListener::bind(&rpath).unwrap();
    raw_server(move || raw_unix.accept().unwrap().0, dest.clone());
    let rp = rpath.clone();
    let unix_connect = move || UnixStream::connect(&rp).unwrap();

    println!("4 KiB pages, 64 MiB per stream, {ROUNDS} paired rounds, medians");
    for (name, uri) in [("tcp", &tcp), ("unix", &unix)] {
        for n in [1u16, 2, 4] {
            let (mut raw, mut ferry, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..ROUNDS + 1 {
                let r_raw = || {
                    gib_per_s(|| {
                        if name == "tcp" {
                            raw_send(&tcp_connect, &src, n.into())
                        } else {
                            raw_send(&unix_connect, &src, n.into())
                        }
                    })
                };
                let r_ferry = || gib_per_s(|| ferry_send(uri, &src, opts(n, Compression::None)));
                let (r, f) = if round % 2 == 0 {
                    let r = r_raw();
                    (r, r_ferry())
                } else {
                    let f = r_ferry();
                    (r_raw(), f)
                };
                if round > 0 {
                    raw.push(r);
                    ferry.push(f);
                    ratio.push(f / r);
                }
            }
            println!(
                "{name} {n} ch: raw {:.2} GiB/s, ferry {:.2} GiB/s, ferry/raw {:.0} %",
                median(raw),
                median(ferry),
                100.0 * median(ratio)
            );
        }
    }
    let _ = std::fs::remove_file(&upath);
    let _ = std::fs::remove_file(&rpath);
}
