//! The `MemoryListener` trait and the sink that listeners report dirty pages into.

use crate::{DirtyBitmap, DirtyReason, RamBlock, RateSample, Result};

/// How a listener harvests dirty pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// `log_sync` once per logged section (the KVM dirty bitmap, per slot).
    PerSection,
    /// `log_sync_global` once per sync (the KVM dirty ring, per vCPU ring).
    Global,
}

/// A component that tracks writes to guest RAM (QEMU's `MemoryListener`, dirty-log part).
///
/// The [`AddressSpace`](crate::AddressSpace) calls `log_global_start`/`log_start` when the
/// first reason turns logging on, `log_stop`/`log_global_stop` when the last one turns it
/// off, and `log_sync` or `log_sync_global` (per [`MemoryListener::sync_mode`]) on every
/// `global_dirty_log_sync`. Listeners report pages into the [`DirtySink`].
pub trait MemoryListener: Send + Sync {
    /// Short name for errors and stats (`"kvm-bitmap"`, `"kvm-ring"`, `"vmm-writes"`).
    fn name(&self) -> &'static str;

    /// Which of `log_sync` / `log_sync_global` this listener implements.
    fn sync_mode(&self) -> SyncMode {
        SyncMode::PerSection
    }

    /// Logging turns on (0 → some reason), before the per-section `log_start`s.
    fn log_global_start(&self) -> Result<()> {
        Ok(())
    }

    /// Logging turned off (last reason stopped), after the per-section `log_stop`s.
    fn log_global_stop(&self) -> Result<()> {
        Ok(())
    }

    /// Start logging writes to `section` (KVM: set KVM_MEM_LOG_DIRTY_PAGES on its slot).
    fn log_start(&self, _section: &RamBlock) -> Result<()> {
        Ok(())
    }

    /// Stop logging writes to `section`.
    fn log_stop(&self, _section: &RamBlock) -> Result<()> {
        Ok(())
    }

    /// Report the pages of `section` dirtied since the previous sync.
    fn log_sync(&self, _section: &RamBlock, _sink: &mut DirtySink<'_>) -> Result<()> {
        Ok(())
    }

    /// Report every page dirtied since the previous sync, across all sections.
    fn log_sync_global(&self, _sink: &mut DirtySink<'_>) -> Result<()> {
        Ok(())
    }

    /// Re-arm tracking for pages `[first_page, first_page + pages)` of `section` (block-relative)
    /// that an earlier sync harvested but left armed (manual protect, deferred clear).
    fn log_clear(&self, _section: &RamBlock, _first_page: u64, _pages: u64) -> Result<()> {
        Ok(())
    }

    /// True when a sync may leave what it harvested armed until [`Self::log_clear`]
    /// (only when [`DirtySink::may_defer_clear`] says so); fixed for the listener's
    /// life. A user that reads pages re-arms them just before (QEMU's lazy clear); with
    /// no such listener it need not call the clear at all.
    ///
    /// Such a listener does not report again a page it harvested and has not re-armed
    /// (whether written again is unknown, and its user still holds it dirty), and
    /// re-arms the pages of [`DirtySink::rearm_sample`] all the same, pending ones
    /// included, so that counting those gives an exact sample of the pages written.
    fn defers_clear(&self) -> bool {
        false
    }
}

/// Where listeners put what they harvested: every active reason's bitmap at once.
///
/// Merging into each reason's own bitmap is what lets a dirty-rate measurement run beside
/// a migration without draining the migration's pages (QEMU shares one bitmap and counts).
pub struct DirtySink<'a> {
    clients: [Option<&'a DirtyBitmap>; SINK_CLIENTS],
    new_pages: [u64; SINK_CLIENTS],
    reported_pages: u64,
    /// Reported pages that are in `sample`.
    sampled_pages: u64,
    sample: Option<RateSample>,
    may_defer_clear: bool,
    rearm: RateSample,
    stops_logging: bool,
}

/// Bitmaps one sink feeds: each reason's own, then each reason's observer (see
/// [`AddressSpace::observe`](crate::AddressSpace::observe)).
pub const SINK_CLIENTS: usize = 6;

impl<'a> DirtySink<'a> {
    /// A sink that feeds the given bitmaps: index [`DirtyReason::index`] is the reason's
    /// own bitmap, index `3 + DirtyReason::index` its observer.
    pub fn new(clients: [Option<&'a DirtyBitmap>; SINK_CLIENTS]) -> Self {
        DirtySink {
            clients,
            new_pages: [0; SINK_CLIENTS],
            reported_pages: 0,
            sampled_pages: 0,
            sample: None,
            may_defer_clear: false,
            rearm: RateSample::ALL,
            stops_logging: false,
        }
    }

    /// Also counts the reported pages that are in `sample` ([`Self::sampled_pages`]).
    pub fn with_rate_sample(mut self, sample: Option<RateSample>) -> Self {
        self.sample = sample;
        self
    }

    /// Lets listeners that defer clears do so in this sync (default: no).
    pub fn with_deferred_clear(mut self, allowed: bool) -> Self {
        self.may_defer_clear = allowed;
        self
    }

    /// The pages a deferring listener re-arms in this sync all the same (default:
    /// every page, as if it did not defer).
    pub fn with_rearm_sample(mut self, sample: RateSample) -> Self {
        self.rearm = sample;
        self
    }

    /// The pages a listener that defers clears re-arms in this sync even so, pending
    /// ones included: from here on their log is exact.
    pub fn rearm_sample(&self) -> RateSample {
        self.rearm
    }

    /// True when a listener may leave what it harvests armed for a later
    /// [`MemoryListener::log_clear`]: the address space allows it while a migration
    /// (which clears pages as it sends them) logs and no dirty-rate measurement does
    /// (a measurement needs every page re-armed at every sync).
    pub fn may_defer_clear(&self) -> bool {
        self.may_defer_clear
    }

    /// Marks this sync as the last before logging stops (the one-shot sync of the last
    /// reason): see [`DirtySink::stops_logging`].
    pub fn with_stops_logging(mut self, stops: bool) -> Self {
        self.stops_logging = stops;
        self
    }

    /// True when no reason logs after this sync: a listener need not re-arm (write-protect
    /// again) what it harvests, since nobody will ask for those pages; the next start's
    /// baseline sync absorbs whatever it reports then. Re-arming here would make the
    /// guest fault on its whole working set right after the last reader stopped.
    pub fn stops_logging(&self) -> bool {
        self.stops_logging
    }

    /// Merges a little-endian bitmap whose bit `i` is global page `first_page + i`.
    pub fn merge_le(&mut self, first_page: u64, words: &[u64], pages: u64) {
        for (i, client) in self.clients.iter().enumerate() {
            if let Some(bitmap) = client {
                self.new_pages[i] += bitmap.merge_le(first_page, words, pages);
            }
        }
        let limit = pages.min(words.len() as u64 * 64);
        let full = (limit / 64) as usize;
        let mut reported: u64 = words[..full]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        if !limit.is_multiple_of(64) {
            reported += u64::from((words[full] & ((1u64 << (limit % 64)) - 1)).count_ones());
        }
        self.reported_pages += reported;
        if let Some(sample) = self.sample {
            let nwords = limit.div_ceil(64) as usize;
            for (i, w) in words[..nwords].iter().enumerate() {
                let mut bits = w & sample.mask_at(first_page + i as u64 * 64);
                if i == full {
                    bits &= (1u64 << (limit % 64)) - 1;
                }
                self.sampled_pages += u64::from(bits.count_ones());
            }
        }
    }

    /// Marks one global page dirty (the ring path's per-entry report).
    pub fn set_page(&mut self, page: u64) {
        for (i, client) in self.clients.iter().enumerate() {
            if let Some(bitmap) = client {
                self.new_pages[i] += u64::from(bitmap.set(page));
            }
        }
        self.reported_pages += 1;
        if self.sample.is_some_and(|s| s.contains(page)) {
            self.sampled_pages += 1;
        }
    }

    /// Pages reported so far (with repeats across listeners; QEMU's `total_dirty_pages` step).
    pub fn reported_pages(&self) -> u64 {
        self.reported_pages
    }

    /// Reported pages in the rate sample so far (0 without one).
    pub fn sampled_pages(&self) -> u64 {
        self.sampled_pages
    }

    /// Pages newly set in `reason`'s bitmap so far.
    pub fn new_pages(&self, reason: DirtyReason) -> u64 {
        self.new_pages[reason.index()]
    }
}
