//! The KVM dirty-ring listener: per-vCPU rings of dirtied GFNs, reaped into per-slot
//! pending bitmaps and published by `log_sync_global` (QEMU's `kvm_dirty_ring_reap` and
//! `kvm_log_sync_global`).
//!
//! Three paths reap, all under one lock around "reap + KVM_RESET_DIRTY_RINGS (+ publish)":
//! the sync (after a flush that kicks every vCPU out of KVM_RUN), the vCPU thread on
//! KVM_EXIT_DIRTY_RING_FULL ([`KvmRingListener::reap_vcpu`]), and the reaper thread
//! ([`KvmRingListener::start_reaper`]). Pages reaped between syncs wait in the pending
//! bitmaps and reach the sink at the next sync, after the reset that re-protected them.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_dirty_gfn;
use kvm_ioctls::VmFd;

use super::ioctls;
use super::ring_memory::{RingMemory, SignalsBlocked};
use crate::listener::{DirtySink, MemoryListener, SyncMode};
use crate::{Error, RamBlock, Result, BITS_PER_WORD};

/// `KVM_DIRTY_GFN_F_DIRTY`: the kernel pushed this entry (kvm-bindings lacks it).
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: userspace collected this entry (kvm-bindings lacks it).
pub const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// Bytes per ring entry (`struct kvm_dirty_gfn`).
pub const DIRTY_GFN_BYTES: u64 = std::mem::size_of::<kvm_dirty_gfn>() as u64;
/// Default ring size in entries per vCPU: 65536 (1 MiB, the largest this kernel takes).
///
/// A guest whose working set per sync period fits in the ring runs at full speed; one
/// entry past it, every reset re-protects the set, the guest re-faults it into a full
/// ring, and it slows 100-1000× (measured on a 4096-entry ring: W = 4000 at full speed,
/// W = 4096 at 1/450). So the largest ring wins: 65536 entries hold 255 MiB of writes
/// per vCPU per period, where QEMU's usual 4096 hold 16 MiB.
pub const DEFAULT_RING_ENTRIES: u32 = 65536;

/// Times KVM_RESET_DIRTY_RINGS is retried after EINTR before the error is reported.
const RESET_RETRIES: u32 = 16;

/// The VMM's half of the ring listener's flush: KVM moves what a vCPU's hardware
/// buffered (PML) into its ring only when the vCPU leaves KVM_RUN, so before a sync
/// harvests the rings the listener asks the VMM to kick every vCPU out once.
///
/// A closure `Fn() -> Result<()>` is a `VcpuKick`.
pub trait VcpuKick: Send + Sync {
    /// Makes every vCPU that is in KVM_RUN leave it, and returns once each has (a
    /// vCPU outside KVM_RUN needs nothing). Never called on a vCPU thread.
    fn kick_all(&self) -> Result<()>;
}

impl<F: Fn() -> Result<()> + Send + Sync> VcpuKick for F {
    fn kick_all(&self) -> Result<()> {
        self()
    }
}

/// Parameters of the [`KvmRingListener`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmRingConfig {
    /// Ring size in entries per vCPU: a power of two, the size the VM was created with.
    pub entries: u32,
    /// The reaper thread reaps every ring this often (0, the default: only on demand,
    /// on a ring-full exit and at the fill level). Every reap ends in a reset that
    /// re-protects what it collected, so the guest faults on its working set again:
    /// a period of 1000 ms (counted from the last reap, a sync's too) reset the rings
    /// just before the final sync of a 1 s calc-dirty-rate window, and the guest
    /// (working set 65536) then stalled 0.4-1 s after the measurement returned. Without
    /// a period, rings are reset at syncs and when one fills (the vCPU's exit).
    pub reap_period_ms: u64,
    /// The reaper reaps once some ring is this many percent full (0: off, the default).
    /// Every early reap ends in a reset that re-protects what it collected, so a fill
    /// level of P % shrinks the working set the ring holds without guest slowdown to
    /// P % of the ring (measured: W = 3072 in a 4096 ring at 75 % slowed the guest 3×,
    /// W = 4000 without it ran at full speed).
    pub fill_wake_percent: u8,
    /// How often the reaper peeks at the fill level (one load per vCPU).
    pub fill_poll_ms: u64,
}

impl Default for KvmRingConfig {
    fn default() -> Self {
        KvmRingConfig {
            entries: DEFAULT_RING_ENTRIES,
            reap_period_ms: 0,
            fill_wake_percent: 0,
            fill_poll_ms: 10,
        }
    }
}

/// Cumulative counters of the ring listener, read lock-free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Entries reaped from every ring (QEMU's count: a page re-dirtied after a reset, or
    /// written by two vCPUs, counts each time).
    pub entries_reaped: u64,
    /// Distinct pages handed to the sink, summed over syncs (unique per sync window).
    pub unique_pages_published: u64,
    /// Distinct pages the last sync handed to the sink.
    pub last_sync_unique_pages: u64,
    /// Entries reaped for the last sync window (since the previous sync).
    pub last_sync_entries: u64,
    /// Entries rejected as corrupt (unknown slot, offset beyond the slot).
    pub rejected_entries: u64,
    /// KVM_RESET_DIRTY_RINGS calls.
    pub resets: u64,
    /// KVM_EXIT_DIRTY_RING_FULL exits handled.
    pub ring_full_exits: u64,
    /// Reaps done by the reaper thread.
    pub reaper_reaps: u64,
    /// `log_sync_global` calls.
    pub syncs: u64,
    /// Time spent reaping rings in userspace (reading entries, marking them collected).
    pub reap_ns: u64,
    /// Time spent in KVM_RESET_DIRTY_RINGS.
    pub reset_ns: u64,
    /// Entries KVM_RESET_DIRTY_RINGS reported re-protecting.
    pub reset_entries: u64,
    /// Time spent in the syncs' flush (kicking every vCPU out of KVM_RUN).
    pub flush_ns: u64,
    /// KVM_RESET_DIRTY_RINGS calls repeated because one stopped early (signal pending).
    pub reset_retries: u64,
}

/// A logged slot's pages reaped but not yet published.
struct SlotPending {
    kvm_slot: u32,
    first_page: u64,
    pages: u64,
    /// Bit `i` = block page `i` reaped since the last publish.
    bits: Vec<u64>,
    /// Bit `w` = word `w` of `bits` is non-zero (so publishing skips empty words).
    summary: Vec<u64>,
    /// Bits set in `bits`.
    count: u64,
}

impl SlotPending {
    #[inline]
    fn set(&mut self, page: u64) {
        let w = (page / BITS_PER_WORD) as usize;
        let mask = 1u64 << (page % BITS_PER_WORD);
        if self.bits[w] & mask == 0 {
            self.bits[w] |= mask;
            self.summary[w / 64] |= 1u64 << (w % 64);
            self.count += 1;
        }
    }

    /// Hands every pending page to `sink` and clears them; returns the count.
    fn publish(&mut self, sink: &mut DirtySink<'_>) -> u64 {
        if self.count == 0 {
            return 0;
        }
        for si in 0..self.summary.len() {
            let mut s = std::mem::take(&mut self.summary[si]);
            while s != 0 {
                let w = si * 64 + s.trailing_zeros() as usize;
                s &= s - 1;
                let word_first = w as u64 * BITS_PER_WORD;
                let pages = BITS_PER_WORD.min(self.pages - word_first);
                sink.merge_le(self.first_page + word_first, &self.bits[w..=w], pages);
                self.bits[w] = 0;
            }
        }
        std::mem::take(&mut self.count)
    }

    fn clear(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = 0);
        self.summary.iter_mut().for_each(|w| *w = 0);
        self.count = 0;
    }
}

/// What the lock protects.
struct State {
    /// Per vCPU: next entry to look at (free-running, masked on use).
    fetch: Vec<u32>,
    slots: Vec<SlotPending>,
    /// Some reason holds the log.
    logging: bool,
    /// The first corrupt entry since the last sync, reported by that sync.
    corrupt: Option<(u32, u32, u64)>,
    /// An error the reaper or ring-full path hit, reported by the next sync.
    deferred_error: Option<Error>,
    /// Entries were collected whose KVM_RESET_DIRTY_RINGS has not completed yet: the
    /// next reap resets even if it collects nothing, and nothing is published before.
    reset_owed: bool,
    /// Per vCPU: the fetch index the last completed reset covered.
    reset_done: Vec<u32>,
    /// Distinct pages per vCPU over a window, while someone counts them.
    vcpu_pages: Option<VcpuPages>,
}

/// Distinct pages each vCPU dirtied since a sync ([`KvmRingListener::vcpu_pages_start`]).
struct VcpuPages {
    /// The window opens at the next sync, after its reap.
    armed: bool,
    /// Per vCPU: one bit per global page, grown on demand.
    bits: Vec<Vec<u64>>,
    /// Per vCPU: bits set in `bits`.
    counts: Vec<u64>,
    /// `counts` as of the last sync inside the window.
    at_sync: Vec<u64>,
}

impl VcpuPages {
    /// Notes that `vcpu` dirtied global page `page`.
    fn set(&mut self, vcpu: usize, page: u64) {
        if self.armed {
            return;
        }
        let (Some(bits), Some(count)) = (self.bits.get_mut(vcpu), self.counts.get_mut(vcpu)) else {
            return;
        };
        let w = (page / BITS_PER_WORD) as usize;
        if w >= bits.len() {
            bits.resize(w + 1, 0);
        }
        let bit = 1u64 << (page % BITS_PER_WORD);
        if bits[w] & bit == 0 {
            bits[w] |= bit;
            *count += 1;
        }
    }

    /// A sync reaped: open the window (armed) or record where it stands.
    fn at_sync(&mut self) {
        if std::mem::take(&mut self.armed) {
            self.bits.iter_mut().for_each(Vec::clear);
            self.counts.iter_mut().for_each(|c| *c = 0);
        }
        self.at_sync.clone_from(&self.counts);
    }
}

/// How the listener re-protects collected entries.
enum Resetter {
    Kvm(Arc<VmFd>),
    #[cfg(test)]
    Fake,
}

/// Wakes the reaper thread.
#[derive(Default)]
struct ReaperCtl {
    flags: Mutex<(bool, bool)>, // (reap requested, stop)
    cv: Condvar,
}

impl ReaperCtl {
    fn lock(&self) -> MutexGuard<'_, (bool, bool)> {
        self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Harvests KVM's per-vCPU dirty rings (`log_sync_global`, once per sync).
pub struct KvmRingListener {
    config: KvmRingConfig,
    resetter: Resetter,
    kick: Arc<dyn VcpuKick>,
    /// Per vCPU ring; reaped only under `state`.
    rings: Box<[RingMemory]>,
    state: Mutex<State>,
    /// Per vCPU: fetch index mirror for the lock-free fill peek.
    fetch_mirror: Box<[AtomicU32]>,
    /// Per vCPU: entries reaped, ever (QEMU's `cpu->dirty_pages`).
    vcpu_entries: Box<[AtomicU64]>,
    entries_reaped: AtomicU64,
    window_entries: AtomicU64,
    last_sync_entries: AtomicU64,
    unique_pages: AtomicU64,
    last_sync_unique: AtomicU64,
    rejected: AtomicU64,
    resets: AtomicU64,
    ring_full_exits: AtomicU64,
    reaper_reaps: AtomicU64,
    syncs: AtomicU64,
    reap_ns: AtomicU64,
    reset_ns: AtomicU64,
    reset_entries: AtomicU64,
    flush_ns: AtomicU64,
    reset_retries: AtomicU64,
    logging: AtomicBool,
    reaper: Arc<ReaperCtl>,
    /// Time base of `last_reap_ns`.
    epoch: Instant,
    /// When any path last reaped every ring (ns since `epoch`): the period counts from it.
    last_reap_ns: AtomicU64,
}

fn check_config(config: &KvmRingConfig) -> Result<()> {
    if config.entries == 0 || !config.entries.is_power_of_two() {
        return Err(Error::InvalidParameter(format!(
            "dirty ring of {} entries: must be a non-zero power of two",
            config.entries
        )));
    }
    if config.fill_wake_percent > 100 {
        return Err(Error::InvalidParameter(format!(
            "fill_wake_percent {} above 100",
            config.fill_wake_percent
        )));
    }
    Ok(())
}

impl KvmRingListener {
    /// Maps the ring of every vCPU in `vcpu_fds` (the VM must have been created with the
    /// ring enabled at `config.entries` entries, before its vCPUs); `kick` is the flush.
    pub fn new(
        vm: Arc<VmFd>,
        vcpu_fds: &[BorrowedFd<'_>],
        config: KvmRingConfig,
        kick: Arc<dyn VcpuKick>,
    ) -> Result<Self> {
        check_config(&config)?;
        let max_bytes = [223u32, 192]
            .iter()
            .map(|c| vm.check_extension_raw(u64::from(*c)))
            .max()
            .unwrap_or(0);
        if max_bytes <= 0 {
            return Err(Error::Unsupported("the KVM dirty ring"));
        }
        let bytes = u64::from(config.entries) * DIRTY_GFN_BYTES;
        if bytes > max_bytes as u64 {
            return Err(Error::InvalidParameter(format!(
                "dirty ring of {} entries exceeds the kernel maximum of {} entries",
                config.entries,
                max_bytes as u64 / DIRTY_GFN_BYTES
            )));
        }
        let rings = vcpu_fds
            .iter()
            .map(|fd| RingMemory::map(*fd, config.entries))
            .collect::<Result<Vec<_>>>()?;
        tracing::debug!(
            vcpus = rings.len(),
            entries = config.entries,
            "KVM dirty ring listener ready: rings mapped"
        );
        Ok(Self::with_rings(rings, config, Resetter::Kvm(vm), kick))
    }

    fn with_rings(
        rings: Vec<RingMemory>,
        config: KvmRingConfig,
        resetter: Resetter,
        kick: Arc<dyn VcpuKick>,
    ) -> Self {
        let n = rings.len();
        KvmRingListener {
            config,
            resetter,
            kick,
            rings: rings.into_boxed_slice(),
            state: Mutex::new(State {
                fetch: vec![0; n],
                slots: Vec::new(),
                logging: false,
                corrupt: None,
                deferred_error: None,
                reset_owed: false,
                reset_done: vec![0; n],
                vcpu_pages: None,
            }),
            fetch_mirror: (0..n).map(|_| AtomicU32::new(0)).collect(),
            vcpu_entries: (0..n).map(|_| AtomicU64::new(0)).collect(),
            entries_reaped: AtomicU64::new(0),
            window_entries: AtomicU64::new(0),
            last_sync_entries: AtomicU64::new(0),
            unique_pages: AtomicU64::new(0),
            last_sync_unique: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            ring_full_exits: AtomicU64::new(0),
            reaper_reaps: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            reap_ns: AtomicU64::new(0),
            reset_ns: AtomicU64::new(0),
            reset_entries: AtomicU64::new(0),
            flush_ns: AtomicU64::new(0),
            reset_retries: AtomicU64::new(0),
            logging: AtomicBool::new(false),
            reaper: Arc::new(ReaperCtl::default()),
            epoch: Instant::now(),
            last_reap_ns: AtomicU64::new(0),
        }
    }

    /// Ring size in entries per vCPU.
    pub fn entries(&self) -> u32 {
        self.config.entries
    }

    /// Number of vCPU rings.
    pub fn vcpus(&self) -> usize {
        self.vcpu_entries.len()
    }

    /// Per vCPU: entries reaped since the listener was made (lock-free; QEMU's
    /// `dirty_pages`, the base of the per-vCPU dirty rate).
    pub fn vcpu_dirty_entries(&self) -> Vec<u64> {
        self.vcpu_entries
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Starts counting the distinct pages each vCPU dirties, in a window that opens at
    /// the next sync (after that sync's reap) and runs to the latest sync; replaces a
    /// count under way. A page dirtied by two vCPUs counts for each; a page re-dirtied
    /// after a reset counts once (ring entries count it again: [`Self::vcpu_dirty_entries`]).
    pub fn vcpu_pages_start(&self) {
        let n = self.rings.len();
        self.lock().vcpu_pages = Some(VcpuPages {
            armed: true,
            bits: vec![Vec::new(); n],
            counts: vec![0; n],
            at_sync: vec![0; n],
        });
    }

    /// Per vCPU: the distinct pages counted from the sync after [`Self::vcpu_pages_start`]
    /// to the latest sync, and stops counting; None when nothing was counting or no
    /// sync opened the window.
    pub fn vcpu_pages_take(&self) -> Option<Vec<u64>> {
        let vp = self.lock().vcpu_pages.take()?;
        (!vp.armed).then_some(vp.at_sync)
    }

    /// Cumulative counters (lock-free).
    pub fn stats(&self) -> RingStats {
        RingStats {
            entries_reaped: self.entries_reaped.load(Ordering::Relaxed),
            unique_pages_published: self.unique_pages.load(Ordering::Relaxed),
            last_sync_unique_pages: self.last_sync_unique.load(Ordering::Relaxed),
            last_sync_entries: self.last_sync_entries.load(Ordering::Relaxed),
            rejected_entries: self.rejected.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            ring_full_exits: self.ring_full_exits.load(Ordering::Relaxed),
            reaper_reaps: self.reaper_reaps.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            reap_ns: self.reap_ns.load(Ordering::Relaxed),
            reset_ns: self.reset_ns.load(Ordering::Relaxed),
            reset_entries: self.reset_entries.load(Ordering::Relaxed),
            flush_ns: self.flush_ns.load(Ordering::Relaxed),
            reset_retries: self.reset_retries.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when every entry collected so far has been reset by the kernel: the kernel
    /// resets each ring in order and marks entries invalid, so it is enough that the last
    /// collected entry of each ring no longer reads RESET.
    fn reset_complete(&self, st: &State) -> bool {
        self.rings.iter().enumerate().all(|(v, r)| {
            st.fetch[v] == st.reset_done[v]
                || r.flags(st.fetch[v].wrapping_sub(1)).load(Ordering::Acquire)
                    != KVM_DIRTY_GFN_F_RESET
        })
    }

    /// KVM_RESET_DIRTY_RINGS until every collected entry is reset. A pending signal (a
    /// kick landing on the ring-full path's vCPU thread) makes the kernel stop early,
    /// with EINTR or with a short count; either way the ioctl is repeated. Clears
    /// `reset_owed` only once the reset is complete.
    fn reset_rings(&self, st: &mut State) -> Result<u64> {
        st.reset_owed = true;
        self.resets.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let mut n = 0;
        let mut attempt = 0;
        // Kernels since 6.16 stop a reset when a signal is pending, and the entries they
        // had gathered for the batch being built are then marked invalid without being
        // re-protected: a write to those pages would go untracked. So no signal may be
        // delivered to this thread during the ioctl (a vCPU thread is kicked by signals).
        let _mask = SignalsBlocked::new();
        loop {
            let r = match &self.resetter {
                Resetter::Kvm(vm) => ioctls::reset_dirty_rings(vm),
                #[cfg(test)]
                Resetter::Fake => Ok(self.rings.iter().map(RingMemory::kernel_reset).sum()),
            };
            match r {
                Ok(cleared) => n += cleared,
                Err(Error::Kvm { source, .. }) if source.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            if self.reset_complete(st) {
                break;
            }
            attempt += 1;
            self.reset_retries.fetch_add(1, Ordering::Relaxed);
            if attempt > RESET_RETRIES {
                return Err(Error::Kvm {
                    op: "KVM_RESET_DIRTY_RINGS (entries left unreset)",
                    source: std::io::Error::from_raw_os_error(libc::EINTR),
                });
            }
        }
        st.reset_done.clone_from(&st.fetch);
        st.reset_owed = false;
        self.reset_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.reset_entries.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Reaps ring `vcpu` into the pending bitmaps; returns the entries collected.
    fn reap_ring_locked(&self, st: &mut State, vcpu: usize) -> u64 {
        let State {
            fetch,
            slots,
            logging,
            corrupt,
            vcpu_pages,
            ..
        } = st;
        let (Some(ring), Some(fetch_index)) = (self.rings.get(vcpu), fetch.get_mut(vcpu)) else {
            return 0;
        };
        let size = ring.entries();
        let t0 = Instant::now();
        let mut n: u32 = 0;
        let mut rejected = 0u64;
        let mut hint = 0usize;
        while n < size && ring.is_dirty(*fetch_index) {
            let (slot, offset) = ring.read(*fetch_index);
            ring.set_collected(*fetch_index);
            *fetch_index = fetch_index.wrapping_add(1);
            n += 1;
            // Decode: the slot field is (address space << 16) | slot id, as RamBlock::kvm_slot.
            let found = match slots.get(hint) {
                Some(s) if s.kvm_slot == slot => Some(hint),
                _ => slots.iter().position(|s| s.kvm_slot == slot),
            };
            match found {
                Some(i) if offset < slots[i].pages => {
                    hint = i;
                    slots[i].set(offset);
                    if let Some(vp) = vcpu_pages.as_mut() {
                        vp.set(vcpu, slots[i].first_page + offset);
                    }
                }
                _ if !*logging => {}
                _ => {
                    rejected += 1;
                    corrupt.get_or_insert((vcpu as u32, slot, offset));
                }
            }
        }
        self.fetch_mirror[vcpu].store(*fetch_index, Ordering::Relaxed);
        self.reap_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let n = u64::from(n);
        if n > 0 {
            self.vcpu_entries[vcpu].fetch_add(n, Ordering::Relaxed);
            self.entries_reaped.fetch_add(n, Ordering::Relaxed);
            self.window_entries.fetch_add(n, Ordering::Relaxed);
        }
        if rejected > 0 {
            self.rejected.fetch_add(rejected, Ordering::Relaxed);
        }
        n
    }

    /// Reaps every ring, then resets if anything was collected.
    fn reap_all_locked(&self, st: &mut State) -> Result<u64> {
        self.collect_all_locked(st, true)
    }

    /// Reaps every ring; with `reset`, then resets if anything was collected (now or by
    /// an earlier reap that did not reset). Without, the reset is owed to the next reap
    /// that resets: the pages stay writable (when logging stops, nobody needs them
    /// protected, and re-protecting would make the guest fault on all of them again).
    fn collect_all_locked(&self, st: &mut State, reset: bool) -> Result<u64> {
        let mut total = 0;
        for v in 0..self.rings.len() {
            total += self.reap_ring_locked(st, v);
        }
        self.last_reap_ns
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if total > 0 {
            st.reset_owed = true;
        }
        if reset && st.reset_owed {
            self.reset_rings(st)?;
        }
        Ok(total)
    }

    /// The ring-full path (vCPU thread, KVM_EXIT_DIRTY_RING_FULL): reaps this vCPU's
    /// ring and resets; the pages wait for the next sync. Returns entries collected.
    pub fn reap_vcpu(&self, vcpu: u32) -> Result<u64> {
        let exits = self.ring_full_exits.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(vcpu, ring_full_exits = exits, "dirty ring full exit");
        let mut st = self.lock();
        let n = self.reap_ring_locked(&mut st, vcpu as usize);
        if n > 0 || st.reset_owed {
            self.reset_rings(&mut st)?;
        }
        Ok(n)
    }

    /// Handles a ring-full exit and never fails: an error is kept for the next sync.
    pub fn handle_ring_full(&self, vcpu: u32) {
        if let Err(e) = self.reap_vcpu(vcpu) {
            tracing::warn!(vcpu, error = %e, "reaping a full dirty ring failed (the next sync fails)");
            self.lock().deferred_error.get_or_insert(e);
        }
        self.request_reap();
    }

    /// Reaps every ring and resets (no flush: entries still buffered in the hardware
    /// wait for the next one). The pages wait for the next sync.
    pub fn reap_all(&self) -> Result<u64> {
        let mut st = self.lock();
        self.reap_all_locked(&mut st)
    }

    /// True when some ring holds at least `entries` uncollected entries (one acquire
    /// load per vCPU, no lock).
    pub fn any_ring_filled(&self, entries: u32) -> bool {
        if entries == 0 {
            return false;
        }
        self.rings.iter().enumerate().any(|(v, r)| {
            let idx = self.fetch_mirror[v]
                .load(Ordering::Relaxed)
                .wrapping_add(entries - 1);
            r.is_dirty(idx)
        })
    }

    /// Asks the reaper thread to reap now.
    pub fn request_reap(&self) {
        let mut f = self.reaper.lock();
        f.0 = true;
        self.reaper.cv.notify_all();
    }

    /// Starts the reaper thread: it reaps every ring when asked ([`request_reap`], a
    /// ring-full exit), when some ring passes the fill level, and every
    /// `reap_period_ms`. It stops when the listener is dropped.
    ///
    /// [`request_reap`]: KvmRingListener::request_reap
    pub fn start_reaper(self: &Arc<Self>) -> Result<()> {
        let weak = Arc::downgrade(self);
        let ctl = Arc::clone(&self.reaper);
        let cfg = self.config;
        std::thread::Builder::new()
            .name("ferry-ring-reaper".into())
            .spawn(move || reaper_loop(&weak, &ctl, cfg))
            .map(|_| ())
            .map_err(|e| Error::Kvm {
                op: "spawning the dirty ring reaper",
                source: e,
            })
    }

    /// Time since any path last reaped every ring.
    fn since_last_reap(&self) -> Duration {
        let now = self.epoch.elapsed().as_nanos() as u64;
        Duration::from_nanos(now.saturating_sub(self.last_reap_ns.load(Ordering::Relaxed)))
    }

    /// Reaper step: reaps all rings if logging; errors are kept for the next sync.
    fn reaper_reap(&self) {
        if !self.logging.load(Ordering::Acquire) {
            return;
        }
        self.reaper_reaps.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if let Err(e) = self.reap_all_locked(&mut st) {
            tracing::warn!(error = %e, "the dirty ring reaper failed (the next sync fails)");
            st.deferred_error.get_or_insert(e);
        }
    }
}

fn reaper_loop(weak: &Weak<KvmRingListener>, ctl: &ReaperCtl, cfg: KvmRingConfig) {
    let period = (cfg.reap_period_ms > 0).then(|| Duration::from_millis(cfg.reap_period_ms));
    let fill_entries =
        (u64::from(cfg.entries) * u64::from(cfg.fill_wake_percent) / 100).max(1) as u32;
    let poll = (cfg.fill_wake_percent > 0).then(|| Duration::from_millis(cfg.fill_poll_ms.max(1)));
    // The period counts from the last reap by anyone (a sync resets too), so the reaper
    // adds no reset a sync has just done: fewer resets, fewer write faults in the guest.
    let mut since = Duration::ZERO;
    loop {
        let wait = match (period, poll) {
            (Some(p), Some(q)) => Some(p.saturating_sub(since).min(q)),
            (Some(p), None) => Some(p.saturating_sub(since)),
            (None, q) => q,
        };
        let requested = {
            let mut f = ctl.lock();
            if !f.0 && !f.1 {
                f = match wait {
                    Some(d) => {
                        ctl.cv
                            .wait_timeout(f, d)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                    None => ctl.cv.wait(f).unwrap_or_else(|p| p.into_inner()),
                };
            }
            if f.1 {
                return;
            }
            std::mem::take(&mut f.0)
        };
        let Some(l) = weak.upgrade() else { return };
        since = l.since_last_reap();
        let due = requested
            || period.is_some_and(|p| since >= p)
            || (poll.is_some() && l.any_ring_filled(fill_entries));
        if due {
            l.reaper_reap();
            since = Duration::ZERO;
        }
    }
}

impl Drop for KvmRingListener {
    fn drop(&mut self) {
        let mut f = self.reaper.lock();
        f.1 = true;
        self.reaper.cv.notify_all();
    }
}

impl MemoryListener for KvmRingListener {
    fn name(&self) -> &'static str {
        "kvm-ring"
    }

    fn sync_mode(&self) -> SyncMode {
        SyncMode::Global
    }

    fn log_global_start(&self) -> Result<()> {
        let mut st = self.lock();
        // Leftovers from an earlier session: collect and drop them.
        st.logging = false;
        self.reap_all_locked(&mut st)?;
        st.slots.iter_mut().for_each(SlotPending::clear);
        st.corrupt = None;
        st.deferred_error = None;
        st.logging = true;
        self.window_entries.store(0, Ordering::Relaxed);
        self.logging.store(true, Ordering::Release);
        tracing::debug!(
            vcpus = self.rings.len(),
            entries = self.config.entries,
            "dirty ring logging on"
        );
        Ok(())
    }

    fn log_global_stop(&self) -> Result<()> {
        self.logging.store(false, Ordering::Release);
        let mut st = self.lock();
        st.logging = false;
        // No reset: nobody logs now, and the next start resets what is owed.
        self.collect_all_locked(&mut st, false)?;
        st.slots.clear();
        Ok(())
    }

    fn log_start(&self, block: &RamBlock) -> Result<()> {
        let words = block.pages().div_ceil(BITS_PER_WORD) as usize;
        {
            let mut st = self.lock();
            st.slots.retain(|s| s.kvm_slot != block.kvm_slot);
            st.slots.push(SlotPending {
                kvm_slot: block.kvm_slot,
                first_page: block.first_page,
                pages: block.pages(),
                bits: vec![0; words],
                summary: vec![0; words.div_ceil(64)],
                count: 0,
            });
        }
        match &self.resetter {
            Resetter::Kvm(vm) => ioctls::set_slot_logging(vm, block, true),
            #[cfg(test)]
            Resetter::Fake => Ok(()),
        }
    }

    fn log_stop(&self, block: &RamBlock) -> Result<()> {
        match &self.resetter {
            Resetter::Kvm(vm) => ioctls::set_slot_logging(vm, block, false)?,
            #[cfg(test)]
            Resetter::Fake => {}
        }
        let mut st = self.lock();
        // Collect what the slot logged before it stopped; the reset waits for the next
        // start (see `collect_all_locked`).
        self.collect_all_locked(&mut st, false)?;
        st.slots.retain(|s| s.kvm_slot != block.kvm_slot);
        Ok(())
    }

    fn log_sync_global(&self, sink: &mut DirtySink<'_>) -> Result<()> {
        // Flush outside the lock: a vCPU in its ring-full handler may be waiting for it.
        let t0 = Instant::now();
        self.kick.kick_all()?;
        self.flush_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut st = self.lock();
        self.syncs.fetch_add(1, Ordering::Relaxed);
        // The last sync before logging stops leaves what it collects writable.
        let reaped = self.collect_all_locked(&mut st, !sink.stops_logging());
        if reaped.is_ok() {
            if let Some(vp) = st.vcpu_pages.as_mut() {
                vp.at_sync();
            }
        }
        // Publish only after the reset above re-protected every reaped page (QEMU's
        // rule); pages reaped earlier by the reaper or ring-full path were reset then.
        // (The last sync before logging stops resets nothing: nobody reads on.)
        if reaped.is_ok() {
            let mut unique = 0;
            for s in &mut st.slots {
                unique += s.publish(sink);
            }
            self.unique_pages.fetch_add(unique, Ordering::Relaxed);
            self.last_sync_unique.store(unique, Ordering::Relaxed);
            self.last_sync_entries.store(
                self.window_entries.swap(0, Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        reaped?;
        if let Some(e) = st.deferred_error.take() {
            return Err(e);
        }
        if let Some((vcpu, slot, offset)) = st.corrupt.take() {
            return Err(Error::CorruptRingEntry { vcpu, slot, offset });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AddressSpace, DirtyReason, HostMemory};

    const SLOT0_PAGES: u64 = 256;
    const SLOT1_PAGES: u64 = 128;

    fn blocks() -> Vec<RamBlock> {
        vec![
            RamBlock::new(
                "ram0",
                0,
                HostMemory::anonymous(SLOT0_PAGES * 4096).unwrap(),
                0,
                0,
            ),
            RamBlock::new(
                "ram1",
                1 << 32,
                HostMemory::anonymous(SLOT1_PAGES * 4096).unwrap(),
                (1 << 16) | 3,
                SLOT0_PAGES,
            ),
        ]
    }

    fn fake(vcpus: usize, entries: u32) -> Arc<KvmRingListener> {
        let rings = (0..vcpus).map(|_| RingMemory::heap(entries)).collect();
        let cfg = KvmRingConfig {
            entries,
            ..Default::default()
        };
        Arc::new(KvmRingListener::with_rings(
            rings,
            cfg,
            Resetter::Fake,
            Arc::new(|| Ok(())),
        ))
    }

    /// The kernel's side: push at its own dirty index.
    fn push(l: &KvmRingListener, vcpu: usize, at: u32, slot: u32, offset: u64) {
        l.rings[vcpu].push(at, slot, offset);
    }

    fn kernel_reset(l: &KvmRingListener) {
        l.rings.iter().for_each(|r| {
            r.kernel_reset();
        });
    }

    #[test]
    fn bad_sizes_are_refused() {
        for entries in [0, 3, 1000] {
            let cfg = KvmRingConfig {
                entries,
                ..Default::default()
            };
            assert!(matches!(
                check_config(&cfg),
                Err(Error::InvalidParameter(_))
            ));
        }
    }

    #[test]
    fn reaped_pages_reach_the_sink_with_counts() {
        let l = fake(2, 16);
        let space = AddressSpace::new(blocks()).unwrap();
        space.register_listener(l.clone()).unwrap();
        let bm = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        push(&l, 0, 0, 0, 5);
        push(&l, 0, 1, 0, 5); // re-dirtied: two entries, one page
        push(&l, 1, 0, (1 << 16) | 3, 127);
        let r = space.global_dirty_log_sync(None).unwrap();
        assert_eq!(r.new_pages(DirtyReason::Migration), 2);
        assert_eq!(
            bm.iter_set().collect::<Vec<_>>(),
            vec![5, SLOT0_PAGES + 127]
        );
        assert_eq!(l.vcpu_dirty_entries(), vec![2, 1]);
        let s = l.stats();
        assert_eq!((s.last_sync_entries, s.last_sync_unique_pages), (3, 2));
        assert_eq!(s.resets, 1, "the empty drain at start skips its reset");
    }

    #[test]
    fn corrupt_entries_are_rejected_and_counted() {
        let l = fake(1, 16);
        let space = AddressSpace::new(blocks()).unwrap();
        space.register_listener(l.clone()).unwrap();
        let bm = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        push(&l, 0, 0, 0, SLOT0_PAGES); // offset just past the slot
        push(&l, 0, 1, 7, 0); // no such slot
        push(&l, 0, 2, (1 << 16) | 3, u64::MAX); // far beyond
        push(&l, 0, 3, 0, 9); // a good one
        let e = space.global_dirty_log_sync(None).unwrap_err();
        assert!(
            matches!(
                e,
                Error::CorruptRingEntry {
                    vcpu: 0,
                    slot: 0,
                    offset: SLOT0_PAGES
                }
            ),
            "{e}"
        );
        assert_eq!(l.stats().rejected_entries, 3);
        assert_eq!(
            bm.iter_set().collect::<Vec<_>>(),
            vec![9],
            "the good page only"
        );
        // The ring moved past them: the next sync is clean.
        kernel_reset(&l);
        push(&l, 0, 4, 0, 10);
        space.global_dirty_log_sync(None).unwrap();
        assert!(bm.is_set(10));
        assert_eq!(bm.count(), 2);
    }

    #[test]
    fn ring_full_and_reaper_pages_wait_for_the_sync() {
        let l = fake(1, 8);
        let space = AddressSpace::new(blocks()).unwrap();
        space.register_listener(l.clone()).unwrap();
        let bm = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        for i in 0..8 {
            push(&l, 0, i, 0, u64::from(i));
        }
        assert!(l.any_ring_filled(8));
        l.handle_ring_full(0);
        assert!(!l.any_ring_filled(1));
        assert_eq!(bm.count(), 0, "not published before the sync");
        kernel_reset(&l);
        for i in 8..12 {
            push(&l, 0, i, 0, u64::from(i));
        }
        assert_eq!(l.reap_all().unwrap(), 4);
        let r = space.global_dirty_log_sync(None).unwrap();
        assert_eq!(r.new_pages(DirtyReason::Migration), 12);
        assert_eq!(l.stats().ring_full_exits, 1);
        assert_eq!(l.vcpu_dirty_entries(), vec![12]);
    }

    #[test]
    fn per_vcpu_pages_count_distinct_pages_from_the_next_sync() {
        let l = fake(2, 16);
        let space = AddressSpace::new(blocks()).unwrap();
        space.register_listener(l.clone()).unwrap();
        space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        assert_eq!(l.vcpu_pages_take(), None, "nothing counting");
        l.vcpu_pages_start();
        // Before the window: reaped by the sync that opens it.
        push(&l, 0, 0, 0, 1);
        space.global_dirty_log_sync(None).unwrap();
        kernel_reset(&l);
        // In the window: vCPU 0 writes page 5 twice (two entries, one page) and page 6;
        // vCPU 1 writes page 5 too and a page of slot 1.
        push(&l, 0, 1, 0, 5);
        push(&l, 0, 2, 0, 6);
        l.reap_all().unwrap();
        kernel_reset(&l);
        push(&l, 0, 3, 0, 5);
        push(&l, 1, 0, 0, 5);
        push(&l, 1, 1, (1 << 16) | 3, 0);
        space.global_dirty_log_sync(None).unwrap();
        // After the last sync: not in the window.
        push(&l, 1, 2, 0, 9);
        l.reap_all().unwrap();
        assert_eq!(l.vcpu_pages_take(), Some(vec![2, 2]));
        assert_eq!(
            l.vcpu_dirty_entries(),
            vec![4, 3],
            "entries count every push"
        );
        assert_eq!(l.vcpu_pages_take(), None, "taken");
    }

    #[test]
    fn the_last_sync_before_logging_stops_resets_nothing() {
        let l = fake(1, 16);
        let space = AddressSpace::new(blocks()).unwrap();
        space.register_listener(l.clone()).unwrap();
        let rate = space
            .global_dirty_log_start(DirtyReason::DirtyRate)
            .unwrap();
        push(&l, 0, 0, 0, 3);
        space.global_dirty_log_sync(None).unwrap();
        let resets = l.stats().resets;
        assert_eq!(resets, 1);
        kernel_reset(&l);
        push(&l, 0, 1, 0, 4);
        space
            .global_dirty_log_sync(Some(DirtyReason::DirtyRate))
            .unwrap();
        assert!(rate.is_set(4), "still counted");
        assert_eq!(
            l.stats().resets,
            resets,
            "the guest keeps its pages writable"
        );
        // The next start resets what is owed before logging again.
        space
            .global_dirty_log_start(DirtyReason::DirtyRate)
            .unwrap();
        assert_eq!(l.stats().resets, resets + 1);
        // With another reason left, a one-shot sync re-protects as usual.
        space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        push(&l, 0, 2, 0, 5);
        space
            .global_dirty_log_sync(Some(DirtyReason::DirtyRate))
            .unwrap();
        assert_eq!(l.stats().resets, resets + 2);
    }

    #[test]
    fn never_reaps_more_than_the_ring() {
        let l = fake(1, 4);
        let space = AddressSpace::new(blocks()).unwrap();
        space.register_listener(l.clone()).unwrap();
        space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        for i in 0..4 {
            push(&l, 0, i, 0, 1);
        }
        assert_eq!(l.reap_all().unwrap(), 4);
        // Not reset by the "kernel": entries stay RESET, nothing more to reap.
        assert_eq!(l.reap_all().unwrap(), 0);
    }
}
