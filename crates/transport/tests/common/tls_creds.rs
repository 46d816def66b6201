//! Test credentials in QEMU's `tls-creds-x509` layout, made at test time with rcgen
//! (never committed): a CA, a server certificate for the given names and a client
//! certificate with a given common name. Shared by the transport's tests, the
//! `ferry` tests and the `tls_creds` example (which the Python QMP tests run).
#![allow(dead_code)]

use std::path::Path;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// The organisation of every test certificate's subject.
pub const ORG: &str = "Ferry test";

/// A test certificate authority.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

/// What to put in a credentials directory.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Names (DNS names or IP addresses) the server certificate is valid for.
    pub server_names: Vec<String>,
    /// Common name of the client certificate (subject `CN=<cn>,O=Ferry test`).
    pub client_cn: String,
    /// Make the server certificate expired (valid 2000 to 2001).
    pub expired_server: bool,
    /// Make the client certificate expired.
    pub expired_client: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            client_cn: "ferry-source".into(),
            expired_server: false,
            expired_client: false,
        }
    }
}

/// The subject the client certificate of `cn` has, as Ferry prints it (RFC 4514).
pub fn client_dn(cn: &str) -> String {
    format!("CN={cn},O={ORG}")
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::OrganizationName, ORG);
    d.push(DnType::CommonName, cn);
    d
}

impl Ca {
    /// A fresh CA named `cn`.
    pub fn new(cn: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name = dn(cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    fn leaf(
        &self,
        names: &[String],
        cn: &str,
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> (String, String) {
        let mut p = CertificateParams::new(names.to_vec()).expect("leaf params");
        p.distinguished_name = dn(cn);
        p.extended_key_usages = vec![usage];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if expired {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`
    /// and `client-key.pem` into `dir` (created if missing).
    pub fn write_dir(&self, dir: &Path, spec: &Spec) {
        std::fs::create_dir_all(dir).expect("creds dir");
        let (sc, sk) = self.leaf(
            &spec.server_names,
            spec.server_names.first().map_or("server", |s| s.as_str()),
            ExtendedKeyUsagePurpose::ServerAuth,
            spec.expired_server,
        );
        let (cc, ck) = self.leaf(
            &[],
            &spec.client_cn,
            ExtendedKeyUsagePurpose::ClientAuth,
            spec.expired_client,
        );
        for (name, text) in [
            ("ca-cert.pem", self.cert.pem()),
            ("server-cert.pem", sc),
            ("server-key.pem", sk),
            ("client-cert.pem", cc),
            ("client-key.pem", ck),
        ] {
            std::fs::write(dir.join(name), text).expect("write a creds file");
        }
    }
}
