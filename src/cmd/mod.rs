//! The `ferry` subcommands and the flags they share.

pub mod demo;
pub mod dirty_rate;
pub mod logging;
pub mod progress;
pub mod receive;
pub mod send;
pub mod vm;

use std::sync::atomic::{AtomicBool, Ordering};

use clap::Args;
use dirty_sync::kvm::KvmBitmapConfig;
use ferry::migration_core::{
    Capability, CompressionParam, MigrationSource, ParametersUpdate, TlsObject,
};
use ferry::transport::{TlsAuthz, TlsConfig, TlsCreds, TlsEndpoint, Uri};
use minivm::{parse_size_bytes, Backend, DirtyTracking, VmConfig, Workload};

/// Parses a byte size with an optional K/M/G suffix.
pub fn size(s: &str) -> Result<u64, String> {
    parse_size_bytes(s).map_err(|e| e.to_string())
}

/// A byte count the way a user would type it: the largest exact K/M/G suffix
/// (3145728 -> `3M`), else plain bytes.
pub fn size_flag(n: u64) -> String {
    for (shift, suffix) in [(30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n & ((1u64 << shift) - 1) == 0 {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

/// Parses the value of `flag` as a migration URI, with an error that names the flag.
pub fn parse_uri(flag: &str, uri: &str) -> Result<Uri, String> {
    uri.parse::<Uri>().map_err(|e| format!("{flag} {uri}: {e}"))
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches the first SIGINT (Ctrl-C) as a request to cancel the migration: the
/// command reports what it has and exits non-zero. The handler is reset after it
/// fires (SA_RESETHAND), so a second Ctrl-C ends the process at once.
pub fn catch_sigint() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe); the struct
    // is fully initialised (zeroed, then the fields set) before sigaction reads it.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

/// Whether Ctrl-C was pressed since [`catch_sigint`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The guest to boot.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Guest RAM (bytes, or with a K/M/G suffix).
    #[arg(long, default_value = "1G", value_parser = size)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// idle | working-set=W (pages, or a size like 16M) | dense=N[,BYTES] (N pages rewritten
    /// with fresh data, BYTES of each a round) | zipf=N[,WRITES/S] (skewed whole-page writes)
    /// | sweep=R (pages/s) | random=SEED,HOT%.
    #[arg(long, default_value = "working-set=16M")]
    pub workload: Workload,
    /// Run the workload on host threads even where /dev/kvm exists.
    #[arg(long)]
    pub threads: bool,
    /// Fault all guest RAM in at start (QEMU's -mem-prealloc); for a destination, no
    /// page fault per incoming page. `ferry demo` passes it to its destination only.
    #[arg(long)]
    pub prealloc: bool,
}

impl VmArgs {
    /// The minivm configuration.
    pub fn config(&self) -> VmConfig {
        VmConfig {
            mem_bytes: self.mem,
            vcpus: self.vcpus,
            workload: self.workload,
            backend: if self.threads {
                Backend::Threads
            } else {
                Backend::Auto
            },
            prealloc: self.prealloc,
            ..Default::default()
        }
    }

    /// Checks the guest flags before anything starts, with errors that name the flag
    /// and its value (`--mem 3M: must be a multiple of 2 MiB and at least 4 MiB`).
    pub fn validate(&self) -> Result<(), String> {
        let Err(e) = self.config().validate() else {
            return Ok(());
        };
        let msg = match &e {
            minivm::Error::Config(m) => m.clone(),
            other => return Err(other.to_string()),
        };
        // minivm words its rules after its config fields; say them as the flags.
        let rest = |prefix: &str| msg.strip_prefix(prefix).map(str::trim_start);
        let (mem, vcpus, workload) = (size_flag(self.mem), self.vcpus, self.workload);
        let named = if let Some(r) = rest(&format!("mem_bytes {}", self.mem)) {
            format!("--mem {mem}: {r}")
        } else if let Some(r) = rest(&format!("vcpus {vcpus}")) {
            format!("--vcpus {vcpus}: {r}")
        } else if msg.starts_with("data region") {
            format!("--mem {mem} with --vcpus {vcpus}: {msg}")
        } else if msg.starts_with("working set")
            || msg.starts_with("sweep")
            || msg.starts_with("hot_percent")
            || msg.starts_with("dense")
            || msg.starts_with("zipf")
        {
            format!("--workload {workload} (with --mem {mem}, --vcpus {vcpus}): {msg}")
        } else {
            e.to_string()
        };
        Err(named)
    }

    /// Dirty tracking: the KVM bitmap with manual protect.
    pub fn tracking(&self) -> DirtyTracking {
        DirtyTracking::Bitmap(KvmBitmapConfig::default())
    }

    /// The same flags as command-line words (to start a matching destination).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--mem".into(),
            self.mem.to_string(),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--workload".into(),
            self.workload.to_string(),
        ];
        if self.threads {
            v.push("--threads".into());
        }
        if self.prealloc {
            v.push("--prealloc".into());
        }
        v
    }
}

/// How to migrate.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Bandwidth cap in bytes/s (K/M/G suffix); 0 = unlimited. (QMP keeps QEMU's 128M.)
    #[arg(long, default_value = "0", value_parser = size)]
    pub max_bandwidth: u64,
    /// Longest acceptable pause of the guest, ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Parallel connections (> 1 turns the multifd capability on).
    #[arg(long, default_value_t = 1)]
    pub channels: u8,
    /// Throttle the vCPUs when the guest dirties memory faster than it can be sent.
    #[arg(long)]
    pub auto_converge: bool,
    /// Switch to postcopy when the migration is predicted not to converge: the guest
    /// moves at once and the destination fetches the pages it still lacks
    /// (`postcopy-ram` with `x-ferry-postcopy-auto`).
    #[arg(long)]
    pub postcopy: bool,
    /// Bandwidth cap after the switch to postcopy for the pages the destination did not
    /// ask for, bytes/s (K/M/G suffix); 0 = unlimited.
    #[arg(long, default_value = "0", value_parser = size)]
    pub max_postcopy_bandwidth: u64,
    /// Compress page batches with zstd.
    #[arg(long)]
    pub zstd: bool,
    /// Send every non-zero page whole (no sparse pages: pages with a few non-zero
    /// words normally travel as those words).
    #[arg(long)]
    pub no_sparse_pages: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS flags, shared by `send`, `receive`, `demo` and `vm`.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// TLS 1.3 with mutual x509 authentication on every connection, with the
    /// credentials in DIR (QEMU's tls-creds-x509 layout: ca-cert.pem,
    /// server-cert.pem and server-key.pem for the destination, client-cert.pem and
    /// client-key.pem for the source). A peer without TLS is refused.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<std::path::PathBuf>,
    /// Source: the name the destination's certificate must be valid for (default:
    /// the host of the URI).
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    pub tls_hostname: Option<String>,
    /// Destination: accept only a source whose client certificate's subject is DN
    /// (RFC 4514, e.g. `CN=src,O=Example`); repeat for more. Default: any
    /// certificate the CA signed.
    #[arg(long, value_name = "DN", requires = "tls_creds")]
    pub tls_authz: Vec<String>,
}

/// Id of the `tls-creds-x509` object the TLS flags make.
pub const TLS_CREDS_ID: &str = "tls0";
/// Id of the `authz-list` object `--tls-authz` makes.
pub const TLS_AUTHZ_ID: &str = "authz0";

impl TlsArgs {
    /// The arguments again, for a child `ferry` process.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(d) = &self.tls_creds {
            v.push("--tls-creds".into());
            v.push(d.display().to_string());
        }
        if let Some(h) = &self.tls_hostname {
            v.push("--tls-hostname".into());
            v.push(h.clone());
        }
        for dn in &self.tls_authz {
            v.push("--tls-authz".into());
            v.push(dn.clone());
        }
        v
    }

    /// Makes the TLS objects (`tls0`, and `authz0` with `--tls-authz`) on `source`'s
    /// table and sets `tls-creds`, `tls-hostname` and `tls-authz`; nothing without
    /// `--tls-creds`.
    pub fn apply(&self, source: &MigrationSource, endpoint: TlsEndpoint) -> Result<(), String> {
        let Some(dir) = &self.tls_creds else {
            return Ok(());
        };
        let creds = TlsCreds::load(TLS_CREDS_ID, dir, endpoint, true)
            .map_err(|e| format!("--tls-creds: {e}"))?;
        let objects = source.tls_objects();
        objects.remove(TLS_CREDS_ID);
        objects
            .add(TLS_CREDS_ID, TlsObject::Creds(creds))
            .map_err(|e| e.to_string())?;
        let authz = if self.tls_authz.is_empty() {
            String::new()
        } else {
            objects.remove(TLS_AUTHZ_ID);
            objects
                .add(
                    TLS_AUTHZ_ID,
                    TlsObject::Authz(TlsAuthz::allow_list(
                        TLS_AUTHZ_ID,
                        self.tls_authz.iter().cloned(),
                    )),
                )
                .map_err(|e| e.to_string())?;
            TLS_AUTHZ_ID.to_string()
        };
        source
            .set_parameters(&ParametersUpdate {
                tls_creds: Some(TLS_CREDS_ID.into()),
                tls_hostname: Some(self.tls_hostname.clone().unwrap_or_default()),
                tls_authz: Some(authz),
                ..Default::default()
            })
            .map_err(|e| e.to_string())
    }

    /// The destination's TLS (`None` without `--tls-creds`).
    pub fn server_config(&self) -> Result<Option<TlsConfig>, String> {
        let Some(dir) = &self.tls_creds else {
            return Ok(None);
        };
        let creds = TlsCreds::load(TLS_CREDS_ID, dir, TlsEndpoint::Server, true)
            .map_err(|e| format!("--tls-creds: {e}"))?;
        Ok(Some(TlsConfig {
            creds,
            hostname: None,
            authz: (!self.tls_authz.is_empty())
                .then(|| TlsAuthz::allow_list(TLS_AUTHZ_ID, self.tls_authz.iter().cloned())),
        }))
    }
}

impl MigrateArgs {
    /// Applies the flags to a source.
    pub fn apply(&self, source: &MigrationSource) -> Result<(), String> {
        source
            .set_parameters(&ParametersUpdate {
                max_bandwidth: Some(self.max_bandwidth),
                downtime_limit: Some(self.downtime_limit),
                multifd_channels: Some(self.channels.max(1)),
                multifd_compression: Some(if self.zstd {
                    CompressionParam::Zstd
                } else {
                    CompressionParam::None
                }),
                x_ferry_sparse_pages: Some(!self.no_sparse_pages),
                x_ferry_postcopy_auto: Some(self.postcopy),
                max_postcopy_bandwidth: Some(self.max_postcopy_bandwidth),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
        self.tls.apply(source, TlsEndpoint::Client)?;
        source
            .set_capability(Capability::PostcopyRam, self.postcopy)
            .map_err(|e| e.to_string())?;
        source
            .set_capability(Capability::Multifd, self.channels > 1)
            .map_err(|e| e.to_string())?;
        source
            .set_capability(Capability::AutoConverge, self.auto_converge)
            .map_err(|e| e.to_string())
    }
}
