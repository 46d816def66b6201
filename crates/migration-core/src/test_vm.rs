//! [`PanickyVm`]: a guest for the engine's unit tests whose callbacks panic where a
//! test says.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dirty_sync::{AddressSpace, DirtySink, HostMemory, MemoryListener, RamBlock, PAGE_SIZE};

use crate::guest::{GuestError, MigratableVm};
use crate::testing::TestVm;

/// Where a [`PanickyVm`] panics: a VMM callback, or its dirty-log listener's sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PanicAt {
    /// `address_space`, which page reads call (on the migration's sender threads).
    AddressSpace,
    /// `address_space` while the vCPUs are paused (a final-pass sender thread).
    AddressSpaceWhilePaused,
    /// `pause_vcpus` (after pausing them).
    PauseVcpus,
    /// `resume_vcpus` (before resuming them).
    ResumeVcpus,
    /// `set_throttle_percent`.
    SetThrottle,
    /// `save_device_state`.
    SaveDeviceState,
    /// `load_device_state` (on the destination).
    LoadDeviceState,
    /// `vcpu_dirty_entries`.
    VcpuDirtyEntries,
    /// The dirty-log listener's `log_sync` (during a global sync).
    LogSync,
}

/// One-shot panics, each at a [`PanicAt`] on its `n`th call.
#[derive(Default)]
pub(crate) struct Trap {
    armed: Mutex<Vec<(PanicAt, u64)>>,
}

impl Trap {
    /// Panics at the `nth` (from 1) call of `at` from now (once).
    pub(crate) fn arm(&self, at: PanicAt, nth: u64) {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((at, nth));
    }

    /// True while some armed panic has not happened yet.
    pub(crate) fn armed(&self) -> bool {
        !self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// A call of `at`: panics if that is an armed call.
    fn hit(&self, at: PanicAt) {
        let fire = {
            let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
            let due = armed.iter_mut().position(|(point, n)| {
                if *point != at {
                    return false;
                }
                *n -= 1;
                *n == 0
            });
            due.map(|i| armed.remove(i)).is_some()
        };
        if fire {
            panic!("injected panic in {at:?}");
        }
    }
}

/// Pages a [`PanickyVm`]'s listener reports dirty at every sync (so the final pass
/// reads pages too).
pub(crate) const DIRTY_PER_SYNC: u64 = 4;

/// The listener of a [`PanickyVm`]'s address space: reports its first
/// [`DIRTY_PER_SYNC`] pages dirty, and panics in `log_sync` when its trap says so.
struct TrapListener(Arc<Trap>);

impl MemoryListener for TrapListener {
    fn name(&self) -> &'static str {
        "trap"
    }
    fn log_sync(&self, b: &RamBlock, sink: &mut DirtySink<'_>) -> dirty_sync::Result<()> {
        self.0.hit(PanicAt::LogSync);
        for p in 0..DIRTY_PER_SYNC.min(b.pages()) {
            sink.set_page(b.first_page + p);
        }
        Ok(())
    }
}

/// A [`TestVm`] over heap memory whose callbacks panic where its [`Trap`] is armed,
/// as a buggy VMM's would. It counts pauses and resumes; it has a one-vCPU dirty
/// ring that never fills.
pub(crate) struct PanickyVm {
    inner: TestVm<HostMemory>,
    /// Where to panic.
    pub(crate) trap: Arc<Trap>,
    /// `pause_vcpus` calls.
    pub(crate) pauses: AtomicU64,
    /// `resume_vcpus` calls.
    pub(crate) resumes: AtomicU64,
    paused: AtomicBool,
}

impl PanickyVm {
    /// A guest of `pages` pages, page `p` filled with the byte `p + seed`.
    pub(crate) fn new(pages: u64, seed: u8) -> Arc<Self> {
        let bytes: Vec<u8> = (0..pages * PAGE_SIZE)
            .map(|i| ((i / PAGE_SIZE) as u8).wrapping_add(seed))
            .collect();
        let inner = TestVm::new(pages * PAGE_SIZE);
        assert!(inner.mem.write_volatile(0, &bytes));
        let trap = Arc::new(Trap::default());
        inner
            .space
            .register_listener(Arc::new(TrapListener(trap.clone())))
            .expect("the only listener");
        let inner = Arc::into_inner(inner).expect("not shared yet");
        Arc::new(PanickyVm {
            inner,
            trap,
            pauses: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            paused: AtomicBool::new(false),
        })
    }

    /// A copy of guest RAM.
    pub(crate) fn ram(&self) -> Vec<u8> {
        self.inner.ram()
    }
}

impl MigratableVm for PanickyVm {
    fn address_space(&self) -> &Arc<AddressSpace> {
        self.trap.hit(PanicAt::AddressSpace);
        if self.paused.load(Ordering::SeqCst) {
            self.trap.hit(PanicAt::AddressSpaceWhilePaused);
        }
        &self.inner.space
    }
    fn pause_vcpus(&self) -> Result<(), GuestError> {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        self.paused.store(true, Ordering::SeqCst);
        self.trap.hit(PanicAt::PauseVcpus);
        Ok(())
    }
    fn resume_vcpus(&self) -> Result<(), GuestError> {
        self.trap.hit(PanicAt::ResumeVcpus);
        self.resumes.fetch_add(1, Ordering::SeqCst);
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError> {
        self.trap.hit(PanicAt::SaveDeviceState);
        Ok(b"registers".to_vec())
    }
    fn load_device_state(&self, _: &[u8]) -> Result<(), GuestError> {
        self.trap.hit(PanicAt::LoadDeviceState);
        Ok(())
    }
    fn set_throttle_percent(&self, _percent: u8) {
        self.trap.hit(PanicAt::SetThrottle);
    }
    fn vcpu_dirty_entries(&self) -> Option<Vec<u64>> {
        self.trap.hit(PanicAt::VcpuDirtyEntries);
        Some(vec![0])
    }
}
