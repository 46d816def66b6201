//! TLS on `tcp:` streams: a round trip with 1 and 2 channels (and postcopy's
//! priority connection), and every refusal with the check that failed in its text:
//! wrong CA, expired certificates, wrong host name, a client outside tls-authz,
//! plaintext against TLS both ways, and a byte flipped in flight.

mod common;
#[path = "common/tls_creds.rs"]
mod tls_creds;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tls_creds::{client_dn, Ca, Spec};
use transport::{
    AcceptOptions, BlockInfo, Error, Listener, Result, SendOptions, Sender, TlsAuthz, TlsConfig,
    TlsCreds, TlsEndpoint, Uri, VecSink,
};

const PS: u32 = 4096;

fn creds_dir(ca: &Ca, spec: &Spec) -> PathBuf {
    let d = temp_path("tls");
    ca.write_dir(&d, spec);
    d
}

fn client(dir: &Path) -> TlsConfig {
    TlsConfig::new(TlsCreds::load("tls0", dir, TlsEndpoint::Client, true).unwrap())
}

fn server(dir: &Path) -> TlsConfig {
    TlsConfig::new(TlsCreds::load("tls0", dir, TlsEndpoint::Server, true).unwrap())
}

fn blocks() -> Vec<BlockInfo> {
    vec![BlockInfo {
        id: "ram".into(),
        size_bytes: 256 * u64::from(PS),
    }]
}

fn ops() -> Vec<Op> {
    let mut v = Vec::new();
    for chunk in 0..8u64 {
        v.push(Op::Pages {
            block: 0,
            offsets: (chunk * 32..chunk * 32 + 24).collect(),
            fill: (0..24).map(|i| (i * 2 + chunk as u8) & 0xfe).collect(),
        });
        v.push(Op::Zero {
            block: 0,
            offsets: (chunk * 32 + 24..chunk * 32 + 28).collect(),
        });
        v.push(Op::Sparse {
            block: 0,
            offsets: (chunk * 32 + 28..chunk * 32 + 32).collect(),
            fill: vec![3, 9, 17, 33],
        });
    }
    v.push(Op::Device {
        name: "cpu".into(),
        data: vec![5; 3000],
    });
    v.push(Op::IterationEnd(0));
    v
}

fn accept_opts(tls: Option<TlsConfig>) -> AcceptOptions {
    AcceptOptions {
        preamble_timeout: Duration::from_secs(3),
        tls,
        ..AcceptOptions::default()
    }
}

fn send_opts(tls: Option<TlsConfig>, channels: u16) -> SendOptions {
    SendOptions {
        channels,
        connect_timeout: Duration::from_secs(3),
        io_timeout: Duration::from_secs(3),
        switchover_timeout: Duration::from_secs(3),
        tls,
        ..SendOptions::default()
    }
}

/// Receives one whole stream on `l` into memory.
fn receive(l: Listener, tls: Option<TlsConfig>) -> Result<Vec<Vec<u8>>> {
    let mut rx = l.accept_with(&accept_opts(tls))?;
    let sink = VecSink::for_header(rx.header());
    rx.receive(&sink, |_| Ok(()))?;
    rx.await_commit()?;
    rx.send_ack(true)?;
    Ok(sink.into_blocks())
}

fn bind() -> (Uri, Listener) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    (l.local_uri().unwrap(), l)
}

fn round_trip_tls(channels: u16) {
    let ca = Ca::new("ca");
    let dir = creds_dir(&ca, &Spec::default());
    round_trip_with(client(&dir), server(&dir), channels);
}

/// One whole stream from `client` to `server`; every page must land.
fn round_trip_with(client: TlsConfig, server: TlsConfig, channels: u16) {
    let (uri, l) = bind();
    let h = thread::spawn(move || receive(l, Some(server)));
    let ops = ops();
    let s = Sender::connect(&uri, PS, blocks(), send_opts(Some(client), channels)).unwrap();
    let ack = send_ops(s, &ops).unwrap();
    assert!(ack.resumed);
    let mem = h.join().unwrap().unwrap();
    assert_eq!(mem, model(PS as usize, &blocks(), &ops));
}

/// A credentials directory of `ca-cert.pem` from `ca_from` and the client's
/// certificate and key from `client_from` (or none).
fn mixed_dir(ca_from: &Path, client_from: Option<&Path>) -> PathBuf {
    let mixed = temp_path("tls-mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(ca_from.join("ca-cert.pem"), mixed.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        if let Some(from) = client_from {
            std::fs::copy(from.join(f), mixed.join(f)).unwrap();
        }
    }
    mixed
}

#[test]
fn a_destination_without_verify_peer_takes_any_client_or_none() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let other = creds_dir(&Ca::new("other"), &Spec::default());
    let lax = || TlsConfig::new(TlsCreds::load("tls0", &dir, TlsEndpoint::Server, false).unwrap());
    // A client certificate from a CA the destination does not trust (refused with
    // verify-peer on: a_client_certificate_from_another_ca_is_refused_by_the_destination).
    round_trip_with(client(&mixed_dir(&dir, Some(&other))), lax(), 1);
    // No client certificate at all.
    round_trip_with(client(&mixed_dir(&dir, None)), lax(), 2);
    // With verify-peer on, the source without a certificate is refused.
    let e = refused(Some(client(&mixed_dir(&dir, None))), Some(server(&dir)));
    assert!(
        e.contains("requires a client certificate; we sent none"),
        "{e}"
    );
}

#[test]
fn a_source_without_verify_peer_takes_any_destination_certificate() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let other = creds_dir(&Ca::new("other"), &Spec::default());
    // Trusts another CA, so the destination's certificate does not verify; its own
    // client certificate is from the destination's CA.
    let cdir = mixed_dir(&other, Some(&dir));
    let lax = TlsConfig::new(TlsCreds::load("tls0", &cdir, TlsEndpoint::Client, false).unwrap());
    round_trip_with(lax, server(&dir), 1);
    // The same directory with verify-peer on is refused.
    let e = refused(Some(client(&cdir)), Some(server(&dir)));
    assert!(e.contains("not signed by a CA"), "{e}");
}

#[test]
fn a_tls_stream_round_trips_on_one_channel() {
    round_trip_tls(1);
}

#[test]
fn a_tls_stream_round_trips_on_two_channels() {
    round_trip_tls(2);
}

/// The sender's error when a stream is refused; the receiver must not have taken a
/// stream within the sender's attempt (it keeps waiting: nothing starts).
fn refused(send_tls: Option<TlsConfig>, recv_tls: Option<TlsConfig>) -> String {
    let (uri, l) = bind();
    let (tx, rx) = crossbeam_channel::bounded(1);
    thread::spawn(move || {
        let r = l.accept_with(&accept_opts(recv_tls)).map(|_| ());
        let _ = tx.send(r);
    });
    let started = Instant::now();
    let r = Sender::connect(&uri, PS, blocks(), send_opts(send_tls, 2))
        .and_then(|s| send_ops(s, &ops()));
    let e = r.expect_err("the stream must be refused");
    // A decision, not a hang: well within the 3 s timeouts plus slack.
    assert!(started.elapsed() < Duration::from_secs(8), "{e}");
    // The destination took no stream.
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the destination accepted a stream"
    );
    e.to_string()
}

#[test]
fn a_source_with_a_certificate_from_another_ca_is_refused() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let other = creds_dir(&Ca::new("other"), &Spec::default());
    let e = refused(Some(client(&other)), Some(server(&dir)));
    // The client also does not trust the server (another CA): it fails first.
    assert!(
        e.contains("TLS: the destination's certificate is not signed by a CA"),
        "{e}"
    );
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_by_the_destination() {
    let ca = Ca::new("ca");
    let dir = creds_dir(&ca, &Spec::default());
    let other = creds_dir(&Ca::new("other"), &Spec::default());
    // The source trusts the real CA but presents a client certificate of another.
    let e = refused(
        Some(client(&mixed_dir(&dir, Some(&other)))),
        Some(server(&dir)),
    );
    assert!(
        e.contains("TLS: the peer refused the handshake with alert")
            && e.contains("does not trust the CA"),
        "{e}"
    );
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let ca = Ca::new("ca");
    let dir = creds_dir(
        &ca,
        &Spec {
            expired_server: true,
            ..Spec::default()
        },
    );
    let e = refused(Some(client(&dir)), Some(server(&dir)));
    assert!(
        e.contains("TLS: the destination's certificate has expired"),
        "{e}"
    );
}

#[test]
fn an_expired_client_certificate_is_refused() {
    let ca = Ca::new("ca");
    let dir = creds_dir(
        &ca,
        &Spec {
            expired_client: true,
            ..Spec::default()
        },
    );
    let e = refused(Some(client(&dir)), Some(server(&dir)));
    assert!(e.contains("our certificate has expired"), "{e}");
}

#[test]
fn a_wrong_host_name_is_refused() {
    let ca = Ca::new("ca");
    let dir = creds_dir(&ca, &Spec::default());
    let mut c = client(&dir);
    c.hostname = Some("migration.example".into());
    let e = refused(Some(c), Some(server(&dir)));
    assert!(
        e.contains("TLS: the destination's certificate is not valid for name 'migration.example'"),
        "{e}"
    );
    // The host of the URI is the default name: the certificate has no "127.0.0.2".
    let dir2 = creds_dir(
        &ca,
        &Spec {
            server_names: vec!["localhost".into()],
            ..Spec::default()
        },
    );
    let e = refused(Some(client(&dir2)), Some(server(&dir2)));
    assert!(e.contains("is not valid for name '127.0.0.1'"), "{e}");
}

#[test]
fn a_client_outside_tls_authz_is_refused_and_one_inside_passes() {
    let ca = Ca::new("ca");
    let dir = creds_dir(&ca, &Spec::default());
    let mut s = server(&dir);
    s.authz = Some(TlsAuthz::allow_list("auth0", [client_dn("someone-else")]));
    let e = refused(Some(client(&dir)), Some(s));
    assert!(
        e.contains(&format!(
            "TLS: the destination refused this source: client certificate '{}' is not in tls-authz 'auth0'",
            client_dn("ferry-source")
        )),
        "{e}"
    );
    // In the list: the stream goes through.
    let (uri, l) = bind();
    let mut s = server(&dir);
    s.authz = Some(TlsAuthz::allow_list("auth0", [client_dn("ferry-source")]));
    let h = thread::spawn(move || receive(l, Some(s)));
    let ops = ops();
    let snd = Sender::connect(&uri, PS, blocks(), send_opts(Some(client(&dir)), 1)).unwrap();
    send_ops(snd, &ops).unwrap();
    assert_eq!(
        h.join().unwrap().unwrap(),
        model(PS as usize, &blocks(), &ops)
    );
}

#[test]
fn a_plaintext_source_is_refused_by_a_tls_destination() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let e = refused(None, Some(server(&dir)));
    assert!(
        e.contains(
            "this destination requires TLS (tls-creds is set) and the source speaks plaintext"
        ),
        "{e}"
    );
}

#[test]
fn a_tls_source_is_refused_by_a_plaintext_destination() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let e = refused(Some(client(&dir)), None);
    assert!(
        e.contains("TLS: the destination answered in plaintext")
            && e.contains("this destination has no tls-creds and the source speaks TLS"),
        "{e}"
    );
}

#[test]
fn a_silent_tls_peer_times_out() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    // Accepts and never answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let _hold = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        thread::sleep(Duration::from_secs(10));
        drop(s);
    });
    let uri: Uri = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    let e = match Sender::connect(&uri, PS, blocks(), send_opts(Some(client(&dir)), 1)) {
        Ok(_) => panic!("connected to a silent peer"),
        Err(e) => e,
    };
    assert!(matches!(e, Error::TimedOut(_)), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(3 + 5),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_cancel_ends_a_handshake_with_a_silent_peer_at_once() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let _hold = thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        thread::sleep(Duration::from_secs(10));
        drop(s);
    });
    let uri: Uri = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let cancel = transport::Cancel::new();
    let c2 = cancel.clone();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        c2.cancel();
    });
    let t = Instant::now();
    // A connect timeout far beyond the cancel.
    let opts = SendOptions {
        connect_timeout: Duration::from_secs(30),
        ..send_opts(Some(client(&dir)), 1)
    };
    let r = Sender::connect_with(&uri, PS, blocks(), opts, &cancel);
    canceller.join().unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// A TCP proxy that flips one bit of the source-to-destination bytes at `flip_at`.
fn flipping_proxy(to: Uri, flip_at: u64) -> Uri {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let Uri::Tcp { host, port: dport } = to else {
        unreachable!()
    };
    thread::spawn(move || {
        let seen = Arc::new(AtomicU64::new(0));
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(d) = TcpStream::connect(format!("{host}:{dport}")) else {
                return;
            };
            let (c2, d2) = (c.try_clone().unwrap(), d.try_clone().unwrap());
            let seen = seen.clone();
            thread::spawn(move || pump(c, d, Some((seen, flip_at))));
            thread::spawn(move || pump(d2, c2, None));
        }
    });
    format!("tcp:127.0.0.1:{port}").parse().unwrap()
}

fn pump(mut from: TcpStream, mut to: TcpStream, flip: Option<(Arc<AtomicU64>, u64)>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((seen, at)) = &flip {
            let start = seen.fetch_add(n as u64, Ordering::SeqCst);
            if (start..start + n as u64).contains(at) {
                buf[(at - start) as usize] ^= 0x01;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[test]
fn a_byte_flipped_in_flight_fails_the_aead_and_the_destination_takes_nothing() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let (uri, l) = bind();
    // Past the handshake (a few KiB), inside the page data of the one channel.
    let proxy = flipping_proxy(uri, 200_000);
    let st = server(&dir);
    let h = thread::spawn(move || receive(l, Some(st)));
    let s = Sender::connect(&proxy, PS, blocks(), send_opts(Some(client(&dir)), 1)).unwrap();
    let sent = send_ops(s, &ops());
    let got = h.join().unwrap();
    let e = got.expect_err("the destination must refuse an altered stream");
    assert!(
        matches!(&e, Error::Tls(m) if m.contains("failed authentication (AEAD)")),
        "{e}"
    );
    let se = sent.expect_err("the source must not see success");
    assert!(!matches!(se, Error::InDoubt(_)), "{se}");
}

#[test]
fn creds_for_the_wrong_endpoint_are_refused_with_a_clear_error() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let (uri, _l) = bind();
    let e = match Sender::connect(&uri, PS, blocks(), send_opts(Some(server(&dir)), 1)) {
        Ok(_) => panic!("server creds used by a source"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("needs endpoint 'client'"), "{e}");
    let missing = TlsCreds::load("x", &temp_path("none"), TlsEndpoint::Server, true).unwrap_err();
    assert!(missing.to_string().contains("ca-cert.pem"), "{missing}");
}

#[test]
fn the_subject_name_prints_in_rfc4514_order() {
    let dir = creds_dir(&Ca::new("ca"), &Spec::default());
    let pem = std::fs::read(dir.join("client-cert.pem")).unwrap();
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    assert_eq!(
        transport::subject_dn(der.as_ref()).unwrap(),
        client_dn("ferry-source")
    );
}

#[test]
fn a_plaintext_stream_cannot_leave_its_page_checksums_to_tls() {
    use transport::format::{Kind as RecKind, Preamble, RecordHeader, FEATURE_AEAD_PAGES};
    let mut h = transport::StreamHeader {
        page_size: PS,
        blocks: blocks(),
        features: transport::Features {
            compression: transport::Compression::None,
            channels: 1,
            sparse_pages: true,
            page_checksum: transport::PageChecksum::Xxh3,
            postcopy: false,
            resume: false,
            aead_pages: true,
        },
    };
    let body = h.encode_body();
    assert_ne!(body[5] & FEATURE_AEAD_PAGES, 0);
    let mut stream = Preamble {
        channel_index: 0,
        channel_count: 1,
        session_id: 7,
    }
    .encode()
    .to_vec();
    stream.extend_from_slice(
        &RecordHeader {
            kind: RecKind::Header,
            flags: 0,
            body_len: body.len() as u32,
            body_crc: transport::checksum::crc32c(&body),
        }
        .encode(),
    );
    stream.extend_from_slice(&body);
    let e = transport::decode_bytes(&stream, 1 << 30).unwrap_err();
    assert!(e.to_string().contains("does not run inside TLS"), "{e}");
    // The same header without the bit decodes (to a truncated stream further on).
    h.features.aead_pages = false;
    assert!(!h.encode_body().is_empty());
}
