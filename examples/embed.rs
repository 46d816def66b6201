//! A minimal VMM that embeds Ferry: one vCPU, 64 MiB of RAM, a tiny real-mode guest.
//!
//! ```sh
//! cargo run --release --example embed -- destination --listen tcp:127.0.0.1:4444
//! cargo run --release --example embed -- source --to tcp:127.0.0.1:4444
//! ```
//!
//! What the VMM provides (all of it is in this file):
//! - guest RAM as a vm-memory `GuestMemoryMmap`, registered with KVM as slot i = region i;
//! - a vCPU thread that can be parked: `pause_vcpus` returns only once the vCPU is out of
//!   KVM_RUN, `resume_vcpus` lets it go on;
//! - its device state as bytes (here the vCPU registers, as JSON);
//! - an impl of [`MigratableVm`] that hands those to Ferry.
//!
//! What Ferry does: turns the KVM dirty log on and off (through the slots registered
//! here), sends RAM in passes while the guest runs, pauses the vCPUs when what is left
//! fits the downtime limit, sends the rest and the device state, and on the other side
//! writes RAM, loads the device state and resumes the guest once the source commits.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dirty_sync::kvm::{KvmBitmapConfig, KvmDirtyLog};
use dirty_sync::AddressSpace;
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration_core::{
    incoming_with, ram_digest, GuestError, GuestRam, IncomingOptions, MigratableVm, MigrationSource,
};
use serde_json::json;
use stats::MigrationStatus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_BYTES: usize = 64 << 20;
/// Where the guest code is loaded and starts.
const CODE: u64 = 0x1000;
/// The guest's loop counter, a u32.
const COUNTER: u64 = 0x2000;
/// The I/O port the guest writes once per loop.
const PORT: u16 = 0x10;

/// 16-bit real mode, CS = DS = 0. Each loop: counter += 1, copy it to four more pages
/// (so the dirty log has something to find), then `out` to exit to the VMM.
#[rustfmt::skip]
const GUEST_CODE: [u8; 29] = [
    0x66, 0xff, 0x06, 0x00, 0x20, // loop: inc dword [0x2000]
    0x66, 0xa1, 0x00, 0x20,       //       mov eax, [0x2000]
    0x66, 0xa3, 0x00, 0x30,       //       mov [0x3000], eax
    0x66, 0xa3, 0x00, 0x40,       //       mov [0x4000], eax
    0x66, 0xa3, 0x00, 0x50,       //       mov [0x5000], eax
    0x66, 0xa3, 0x00, 0x60,       //       mov [0x6000], eax
    0xe6, 0x10,                   //       out 0x10, al
    0xeb, 0xe3,                   //       jmp loop (-29 bytes)
];

/// The pause handshake between the VMM (or Ferry) and the vCPU thread.
#[derive(Default)]
struct Park {
    /// Someone wants the vCPU stopped.
    pause: bool,
    /// The vCPU thread is out of KVM_RUN and waiting for `pause` to clear.
    parked: bool,
    /// Why the vCPU thread ended, if it did (an unexpected exit).
    dead: Option<String>,
}

/// The VMM's VM: what Ferry sees through [`MigratableVm`].
struct EmbedVm {
    memory: GuestMemoryMmap<()>,
    space: Arc<AddressSpace>,
    vcpu: Mutex<VcpuFd>,
    park: Mutex<Park>,
    park_changed: Condvar,
    /// The counter as it arrived (destination: read in `load_device_state`).
    counter_at_load: AtomicU32,
    /// Keeps the VM (and so its vCPU and slot) alive.
    _vm: Arc<VmFd>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EmbedVm {
    /// Creates the VM, its RAM and its vCPU; nothing runs yet (the vCPU thread starts
    /// parked). The destination builds exactly the same VM, so the RAM blocks match.
    fn new() -> Result<Arc<Self>, GuestError> {
        let vm = Arc::new(Kvm::new()?.create_vm()?);
        // Anonymous private memory: pages never touched read as zero.
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES)])?;
        let region = kvm_userspace_memory_region {
            slot: 0,  // slot i = region i: what dirty_sync::ram_blocks assumes
            flags: 0, // Ferry's listener adds KVM_MEM_LOG_DIRTY_PAGES when it logs
            guest_phys_addr: 0,
            memory_size: MEM_BYTES as u64,
            userspace_addr: memory.get_host_address(GuestAddress(0))? as u64,
        };
        // SAFETY: the range is the live mapping of `memory`, which this struct keeps (and
        // Ferry's RAM blocks keep clones of) for as long as the VM exists.
        unsafe { vm.set_user_memory_region(region)? };
        // Ferry's view of RAM: one block per region, and KVM's dirty bitmap as the log.
        let log = KvmDirtyLog::bitmap(
            vm.clone(),
            dirty_sync::ram_blocks(&memory)?,
            KvmBitmapConfig::default(),
        )?;
        let vcpu = vm.create_vcpu(0)?;
        let this = Arc::new(EmbedVm {
            memory,
            space: log.space,
            vcpu: Mutex::new(vcpu),
            park: Mutex::new(Park {
                pause: true,
                ..Default::default()
            }),
            park_changed: Condvar::new(),
            counter_at_load: AtomicU32::new(0),
            _vm: vm,
        });
        let me = this.clone();
        std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || me.vcpu_loop())?;
        Ok(this)
    }

    /// Source only: loads the guest code and points the vCPU at it, in real mode.
    fn boot(&self) -> Result<(), GuestError> {
        self.memory.write_slice(&GUEST_CODE, GuestAddress(CODE))?;
        let vcpu = lock(&self.vcpu);
        let mut sregs = vcpu.get_sregs()?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)?;
        let regs = kvm_regs {
            rip: CODE,
            rflags: 2, // bit 1 is always set
            ..Default::default()
        };
        vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// The guest's loop counter, read from guest RAM.
    fn counter(&self) -> u32 {
        self.memory.read_obj(GuestAddress(COUNTER)).unwrap_or(0)
    }

    /// The vCPU thread: parks while a pause is asked, else runs the guest until its
    /// next exit. The guest exits on every loop, so a pause waits microseconds.
    fn vcpu_loop(&self) {
        loop {
            let mut park = lock(&self.park);
            if park.pause {
                park.parked = true;
                self.park_changed.notify_all();
                while park.pause {
                    park = self
                        .park_changed
                        .wait(park)
                        .unwrap_or_else(|p| p.into_inner());
                }
                park.parked = false;
            }
            drop(park);
            let exit = match lock(&self.vcpu).run() {
                Ok(VcpuExit::IoOut(PORT, _)) => continue,
                Ok(other) => format!("unexpected exit {other:?}"),
                Err(e) => format!("KVM_RUN: {e}"),
            };
            eprintln!("vcpu0 stopped: {exit}");
            lock(&self.park).dead = Some(exit);
            self.park_changed.notify_all();
            return;
        }
    }
}

impl MigratableVm for EmbedVm {
    fn address_space(&self) -> &Arc<AddressSpace> {
        &self.space
    }

    fn pause_vcpus(&self) -> Result<(), GuestError> {
        let mut park = lock(&self.park);
        park.pause = true;
        while !park.parked && park.dead.is_none() {
            park = self
                .park_changed
                .wait(park)
                .unwrap_or_else(|p| p.into_inner());
        }
        match &park.dead {
            Some(why) => Err(why.clone().into()),
            None => Ok(()),
        }
    }

    fn resume_vcpus(&self) -> Result<(), GuestError> {
        lock(&self.park).pause = false;
        self.park_changed.notify_all();
        Ok(())
    }

    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        // The vCPU is parked, so its registers are stable. A real VMM also saves the
        // FPU, MSRs, LAPIC, vCPU events and its devices.
        let vcpu = lock(&self.vcpu);
        Ok(serde_json::to_vec(&(vcpu.get_regs()?, vcpu.get_sregs()?))?)
    }

    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError> {
        let (regs, sregs): (kvm_regs, kvm_sregs) = serde_json::from_slice(state)?;
        let vcpu = lock(&self.vcpu);
        vcpu.set_sregs(&sregs)?;
        vcpu.set_regs(&regs)?;
        // RAM has all arrived and the guest has not run here yet.
        self.counter_at_load
            .store(self.counter(), Ordering::Relaxed);
        Ok(())
    }

    fn untouched_ram_is_zero(&self) -> bool {
        true // GuestMemoryMmap::from_ranges maps private anonymous memory
    }
}

/// Polls `done` until it holds, for at most `timeout` (a stuck guest, not a slow one).
fn wait_until(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Result<(), GuestError> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting until {what}").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

const TIMEOUT: Duration = Duration::from_secs(60);

/// `embed source --to URI`: boot, run, migrate, report.
fn source(uri: &str) -> Result<(), GuestError> {
    let vm = EmbedVm::new()?;
    vm.boot()?;
    vm.resume_vcpus()?;
    wait_until("the guest counts to 1000", TIMEOUT, || vm.counter() >= 1000)?;
    eprintln!("source: guest running, counter {}", vm.counter());

    let source = MigrationSource::new(vm.clone());
    source.migrate(uri)?;
    let status = source.wait();
    let info = source.query();
    // A completed migration leaves the source guest paused (it runs on the other side).
    let counter = vm.counter();
    let digest =
        (status == MigrationStatus::Completed).then(|| ram_digest(&GuestRam::new(vm.clone())));
    std::thread::sleep(Duration::from_millis(200)); // the counter must not move now
    println!(
        "{}",
        json!({
            "status": status.as_str(),
            "error": info.error_desc,
            "downtime_ms": info.downtime,
            "transferred_bytes": info.ram.map(|r| r.transferred),
            "ram_digest": digest,
            "counter": counter,
            "counter_200ms_later": vm.counter(),
        })
    );
    match status {
        MigrationStatus::Completed => Ok(()),
        other => Err(format!("migration {}", other.as_str()).into()),
    }
}

/// `embed destination --listen URI`: the same VM, empty, filled by the migration.
fn destination(uri: &str) -> Result<(), GuestError> {
    let vm = EmbedVm::new()?;
    let options = IncomingOptions {
        verify: true, // digest RAM as it arrived, before the guest runs here
        ..Default::default()
    };
    let incoming = incoming_with(vm.clone(), uri, options)?;
    // With tcp:HOST:0 the real port is only known now.
    println!("{}", json!({"listening": incoming.uri().to_string()}));
    let report = incoming.wait()?; // RAM and registers loaded, guest resumed
    let at_switchover = vm.counter_at_load.load(Ordering::Relaxed);
    wait_until("the guest runs here", TIMEOUT, || {
        vm.counter() > at_switchover
    })?;
    println!(
        "{}",
        json!({
            "status": "completed",
            "ram_digest": report.ram_digest,
            "received_bytes": report.received_bytes,
            "counter_at_switchover": at_switchover,
            "counter_now": vm.counter(),
        })
    );
    Ok(())
}

fn main() -> Result<(), GuestError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["source", "--to", uri] => source(uri),
        ["destination", "--listen", uri] => destination(uri),
        _ => Err("usage: embed source --to URI | embed destination --listen URI".into()),
    }
}
