//! TLS 1.3 on `tcp:` connections (rustls with the ring provider), with mutual x509
//! authentication, QEMU's `tls-creds-x509` directory layout and `authz-list`
//! allow-lists.
//!
//! rustls runs the handshake on each TCP connection before Ferry's preamble; then the
//! destination sends one verdict record (accepted, or refused and why), and the
//! traffic keys are taken out of rustls into a small TLS 1.3 record layer of our own
//! (RFC 8446 §5.2, ring's AEAD), split in a send half and a receive half, so that one
//! thread can write page batches while another reads the back-channel, as on a plain
//! socket. A page batch is copied once into record buffers and sealed in place; a
//! received record is opened in place and copied once into guest pages.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ring::aead;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ConnectionTrafficSecrets, DigitallySignedStruct, SignatureScheme};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::format::{encode_record, Kind, MAGIC, RECORD_HEADER_BYTES};

/// Which side of a connection a set of credentials is for (QEMU's `endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// The migration source: connects, verifies the destination's name, presents
    /// `client-cert.pem`.
    Client,
    /// The migration destination: listens, presents `server-cert.pem`, verifies the
    /// source's client certificate.
    Server,
}

impl std::str::FromStr for TlsEndpoint {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "client" => Ok(TlsEndpoint::Client),
            "server" => Ok(TlsEndpoint::Server),
            _ => Err(Error::InvalidArgument(format!(
                "TLS endpoint '{s}': expected 'client' or 'server'"
            ))),
        }
    }
}

/// QEMU's `tls-creds-x509` object: x509 credentials loaded from a directory holding
/// `ca-cert.pem` and, for a server, `server-cert.pem` and `server-key.pem`, for a
/// client `client-cert.pem` and `client-key.pem`. Cheap to clone.
#[derive(Clone)]
pub struct TlsCreds {
    inner: Arc<CredsInner>,
}

struct CredsInner {
    id: String,
    dir: PathBuf,
    endpoint: TlsEndpoint,
    verify_peer: bool,
    client: Option<Arc<rustls::ClientConfig>>,
    server: Option<Arc<rustls::ServerConfig>>,
}

impl fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsCreds")
            .field("id", &self.inner.id)
            .field("dir", &self.inner.dir)
            .field("endpoint", &self.inner.endpoint)
            .field("verify_peer", &self.inner.verify_peer)
            .finish()
    }
}

impl PartialEq for TlsCreds {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
impl Eq for TlsCreds {}

/// Ring with the TLS 1.3 suites only, AES-128-GCM first (the fastest with AES-NI).
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn creds_err(dir: &Path, file: &str, why: impl fmt::Display) -> Error {
    Error::Tls(format!(
        "TLS credentials: {}: {why}",
        dir.join(file).display()
    ))
}

fn load_certs(dir: &Path, file: &str) -> Result<Vec<CertificateDer<'static>>> {
    let path = dir.join(file);
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| creds_err(dir, file, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| creds_err(dir, file, e))?;
    if certs.is_empty() {
        return Err(creds_err(dir, file, "no certificate in it"));
    }
    Ok(certs)
}

fn load_key(dir: &Path, file: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(dir.join(file)).map_err(|e| creds_err(dir, file, e))
}

fn load_roots(dir: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(dir, "ca-cert.pem")? {
        roots.add(c).map_err(|e| creds_err(dir, "ca-cert.pem", e))?;
    }
    Ok(Arc::new(roots))
}

impl TlsCreds {
    /// Loads the credentials of `endpoint` from `dir` (QEMU's `object-add
    /// tls-creds-x509`, `id`, `dir`, `endpoint`, `verify-peer`). With `verify_peer`
    /// (QEMU's default) a server requires and checks a client certificate, and a
    /// client checks the server's certificate against `ca-cert.pem` and the host
    /// name; without it the peer's certificate is not checked. A client without
    /// `client-cert.pem` presents no certificate.
    pub fn load(id: &str, dir: &Path, endpoint: TlsEndpoint, verify_peer: bool) -> Result<Self> {
        let p = provider();
        let tls_err =
            |e: rustls::Error| Error::Tls(format!("TLS credentials in {}: {e}", dir.display()));
        let (client, server) = match endpoint {
            TlsEndpoint::Client => {
                let b = rustls::ClientConfig::builder_with_provider(p.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(tls_err)?;
                let b = if verify_peer {
                    b.with_root_certificates(load_roots(dir)?)
                } else {
                    b.dangerous()
                        .with_custom_certificate_verifier(Arc::new(NoServerCheck(
                            p.signature_verification_algorithms,
                        )))
                };
                let mut c = if dir.join("client-cert.pem").exists() {
                    b.with_client_auth_cert(
                        load_certs(dir, "client-cert.pem")?,
                        load_key(dir, "client-key.pem")?,
                    )
                    .map_err(tls_err)?
                } else {
                    b.with_no_client_auth()
                };
                c.enable_secret_extraction = true;
                c.resumption = rustls::client::Resumption::disabled();
                (Some(Arc::new(c)), None)
            }
            TlsEndpoint::Server => {
                let b = rustls::ServerConfig::builder_with_provider(p.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(tls_err)?;
                let b = if verify_peer {
                    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                        load_roots(dir)?,
                        p.clone(),
                    )
                    .build()
                    .map_err(|e| {
                        Error::Tls(format!("TLS credentials in {}: {e}", dir.display()))
                    })?;
                    b.with_client_cert_verifier(v)
                } else {
                    b.with_no_client_auth()
                };
                let mut s = b
                    .with_single_cert(
                        load_certs(dir, "server-cert.pem")?,
                        load_key(dir, "server-key.pem")?,
                    )
                    .map_err(tls_err)?;
                s.enable_secret_extraction = true;
                // No tickets: nothing follows the handshake but our verdict record.
                s.send_tls13_tickets = 0;
                (None, Some(Arc::new(s)))
            }
        };
        Ok(TlsCreds {
            inner: Arc::new(CredsInner {
                id: id.to_string(),
                dir: dir.to_path_buf(),
                endpoint,
                verify_peer,
                client,
                server,
            }),
        })
    }

    /// The object's id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The directory the credentials came from.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Which side they are for.
    pub fn endpoint(&self) -> TlsEndpoint {
        self.inner.endpoint
    }

    /// Whether the peer's certificate is checked.
    pub fn verify_peer(&self) -> bool {
        self.inner.verify_peer
    }
}

/// How an [`AuthzRule`] matches a distinguished name (QEMU's `QAuthZListFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthzFormat {
    /// The whole name, byte for byte.
    Exact,
    /// A glob: `*` matches any run of characters, `?` one character.
    Glob,
}

/// One rule of an [`TlsAuthz`] list (QEMU's `QAuthZListRule`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzRule {
    /// The distinguished name (or glob), in RFC 4514 form: `CN=client,O=Example`.
    pub pattern: String,
    /// How `pattern` matches.
    pub format: AuthzFormat,
    /// `allow` (true) or `deny` (false) when it matches.
    pub allow: bool,
}

/// QEMU's `authz-list` object: which client certificates a destination accepts,
/// by subject distinguished name. The first matching rule decides; with none,
/// `default_allow`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsAuthz {
    /// The object's id (named in refusals).
    pub id: String,
    /// The rules, in order.
    pub rules: Vec<AuthzRule>,
    /// The verdict when no rule matches (QEMU's `policy`, default deny).
    pub default_allow: bool,
}

impl TlsAuthz {
    /// An allow-list: exactly these names, everything else denied.
    pub fn allow_list(id: &str, names: impl IntoIterator<Item = String>) -> Self {
        TlsAuthz {
            id: id.to_string(),
            rules: names
                .into_iter()
                .map(|pattern| AuthzRule {
                    pattern,
                    format: AuthzFormat::Exact,
                    allow: true,
                })
                .collect(),
            default_allow: false,
        }
    }

    /// Whether a client whose certificate's subject is `dn` may migrate here.
    pub fn is_allowed(&self, dn: &str) -> bool {
        for r in &self.rules {
            let hit = match r.format {
                AuthzFormat::Exact => r.pattern == dn,
                AuthzFormat::Glob => glob(r.pattern.as_bytes(), dn.as_bytes()),
            };
            if hit {
                return r.allow;
            }
        }
        self.default_allow
    }
}

/// `*` and `?` globbing.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// TLS for one side of a migration: credentials, the name the source checks in the
/// destination's certificate, and the destination's allow-list of sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The credentials (`endpoint` client for a sender, server for a listener).
    pub creds: TlsCreds,
    /// Sender: the name the destination's certificate must be valid for (QEMU's
    /// `tls-hostname`); `None`: the host of the URI.
    pub hostname: Option<String>,
    /// Listener: the client certificate names allowed (QEMU's `tls-authz`); `None`:
    /// any certificate the CA signed.
    pub authz: Option<TlsAuthz>,
}

impl TlsConfig {
    /// TLS with `creds`, no host-name override and no allow-list.
    pub fn new(creds: TlsCreds) -> Self {
        TlsConfig {
            creds,
            hostname: None,
            authz: None,
        }
    }
}

/// Accepts any server certificate (a client with `verify-peer` off); the handshake
/// signature is still checked.
#[derive(Debug)]
struct NoServerCheck(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoServerCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// TLS record content types.
const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPDATA: u8 = 23;
/// Largest plaintext of one record (RFC 8446 §5.1).
const MAX_PLAIN_BYTES: usize = 1 << 14;
/// Record header, and the AEAD tag of our suites.
const TLS_HEADER_BYTES: usize = 5;
const TAG_BYTES: usize = 16;
/// Largest ciphertext of one record we accept (RFC 8446 §5.2 allows 2^14 + 256).
const MAX_CIPHER_BYTES: usize = MAX_PLAIN_BYTES + 256;
/// Most plaintext sealed per socket write.
const WRITE_CHUNK_BYTES: usize = 256 << 10;
/// Receive buffer: many records per `read`.
const RX_BUF_BYTES: usize = 256 << 10;

/// The destination's verdict after the handshake: accepted.
const VERDICT_OK: u8 = 0;
/// The destination's verdict: refused, a reason follows.
const VERDICT_REFUSED: u8 = 1;
/// Longest verdict message.
const MAX_VERDICT_BYTES: usize = 1024;

/// Whether `b` (at least one byte) can start a TLS record from a handshake.
fn looks_like_tls(b: &[u8]) -> bool {
    matches!(b[0], CT_ALERT | CT_HANDSHAKE) && (b.len() < 2 || b[1] == 3)
}

/// Whether a connection's first four bytes are a TLS ClientHello (what a plaintext
/// destination finds instead of Ferry's magic when the source speaks TLS).
pub(crate) fn is_client_hello(first: &[u8; 4]) -> bool {
    first[0] == CT_HANDSHAKE && first[1] == 3 && first[2] <= 4
}

fn io_during(e: io::Error, side: &str) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Error::TimedOut(format!("TLS: no answer from {side} during the handshake"))
        }
        _ => Error::Tls(format!("TLS: the handshake with {side} failed: {e}")),
    }
}

/// Text for a certificate error found in the peer's certificate.
fn cert_text(e: &CertificateError, whose: &str, name: &str) -> String {
    use CertificateError as C;
    match e {
        C::Expired | C::ExpiredContext { .. } => format!("{whose} certificate has expired"),
        C::NotValidYet | C::NotValidYetContext { .. } => {
            format!("{whose} certificate is not valid yet")
        }
        C::UnknownIssuer => {
            format!("{whose} certificate is not signed by a CA in ca-cert.pem (unknown issuer)")
        }
        C::BadSignature => format!(
            "{whose} certificate is not signed by a CA in ca-cert.pem (bad signature: another CA of the same name?)"
        ),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!("{whose} certificate is not valid for name '{name}'")
        }
        C::Revoked => format!("{whose} certificate is revoked"),
        other => format!("{whose} certificate is not acceptable: {other:?}"),
    }
}

fn alert_text(a: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    let why = match a {
        A::UnknownCA => " (it does not trust the CA that signed our certificate)",
        A::CertificateExpired => " (our certificate has expired)",
        A::BadCertificate => " (our certificate is not acceptable to it)",
        A::CertificateRequired => " (it requires a client certificate; we sent none)",
        A::HandshakeFailure => " (no common parameters)",
        A::DecryptError => " (a signature or MAC did not verify)",
        _ => "",
    };
    format!("the peer refused the handshake with alert {a:?}{why}")
}

/// Sends what rustls has queued (a flight, or the alert of a failure).
fn flush_tls(c: &mut rustls::Connection, sock: &mut TcpStream) -> io::Result<()> {
    while c.wants_write() {
        c.write_tls(sock)?;
    }
    Ok(())
}

/// Text for a failed `process_new_packets`.
fn handshake_text(e: &rustls::Error, client: bool, name: &str) -> String {
    let whose = if client {
        "the destination's"
    } else {
        "the source's client"
    };
    match e {
        rustls::Error::InvalidCertificate(ce) => format!("TLS: {}", cert_text(ce, whose, name)),
        rustls::Error::NoCertificatesPresented => {
            "TLS: the source presented no client certificate (verify-peer is on)".into()
        }
        rustls::Error::AlertReceived(a) => format!("TLS: {}", alert_text(*a)),
        other => format!("TLS: the handshake failed: {other}"),
    }
}

/// A plaintext answer from a destination without TLS: its refusal text if it sent
/// a Ferry `Refuse` record.
fn plaintext_answer(b: &[u8]) -> String {
    let msg = if b.len() > RECORD_HEADER_BYTES && b[0] == Kind::Refuse as u8 {
        String::from_utf8_lossy(&b[RECORD_HEADER_BYTES..]).into_owned()
    } else if b.len() >= 4 && b[..4] == MAGIC {
        "a Ferry stream".into()
    } else {
        format!("{:02x?}", &b[..b.len().min(8)])
    };
    format!(
        "TLS: the destination answered in plaintext: tls-creds is set here but not there ({msg})"
    )
}

/// How a client's handshake waits: in slices of the socket's read timeout, until
/// `deadline` (`None`: none), ending at once when `cancel` fires.
struct Sliced<'a> {
    deadline: Option<Instant>,
    cancel: &'a Cancel,
}

/// Slice of a client's handshake wait between looks at its cancel token.
const HANDSHAKE_SLICE: Duration = Duration::from_millis(20);

/// Runs rustls's handshake on `sock` until `done(conn)` says it is over. `first`:
/// the check of the peer's first bytes. With `sliced`, a read that times out is a
/// slice of the wait; without, the socket's read timeout is the whole bound.
#[allow(clippy::too_many_arguments)]
fn drive(
    c: &mut rustls::Connection,
    sock: &mut TcpStream,
    client: bool,
    name: &str,
    sliced: Option<Sliced<'_>>,
    mut first: impl FnMut(&[u8], &mut TcpStream) -> Result<()>,
    mut done: impl FnMut(&mut rustls::Connection) -> Result<bool>,
) -> Result<()> {
    let side = if client {
        "the destination"
    } else {
        "the source"
    };
    let mut seen = false;
    let mut buf = vec![0u8; MAX_CIPHER_BYTES + TLS_HEADER_BYTES];
    flush_tls(c, sock).map_err(|e| io_during(e, side))?;
    loop {
        if done(c)? {
            return Ok(());
        }
        let n = loop {
            match sock.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && sliced.is_some() =>
                {
                    if let Some(sl) = &sliced {
                        if sl.cancel.is_cancelled() {
                            return Err(Error::Cancelled);
                        }
                        if sl.deadline.is_some_and(|d| Instant::now() >= d) {
                            return Err(io_during(e, side));
                        }
                    }
                }
                Err(e) => return Err(io_during(e, side)),
            }
        };
        if n == 0 {
            return Err(Error::Tls(if client && !seen {
                "TLS: the destination closed the connection during the handshake (does it have tls-creds set?)".into()
            } else {
                format!("TLS: {side} closed the connection during the handshake")
            }));
        }
        if !seen {
            seen = true;
            first(&buf[..n], sock)?;
        }
        let mut rd = &buf[..n];
        while !rd.is_empty() {
            c.read_tls(&mut rd)
                .map_err(|e| Error::Tls(format!("TLS: the handshake with {side} failed: {e}")))?;
            if let Err(e) = c.process_new_packets() {
                // Tell the peer why (its alert), then fail.
                let _ = flush_tls(c, sock);
                return Err(Error::Tls(handshake_text(&e, client, name)));
            }
        }
        flush_tls(c, sock).map_err(|e| io_during(e, side))?;
    }
}

/// The host to check the destination's certificate against: `tls-hostname` or the
/// URI's host (IPv6 brackets removed).
fn check_name(cfg: &TlsConfig, uri_host: &str) -> String {
    cfg.hostname
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| {
            uri_host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
}

/// Source side: the handshake on a fresh connection to `uri_host`, then the
/// destination's verdict; within `timeout` (zero: none), ending at once with
/// [`Error::Cancelled`] when `cancel` fires.
pub(crate) fn client(
    mut sock: TcpStream,
    cfg: &TlsConfig,
    uri_host: &str,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<TlsConn> {
    let Some(cc) = cfg.creds.inner.client.clone() else {
        return Err(Error::InvalidArgument(format!(
            "tls-creds '{}' has endpoint 'server'; the migration source needs endpoint 'client'",
            cfg.creds.id()
        )));
    };
    let name = check_name(cfg, uri_host);
    let server_name = ServerName::try_from(name.clone()).map_err(|_| {
        Error::InvalidArgument(format!("tls-hostname '{name}' is not a valid name"))
    })?;
    let mut c: rustls::Connection = rustls::ClientConnection::new(cc, server_name)
        .map_err(|e| Error::Tls(format!("TLS: {e}")))?
        .into();
    sock.set_read_timeout(Some(HANDSHAKE_SLICE))?;
    let sliced = Sliced {
        deadline: (!timeout.is_zero()).then(|| Instant::now() + timeout),
        cancel,
    };
    let mut verdict: Vec<u8> = Vec::new();
    drive(
        &mut c,
        &mut sock,
        true,
        &name,
        Some(sliced),
        |b, sock| {
            if looks_like_tls(b) {
                return Ok(());
            }
            // Read a little more of a plaintext refusal (it is short).
            let mut all = b.to_vec();
            let mut more = [0u8; 512];
            let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
            if let Ok(n) = sock.read(&mut more) {
                all.extend_from_slice(&more[..n]);
            }
            Err(Error::Tls(plaintext_answer(&all)))
        },
        |c| {
            if c.is_handshaking() {
                return Ok(false);
            }
            let mut tmp = [0u8; 256];
            loop {
                match c.reader().read(&mut tmp) {
                    Ok(0) => {
                        return Err(Error::Tls(
                            "TLS: the destination closed the connection before accepting us".into(),
                        ))
                    }
                    Ok(n) => verdict.extend_from_slice(&tmp[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(Error::Tls(format!("TLS: {e}"))),
                }
                if verdict.len() > 3 + MAX_VERDICT_BYTES {
                    return Err(Error::Tls(
                        "TLS: the destination's verdict is too long".into(),
                    ));
                }
            }
            if verdict.len() < 3 {
                return Ok(false);
            }
            let len = usize::from(u16::from_le_bytes([verdict[1], verdict[2]]));
            Ok(verdict.len() >= 3 + len)
        },
    )?;
    let len = usize::from(u16::from_le_bytes([verdict[1], verdict[2]]));
    if verdict.len() != 3 + len || len > MAX_VERDICT_BYTES {
        return Err(Error::Tls(
            "TLS: malformed verdict from the destination".into(),
        ));
    }
    let why = String::from_utf8_lossy(&verdict[3..]).into_owned();
    match verdict[0] {
        VERDICT_OK => {}
        VERDICT_REFUSED => {
            return Err(Error::Tls(format!(
                "TLS: the destination refused this source: {why}"
            )))
        }
        v => {
            return Err(Error::Tls(format!(
                "TLS: unknown verdict {v} from the destination"
            )))
        }
    }
    sock.set_read_timeout(None)?;
    TlsConn::from_rustls(sock, c)
}

/// Destination side: the handshake on an accepted connection (its read timeout
/// bounds it), the allow-list, and the verdict.
pub(crate) fn server(mut sock: TcpStream, cfg: &TlsConfig) -> Result<TlsConn> {
    let Some(sc) = cfg.creds.inner.server.clone() else {
        return Err(Error::InvalidArgument(format!(
            "tls-creds '{}' has endpoint 'client'; the migration destination needs endpoint 'server'",
            cfg.creds.id()
        )));
    };
    let mut c: rustls::Connection = rustls::ServerConnection::new(sc)
        .map_err(|e| Error::Tls(format!("TLS: {e}")))?
        .into();
    drive(
        &mut c,
        &mut sock,
        false,
        "",
        None,
        |b, sock| {
            if b.len() >= 4 && b[..4] == MAGIC || !looks_like_tls(b) {
                // Tell a plaintext Ferry source why, in its own language.
                let msg = "this destination requires TLS (tls-creds is set) and the source speaks plaintext";
                let _ = sock.write_all(&encode_record(Kind::Refuse, msg.as_bytes()));
                return Err(Error::Tls(
                    "TLS: the peer speaks plaintext but tls-creds is set".into(),
                ));
            }
            Ok(())
        },
        |c| Ok(!c.is_handshaking()),
    )?;
    let mut refusal = None;
    if let Some(authz) = &cfg.authz {
        let dn = c
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| subject_dn(cert.as_ref()));
        match dn {
            Some(dn) if authz.is_allowed(&dn) => {}
            Some(dn) => {
                refusal = Some(format!(
                    "client certificate '{dn}' is not in tls-authz '{}'",
                    authz.id
                ))
            }
            None => {
                refusal = Some(format!(
                    "no client certificate name to check against tls-authz '{}'",
                    authz.id
                ))
            }
        }
    }
    let (code, why) = match &refusal {
        Some(r) => (VERDICT_REFUSED, r.as_str()),
        None => (VERDICT_OK, ""),
    };
    let why = &why.as_bytes()[..why.len().min(MAX_VERDICT_BYTES)];
    let mut msg = vec![code];
    msg.extend_from_slice(&(why.len() as u16).to_le_bytes());
    msg.extend_from_slice(why);
    c.writer()
        .write_all(&msg)
        .map_err(|e| Error::Tls(format!("TLS: {e}")))?;
    flush_tls(&mut c, &mut sock).map_err(|e| io_during(e, "the source"))?;
    if let Some(r) = refusal {
        return Err(Error::Tls(format!("TLS: {r}")));
    }
    TlsConn::from_rustls(sock, c)
}

// ---------------------------------------------------------------------------
// Subject names
// ---------------------------------------------------------------------------

/// One DER element: (tag, contents, rest).
fn der(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let l0 = *b.get(1)?;
    let (len, hdr) = if l0 < 0x80 {
        (usize::from(l0), 2)
    } else {
        let n = usize::from(l0 & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, b.get(hdr..end)?, b.get(end..)?))
}

fn oid_text(oid: &[u8]) -> String {
    let known: &[(&[u8], &str)] = &[
        (&[0x55, 0x04, 0x03], "CN"),
        (&[0x55, 0x04, 0x06], "C"),
        (&[0x55, 0x04, 0x07], "L"),
        (&[0x55, 0x04, 0x08], "ST"),
        (&[0x55, 0x04, 0x09], "STREET"),
        (&[0x55, 0x04, 0x0a], "O"),
        (&[0x55, 0x04, 0x0b], "OU"),
        (
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
            "DC",
        ),
        (
            &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
            "UID",
        ),
    ];
    if let Some((_, n)) = known.iter().find(|(o, _)| *o == oid) {
        return (*n).to_string();
    }
    // Dotted decimal.
    let mut parts: Vec<u64> = Vec::new();
    let mut v: u64 = 0;
    for &b in oid {
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (v / 40).min(2);
                parts.push(first);
                parts.push(v - first * 40);
            } else {
                parts.push(v);
            }
            v = 0;
        }
    }
    parts
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// RFC 4514 escaping of an attribute value.
fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, ch) in v.chars().enumerate() {
        let special = matches!(ch, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (ch == '#' || ch == ' '))
            || (i + 1 == n && ch == ' ');
        if special {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// A certificate's subject as an RFC 4514 string (`CN=client,O=Example`: the last
/// RDN first, as GnuTLS and OpenSSL's RFC 2253 mode print it); `None` if it does
/// not parse.
pub fn subject_dn(cert_der: &[u8]) -> Option<String> {
    let (_, cert, _) = der(cert_der)?;
    let (_, tbs, _) = der(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    if tag == 0xa0 {
        rest = r; // version
    }
    // serialNumber, signature, issuer, validity.
    for _ in 0..4 {
        rest = der(rest)?.2;
    }
    let (tag, mut name, _) = der(rest)?;
    if tag != 0x30 {
        return None;
    }
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (_, mut set, r) = der(name)?;
        name = r;
        let mut atvs = Vec::new();
        while !set.is_empty() {
            let (_, atv, r) = der(set)?;
            set = r;
            let (_, oid, r) = der(atv)?;
            let (vtag, val, _) = der(r)?;
            let text = match vtag {
                0x0c | 0x13 | 0x16 | 0x14 | 0x1a => escape_value(&String::from_utf8_lossy(val)),
                _ => {
                    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
                    format!("#{hex}")
                }
            };
            atvs.push(format!("{}={text}", oid_text(oid)));
        }
        rdns.push(atvs.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

// ---------------------------------------------------------------------------
// Record layer
// ---------------------------------------------------------------------------

/// A TLS failure carried through `io::Error` (the connection's I/O paths speak
/// `io::Result`), turned back into [`Error::Tls`] by the crate's conversion.
#[derive(Debug)]
pub(crate) struct TlsIoError(pub(crate) String);

impl fmt::Display for TlsIoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for TlsIoError {}

fn tls_io(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsIoError(msg.into()))
}

fn key_of(s: ConnectionTrafficSecrets) -> Result<(aead::LessSafeKey, [u8; 12])> {
    let (alg, key, iv) = match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (&aead::CHACHA20_POLY1305, key, iv)
        }
        _ => return Err(Error::Tls("TLS: unsupported cipher suite".into())),
    };
    let k = aead::UnboundKey::new(alg, key.as_ref())
        .map_err(|_| Error::Tls("TLS: bad traffic key".into()))?;
    let iv: [u8; 12] = iv
        .as_ref()
        .try_into()
        .map_err(|_| Error::Tls("TLS: bad IV length".into()))?;
    Ok((aead::LessSafeKey::new(k), iv))
}

fn nonce(iv: &[u8; 12], seq: u64) -> aead::Nonce {
    let mut n = *iv;
    for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
        *b ^= s;
    }
    aead::Nonce::assume_unique_for_key(n)
}

/// The send half: seals records.
struct Sealer {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    buf: Vec<u8>,
}

impl Sealer {
    /// Appends one record of `content_type` whose plaintext is `parts` (total at most
    /// [`MAX_PLAIN_BYTES`]) to `buf`: one copy, sealed in place.
    fn seal(&mut self, content_type: u8, parts: &[&[u8]]) -> io::Result<()> {
        let plain: usize = parts.iter().map(|p| p.len()).sum();
        let clen = plain + 1 + TAG_BYTES;
        let at = self.buf.len();
        let hdr = [CT_APPDATA, 3, 3, (clen >> 8) as u8, clen as u8];
        self.buf.extend_from_slice(&hdr);
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        self.buf.push(content_type);
        // A sequence number never repeats under one key; the AES-GCM limit
        // (2^24.5 full records per key, RFC 8446 §5.5) is far above a migration.
        if self.seq == u64::MAX {
            return Err(tls_io("TLS: record sequence number exhausted"));
        }
        let n = nonce(&self.iv, self.seq);
        self.seq += 1;
        let tag = self
            .key
            .seal_in_place_separate_tag(
                n,
                aead::Aad::from(hdr),
                &mut self.buf[at + TLS_HEADER_BYTES..],
            )
            .map_err(|_| tls_io("TLS: sealing a record failed"))?;
        self.buf.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

/// The receive half: opens records.
struct Opener {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    buf: Box<[u8]>,
    /// Raw bytes not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Opened plaintext not yet handed out: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    eof: bool,
}

impl Opener {
    /// Opens the next whole record in the buffer, if there is one; `Ok(true)` if it
    /// did (its plaintext may be empty).
    fn open_next(&mut self) -> io::Result<bool> {
        let avail = self.end - self.start;
        if avail < TLS_HEADER_BYTES {
            return Ok(false);
        }
        let h = &self.buf[self.start..self.start + TLS_HEADER_BYTES];
        let hdr: [u8; 5] = [h[0], h[1], h[2], h[3], h[4]];
        let clen = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if hdr[0] != CT_APPDATA || hdr[1] != 3 || hdr[2] != 3 {
            return Err(tls_io(format!(
                "TLS: not a TLS 1.3 record (header {hdr:02x?}): the stream was altered in flight"
            )));
        }
        if !(TAG_BYTES + 1..=MAX_CIPHER_BYTES).contains(&clen) {
            return Err(tls_io(format!("TLS: record length {clen} out of range")));
        }
        if avail < TLS_HEADER_BYTES + clen {
            return Ok(false);
        }
        let body = self.start + TLS_HEADER_BYTES;
        let n = nonce(&self.iv, self.seq);
        self.seq += 1;
        let plain_len = self
            .key
            .open_in_place(n, aead::Aad::from(hdr), &mut self.buf[body..body + clen])
            .map_err(|_| {
                tls_io(
                    "TLS: a record failed authentication (AEAD): the stream was altered in flight",
                )
            })?
            .len();
        self.start = body + clen;
        // Strip the padding; the last non-zero byte is the real content type.
        let inner = &self.buf[body..body + plain_len];
        let Some(ct_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(tls_io("TLS: a record without a content type"));
        };
        match inner[ct_at] {
            CT_APPDATA => {
                self.plain = (body, body + ct_at);
                Ok(true)
            }
            CT_ALERT => {
                if inner.get(1) == Some(&0) {
                    // close_notify: the end of the stream.
                    self.eof = true;
                    Ok(true)
                } else {
                    Err(tls_io(format!(
                        "TLS: the peer sent alert {:?}",
                        inner.get(1).map(|&d| rustls::AlertDescription::from(d))
                    )))
                }
            }
            t => Err(tls_io(format!(
                "TLS: unexpected record type {t} after the handshake"
            ))),
        }
    }

    /// Makes plaintext available: opens buffered records, reading from `sock` only if
    /// `may_read` and none is whole. `Ok(false)` at end of stream or when nothing is
    /// available without a read.
    fn fill(&mut self, sock: &mut TcpStream, may_read: bool) -> io::Result<bool> {
        loop {
            if self.plain.0 < self.plain.1 {
                return Ok(true);
            }
            if self.eof {
                return Ok(false);
            }
            if self.open_next()? {
                continue;
            }
            if !may_read {
                return Ok(false);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                self.plain = (0, 0);
            }
            let n = sock.read(&mut self.buf[self.end..])?;
            if n == 0 {
                if self.start == self.end {
                    self.eof = true;
                    return Ok(false);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS record cut short",
                ));
            }
            self.end += n;
        }
    }

    fn take(&mut self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.plain.1 - self.plain.0);
        dst[..n].copy_from_slice(&self.buf[self.plain.0..self.plain.0 + n]);
        self.plain.0 += n;
        n
    }
}

/// A TCP connection after the handshake: the socket and the two halves of the
/// record layer. Clones share the halves (a reader thread and a writer thread each
/// use one).
pub(crate) struct TlsConn {
    pub(crate) sock: TcpStream,
    tx: Arc<Mutex<Sealer>>,
    rx: Arc<Mutex<Opener>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsConn {
    fn from_rustls(sock: TcpStream, c: rustls::Connection) -> Result<TlsConn> {
        let s = c
            .dangerous_extract_secrets()
            .map_err(|e| Error::Tls(format!("TLS: {e}")))?;
        let (tx_seq, tx) = s.tx;
        let (rx_seq, rx) = s.rx;
        let (tk, tiv) = key_of(tx)?;
        let (rk, riv) = key_of(rx)?;
        Ok(TlsConn {
            sock,
            tx: Arc::new(Mutex::new(Sealer {
                key: tk,
                iv: tiv,
                seq: tx_seq,
                buf: Vec::new(),
            })),
            rx: Arc::new(Mutex::new(Opener {
                key: rk,
                iv: riv,
                seq: rx_seq,
                buf: vec![0u8; RX_BUF_BYTES].into_boxed_slice(),
                start: 0,
                end: 0,
                plain: (0, 0),
                eof: false,
            })),
        })
    }

    /// Another handle on the same connection (a duplicated socket, shared halves).
    pub(crate) fn try_clone(&self) -> io::Result<TlsConn> {
        Ok(TlsConn {
            sock: self.sock.try_clone()?,
            tx: self.tx.clone(),
            rx: self.rx.clone(),
        })
    }

    /// Reads plaintext; 0 at the end of the stream.
    pub(crate) fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        let mut rx = lock(&self.rx);
        if !rx.fill(&mut self.sock, true)? {
            return Ok(0);
        }
        Ok(rx.take(dst))
    }

    /// Reads plaintext into raw buffers: what one socket read brings (and whatever
    /// is already buffered), opened and copied once; 0 at end of stream.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for writes of `len` bytes.
    pub(crate) unsafe fn read_raw(&mut self, iov: &[(*mut u8, usize)]) -> io::Result<usize> {
        let mut rx = lock(&self.rx);
        let mut done = 0;
        let mut first = true;
        for &(p, len) in iov {
            let mut off = 0;
            while off < len {
                if !rx.fill(&mut self.sock, first)? {
                    return Ok(done);
                }
                first = false;
                // SAFETY: the caller guarantees `p` is valid for writes of `len` bytes,
                // and `off < len`; the record buffer is ours, so they do not overlap.
                let dst = unsafe { std::slice::from_raw_parts_mut(p.add(off), len - off) };
                let n = rx.take(dst);
                off += n;
                done += n;
            }
        }
        Ok(done)
    }

    /// Seals and writes some of `bufs` (up to [`WRITE_CHUNK_BYTES`] of plaintext);
    /// returns how much plaintext went out. Every record sealed is written whole.
    pub(crate) fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut tx = lock(&self.tx);
        tx.buf.clear();
        let mut taken = 0usize;
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut in_rec = 0usize;
        for b in bufs {
            let mut s: &[u8] = b;
            while !s.is_empty() && taken < WRITE_CHUNK_BYTES {
                let room = (MAX_PLAIN_BYTES - in_rec).min(WRITE_CHUNK_BYTES - taken);
                let n = s.len().min(room);
                parts.push(&s[..n]);
                s = &s[n..];
                in_rec += n;
                taken += n;
                if in_rec == MAX_PLAIN_BYTES {
                    tx.seal(CT_APPDATA, &parts)?;
                    parts.clear();
                    in_rec = 0;
                }
            }
            if taken >= WRITE_CHUNK_BYTES {
                break;
            }
        }
        if in_rec > 0 {
            tx.seal(CT_APPDATA, &parts)?;
        }
        let Sealer { buf, .. } = &mut *tx;
        self.sock.write_all(buf)?;
        Ok(taken)
    }

    /// Sends `close_notify` (best effort) and ends the writing direction.
    pub(crate) fn shutdown_write(&mut self) -> io::Result<()> {
        {
            let mut tx = lock(&self.tx);
            tx.buf.clear();
            if tx.seal(CT_ALERT, &[&[1, 0]]).is_ok() {
                let Sealer { buf, .. } = &mut *tx;
                let _ = self.sock.write_all(buf);
            }
        }
        self.sock.shutdown(std::net::Shutdown::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match() {
        assert!(glob(b"CN=*,O=Ferry", b"CN=a,O=Ferry"));
        assert!(glob(b"CN=?,O=*", b"CN=a,O=x"));
        assert!(!glob(b"CN=?,O=*", b"CN=ab,O=x"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"CN=a", b"CN=ab"));
    }

    #[test]
    fn authz_first_match_decides() {
        let mut a = TlsAuthz::allow_list("auth0", ["CN=good,O=Ferry".to_string()]);
        assert!(a.is_allowed("CN=good,O=Ferry"));
        assert!(!a.is_allowed("CN=bad,O=Ferry"));
        a.rules.insert(
            0,
            AuthzRule {
                pattern: "CN=good*".into(),
                format: AuthzFormat::Glob,
                allow: false,
            },
        );
        assert!(!a.is_allowed("CN=good,O=Ferry"));
        a.default_allow = true;
        assert!(a.is_allowed("CN=other"));
    }

    #[test]
    fn a_record_round_trips_and_a_flipped_byte_fails() {
        let key = [7u8; 16];
        let mk =
            || aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &key).unwrap());
        let mut s = Sealer {
            key: mk(),
            iv: [1; 12],
            seq: 0,
            buf: Vec::new(),
        };
        s.seal(CT_APPDATA, &[b"hello ", b"world"]).unwrap();
        let rec = s.buf.clone();
        let mut o = Opener {
            key: mk(),
            iv: [1; 12],
            seq: 0,
            buf: vec![0u8; 1024].into_boxed_slice(),
            start: 0,
            end: rec.len(),
            plain: (0, 0),
            eof: false,
        };
        o.buf[..rec.len()].copy_from_slice(&rec);
        assert!(o.open_next().unwrap());
        let mut out = [0u8; 32];
        let n = o.take(&mut out);
        assert_eq!(&out[..n], b"hello world");
        // The same record again, one byte flipped.
        o.seq = 0;
        o.buf[..rec.len()].copy_from_slice(&rec);
        o.buf[10] ^= 1;
        o.start = 0;
        o.end = rec.len();
        let e = o.open_next().unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
    }
}
