//! `ferry vm`: a minivm with a QMP endpoint, used like
//! `qemu-system-x86_64 -qmp unix:PATH,server=on,wait=off [-incoming URI|defer]`.
//!
//! Prints one JSON line on stdout once the QMP socket listens:
//! `{"event": "ready", "qmp": ADDRESS, "incoming": URI|null}`.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ferry::migration_core::MigratableVm;
use ferry::GuestVm;
use minivm::DirtyTracking;
use qmp::{IncomingStart, Machine, Monitor, Server};
use serde_json::json;

use super::VmArgs;
use ferry::transport::TlsEndpoint;

/// Run a guest with a QMP endpoint.
#[derive(Args, Debug)]
pub struct VmCmdArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// QMP endpoint: unix:PATH | tcp:HOST:PORT (QEMU's `,server=on,wait=off` accepted).
    #[arg(long)]
    pub qmp: String,
    /// Be a migration destination: listen at URI at once (tcp:HOST:PORT | unix:PATH),
    /// or `defer` to wait for `migrate-incoming`.
    #[arg(long)]
    pub incoming: Option<String>,
    /// Track dirty pages with a KVM dirty ring of ENTRIES per vCPU (0 = dirty bitmap).
    #[arg(long, default_value_t = 0)]
    pub dirty_ring: u32,
    /// Do not start the guest when the incoming migration completes; `cont` does
    /// (QEMU's -S, as libvirt runs destinations). Needs --incoming.
    #[arg(short = 'S')]
    pub no_autostart: bool,
    /// TLS objects and parameters made at start (`tls0`, `authz0`), as QMP's
    /// `object-add` and `migrate-set-parameters` would: endpoint server with
    /// `--incoming`, else client.
    #[command(flatten)]
    pub tls: super::TlsArgs,
}

/// The process as QMP's [`Machine`] (the run state lives in the monitor's
/// `RunControl`).
struct VmMachine {
    guest: Arc<GuestVm>,
}

impl Machine for VmMachine {
    fn guest_progress(&self) -> Option<Vec<u64>> {
        Some(self.guest.counters())
    }

    fn quit(&self) {
        std::process::exit(0);
    }

    fn incoming_failed(&self, reason: &str) {
        eprintln!("ferry vm: incoming migration failed: {reason}");
        std::process::exit(1);
    }
}

/// Runs `ferry vm` until `quit` (or a failed incoming migration) ends the process.
pub fn run(args: VmCmdArgs) -> Result<(), String> {
    let mut cfg = args.vm.config();
    cfg.dirty_ring_entries = args.dirty_ring;
    let tracking = if args.dirty_ring == 0 {
        args.vm.tracking()
    } else {
        DirtyTracking::from_ring_entries(args.dirty_ring)
    };
    if args.no_autostart && args.incoming.is_none() {
        return Err("-S is for a migration destination: it needs --incoming".into());
    }
    let start = match args.incoming.as_deref() {
        None => IncomingStart::None,
        Some("defer") => IncomingStart::Defer,
        Some(uri) => IncomingStart::Now(uri.to_string()),
    };
    let guest = if start == IncomingStart::None {
        let g = GuestVm::boot(cfg, tracking).map_err(|e| e.to_string())?;
        {
            let vm = g.vm();
            eprintln!(
                "ferry vm: {} MiB, {} vCPU(s), workload {}, backend {}",
                args.vm.mem >> 20,
                args.vm.vcpus,
                args.vm.workload,
                vm.backend_name()
            );
            for v in 0..vm.vcpus() {
                vm.wait_rounds(v, 1, Duration::from_secs(60))
                    .map_err(|e| format!("guest did not start: {e}"))?;
            }
        }
        g
    } else {
        GuestVm::incoming(cfg, tracking).map_err(|e| e.to_string())?
    };
    let guest = Arc::new(guest);
    let machine = Arc::new(VmMachine {
        guest: guest.clone(),
    });
    let incoming_uri = match &start {
        IncomingStart::Now(u) => Some(u.clone()),
        IncomingStart::Defer => Some("defer".to_string()),
        IncomingStart::None => None,
    };
    let vm: Arc<dyn MigratableVm> = guest;
    // With TLS flags, the objects exist before the incoming side listens.
    let tls = args.tls.tls_creds.is_some();
    let (first, now) = match start {
        IncomingStart::Now(uri) if tls => (IncomingStart::Defer, Some(uri)),
        s => (s, None),
    };
    let endpoint = if first == IncomingStart::None {
        TlsEndpoint::Client
    } else {
        TlsEndpoint::Server
    };
    let monitor =
        Monitor::new(machine, vm, first, !args.no_autostart).map_err(|e| e.to_string())?;
    args.tls.apply(monitor.source(), endpoint)?;
    if let Some(uri) = now {
        monitor.migrate_incoming(&uri).map_err(|e| e.to_string())?;
    }
    let server = Server::bind(monitor, &args.qmp).map_err(|e| e.to_string())?;
    println!(
        "{}",
        json!({"event": "ready", "qmp": server.local_addr(), "incoming": incoming_uri})
    );
    loop {
        std::thread::park();
    }
}
