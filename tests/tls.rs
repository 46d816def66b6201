//! TLS end to end with real guests: two `ferry` processes in two network namespaces
//! (a `ferry send` in one, a `ferry receive` in the other) migrate over TLS 1.3 with
//! 1 and 2 channels and every page equal; and refusals with a guest running here:
//! a source whose CA the destination does not share, a plaintext source against a
//! TLS destination, and a byte flipped in flight (the destination fails and starts
//! nothing; the source's guest runs on).

mod common;
#[path = "../crates/transport/tests/common/tls_creds.rs"]
mod tls_creds;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{config, ferry, guest_lock, wait_all, Dest};
use ferry::migration_core::{MigrationSource, ParametersUpdate, TlsObject};
use ferry::stats::MigrationStatus;
use ferry::transport::{TlsCreds, TlsEndpoint};
use ferry::GuestVm;
use minivm::{DirtyTracking, VmConfig, Workload};
use serde_json::Value;
use tls_creds::{client_dn, Ca, Spec};

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "ferry-tls-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn creds(spec: &Spec) -> PathBuf {
    let d = temp_dir("creds");
    Ca::new("Ferry test CA").write_dir(&d, spec);
    d
}

/// Two namespaces joined by a veth pair (scripts/netns), removed on drop.
struct Net {
    name: String,
    ns_a: String,
    ns_b: String,
    addr_b: String,
}

impl Net {
    /// `None` (the test then runs on loopback) without root or `ip netns`.
    fn up(tag: &str) -> Option<Net> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("tls: not root, no namespaces: loopback instead");
            return None;
        }
        let name = format!("ftls-{}-{tag}", std::process::id() % 100_000);
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns"))
            .args(["up", "--name", &name])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "tls: scripts/netns up failed ({}): loopback instead",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let get = |k: &str| {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")).map(str::to_string))
        };
        Some(Net {
            ns_a: get("ns_a")?,
            ns_b: get("ns_b")?,
            addr_b: get("addr_b")?,
            name,
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/netns"))
            .args(["down", &self.name])
            .status();
    }
}

fn cfg() -> VmConfig {
    config(
        256 << 20,
        2,
        Workload::Dense {
            pages: 4096,
            bytes_per_page: 256,
        },
    )
}

/// `ferry send` in namespace A to `ferry receive` in namespace B (loopback without
/// namespaces), both with TLS and the destination allowing only this source.
fn tls_migration_between_processes(channels: u8) {
    let _g = guest_lock();
    if !common::kvm_or_skip() {
        return;
    }
    let net = Net::up(&format!("c{channels}"));
    let host = net
        .as_ref()
        .map_or("127.0.0.1".to_string(), |n| n.addr_b.clone());
    let dir = creds(&Spec {
        server_names: vec![host.clone()],
        ..Spec::default()
    });
    let cfg = cfg();
    let dn = client_dn("ferry-source");
    let mut dest = Dest::spawn_in(
        net.as_ref().map(|n| n.ns_b.as_str()),
        &cfg,
        &format!("tcp:{host}:0"),
        &["--tls-creds", dir.to_str().unwrap(), "--tls-authz", &dn],
    );
    let json = temp_dir("json").join("send.json");
    let out = ferry(net.as_ref().map(|n| n.ns_a.as_str()), "send", &cfg)
        .args(["--uri", &dest.uri, "--channels", &channels.to_string()])
        .args(["--tls-creds", dir.to_str().unwrap(), "--json"])
        .arg(&json)
        .output()
        .expect("run ferry send");
    assert!(
        out.status.success(),
        "ferry send: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "tls x{channels} to {} ({}):\n{}",
        dest.uri,
        if net.is_some() {
            "two namespaces"
        } else {
            "loopback"
        },
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["query-migrate"]["status"], "completed", "{v}");
    let digest = v["source-ram-digest"].as_u64().expect("source digest");
    dest.check_completed(digest);
}

#[test]
fn a_tls_migration_between_two_processes_on_one_channel() {
    tls_migration_between_processes(1);
}

#[test]
fn a_tls_migration_between_two_processes_on_two_channels() {
    tls_migration_between_processes(2);
}

fn boot(cfg: &VmConfig) -> Arc<GuestVm> {
    let g = Arc::new(GuestVm::boot(cfg.clone(), DirtyTracking::from_ring_entries(0)).unwrap());
    wait_all(&g.vm(), 2);
    g
}

/// A source for `guest`; with `creds`, TLS with them (endpoint client).
fn source(guest: &Arc<GuestVm>, creds: Option<&Path>) -> MigrationSource {
    let s = MigrationSource::new(guest.clone());
    s.set_parameters(&ParametersUpdate {
        max_bandwidth: Some(0),
        x_ferry_connect_timeout_ms: Some(3000),
        ..Default::default()
    })
    .unwrap();
    if let Some(dir) = creds {
        let c = TlsCreds::load("tls0", dir, TlsEndpoint::Client, true).unwrap();
        s.tls_objects().add("tls0", TlsObject::Creds(c)).unwrap();
        s.set_parameters(&ParametersUpdate {
            tls_creds: Some("tls0".into()),
            ..Default::default()
        })
        .unwrap();
    }
    s
}

/// Runs a migration that must fail; returns its error, after checking that the
/// source's guest runs again.
fn failed_migration(guest: &Arc<GuestVm>, s: &MigrationSource, uri: &str) -> String {
    s.migrate(uri).unwrap();
    assert_eq!(s.wait(), MigrationStatus::Failed);
    let e = s.query().error_desc.unwrap_or_default();
    wait_all(&guest.vm(), 2);
    e
}

#[test]
fn refusals_with_a_real_guest_leave_it_running_and_the_destination_waiting() {
    let _g = guest_lock();
    if !common::kvm_or_skip() {
        return;
    }
    let cfg = cfg();
    let guest = boot(&cfg);
    let dir = creds(&Spec::default());
    let other = creds(&Spec::default());
    let mut dest = Dest::spawn_in(
        None,
        &cfg,
        "tcp:127.0.0.1:0",
        &["--tls-creds", dir.to_str().unwrap()],
    );
    // Another CA.
    let e = failed_migration(&guest, &source(&guest, Some(&other)), &dest.uri);
    assert!(
        e.contains("TLS: the destination's certificate is not signed by a CA"),
        "{e}"
    );
    dest.assert_still_waiting();
    // Plaintext against TLS.
    let e = failed_migration(&guest, &source(&guest, None), &dest.uri);
    assert!(e.contains("requires TLS"), "{e}");
    dest.assert_still_waiting();
    drop(dest);
    // TLS against plaintext.
    let dest = Dest::spawn_in(None, &cfg, "tcp:127.0.0.1:0", &[]);
    let e = failed_migration(&guest, &source(&guest, Some(&dir)), &dest.uri);
    assert!(
        e.contains("TLS: the destination answered in plaintext"),
        "{e}"
    );
    drop(dest);
}

/// A proxy that flips one bit of the source-to-destination bytes at `at`.
fn flipping_proxy(to: String, at: u64) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let seen = Arc::new(AtomicU64::new(0));
        for c in l.incoming() {
            let Ok(c) = c else { return };
            let Ok(d) = TcpStream::connect(&to) else {
                return;
            };
            let (c2, d2) = (c.try_clone().unwrap(), d.try_clone().unwrap());
            let seen = seen.clone();
            std::thread::spawn(move || pump(c, d, Some((seen, at))));
            std::thread::spawn(move || pump(d2, c2, None));
        }
    });
    format!("tcp:127.0.0.1:{port}")
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
fn a_byte_flipped_in_flight_fails_the_destination_and_the_source_guest_runs_on() {
    let _g = guest_lock();
    if !common::kvm_or_skip() {
        return;
    }
    let cfg = cfg();
    let guest = boot(&cfg);
    let dir = creds(&Spec::default());
    let mut dest = Dest::spawn_in(
        None,
        &cfg,
        "tcp:127.0.0.1:0",
        &["--tls-creds", dir.to_str().unwrap()],
    );
    let real = dest.uri.trim_start_matches("tcp:").to_string();
    // Well inside the first pass (the dense guest's pages are megabytes).
    let proxy = flipping_proxy(real, 1 << 20);
    // The proxy's address is 127.0.0.1: the certificate is valid for it.
    let s = source(&guest, Some(&dir));
    let e = failed_migration(&guest, &s, &proxy);
    assert!(!e.is_empty());
    let l = dest.next_line();
    assert_eq!(l["event"], "failed", "{l}");
    let why = l["error"].as_str().unwrap_or_default();
    assert!(why.contains("failed authentication (AEAD)"), "{why}");
    // Failed before any commit: it never ran the guest.
    let status = dest.child.wait().unwrap();
    assert!(!status.success());
}
