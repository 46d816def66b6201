//! TLS against plaintext on loopback TCP, robust to a shared, noisy machine: each
//! round sends the same 64 MiB of dense (incompressible) pages once in plaintext
//! and once over TLS 1.3 (AES-128-GCM), back to back, alternating which goes first;
//! the report gives the median rates and the median of the per-round ratios, for 1
//! and 2 channels. Then the handshake's cost: the median time `Sender::connect`
//! takes (TCP connect, handshake, verdict, preamble and header) with and without
//! TLS, per connection.
//! Run: `cargo bench -p ferry-transport --bench tls`

mod support;
#[path = "../tests/common/tls_creds.rs"]
mod tls_creds;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::*;
use transport::{
    AcceptOptions, Compression, Listener, SendOptions, Sender, TlsConfig, TlsCreds, TlsEndpoint,
    Uri,
};

const ROUNDS: usize = 11;
const HANDSHAKES: usize = 41;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// CPU time this process has used (every thread, user and system), seconds.
fn process_cpu_s() -> f64 {
    // SAFETY: rusage is plain data; getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU time the calling thread has used, seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs one transfer of the region: its rate, GiB/s, and the CPU time both ends
/// spent on it (this process holds both), ns per byte.
fn gib_per_s(f: impl FnOnce()) -> (f64, f64) {
    let (t, cpu) = (Instant::now(), process_cpu_s());
    f();
    let cpu_ns_per_byte = (process_cpu_s() - cpu) * 1e9 / REGION_BYTES as f64;
    (
        REGION_BYTES as f64 / (1u64 << 30) as f64 / t.elapsed().as_secs_f64(),
        cpu_ns_per_byte,
    )
}

/// AES-128-GCM (ring, TLS's cipher here) sealing 16 KiB records on one core, GB/s of
/// the calling thread's CPU time.
fn aes_gcm_gb_per_s() -> f64 {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7; 16]).unwrap());
    let mut record = vec![0x5au8; 16 << 10];
    let total = 1usize << 30;
    let t = thread_cpu_s();
    for seq in 0..(total / record.len()) as u64 {
        let mut iv = [0u8; 12];
        iv[4..].copy_from_slice(&seq.to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(iv), Aad::empty(), &mut record)
            .unwrap();
        let _ = std::hint::black_box(tag);
    }
    total as f64 / (thread_cpu_s() - t) / 1e9
}

/// A receiver thread taking streams one after another into `dest`, with `tls`.
fn server(tls: Option<TlsConfig>, dest: Arc<Dest>) -> Uri {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = listener.local_uri().unwrap();
    let opts = AcceptOptions {
        tls,
        ..AcceptOptions::default()
    };
    thread::spawn(move || loop {
        let Ok(mut rx) = listener.accept_with(&opts) else {
            return;
        };
        rx.receive(&*dest, |_| Ok(())).unwrap();
        rx.await_commit().unwrap();
        rx.send_ack(true).unwrap();
    });
    uri
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferry-bench-tls-{}", std::process::id()));
    tls_creds::Ca::new("bench-ca").write_dir(&dir, &tls_creds::Spec::default());
    let client = TlsConfig::new(TlsCreds::load("tls0", &dir, TlsEndpoint::Client, true).unwrap());
    let srv = TlsConfig::new(TlsCreds::load("tls0", &dir, TlsEndpoint::Server, true).unwrap());

    let src = source(REGION_BYTES, false);
    let dest = Dest::new(REGION_BYTES);
    let plain_uri = server(None, dest.clone());
    let tls_uri = server(Some(srv), dest.clone());

    println!("dense 4 KiB pages, 64 MiB per stream, loopback TCP, {ROUNDS} rounds of plaintext and TLS back to back, medians");
    println!(
        "| channels | plaintext GiB/s | TLS GiB/s | TLS / plaintext | CPU ns/byte plaintext | CPU ns/byte TLS | cores busy plaintext | cores busy TLS |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for n in [1u16, 2] {
        let (mut plain, mut tls, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
        let (mut plain_cpu, mut tls_cpu) = (Vec::new(), Vec::new());
        for round in 0..ROUNDS + 1 {
            let mut rates = [(0.0f64, 0.0f64); 2];
            for k in 0..2 {
                let which = (round + k) % 2;
                rates[which] = if which == 0 {
                    gib_per_s(|| ferry_send(&plain_uri, &src, opts(n, Compression::None)))
                } else {
                    let o = SendOptions {
                        tls: Some(client.clone()),
                        ..opts(n, Compression::None)
                    };
                    gib_per_s(|| ferry_send(&tls_uri, &src, o))
                };
            }
            if round > 0 {
                plain.push(rates[0].0);
                tls.push(rates[1].0);
                ratio.push(rates[1].0 / rates[0].0);
                plain_cpu.push(rates[0].1);
                tls_cpu.push(rates[1].1);
            }
        }
        let (pc, tc) = (median(plain_cpu), median(tls_cpu));
        let (pr, tr) = (median(plain), median(tls));
        // Cores kept busy: CPU seconds per byte times bytes per second.
        let busy = |gib_s: f64, ns_b: f64| gib_s * (1u64 << 30) as f64 * ns_b * 1e-9;
        println!(
            "| {n} | {pr:.2} | {tr:.2} | {:.0} % | {pc:.2} | {tc:.2} | {:.2} | {:.2} |",
            100.0 * median(ratio),
            busy(pr, pc),
            busy(tr, tc),
        );
    }
    let aes = aes_gcm_gb_per_s();
    println!(
        "CPU ns/byte: both ends' CPU time (user and system, this process holds both) per byte \
         of guest memory moved; cores busy: that times the rate (of this machine's {} cores; \
         a stream that keeps fewer busy is held by its threads' serial work, not by the CPU). \
         AES-128-GCM (ring) on one core here now: {:.2} GB/s ({:.2} ns/byte, paid once by \
         each end).",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        aes,
        1.0 / aes
    );

    // Setup time: connect (and the handshake) of one connection, then an empty
    // stream is finished so the receiver takes the next.
    let connect = |uri: &Uri, tls: Option<TlsConfig>| -> Duration {
        let o = SendOptions {
            tls,
            ..opts(1, Compression::None)
        };
        let t = Instant::now();
        let s = Sender::connect(uri, PAGE_SIZE as u32, blocks(src.len()), o).unwrap();
        let d = t.elapsed();
        s.finish().unwrap();
        d
    };
    let (mut p, mut t) = (Vec::new(), Vec::new());
    for _ in 0..HANDSHAKES {
        p.push(connect(&plain_uri, None).as_secs_f64() * 1e3);
        t.push(connect(&tls_uri, Some(client.clone())).as_secs_f64() * 1e3);
    }
    let (p, t) = (median(p), median(t));
    println!(
        "setup of one connection (median of {HANDSHAKES}): plaintext {p:.3} ms, TLS {t:.3} ms, handshake adds {:.3} ms",
        t - p
    );
    let _ = std::fs::remove_dir_all(&dir);
}
