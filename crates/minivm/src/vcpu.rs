//! KVM vCPUs: CPU setup, the KVM_RUN loop thread, and signal-based kicks.
//!
//! Kicks follow Firecracker: a no-op-ish handler for a real-time signal (no SA_RESTART)
//! sets `kvm_run.immediate_exit = 1` through a thread-local pointer, so KVM_RUN returns
//! EINTR even when the signal lands just before the thread enters it (no lost wakeup).

use std::cell::Cell;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_run, kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::control::Control;
use crate::error::{kvm, Error, Result};
use crate::guest::{
    EntryRegs, CODE_SELECTOR, DATA_SELECTOR, GDT_GPA, IDLE_PORT, PML4_GPA, SWEEP_YIELD_PORT,
};
use crate::ExitHandler;

/// Offset from SIGRTMIN of the signal used to kick vCPU threads out of KVM_RUN.
pub const KICK_SIGNAL_OFFSET: i32 = 2;
/// `KVM_EXIT_DIRTY_RING_FULL`: kvm-ioctls reports it as `VcpuExit::Unsupported(31)`.
const EXIT_DIRTY_RING_FULL: u32 = 31;
/// How long the host naps when the idle loop yields.
const IDLE_NAP: Duration = Duration::from_millis(10);
/// How long the host naps when the sweep is ahead of schedule.
const SWEEP_NAP: Duration = Duration::from_millis(1);

/// A vCPU fd shared between its run thread and the VM handle (for save/restore while parked).
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;
/// The optional exit handler, settable after start.
pub type SharedHandler = Arc<RwLock<Option<Arc<dyn ExitHandler>>>>;
/// Errors recorded by vCPU threads, readable by the VM handle.
pub type SharedErrors = Arc<Mutex<Vec<(u32, String)>>>;

thread_local! {
    /// This thread's kvm_run page, or null when the thread runs no vCPU.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _unused: *mut libc::c_void,
) {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mmapped kvm_run page, set by the vCPU thread
        // and cleared before the VcpuFd (and its mapping) can go away; a volatile byte store
        // is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// The kick signal number (SIGRTMIN + offset).
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    let r = INSTALLED.get_or_init(|| {
        register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno())
    });
    r.map_err(|errno| Error::Os {
        what: "registering the vCPU kick signal handler",
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Sends the kick signal to a vCPU thread.
pub fn kick(handle: &JoinHandle<()>) {
    // A thread that already ended cannot be in KVM_RUN; ignoring the error is correct.
    let _ignored = handle.kill(kick_signal());
}

/// A one-shot `CLOCK_MONOTONIC` timer that sends the kick signal to the thread that
/// made it: it ends a throttled vCPU's run slice on time. A kick from another thread
/// would first have to be scheduled, which on a host whose cores the vCPUs keep busy
/// takes milliseconds, far longer than a deep throttle's slice.
struct SliceTimer {
    timer: libc::timer_t,
    /// When the armed timer fires; None while disarmed.
    deadline: Option<Instant>,
}

/// Re-arming for a deadline this close to the armed one is skipped.
const SLICE_TIMER_SLACK: Duration = Duration::from_micros(20);

impl SliceTimer {
    /// A timer that signals the calling thread.
    fn for_this_thread() -> std::io::Result<SliceTimer> {
        // SAFETY: sigevent is plain data; zeroed is a valid value, and the fields the
        // kernel reads for SIGEV_THREAD_ID are set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: both pointers are to live locals; the kernel writes the timer id.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut timer) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SliceTimer {
            timer,
            deadline: None,
        })
    }

    /// Arms the timer to fire in `left` (None: disarms it).
    fn set(&mut self, left: Option<Duration>) {
        let value = match left {
            None if self.deadline.is_none() => return,
            None => {
                self.deadline = None;
                Duration::ZERO
            }
            Some(left) => {
                let deadline = Instant::now() + left;
                if let Some(armed) = self.deadline {
                    let gap = armed.max(deadline) - armed.min(deadline);
                    if gap <= SLICE_TIMER_SLACK {
                        return;
                    }
                }
                self.deadline = Some(deadline);
                // A zero value would disarm it: fire at once instead.
                left.max(Duration::from_nanos(1))
            }
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: value.as_secs() as libc::time_t,
                tv_nsec: libc::c_long::from(value.subsec_nanos() as i32),
            },
        };
        // SAFETY: the timer is this value's own (deleted only on drop); spec is a live
        // local and no old value is asked for.
        let r = unsafe { libc::timer_settime(self.timer, 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            // Only an invalid timer or value fails; the slice then ends at the vCPU's
            // next exit of its own.
            self.deadline = None;
        }
    }
}

impl Drop for SliceTimer {
    fn drop(&mut self) {
        // SAFETY: the timer was created by this value and is deleted once.
        unsafe { libc::timer_delete(self.timer) };
    }
}

/// Blocks (or unblocks) the kick signal on the calling thread; true on success.
fn block_kick_signal(block: bool) -> bool {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset/sigaddset before use;
    // pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut()) == 0
    }
}

/// Sets the host-supported CPUID on a fresh vCPU (needed for long mode under PVM).
pub fn setup_cpuid(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<()> {
    let cpuid = kvm_fd
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))
}

/// Puts a vCPU in 64-bit long mode at CPL 3 at the program's entry point.
pub fn set_entry_state(vcpu: &VcpuFd, entry: &EntryRegs) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x28,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 6 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // CR0: PE | MP | ET | NE | WP | PG.
    sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
    sregs.cr3 = PML4_GPA;
    // CR4: PAE | OSFXSR | OSXMMEXCPT.
    sregs.cr4 = 0x20 | 0x200 | 0x400;
    // EFER: LME | LMA.
    sregs.efer = 0x100 | 0x400;
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: entry.rip,
        rdi: entry.rdi,
        rsi: entry.rsi,
        r8: entry.r8,
        r9: entry.r9,
        r10: entry.r10,
        r11: entry.r11,
        r12: entry.r12,
        // Bit 1 is reserved-1; IOPL = 3 lets CPL 3 use `out` (exits to the host).
        rflags: 0x2 | 0x3000,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// The guest TSC frequency in Hz: KVM_GET_TSC_KHZ, else the host TSC calibrated for 50 ms.
pub fn tsc_hz(vcpu: &VcpuFd) -> u64 {
    match vcpu.get_tsc_khz() {
        Ok(khz) if khz > 0 => u64::from(khz) * 1000,
        _ => calibrate_tsc_hz(),
    }
}

/// Calibrates the host TSC against CLOCK_MONOTONIC for 50 ms.
pub fn calibrate_tsc_hz() -> u64 {
    // SAFETY: rdtsc has no memory effects and exists on every x86-64 CPU.
    let t0 = unsafe { core::arch::x86_64::_rdtsc() };
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: as above.
    let t1 = unsafe { core::arch::x86_64::_rdtsc() };
    let ns = start.elapsed().as_nanos().max(1);
    u64::try_from(u128::from(t1.wrapping_sub(t0)) * 1_000_000_000 / ns).unwrap_or(u64::MAX)
}

/// What one KVM_RUN came back with, detached from the kvm_run borrow.
enum Outcome {
    Again,
    Nap(Duration),
    RingFull,
    Fatal(String),
}

/// Everything a vCPU thread needs.
pub struct VcpuThread {
    /// vCPU index.
    pub id: u32,
    /// The vCPU.
    pub vcpu: SharedVcpu,
    /// Shared control block.
    pub control: Arc<Control>,
    /// Dirty-ring-full handler.
    pub handler: SharedHandler,
    /// Where fatal exits are recorded.
    pub errors: SharedErrors,
}

impl VcpuThread {
    /// Spawns the run-loop thread.
    pub fn spawn(self) -> Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("minivm-vcpu{}", self.id))
            .spawn(move || self.run_loop())
            .map_err(|source| Error::Os {
                what: "spawning a vCPU thread",
                source,
            })
    }

    fn lock_vcpu(&self) -> std::sync::MutexGuard<'_, VcpuFd> {
        self.vcpu.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run_loop(self) {
        let id = self.id as usize;
        {
            let mut v = self.lock_vcpu();
            let run: *mut kvm_run = v.get_kvm_run();
            KVM_RUN_PTR.with(|p| p.set(run));
        }
        let mut slice_start = Instant::now();
        let mut timer = match SliceTimer::for_this_thread() {
            Ok(t) => t,
            Err(e) => {
                self.errors.lock().unwrap_or_else(|p| p.into_inner()).push((
                    self.id,
                    format!("cannot create the vCPU's slice timer: {e}"),
                ));
                KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
                self.control.mark_exited(id);
                return;
            }
        };
        while self.control.checkpoint(id) {
            timer.set(self.control.throttle(id, &mut slice_start));
            match self.run_once() {
                Outcome::Again => {}
                Outcome::Nap(d) => self.control.nap(id, d),
                Outcome::RingFull => {
                    let h = self
                        .handler
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    match h {
                        Some(h) => {
                            // Kicks wait until the handler is done: a pending signal makes
                            // KVM_RESET_DIRTY_RINGS stop early. The kick is delivered on
                            // unblock and ends the next KVM_RUN at once (immediate_exit).
                            let blocked = block_kick_signal(true);
                            h.dirty_ring_full(self.id);
                            if blocked {
                                block_kick_signal(false);
                            }
                        }
                        // Nobody reaps the ring yet: wait a little instead of spinning.
                        None => self.control.nap(id, SWEEP_NAP),
                    }
                }
                Outcome::Fatal(reason) => {
                    self.errors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((self.id, reason));
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        self.control.mark_exited(id);
    }

    fn run_once(&self) -> Outcome {
        let mut v = self.lock_vcpu();
        self.control.set_in_guest(self.id as usize, true);
        let result = v.run();
        self.control.set_in_guest(self.id as usize, false);
        let outcome = match result {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Outcome::Again,
            Err(e) => Outcome::Fatal(format!("KVM_RUN failed: {e}")),
            Ok(VcpuExit::IoOut(IDLE_PORT, _)) => Outcome::Nap(IDLE_NAP),
            Ok(VcpuExit::IoOut(SWEEP_YIELD_PORT, _)) => Outcome::Nap(SWEEP_NAP),
            Ok(VcpuExit::IoOut(..)) | Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::Intr) => Outcome::Again,
            Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => Outcome::RingFull,
            Ok(other) => Outcome::Fatal(format!("unexpected exit {other:?}")),
        };
        // Clear before the next checkpoint: a kick after this point sets it again.
        v.set_kvm_immediate_exit(0);
        outcome
    }
}
