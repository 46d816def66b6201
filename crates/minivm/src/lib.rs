//! A small real KVM VM with known memory-dirtying workloads: Ferry's test guest.
//!
//! The guest runs a hand-assembled program in 64-bit long mode at CPL 3 (fast under PVM,
//! where CPL 0 is emulated), writing pages in a known pattern and bumping a per-vCPU round
//! counter, so every dirty-rate measurement has a ground truth. Without /dev/kvm the same
//! workloads run as host threads writing through vm-memory.
//!
//! Guest physical layout (low 1 MiB holds nothing else):
//!
//! | GPA | what |
//! |---|---|
//! | 0x1000 | PML4 |
//! | 0x2000 | PDPT |
//! | 0x3000 | GDT (3: user code 0x1b, 4: user data 0x23) |
//! | 0x4000 | program (`asm/program.S`, bytes in `guest.rs`) |
//! | 0x10000 + n × 4 KiB | page directory for GiB n (2 MiB pages, U/W/P/A/D) |
//! | 0x80000 + v × 4 KiB | vCPU v's counter page (counter u64 at offset 0, page writes u64 at 8) |
//! | 1 MiB .. mem_bytes | data region, split evenly into one share per vCPU |
//!
//! vCPUs run at CPL 3 with RFLAGS.IOPL = 3, so `out` is legal and exits to the host:
//! port 0x80 (idle: host naps 10 ms) and 0x81 (sweep or zipf ahead of schedule: host
//! naps 1 ms).
//!
//! Workloads (`--workload`): `idle`; `working-set=N` (one 8-byte round number per page,
//! N pages round and round); `dense=N[,BYTES]` (each round rewrites BYTES of each of N
//! pages with incompressible data, [`page_words`]); `zipf=N[,RATE]` (RATE whole-page
//! writes a second, skewed over N pages, [`zipf_page`]); `sweep=RATE`; `random=SEED,HOT%`.
//! Each has a ground truth the tests check: the pages it dirties, and for dense and zipf
//! the content of every page, computed on the host from the counters.

mod config;
mod control;
pub use control::MAX_THROTTLE_PPM;
mod dirty_log;
mod error;
mod fallback;
mod guest;
mod memory;
mod state;
mod vcpu;

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use config::{
    parse_size_bytes, Backend, VmConfig, Workload, MAX_MEM_BYTES, MAX_VCPUS, MIN_MEM_BYTES,
};
pub use dirty_log::DirtyTracking;
pub use error::{Error, Result};
pub use guest::{
    page_words, xorshift_next, xorshift_seed, zipf_levels, zipf_page, Layout, COUNTER_GPA,
    DATA_GPA, ZIPF_SEED,
};
pub use memory::SlotInfo;
pub use state::FORMAT_VERSION;

use control::{Control, Request};
use error::kvm;
use state::{ThreadProgress, BACKEND_KVM, BACKEND_THREADS};
use vcpu::{SharedHandler, SharedVcpu};

/// Guest page size in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// [`MiniVm::backend_name`] for the KVM backend.
pub const BACKEND_NAME_KVM: &str = "kvm";
/// [`MiniVm::backend_name`] for the host-thread fallback.
pub const BACKEND_NAME_THREADS: &str = "host-threads (no /dev/kvm)";

/// Errors recorded by vCPU workers: (vCPU, reason).
pub(crate) type SharedErrors = Arc<Mutex<Vec<(u32, String)>>>;

/// Called from a vCPU thread on guest exits the VMM must service.
pub trait ExitHandler: Send + Sync {
    /// The vCPU's dirty ring is full (KVM_EXIT_DIRTY_RING_FULL); reap and reset, then return.
    fn dirty_ring_full(&self, vcpu: u32);
}

/// The KVM objects of a KVM-backed VM.
struct KvmParts {
    dirty_ring_cap: Option<u32>,
    vcpus: Vec<SharedVcpu>,
    raw_fds: Vec<RawFd>,
    msr_indices: Vec<u32>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
}

/// Which engine runs the workload.
enum Engine {
    Kvm(KvmParts),
    Threads(Vec<Arc<Mutex<ThreadProgress>>>),
}

/// The test guest: memory, vCPUs (or host threads) and their workload.
pub struct MiniVm {
    cfg: VmConfig,
    layout: Layout,
    tsc_hz: u64,
    handles: Vec<JoinHandle<()>>,
    // Declared before `memory` so the VM (and its slots) go before the mapping.
    engine: Engine,
    memory: Arc<memory::GuestMemory>,
    slots: Vec<SlotInfo>,
    control: Arc<Control>,
    handler: SharedHandler,
    errors: SharedErrors,
    last_pause_ns: AtomicU64,
    /// The running vCPU threads, for kicks from outside the VM handle (the dirty ring's
    /// flush); emptied before the threads are joined, so every entry is a live thread.
    kick_targets: KickTargets,
    /// The dirty-ring listener made by [`MiniVm::ring_listener`], if any.
    ring: Mutex<Option<Arc<dirty_sync::kvm::KvmRingListener>>>,
}

/// The pthreads of the running vCPU threads.
pub(crate) type KickTargets = Arc<Mutex<Vec<libc::pthread_t>>>;

impl MiniVm {
    /// Builds the source guest: memory, page tables and program written, vCPU registers set,
    /// not running.
    pub fn new(cfg: VmConfig) -> Result<MiniVm> {
        Self::build(cfg, false)
    }

    /// Builds a destination: same memory layout, slots and vCPUs, but writes nothing into
    /// guest memory and sets no registers (a migration fills them, then `restore_state`).
    pub fn new_incoming(cfg: VmConfig) -> Result<MiniVm> {
        Self::build(cfg, true)
    }

    fn build(cfg: VmConfig, incoming: bool) -> Result<MiniVm> {
        cfg.validate()?;
        let kvm_fd = match cfg.backend {
            Backend::Threads => None,
            Backend::Kvm => Some(Kvm::new().map_err(Error::KvmUnavailable)?),
            Backend::Auto => match Kvm::new() {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::info!(error = %e, "no KVM: the guest runs as host threads");
                    None
                }
            },
        };
        let layout = Layout::new(cfg.mem_bytes, cfg.vcpus);
        let (mem, slots) = memory::create(cfg.mem_bytes, cfg.slot_bytes)?;
        if cfg.prealloc {
            memory::populate(&slots)?;
        }
        let memory = Arc::new(mem);
        if !incoming {
            guest::write_low_memory(&memory, &layout)?;
        }
        let (engine, tsc_hz) = match kvm_fd {
            Some(k) => {
                let (parts, tsc_hz) = Self::build_kvm(k, &cfg, &layout, &slots, incoming)?;
                (Engine::Kvm(parts), tsc_hz)
            }
            None => {
                let progress = (0..cfg.vcpus)
                    .map(|_| Arc::new(Mutex::new(ThreadProgress::default())))
                    .collect();
                (Engine::Threads(progress), 0)
            }
        };
        Ok(MiniVm {
            control: Arc::new(Control::new(cfg.vcpus)),
            cfg,
            layout,
            tsc_hz,
            handles: Vec::new(),
            kick_targets: Arc::default(),
            ring: Mutex::new(None),
            engine,
            memory,
            slots,
            handler: Arc::new(RwLock::new(None)),
            errors: Arc::new(Mutex::new(Vec::new())),
            last_pause_ns: AtomicU64::new(0),
        })
    }

    fn build_kvm(
        kvm_fd: Kvm,
        cfg: &VmConfig,
        layout: &Layout,
        slots: &[SlotInfo],
        incoming: bool,
    ) -> Result<(KvmParts, u64)> {
        let max_vcpus = kvm_fd.get_max_vcpus();
        if cfg.vcpus as usize > max_vcpus {
            return Err(Error::Config(format!(
                "vcpus {} exceeds KVM's maximum {max_vcpus}",
                cfg.vcpus
            )));
        }
        let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        memory::register(&vm, slots, cfg.dirty_log)?;
        let dirty_ring_cap = if cfg.dirty_ring_entries > 0 {
            Some(
                dirty_sync::kvm::enable_dirty_ring(&vm, cfg.dirty_ring_entries)
                    .map_err(|e| Error::DirtyRing(e.to_string()))?,
            )
        } else {
            None
        };
        let msr_indices = state::msr_indices(&kvm_fd);
        let mut vcpus = Vec::new();
        let mut raw_fds = Vec::new();
        let mut tsc_hz = 0;
        for id in 0..cfg.vcpus {
            let v = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            vcpu::setup_cpuid(&kvm_fd, &v)?;
            if id == 0 {
                tsc_hz = vcpu::tsc_hz(&v);
            }
            if !incoming {
                let entry = guest::entry_regs(layout, &cfg.workload, id, tsc_hz);
                vcpu::set_entry_state(&v, &entry)?;
            }
            raw_fds.push(v.as_raw_fd());
            vcpus.push(Arc::new(Mutex::new(v)));
        }
        let parts = KvmParts {
            dirty_ring_cap,
            vcpus,
            raw_fds,
            msr_indices,
            vm: Arc::new(vm),
            _kvm: kvm_fd,
        };
        Ok((parts, tsc_hz))
    }

    /// True when the guest runs on KVM (false: host-thread fallback).
    pub fn is_kvm(&self) -> bool {
        matches!(self.engine, Engine::Kvm(_))
    }

    /// "kvm" or "host-threads (no /dev/kvm)", so callers can say which one runs.
    pub fn backend_name(&self) -> &'static str {
        if self.is_kvm() {
            BACKEND_NAME_KVM
        } else {
            BACKEND_NAME_THREADS
        }
    }

    /// The KVM VM fd, for dirty-log listeners (None on the fallback backend).
    pub fn vm_fd(&self) -> Option<Arc<VmFd>> {
        match &self.engine {
            Engine::Kvm(k) => Some(Arc::clone(&k.vm)),
            Engine::Threads(_) => None,
        }
    }

    /// The dirty-ring capability enabled (223 = `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`,
    /// 192 = `KVM_CAP_DIRTY_LOG_RING`), or None without a ring.
    pub fn dirty_ring_cap(&self) -> Option<u32> {
        match &self.engine {
            Engine::Kvm(k) => k.dirty_ring_cap,
            Engine::Threads(_) => None,
        }
    }

    /// The vCPU fds, for mapping their dirty rings (empty on the fallback backend).
    pub fn vcpu_fds(&self) -> Vec<BorrowedFd<'_>> {
        match &self.engine {
            Engine::Kvm(k) => k
                .raw_fds
                .iter()
                // SAFETY: each is the fd of a `VcpuFd` in `k.vcpus`, which this MiniVm
                // owns and closes only when dropped, so it outlives the borrow of self.
                .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
                .collect(),
            Engine::Threads(_) => Vec::new(),
        }
    }

    /// Guest memory (vm-memory's bitmap records writes made through it).
    pub fn memory(&self) -> &GuestMemoryMmap<AtomicBitmap> {
        &self.memory
    }

    /// Guest memory, shared.
    pub fn memory_arc(&self) -> Arc<GuestMemoryMmap<AtomicBitmap>> {
        Arc::clone(&self.memory)
    }

    /// The memory slots (one per vm-memory region).
    pub fn slots(&self) -> Vec<SlotInfo> {
        self.slots.clone()
    }

    /// Guest RAM in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.cfg.mem_bytes
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.cfg.vcpus
    }

    /// The configuration this VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.cfg
    }

    /// The memory layout (counter pages, shares).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Guest TSC frequency used to pace the sweep (0 on the fallback backend).
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// Starts one thread per vCPU (KVM_RUN, or the host-thread workload).
    pub fn start(&mut self) -> Result<()> {
        if !self.handles.is_empty() {
            return Err(Error::AlreadyStarted);
        }
        self.control.set_request(Request::Run);
        match &self.engine {
            Engine::Kvm(k) => {
                vcpu::install_kick_handler()?;
                for (id, v) in k.vcpus.iter().enumerate() {
                    let t = vcpu::VcpuThread {
                        id: id as u32,
                        vcpu: Arc::clone(v),
                        control: Arc::clone(&self.control),
                        handler: Arc::clone(&self.handler),
                        errors: Arc::clone(&self.errors),
                    };
                    match t.spawn() {
                        Ok(h) => self.handles.push(h),
                        Err(e) => {
                            self.shutdown();
                            return Err(e);
                        }
                    }
                }
                *self.kick_targets.lock().unwrap_or_else(|p| p.into_inner()) =
                    self.handles.iter().map(|h| h.as_pthread_t()).collect();
            }
            Engine::Threads(progress) => {
                for (id, p) in progress.iter().enumerate() {
                    let w = fallback::Worker {
                        id: id as u32,
                        memory: Arc::clone(&self.memory),
                        layout: self.layout,
                        workload: self.cfg.workload,
                        control: Arc::clone(&self.control),
                        progress: Arc::clone(p),
                        errors: Arc::clone(&self.errors),
                    };
                    match w.spawn() {
                        Ok(h) => self.handles.push(h),
                        Err(e) => {
                            self.shutdown();
                            return Err(e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn kick_threads(&self) {
        if self.is_kvm() {
            for h in &self.handles {
                vcpu::kick(h);
            }
        }
    }

    /// Takes every vCPU out of the guest and parks it; returns once all are parked.
    pub fn pause(&self) -> Result<()> {
        if self.handles.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        self.control.set_request(Request::Pause);
        self.kick_threads();
        self.control.wait_all_parked();
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_pause_ns.store(ns, Ordering::Relaxed);
        Ok(())
    }

    /// How long the last `pause` took to park every vCPU.
    pub fn last_pause_latency(&self) -> Duration {
        Duration::from_nanos(self.last_pause_ns.load(Ordering::Relaxed))
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) -> Result<()> {
        if !self.handles.is_empty() {
            self.control.set_request(Request::Run);
        }
        Ok(())
    }

    /// Forces every running vCPU out of KVM_RUN once (flushing PML into the dirty rings);
    /// returns after each has exited once. A no-op on the fallback backend.
    /// Must not be called from an [`ExitHandler`] (it would wait for its own vCPU).
    pub fn kick_all(&self) -> Result<()> {
        if self.handles.is_empty() || !self.is_kvm() {
            return Ok(());
        }
        let epoch = self.control.begin_kick();
        self.kick_threads();
        self.control.wait_kick(epoch);
        Ok(())
    }

    /// Throttles the vCPUs like QEMU's cpu-throttle: per 10 ms run slice, sleep
    /// pct/(100-pct) × 10 ms. 0 turns it off; values above 99 count as 99.
    pub fn set_throttle_percent(&self, pct: u8) {
        self.control.set_throttle_percent(pct);
        // A vCPU in a long KVM_RUN arms its slice timer only once it comes out.
        self.kick_threads();
    }

    /// Throttles one vCPU on its own (dirty limit): asleep `ppm` millionths of its time
    /// (at most [`MAX_THROTTLE_PPM`]), or the global throttle if larger. 0
    /// turns it off. False for a vCPU that does not exist.
    pub fn set_vcpu_throttle_ppm(&self, vcpu: usize, ppm: u32) -> bool {
        let exists = self.control.set_vcpu_throttle_ppm(vcpu, ppm);
        if exists && self.is_kvm() {
            // A vCPU in a long KVM_RUN arms its slice timer (for the new slice length)
            // only once it comes out.
            if let Some(h) = self.handles.get(vcpu) {
                vcpu::kick(h);
            }
        }
        exists
    }

    /// Per vCPU: microseconds slept in throttle sleeps so far.
    pub fn vcpu_throttled_us(&self) -> Vec<u64> {
        self.control.throttled_us()
    }

    /// Installs the handler called on the vCPU thread when its dirty ring is full.
    pub fn set_exit_handler(&self, h: Arc<dyn ExitHandler>) {
        *self.handler.write().unwrap_or_else(|p| p.into_inner()) = Some(h);
    }

    fn require_paused(&self) -> Result<()> {
        if self.handles.is_empty() || self.control.all_parked() {
            Ok(())
        } else {
            Err(Error::NotPaused)
        }
    }

    /// Serializes every vCPU's arch state (or the host threads' progress) into a versioned
    /// blob; needs the VM paused or not started.
    pub fn save_state(&self) -> Result<Vec<u8>> {
        self.require_paused()?;
        match &self.engine {
            Engine::Kvm(k) => {
                let mut states = Vec::with_capacity(k.vcpus.len());
                for v in &k.vcpus {
                    let v = v.lock().unwrap_or_else(|p| p.into_inner());
                    states.push(state::save_kvm(&v, &k.msr_indices)?);
                }
                Ok(state::encode_kvm(&states))
            }
            Engine::Threads(progress) => {
                let p: Vec<ThreadProgress> = progress
                    .iter()
                    .map(|p| *p.lock().unwrap_or_else(|e| e.into_inner()))
                    .collect();
                Ok(state::encode_threads(&p))
            }
        }
    }

    /// Loads a blob from `save_state` (before start or while paused); checks magic,
    /// version, backend and vCPU count before touching any vCPU.
    pub fn restore_state(&self, blob: &[u8]) -> Result<()> {
        self.require_paused()?;
        let tag = if self.is_kvm() {
            BACKEND_KVM
        } else {
            BACKEND_THREADS
        };
        match (state::decode(blob, self.cfg.vcpus, tag)?, &self.engine) {
            (state::Decoded::Kvm(states), Engine::Kvm(k)) => {
                for (v, s) in k.vcpus.iter().zip(&states) {
                    let v = v.lock().unwrap_or_else(|p| p.into_inner());
                    state::restore_kvm(&v, s)?;
                }
                Ok(())
            }
            (state::Decoded::Threads(ps), Engine::Threads(progress)) => {
                for (dst, src) in progress.iter().zip(ps) {
                    *dst.lock().unwrap_or_else(|p| p.into_inner()) = src;
                }
                Ok(())
            }
            // decode() checked the backend tag against ours.
            _ => Err(Error::BackendMismatch {
                blob: "other",
                vm: self.backend_name(),
            }),
        }
    }

    /// The vCPU's round counter, read from guest memory (0 for an unknown vCPU).
    /// A round is: idle, one yield; working set, one pass over its pages; sweep, one
    /// page written (the counter is pages written so far); random, 4096 writes; dense,
    /// one pass over its pages; zipf, one page write (the counter is writes so far).
    pub fn counter(&self, vcpu: u32) -> u64 {
        if vcpu >= self.cfg.vcpus {
            return 0;
        }
        self.memory
            .load(
                GuestAddress(self.layout.counter_gpa(vcpu)),
                Ordering::Acquire,
            )
            .unwrap_or(0)
    }

    /// Pages the vCPU has written since boot (on the destination: since the source
    /// booted), the u64 after its counter: every workload but idle adds one per page
    /// write, so its rate is the guest's speed in page writes per second, comparable
    /// across workloads and intervals. 0 for an unknown vCPU.
    pub fn page_writes(&self, vcpu: u32) -> u64 {
        if vcpu >= self.cfg.vcpus {
            return 0;
        }
        self.memory
            .load(
                GuestAddress(self.layout.counter_gpa(vcpu) + guest::PAGE_WRITES_OFFSET),
                Ordering::Acquire,
            )
            .unwrap_or(0)
    }

    /// GPA of the vCPU's counter (u64 at offset 0 of its own page).
    pub fn counter_gpa(&self, vcpu: u32) -> u64 {
        self.layout.counter_gpa(vcpu)
    }

    /// (GPA, pages) the vCPU's workload writes: its part of N for working set, dense and
    /// zipf, its whole share for sweep and random, no pages for idle.
    pub fn workload_region(&self, vcpu: u32) -> (u64, u64) {
        (
            self.layout.share_gpa(vcpu),
            self.layout.touched_pages(&self.cfg.workload, vcpu),
        )
    }

    /// (GPA, pages) of the vCPU's whole share of the data region.
    pub fn share_region(&self, vcpu: u32) -> (u64, u64) {
        (self.layout.share_gpa(vcpu), self.layout.share_pages)
    }

    /// Waits until the vCPU's counter has advanced by `rounds` from now; returns the counter.
    /// Errors on timeout or if the vCPU stopped.
    pub fn wait_rounds(&self, vcpu: u32, rounds: u64, timeout: Duration) -> Result<u64> {
        if vcpu >= self.cfg.vcpus {
            return Err(Error::NoSuchVcpu {
                vcpu,
                vcpus: self.cfg.vcpus,
            });
        }
        let start = self.counter(vcpu);
        let t0 = Instant::now();
        loop {
            let now = self.counter(vcpu);
            if now.wrapping_sub(start) >= rounds {
                return Ok(now);
            }
            if let Some(reason) = self.vcpu_error(vcpu) {
                return Err(Error::VcpuStopped { vcpu, reason });
            }
            if t0.elapsed() >= timeout {
                return Err(Error::Timeout {
                    vcpu,
                    done_rounds: now.wrapping_sub(start),
                    wanted_rounds: rounds,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn vcpu_error(&self, vcpu: u32) -> Option<String> {
        let errs = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        errs.iter()
            .rev()
            .find(|(v, _)| *v == vcpu)
            .map(|(_, r)| r.clone())
    }

    /// Every fatal vCPU exit so far: (vCPU, reason).
    pub fn errors(&self) -> Vec<(u32, String)> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The most recent fatal vCPU exit, if any.
    pub fn last_error(&self) -> Option<(u32, String)> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    }

    /// Stops and joins every thread (also done on drop). The VM cannot be restarted.
    pub fn shutdown(&mut self) {
        if self.handles.is_empty() {
            return;
        }
        self.control.set_request(Request::Stop);
        self.kick_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.kick_threads();
        for h in self.handles.drain(..) {
            // A panicked worker has already marked nothing more we could repair.
            let _ignored = h.join();
        }
    }
}

impl Drop for MiniVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
