//! `AddressSpace`: the RAM blocks, the registered listeners, and the shared dirty-log mask.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use stats::DirtyLogStats;

use crate::listener::{DirtySink, MemoryListener, SyncMode, SINK_CLIENTS};
use crate::{DirtyBitmap, DirtyReason, Error, RamBlock, RateSample, ReasonMask, Result, PAGE_SIZE};

/// What one `global_dirty_log_sync` found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Pages the listeners reported (a page reported by two listeners counts twice).
    pub reported_pages: u64,
    /// Reported pages in `sample` (0 without one).
    pub sampled_pages: u64,
    /// The sample a lazy sync counted in ([`AddressSpace::global_dirty_log_sync_lazy`]).
    pub sample: Option<RateSample>,
    /// Pages newly set in each reason's bitmap, indexed by [`DirtyReason::index`].
    pub new_pages: [u64; 3],
    /// Wall time of the whole sync, in nanoseconds.
    pub sync_ns: u64,
}

impl SyncReport {
    /// Pages newly set in `reason`'s bitmap by this sync.
    pub fn new_pages(&self, reason: DirtyReason) -> u64 {
        self.new_pages[reason.index()]
    }

    /// Pages written since the previous sync, as well as this sync can tell: the
    /// reported pages, or with a count sample (a lazy sync, whose listener may not
    /// report a page it has not re-armed, written or not) the sample's count scaled
    /// up, exact when the previous sync re-armed that sample.
    pub fn estimated_written_pages(&self) -> u64 {
        match self.sample {
            Some(s) => s.scale(self.sampled_pages),
            None => self.reported_pages,
        }
    }
}

struct Inner {
    listeners: Vec<Arc<dyn MemoryListener>>,
    mask: ReasonMask,
    /// Each reason's bitmap at `reason.index()`, its observer at `3 + reason.index()`.
    clients: [Option<Arc<DirtyBitmap>>; SINK_CLIENTS],
    /// Per reason: pages another reason's own sync ([`AddressSpace::global_dirty_log_sync_for`])
    /// harvested for it, held back until the next shared sync hands them over.
    held: [Option<DirtyBitmap>; 3],
}

/// Guest RAM as a list of [`RamBlock`]s plus the listeners that log writes to it.
///
/// Each active [`DirtyReason`] owns a [`DirtyBitmap`] over every page of the space; a sync
/// merges what the listeners harvested into all of them, so reasons never steal each
/// other's pages, and stopping one reason never stops logging another still needs.
pub struct AddressSpace {
    blocks: Vec<RamBlock>,
    total_pages: u64,
    inner: Mutex<Inner>,
    mask_bits: AtomicU8,
    /// Some registered listener defers its clear ([`MemoryListener::defers_clear`]).
    defers_clear: AtomicBool,
    stats: Arc<DirtyLogStats>,
}

impl AddressSpace {
    /// Builds an address space over `blocks`, which must be page-aligned, non-empty,
    /// non-overlapping in guest physical space, with distinct ids and KVM slots, and laid
    /// end to end in page-index space (`first_page` of each = sum of the previous sizes).
    pub fn new(blocks: Vec<RamBlock>) -> Result<Self> {
        if blocks.is_empty() {
            return Err(Error::InvalidBlocks("no RAM blocks".into()));
        }
        let mut next_page = 0;
        for (i, b) in blocks.iter().enumerate() {
            if b.size_bytes == 0 || b.size_bytes % PAGE_SIZE != 0 || b.gpa % PAGE_SIZE != 0 {
                return Err(Error::InvalidBlocks(format!(
                    "block {} ({:#x}+{:#x}) is empty or not page-aligned",
                    b.id, b.gpa, b.size_bytes
                )));
            }
            if b.size_bytes > b.memory.size_bytes() {
                return Err(Error::InvalidBlocks(format!(
                    "block {} has {:#x} bytes but its host memory only {:#x}",
                    b.id,
                    b.size_bytes,
                    b.memory.size_bytes()
                )));
            }
            if b.first_page != next_page {
                return Err(Error::InvalidBlocks(format!(
                    "block {} starts at page {} but the previous blocks end at page {}",
                    b.id, b.first_page, next_page
                )));
            }
            next_page += b.pages();
            for other in &blocks[..i] {
                let overlap =
                    b.gpa < other.gpa + other.size_bytes && other.gpa < b.gpa + b.size_bytes;
                if overlap || other.id == b.id || other.kvm_slot == b.kvm_slot {
                    return Err(Error::InvalidBlocks(format!(
                        "blocks {} and {} overlap or share an id or a slot",
                        other.id, b.id
                    )));
                }
            }
        }
        Ok(AddressSpace {
            blocks,
            total_pages: next_page,
            inner: Mutex::new(Inner {
                listeners: Vec::new(),
                mask: ReasonMask::default(),
                clients: Default::default(),
                held: Default::default(),
            }),
            mask_bits: AtomicU8::new(0),
            defers_clear: AtomicBool::new(false),
            stats: Arc::new(DirtyLogStats::default()),
        })
    }

    /// The RAM blocks, in page-index order.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Pages in all blocks together.
    pub fn total_pages(&self) -> u64 {
        self.total_pages
    }

    /// The index of the block that holds global page `page`, and the page's index
    /// inside that block.
    pub fn locate_page(&self, page: u64) -> Option<(usize, u64)> {
        let i = self
            .blocks
            .partition_point(|b| b.first_page + b.pages() <= page);
        let b = self.blocks.get(i)?;
        (page >= b.first_page).then(|| (i, page - b.first_page))
    }

    /// Counters of every sync, readable at any time without a lock.
    pub fn stats(&self) -> &Arc<DirtyLogStats> {
        &self.stats
    }

    /// The reasons that currently hold the log.
    pub fn reasons(&self) -> ReasonMask {
        ReasonMask::from_bits(self.mask_bits.load(Ordering::Acquire))
    }

    /// True when some reason holds the log.
    pub fn logging(&self) -> bool {
        !self.reasons().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the listener list intact; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a listener; if logging is already on, it starts logging right away.
    ///
    /// A listener whose name is already registered is refused, and so is mixing the KVM
    /// dirty ring with the KVM dirty bitmap (KVM does not offer both on one VM here).
    pub fn register_listener(&self, listener: Arc<dyn MemoryListener>) -> Result<()> {
        let mut inner = self.lock();
        for l in &inner.listeners {
            let kvm_pair = l.name().starts_with("kvm-") && listener.name().starts_with("kvm-");
            if l.name() == listener.name() || kvm_pair {
                return Err(Error::Conflict(format!(
                    "cannot register {} beside {}",
                    listener.name(),
                    l.name()
                )));
            }
        }
        if !inner.mask.is_empty() {
            self.start_listener(listener.as_ref())?;
        }
        if listener.defers_clear() {
            self.defers_clear.store(true, Ordering::Release);
        }
        inner.listeners.push(listener);
        Ok(())
    }

    /// True when a listener leaves harvested pages armed until
    /// [`AddressSpace::clear_dirty_log`]: a reader of dirty pages must then re-arm each
    /// range before it reads it. Without one, the clear is a no-op and need not be called.
    pub fn defers_clear(&self) -> bool {
        self.defers_clear.load(Ordering::Acquire)
    }

    fn start_listener(&self, l: &dyn MemoryListener) -> Result<()> {
        l.log_global_start()?;
        for b in &self.blocks {
            l.log_start(b)?;
        }
        Ok(())
    }

    fn stop_listener(&self, l: &dyn MemoryListener) -> Result<()> {
        let mut first_err = None;
        for b in &self.blocks {
            if let Err(e) = l.log_stop(b) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = l.log_global_stop() {
            first_err.get_or_insert(e);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Starts logging for `reason` and returns the reason's own bitmap (all clear).
    ///
    /// On the first reason every listener starts (`log_global_start`, then `log_start` per
    /// block); if one fails, the ones already started are stopped again and the error is
    /// returned. Starting a reason that is already on is an error.
    pub fn global_dirty_log_start(&self, reason: DirtyReason) -> Result<Arc<DirtyBitmap>> {
        let mut inner = self.lock();
        if inner.mask.contains(reason) {
            return Err(Error::Reason {
                reason,
                what: "already started",
            });
        }
        if inner.mask.is_empty() {
            tracing::debug!(
                ?reason,
                listeners = inner.listeners.len(),
                "dirty logging starts"
            );
            for (i, l) in inner.listeners.iter().enumerate() {
                if let Err(e) = self.start_listener(l.as_ref()) {
                    for started in &inner.listeners[..=i] {
                        if let Err(se) = self.stop_listener(started.as_ref()) {
                            tracing::warn!(
                                listener = started.name(),
                                error = %se,
                                "rolling back a failed dirty-log start: stopping failed too"
                            );
                        }
                    }
                    return Err(e);
                }
            }
        }
        let bitmap = Arc::new(DirtyBitmap::new(self.total_pages));
        inner.clients[reason.index()] = Some(Arc::clone(&bitmap));
        inner.mask = inner.mask.with(reason);
        self.mask_bits.store(inner.mask.bits(), Ordering::Release);
        Ok(bitmap)
    }

    /// Stops logging for `reason` only; the listeners stop when no reason is left.
    pub fn global_dirty_log_stop(&self, reason: DirtyReason) -> Result<()> {
        let mut inner = self.lock();
        self.stop_locked(&mut inner, reason)
    }

    fn stop_locked(&self, inner: &mut Inner, reason: DirtyReason) -> Result<()> {
        if !inner.mask.contains(reason) {
            return Err(Error::Reason {
                reason,
                what: "not started",
            });
        }
        inner.mask = inner.mask.without(reason);
        inner.clients[reason.index()] = None;
        inner.clients[3 + reason.index()] = None;
        inner.held[reason.index()] = None;
        self.mask_bits.store(inner.mask.bits(), Ordering::Release);
        if inner.mask.is_empty() {
            tracing::debug!(?reason, "dirty logging stops (no reason left)");
            let mut first_err = None;
            for l in &inner.listeners {
                if let Err(e) = self.stop_listener(l.as_ref()) {
                    first_err.get_or_insert(e);
                }
            }
            return first_err.map_or(Ok(()), Err);
        }
        Ok(())
    }

    /// The bitmap of a running reason.
    pub fn dirty_bitmap(&self, reason: DirtyReason) -> Option<Arc<DirtyBitmap>> {
        self.lock().clients[reason.index()].clone()
    }

    /// A second bitmap fed by every sync while `reason` is on, for a view that is cleared
    /// on its own schedule (the migration's "unique pages per window" count). Replaces
    /// any earlier observer of the reason; dropped when the reason stops.
    pub fn observe(&self, reason: DirtyReason) -> Result<Arc<DirtyBitmap>> {
        let mut inner = self.lock();
        if !inner.mask.contains(reason) {
            return Err(Error::Reason {
                reason,
                what: "not started",
            });
        }
        let bitmap = Arc::new(DirtyBitmap::new(self.total_pages));
        inner.clients[3 + reason.index()] = Some(Arc::clone(&bitmap));
        Ok(bitmap)
    }

    /// Harvests every listener and merges what they report into every active reason's
    /// bitmap (with the pages held back for it by syncs of another reason's own, see
    /// [`AddressSpace::global_dirty_log_sync_for`]); with `one_shot`, then stops that
    /// reason (and only it). Every listener re-arms all it harvested.
    ///
    /// Syncs are serialised: a dirty-rate job and a migration can both call this.
    pub fn global_dirty_log_sync(&self, one_shot: Option<DirtyReason>) -> Result<SyncReport> {
        self.sync(one_shot, RateSample::ALL, None)
    }

    /// The migration's sync with QEMU's lazy clear: a listener that defers clears
    /// ([`Self::defers_clear`]) leaves what it harvested armed for
    /// [`Self::clear_dirty_log`], except the pages of `rearm` (see [`RateSample`]), and
    /// does not report again a page still waiting for that clear. The report counts the
    /// reported pages in `count` ([`SyncReport::estimated_written_pages`]). While a
    /// dirty-rate measurement is logging too, every listener re-arms all it harvests.
    pub fn global_dirty_log_sync_lazy(
        &self,
        rearm: RateSample,
        count: RateSample,
    ) -> Result<SyncReport> {
        self.sync(None, rearm, Some(count))
    }

    fn sync(
        &self,
        one_shot: Option<DirtyReason>,
        rearm: RateSample,
        count: Option<RateSample>,
    ) -> Result<SyncReport> {
        let mut inner = self.lock();
        self.sync_locked(&mut inner, None, one_shot, rearm, count)
    }

    /// A sync of `reason`'s own: what the listeners harvest reaches `reason`'s bitmap
    /// (and observer) at once, while every other active reason's share is held back and
    /// handed to it by the next [`AddressSpace::global_dirty_log_sync`], which then
    /// reports the same new pages as if this sync had not happened. So a dirty-rate
    /// measurement changes none of a migration's per-sync figures. With `one_shot`,
    /// `reason` stops after the sync.
    ///
    /// The held pages' `reported_pages` are folded into the next shared sync's as a
    /// union (exact with one listener per page; a page reported by two listeners in
    /// the same sync still counts twice).
    pub fn global_dirty_log_sync_for(
        &self,
        reason: DirtyReason,
        one_shot: bool,
    ) -> Result<SyncReport> {
        let mut inner = self.lock();
        if !inner.mask.contains(reason) {
            return Err(Error::Reason {
                reason,
                what: "sync of a reason that is not started",
            });
        }
        self.sync_locked(
            &mut inner,
            Some(reason),
            one_shot.then_some(reason),
            RateSample::ALL,
            None,
        )
    }

    fn sync_locked(
        &self,
        inner: &mut Inner,
        own: Option<DirtyReason>,
        one_shot: Option<DirtyReason>,
        rearm: RateSample,
        count: Option<RateSample>,
    ) -> Result<SyncReport> {
        if inner.mask.is_empty() {
            return Err(Error::Reason {
                reason: one_shot.unwrap_or(DirtyReason::Migration),
                what: "sync with dirty logging off",
            });
        }
        let start = Instant::now();
        // A sync of one reason's own holds back every other active reason's share.
        if let Some(own) = own {
            for r in DirtyReason::ALL {
                if r != own && inner.mask.contains(r) && inner.held[r.index()].is_none() {
                    inner.held[r.index()] = Some(DirtyBitmap::new(self.total_pages));
                }
            }
        }
        let held_before: [u64; 3] =
            std::array::from_fn(|i| inner.held[i].as_ref().map_or(0, DirtyBitmap::count));
        let mut clients: [Option<&DirtyBitmap>; SINK_CLIENTS] =
            std::array::from_fn(|i| inner.clients[i].as_deref());
        // Only the migration clears what it reads; a measurement needs every page
        // re-armed at each of its syncs to count exactly.
        let defer = inner.mask.contains(DirtyReason::Migration)
            && !inner.mask.contains(DirtyReason::DirtyRate);
        for r in DirtyReason::ALL {
            if own == Some(r) {
                continue;
            }
            if let Some(held) = &inner.held[r.index()] {
                // Harvest into the held pages first; they reach the reason below (a
                // shared sync) or at the next shared sync.
                clients[r.index()] = Some(held);
                clients[3 + r.index()] = None;
            }
        }
        let stops_logging = one_shot.is_some_and(|r| inner.mask.without(r).is_empty());
        let mut sink = DirtySink::new(clients)
            .with_stops_logging(stops_logging)
            .with_rate_sample(count)
            .with_deferred_clear(defer)
            .with_rearm_sample(rearm);
        let mut result = Ok(());
        for l in &inner.listeners {
            let r = match l.sync_mode() {
                SyncMode::PerSection => self
                    .blocks
                    .iter()
                    .try_for_each(|b| l.log_sync(b, &mut sink)),
                SyncMode::Global => l.log_sync_global(&mut sink),
            };
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        let mut report = SyncReport {
            reported_pages: sink.reported_pages(),
            sampled_pages: sink.sampled_pages(),
            sample: count,
            new_pages: DirtyReason::ALL.map(|r| sink.new_pages(r)),
            sync_ns: 0,
        };
        // What this sync's harvest newly set, per reason (in the held pages, if held).
        let harvested_new = report.new_pages;
        if let Some(own) = own {
            // Nothing reached another reason's bitmap.
            for r in DirtyReason::ALL.into_iter().filter(|r| *r != own) {
                report.new_pages[r.index()] = 0;
            }
        } else {
            // Hand the held pages over: the union of what earlier own-syncs held and
            // what this one harvested, counted as one sync would have counted it.
            let mut extra_reported = 0;
            for r in DirtyReason::ALL {
                let i = r.index();
                let Some(held) = inner.held[i].take() else {
                    continue;
                };
                let words = held.to_vec();
                let total = self.total_pages;
                report.new_pages[i] = inner.clients[i]
                    .as_ref()
                    .map_or(0, |b| b.merge_le(0, &words, total));
                if let Some(obs) = &inner.clients[3 + i] {
                    obs.merge_le(0, &words, total);
                }
                // Harvested pages that were already held were reported once before.
                let repeats = report.reported_pages.saturating_sub(harvested_new[i]);
                extra_reported = u64::max(
                    extra_reported,
                    held_before[i].saturating_sub(repeats.min(held_before[i])),
                );
            }
            report.reported_pages += extra_reported;
        }
        report.sync_ns = start.elapsed().as_nanos() as u64;
        self.stats
            .record_sync(report.reported_pages, report.sync_ns);
        if let Some(reason) = one_shot {
            self.stop_locked(inner, reason)?;
        }
        result.map(|()| report)
    }

    /// Re-arms tracking for global pages `[first_page, first_page + pages)` in every
    /// listener (QEMU's `memory_region_clear_dirty_bitmap`), block by block.
    pub fn clear_dirty_log(&self, first_page: u64, pages: u64) -> Result<()> {
        let end = first_page
            .checked_add(pages)
            .filter(|e| *e <= self.total_pages)
            .ok_or_else(|| Error::NoSuchMemory(format!("pages {first_page}+{pages}")))?;
        let inner = self.lock();
        for b in &self.blocks {
            let lo = first_page.max(b.first_page);
            let hi = end.min(b.first_page + b.pages());
            if lo < hi {
                for l in &inner.listeners {
                    l.log_clear(b, lo - b.first_page, hi - lo)?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for AddressSpace {
    fn drop(&mut self) {
        let mut inner = self.lock();
        for reason in DirtyReason::ALL {
            if inner.mask.contains(reason) {
                if let Err(e) = self.stop_locked(&mut inner, reason) {
                    tracing::warn!(?reason, error = %e, "stopping dirty logging on drop failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Reports the pages queued in `next` on the next sync; counts starts and stops.
    #[derive(Default)]
    struct Fake {
        next: Mutex<Vec<u64>>,
        starts: AtomicU32,
        stops: AtomicU32,
    }

    impl MemoryListener for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn log_start(&self, _b: &RamBlock) -> Result<()> {
            self.starts.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn log_stop(&self, _b: &RamBlock) -> Result<()> {
            self.stops.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn log_sync(&self, b: &RamBlock, sink: &mut DirtySink<'_>) -> Result<()> {
            let mut next = self.next.lock().unwrap();
            next.retain(|p| {
                if *p >= b.first_page && *p < b.first_page + b.pages() {
                    sink.set_page(*p);
                    false
                } else {
                    true
                }
            });
            Ok(())
        }
    }

    fn two_blocks() -> Vec<RamBlock> {
        (0..2)
            .map(|i| {
                RamBlock::new(
                    format!("ram{i}"),
                    i * (1 << 20),
                    crate::HostMemory::anonymous(1 << 20).unwrap(),
                    i as u32,
                    i * 256,
                )
            })
            .collect()
    }

    #[test]
    fn rejects_bad_block_tables() {
        assert!(AddressSpace::new(vec![]).is_err());
        let mut b = two_blocks();
        b[1].first_page = 300;
        assert!(AddressSpace::new(b).is_err());
        let mut b = two_blocks();
        b[1].gpa = 4096;
        assert!(AddressSpace::new(b).is_err());
        let mut b = two_blocks();
        b[0].size_bytes = 100;
        assert!(AddressSpace::new(b).is_err());
        let mut b = two_blocks();
        b[1].kvm_slot = 0;
        assert!(AddressSpace::new(b).is_err());
    }

    #[test]
    fn locate_page_spans_blocks() {
        let space = AddressSpace::new(two_blocks()).unwrap();
        assert_eq!(space.locate_page(0), Some((0, 0)));
        assert_eq!(space.locate_page(300), Some((1, 44)));
        assert!(space.locate_page(512).is_none());
    }

    #[test]
    fn stopping_one_reason_keeps_logging_for_another() {
        let space = AddressSpace::new(two_blocks()).unwrap();
        let fake = Arc::new(Fake::default());
        space.register_listener(fake.clone()).unwrap();
        let mig = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        assert_eq!(fake.starts.load(Ordering::SeqCst), 2, "log_start per block");
        let rate = space
            .global_dirty_log_start(DirtyReason::DirtyRate)
            .unwrap();
        assert_eq!(fake.starts.load(Ordering::SeqCst), 2, "no second start");
        space.global_dirty_log_stop(DirtyReason::DirtyRate).unwrap();
        assert!(space.logging());
        assert!(space.reasons().contains(DirtyReason::Migration));
        assert_eq!(fake.stops.load(Ordering::SeqCst), 0, "logging stays on");
        fake.next.lock().unwrap().extend([1, 300]);
        let r = space.global_dirty_log_sync(None).unwrap();
        assert_eq!(r.new_pages(DirtyReason::Migration), 2);
        assert_eq!(mig.iter_set().collect::<Vec<_>>(), vec![1, 300]);
        assert_eq!(rate.count(), 0, "a stopped reason's bitmap is not fed");
        space.global_dirty_log_stop(DirtyReason::Migration).unwrap();
        assert!(!space.logging());
        assert_eq!(fake.stops.load(Ordering::SeqCst), 2);
        assert!(
            space.global_dirty_log_sync(None).is_err(),
            "sync with logging off"
        );
    }

    #[test]
    fn reasons_get_their_own_bitmaps_and_one_shot_stops_only_its_own() {
        let space = AddressSpace::new(two_blocks()).unwrap();
        let fake = Arc::new(Fake::default());
        space.register_listener(fake.clone()).unwrap();
        let mig = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        let rate = space
            .global_dirty_log_start(DirtyReason::DirtyRate)
            .unwrap();
        mig.set(5);
        fake.next.lock().unwrap().extend([5, 6]);
        let r = space
            .global_dirty_log_sync(Some(DirtyReason::DirtyRate))
            .unwrap();
        assert_eq!(r.reported_pages, 2);
        assert_eq!(
            r.new_pages(DirtyReason::Migration),
            1,
            "page 5 was already set"
        );
        assert_eq!(r.new_pages(DirtyReason::DirtyRate), 2);
        assert_eq!(rate.iter_set().collect::<Vec<_>>(), vec![5, 6]);
        // An observer sees the same pages without touching the reason's counts.
        let window = space.observe(DirtyReason::Migration).unwrap();
        fake.next.lock().unwrap().extend([5, 7]);
        let r = space.global_dirty_log_sync(None).unwrap();
        assert_eq!(r.new_pages(DirtyReason::Migration), 1);
        assert_eq!(window.iter_set().collect::<Vec<_>>(), vec![5, 7]);
        assert!(
            space.observe(DirtyReason::DirtyRate).is_err(),
            "stopped reason"
        );
        assert!(!space.reasons().contains(DirtyReason::DirtyRate));
        assert!(space.reasons().contains(DirtyReason::Migration));
        assert_eq!(space.stats().snapshot().syncs, 2);
    }

    /// Runs a migration's syncs over a scripted guest, with or without another reason's
    /// own syncs in between, and returns every migration sync's report (less the time),
    /// the migration bitmap and its observer after each.
    fn migration_run(with_measurement: bool) -> Vec<(u64, u64, Vec<u64>, Vec<u64>)> {
        let space = AddressSpace::new(two_blocks()).unwrap();
        let fake = Arc::new(Fake::default());
        space.register_listener(fake.clone()).unwrap();
        let mig = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        let window = space.observe(DirtyReason::Migration).unwrap();
        // The guest writes `pages`: a listener reports a page once per sync.
        let write = |pages: &[u64]| {
            let mut q = fake.next.lock().unwrap();
            for p in pages {
                if !q.contains(p) {
                    q.push(*p);
                }
            }
        };
        let mut out = Vec::new();
        let writes: [&[u64]; 4] = [&[1, 2, 300], &[2, 3, 301, 400], &[5], &[1, 2, 3, 4]];
        for (i, w) in writes.iter().enumerate() {
            write(w);
            if with_measurement && i % 2 == 0 {
                // A measurement: its baseline harvests what the guest wrote so far,
                // the guest writes more (page 2 again), its final sync stops it.
                let rate = space
                    .global_dirty_log_start(DirtyReason::DirtyRate)
                    .unwrap();
                space
                    .global_dirty_log_sync_for(DirtyReason::DirtyRate, false)
                    .unwrap();
                rate.clear_all();
                write(&[2, 7]);
                let r = space
                    .global_dirty_log_sync_for(DirtyReason::DirtyRate, true)
                    .unwrap();
                assert_eq!(r.new_pages(DirtyReason::Migration), 0, "held back");
                assert_eq!(rate.iter_set().collect::<Vec<_>>(), vec![2, 7]);
                assert!(!space.reasons().contains(DirtyReason::DirtyRate));
            } else {
                write(&[2, 7]);
            }
            let r = space.global_dirty_log_sync(None).unwrap();
            out.push((
                r.reported_pages,
                r.new_pages(DirtyReason::Migration),
                mig.to_vec(),
                window.to_vec(),
            ));
            // The sender takes what it sends; the period's observer is cleared.
            if i == 1 {
                mig.clear_all();
                window.clear_all();
            }
        }
        out
    }

    #[test]
    fn another_reasons_own_syncs_change_none_of_the_migrations_figures() {
        let without = migration_run(false);
        let with = migration_run(true);
        assert_eq!(with, without);
        // And the figures are the guest's: pages 1, 2, 7, 300 in the first sync.
        assert_eq!((without[0].0, without[0].1), (4, 4));
    }

    #[test]
    fn only_the_last_reasons_one_shot_sync_stops_logging() {
        struct Final(Mutex<Vec<bool>>);
        impl MemoryListener for Final {
            fn name(&self) -> &'static str {
                "final"
            }
            fn log_sync(&self, _b: &RamBlock, sink: &mut DirtySink<'_>) -> Result<()> {
                self.0.lock().unwrap().push(sink.stops_logging());
                Ok(())
            }
        }
        let space = AddressSpace::new(two_blocks()).unwrap();
        let l = Arc::new(Final(Mutex::new(Vec::new())));
        space.register_listener(l.clone()).unwrap();
        space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        space
            .global_dirty_log_start(DirtyReason::DirtyRate)
            .unwrap();
        space
            .global_dirty_log_sync_for(DirtyReason::DirtyRate, true)
            .unwrap();
        space.global_dirty_log_sync(None).unwrap();
        space
            .global_dirty_log_sync(Some(DirtyReason::Migration))
            .unwrap();
        // Two blocks per sync.
        assert_eq!(
            *l.0.lock().unwrap(),
            vec![false, false, false, false, true, true]
        );
        assert!(space
            .global_dirty_log_sync_for(DirtyReason::DirtyRate, false)
            .is_err());
    }

    #[test]
    fn double_start_and_stray_stop_are_errors() {
        let space = AddressSpace::new(two_blocks()).unwrap();
        space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        assert!(space
            .global_dirty_log_start(DirtyReason::Migration)
            .is_err());
        assert!(space
            .global_dirty_log_stop(DirtyReason::DirtyLimit)
            .is_err());
    }

    #[test]
    fn failed_start_rolls_back() {
        let space = AddressSpace::new(two_blocks()).unwrap();
        let good = Arc::new(Fake::default());
        space.register_listener(good.clone()).unwrap();
        struct Bad;
        impl MemoryListener for Bad {
            fn name(&self) -> &'static str {
                "bad"
            }
            fn log_start(&self, _b: &RamBlock) -> Result<()> {
                Err(Error::Unsupported("test"))
            }
        }
        space.register_listener(Arc::new(Bad)).unwrap();
        assert!(space
            .global_dirty_log_start(DirtyReason::Migration)
            .is_err());
        assert!(!space.logging());
        assert_eq!(
            good.stops.load(Ordering::SeqCst),
            2,
            "the started listener was stopped"
        );
    }

    #[test]
    fn listener_registered_while_logging_starts_at_once_and_kvm_pair_conflicts() {
        let space = AddressSpace::new(two_blocks()).unwrap();
        space
            .global_dirty_log_start(DirtyReason::DirtyLimit)
            .unwrap();
        let fake = Arc::new(Fake::default());
        space.register_listener(fake.clone()).unwrap();
        assert_eq!(fake.starts.load(Ordering::SeqCst), 2);
        assert!(space.register_listener(fake).is_err(), "same name twice");
    }

    #[test]
    fn clear_dirty_log_checks_range() {
        let space = AddressSpace::new(two_blocks()).unwrap();
        assert!(space.clear_dirty_log(500, 20).is_err());
        assert!(space.clear_dirty_log(200, 100).is_ok());
    }
}
