//! Paired ferry-vs-raw throughput, robust to a shared, noisy machine: each
//! round runs one raw-socket copy and two ferry streams (XXH3 page checksums, the
//! default, and CRC32C) of the same 64 MiB back to back (rotating which goes
//! first), and the report gives the median of the per-round ratios beside the
//! median rates.
//! Run: `CARGO_TARGET_DIR=/work/target-transport cargo bench -p ferry-transport --bench paired`

mod support;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Instant;

use support::*;
use transport::{Compression, PageChecksum, SendOptions, Uri};

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

    println!("4 KiB pages, 64 MiB per stream, {ROUNDS} rounds of raw, ferry (XXH3 page checksums) and ferry (CRC32C) back to back, medians");
    for (name, uri) in [("tcp", &tcp), ("unix", &unix)] {
        for n in [1u16, 2, 4] {
            let (mut raw, mut xxh3, mut crc) = (Vec::new(), Vec::new(), Vec::new());
            let (mut ratio_xxh3, mut ratio_crc) = (Vec::new(), Vec::new());
            for round in 0..ROUNDS + 1 {
                let mut rates = [0.0f64; 3];
                // Rotate which goes first, so a drift in the machine's load hits each alike.
                for k in 0..3 {
                    let which = (round + k) % 3;
                    rates[which] = match which {
                        0 => gib_per_s(|| {
                            if name == "tcp" {
                                raw_send(&tcp_connect, &src, n.into())
                            } else {
                                raw_send(&unix_connect, &src, n.into())
                            }
                        }),
                        1 => gib_per_s(|| ferry_send(uri, &src, opts(n, Compression::None))),
                        _ => gib_per_s(|| {
                            let o = SendOptions {
                                page_checksum: PageChecksum::Crc32c,
                                ..opts(n, Compression::None)
                            };
                            ferry_send(uri, &src, o)
                        }),
                    };
                }
                if round > 0 {
                    let [r, x, c] = rates;
                    raw.push(r);
                    xxh3.push(x);
                    crc.push(c);
                    ratio_xxh3.push(x / r);
                    ratio_crc.push(c / r);
                }
            }
            println!(
                "{name} {n} ch: raw {:.2} GiB/s, ferry xxh3 {:.2} GiB/s = {:.0} %, ferry crc32c {:.2} GiB/s = {:.0} % of raw",
                median(raw),
                median(xxh3),
                100.0 * median(ratio_xxh3),
                median(crc),
                100.0 * median(ratio_crc)
            );
        }
    }
    let _ = std::fs::remove_file(&upath);
    let _ = std::fs::remove_file(&rpath);
}
