//! Writes test TLS credentials in QEMU's `tls-creds-x509` layout (a fresh CA, a
//! server certificate, a client certificate) into a directory, with rcgen: for the
//! Python QMP tests and for trying `--tls-creds` by hand. Never for production.
//!
//! `cargo run --release --example tls_creds -- DIR [--server-name NAME]...
//! [--client-cn CN] [--expired-server] [--expired-client]`; prints
//! `{"dir": DIR, "client-dn": "CN=...,O=Ferry test"}`.

#[path = "../crates/transport/tests/common/tls_creds.rs"]
mod tls_creds;

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let mut spec = tls_creds::Spec::default();
    let mut names = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--server-name" => names.push(args.next().expect("--server-name NAME")),
            "--client-cn" => spec.client_cn = args.next().expect("--client-cn CN"),
            "--expired-server" => spec.expired_server = true,
            "--expired-client" => spec.expired_client = true,
            _ if dir.is_none() && !a.starts_with('-') => dir = Some(PathBuf::from(a)),
            _ => {
                eprintln!("usage: tls_creds DIR [--server-name NAME]... [--client-cn CN] [--expired-server] [--expired-client]");
                std::process::exit(2);
            }
        }
    }
    let Some(dir) = dir else {
        eprintln!("usage: tls_creds DIR [...]");
        std::process::exit(2);
    };
    if !names.is_empty() {
        spec.server_names = names;
    }
    tls_creds::Ca::new("Ferry test CA").write_dir(&dir, &spec);
    println!(
        "{}",
        serde_json::json!({"dir": dir, "client-dn": tls_creds::client_dn(&spec.client_cn)})
    );
}
