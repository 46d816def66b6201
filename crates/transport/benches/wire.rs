//! Wire throughput: encode + send + receive + decode of 4 KiB pages over
//! loopback TCP and Unix sockets with 1, 2 and 4 channels, each beside a raw
//! socket copy of the same bytes in the same run; zero-page batches; zstd.
//!
//! One iteration moves a whole 64 MiB stream (connect, header, 512 KiB
//! batches, end of stream, acknowledgement) into a prefaulted destination.
//! Run: `CARGO_TARGET_DIR=/work/target-transport cargo bench -p ferry-transport --bench wire`

// criterion_group! generates undocumented functions.
#![allow(missing_docs)]

mod support;

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use support::*;
use transport::{Compression, SendOptions, Sender, Uri};

fn bench_sockets(c: &mut Criterion) {
    let src = source(REGION_BYTES, false);
    let dest = Dest::new(REGION_BYTES);

    // TCP
    let tcp = ferry_server(&"tcp:127.0.0.1:0".parse().unwrap(), dest.clone());
    let raw_tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let raw_tcp_port = raw_tcp.local_addr().unwrap().port();
    raw_server(move || raw_tcp.accept().unwrap().0, dest.clone());
    let tcp_connect = move || TcpStream::connect(("127.0.0.1", raw_tcp_port)).unwrap();

    // Unix
    let upath = std::env::temp_dir().join(format!("ferry-bench-{}.sock", std::process::id()));
    let unix = ferry_server(&Uri::Unix(upath.clone()), dest.clone());
    let rpath = std::env::temp_dir().join(format!("ferry-bench-raw-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&rpath);
    let raw_unix = UnixListener::bind(&rpath).unwrap();
    raw_server(move || raw_unix.accept().unwrap().0, dest.clone());
    let rp = rpath.clone();
    let unix_connect = move || UnixStream::connect(&rp).unwrap();

    for (name, uri) in [("tcp", &tcp), ("unix", &unix)] {
        let mut g = c.benchmark_group(format!("pages_4k_{name}"));
        g.throughput(Throughput::Bytes(REGION_BYTES as u64));
        for n in [1u16, 2, 4] {
            g.bench_function(BenchmarkId::new("raw", n), |b| {
                b.iter_custom(|iters| {
                    timed(iters, || {
                        if name == "tcp" {
                            raw_send(&tcp_connect, &src, n.into())
                        } else {
                            raw_send(&unix_connect, &src, n.into())
                        }
                    })
                })
            });
            g.bench_function(BenchmarkId::new("ferry", n), |b| {
                b.iter_custom(|iters| {
                    timed(iters, || ferry_send(uri, &src, opts(n, Compression::None)))
                })
            });
        }
        g.finish();
    }

    let mut g = c.benchmark_group("pages_4k_zstd_unix");
    let zsrc = source(REGION_BYTES, true);
    g.throughput(Throughput::Bytes(REGION_BYTES as u64));
    for n in [1u16, 2] {
        g.bench_function(BenchmarkId::new("ferry_zstd", n), |b| {
            b.iter_custom(|iters| {
                timed(iters, || {
                    ferry_send(&unix, &zsrc, opts(n, Compression::Zstd))
                })
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_file(&upath);
    let _ = std::fs::remove_file(&rpath);
}

fn bench_zero_pages(c: &mut Criterion) {
    let dest = Dest::new(ZERO_REGION_BYTES);
    let uri = ferry_server(&"tcp:127.0.0.1:0".parse().unwrap(), dest);
    let pages = (ZERO_REGION_BYTES / PAGE_SIZE) as u64;
    let offsets: Vec<u64> = (0..pages).collect();
    let mut g = c.benchmark_group("zero_pages_tcp");
    g.throughput(Throughput::Bytes(ZERO_REGION_BYTES as u64));
    g.bench_function("ferry_zero_256MiB", |b| {
        b.iter_custom(|iters| {
            timed(iters, || {
                let s = Sender::connect(
                    &uri,
                    PAGE_SIZE as u32,
                    blocks(ZERO_REGION_BYTES),
                    opts(1, Compression::None),
                )
                .unwrap();
                s.send_zero_pages(0, &offsets).unwrap();
                s.finish().unwrap();
            })
        })
    });
    g.finish();
}

/// Rate limit: 64 MiB at a 256 MiB/s cap over Unix; the reported throughput
/// must stay within 5 % of the cap (the limiter's own bound is about 2 %).
fn bench_rate_limit(c: &mut Criterion) {
    let src = source(REGION_BYTES, false);
    let dest = Dest::new(REGION_BYTES);
    let path = std::env::temp_dir().join(format!("ferry-bench-rl-{}.sock", std::process::id()));
    let uri = ferry_server(&Uri::Unix(path.clone()), dest);
    let mut g = c.benchmark_group("rate_limit_256MiBps_unix");
    g.throughput(Throughput::Bytes(REGION_BYTES as u64));
    for n in [1u16, 4] {
        let o = SendOptions {
            max_bandwidth_bytes_per_sec: 256 << 20,
            ..opts(n, Compression::None)
        };
        g.bench_function(BenchmarkId::new("ferry", n), |b| {
            b.iter_custom(|iters| timed(iters, || ferry_send(&uri, &src, o.clone())))
        });
    }
    g.finish();
    let _ = std::fs::remove_file(&path);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_sockets, bench_zero_pages, bench_rate_limit
}
criterion_main!(benches);
