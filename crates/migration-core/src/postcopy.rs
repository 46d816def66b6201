//! Postcopy's destination memory: guest RAM whose missing pages fault, each fault
//! turned into one request to the source, and every page (requested or pushed in the
//! background) landing once, atomically (see `docs/postcopy.md`).
//!
//! [`PostcopyRam`] holds a [`UffdRegion`] per RAM block and the **received map**;
//! [`PostcopyRam::serve_faults`] runs the fault threads, which ask a [`PageSource`]
//! for each missing page once, however many vCPUs touch it; the receive path hands
//! every page it gets to [`PostcopyRam::land`]. The destination
//! (`crate::destination`) drives it with the source's requests over the back-channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dirty_sync::{DetachedPages, DirtyBitmap, RamBlock, PAGE_SIZE};
use stats::PostcopyStats;
use uffd::{Filled, UffdRegion};

use crate::{Error, Result};

/// Where missing pages come from: the source, over the back-channel (or a test).
pub trait PageSource: Send + Sync {
    /// Asks for page `page` of block `block` (indices in the destination's blocks); the
    /// page arrives later through [`PostcopyRam::land`]. Called once per missing page
    /// while its request is outstanding.
    fn request(&self, block: usize, page: u64) -> std::result::Result<(), String>;
}

/// Runs of stale pages at least this long are dropped by moving them out of guest RAM
/// ([`HostMemory::discard_deferred`](dirty_sync::HostMemory::discard_deferred)) and
/// freed after the guest runs; shorter ones are dropped in place.
const DEFER_MIN_PAGES: u64 = 512;
/// Most runs moved out (each splits the mapping, and a process has a limited number).
const MAX_DEFERRED_RUNS: usize = 256;

/// How often a fault thread looks at its stop flag while no fault comes.
const FAULT_POLL: Duration = Duration::from_millis(50);

/// Inserts `key` with `at` unless it is there; true when it was not.
trait TryInsertAt<K> {
    fn try_insert_at(&mut self, key: K, at: Instant) -> bool;
}

impl<K: std::hash::Hash + Eq> TryInsertAt<K> for HashMap<K, Instant> {
    fn try_insert_at(&mut self, key: K, at: Instant) -> bool {
        match self.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(at);
                true
            }
        }
    }
}

/// The destination's RAM while postcopy fills it.
pub struct PostcopyRam {
    regions: Vec<UffdRegion>,
    /// Per block: the pages present (sent during precopy, or landed since).
    received: Vec<DirtyBitmap>,
    /// Per block: the pages missing at the switch and not landed yet (each is counted
    /// off once, whichever of two racing installs clears it).
    missing: Vec<DirtyBitmap>,
    /// (block, page) asked of the source and not landed yet, with when it was asked.
    requested: Mutex<HashMap<(usize, u64), Instant>>,
    /// Stale pages moved out of guest RAM at the switch, not freed yet (freeing them
    /// costs ~20 ms per 256 MiB, which the downtime need not pay).
    stale: Mutex<Vec<DetachedPages>>,
    counters: Arc<PostcopyStats>,
}

impl PostcopyRam {
    /// Registers every block's memory for missing-page faults. `missing[i]` holds the
    /// pages of block `i` that are not there yet: each is dropped (it may hold what
    /// precopy sent before the guest wrote it again), so its first touch faults. The
    /// other pages stay as they are; those never written (not mapped) read as zero.
    /// Needs private anonymous guest RAM. Call before the vCPUs run. The counters go
    /// to `counters` (a destination's `MigStats::postcopy`).
    pub fn register(
        blocks: &[RamBlock],
        missing: &[DirtyBitmap],
        counters: Arc<PostcopyStats>,
    ) -> Result<Arc<Self>> {
        if blocks.len() != missing.len()
            || blocks
                .iter()
                .zip(missing)
                .any(|(b, m)| b.pages() != m.pages())
        {
            return Err(Error::InvalidParameter(
                "postcopy: one missing-page map per block, of the block's size".into(),
            ));
        }
        let mut regions = Vec::with_capacity(blocks.len());
        let mut received = Vec::with_capacity(blocks.len());
        let mut still_missing = Vec::with_capacity(blocks.len());
        let mut missing_pages = 0;
        let mut stale = Vec::new();
        for (b, m) in blocks.iter().zip(missing) {
            let t0 = Instant::now();
            // Present: every page but the missing ones (word by word: this runs in the
            // downtime).
            let r = DirtyBitmap::new(b.pages());
            r.set_all();
            for (rw, mw) in r.words().iter().zip(m.words()) {
                rw.fetch_and(!mw.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            missing_pages += m.count();
            let mut deferred_runs = 0;
            // The guest does not run here yet: dropping pages before the registration
            // races with nothing.
            for (first, n) in crate::guest::page_runs(m.iter_set()) {
                if n >= DEFER_MIN_PAGES && stale.len() < MAX_DEFERRED_RUNS {
                    if let Some(d) = b.memory.discard_deferred(first * PAGE_SIZE, n * PAGE_SIZE) {
                        stale.push(d);
                        deferred_runs += 1;
                        continue;
                    }
                }
                if !b.memory.discard(first * PAGE_SIZE, n * PAGE_SIZE) {
                    return Err(Error::Guest(format!(
                        "postcopy: cannot drop pages {first}..{} of {}",
                        first + n,
                        b.id
                    )));
                }
            }
            let dropped_us = t0.elapsed().as_micros() as u64;
            let region = UffdRegion::register(b.memory.clone())?;
            tracing::debug!(
                block = %b.id,
                dropped_us,
                deferred_runs,
                registered_us = t0.elapsed().as_micros() as u64 - dropped_us,
                "postcopy: stale pages dropped, block registered"
            );
            regions.push(region);
            received.push(r);
            let left = DirtyBitmap::new(b.pages());
            for (lw, mw) in left.words().iter().zip(m.words()) {
                lw.store(mw.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            still_missing.push(left);
        }
        Ok(Arc::new(PostcopyRam {
            regions,
            received,
            missing: still_missing,
            requested: Mutex::new(HashMap::new()),
            stale: Mutex::new(stale),
            counters: {
                counters.start(missing_pages);
                counters
            },
        }))
    }

    /// Installs page `page` of block `block` with `data` (one page; all zeros installs
    /// the zero page) and wakes the vCPUs waiting on it. A page that is already there
    /// is left as it is ([`Filled::AlreadyPresent`]): a page lands once.
    pub fn land(&self, block: usize, page: u64, data: &[u8]) -> Result<Filled> {
        let region = self.region(block, page)?;
        let offset = page * PAGE_SIZE;
        let filled = if data.iter().all(|b| *b == 0) {
            if data.len() as u64 != PAGE_SIZE {
                return Err(Error::InvalidParameter(format!(
                    "postcopy: a page of {} bytes",
                    data.len()
                )));
            }
            region.zero(offset, PAGE_SIZE)?
        } else {
            region.copy(offset, data)?
        };
        match filled {
            Filled::Done => self.counters.landed_pages.fetch_add(1, Ordering::Relaxed),
            Filled::AlreadyPresent => self
                .counters
                .already_present
                .fetch_add(1, Ordering::Relaxed),
        };
        // Present either way. Two copies of one page may race (a request answered while
        // the background had the page on its way): the kernel installs one, and the
        // page is counted off once.
        self.received[block].set(page);
        if self.missing[block].test_and_clear(page) {
            self.counters.page_arrived();
        }
        let asked = self
            .requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(block, page));
        if let (Some(at), Filled::Done) = (asked, filled) {
            self.counters.fault_latency.record(at.elapsed());
        }
        Ok(filled)
    }

    fn region(&self, block: usize, page: u64) -> Result<&UffdRegion> {
        match self.regions.get(block) {
            Some(r) if page < self.received[block].pages() => Ok(r),
            _ => Err(Error::InvalidParameter(format!(
                "postcopy: no page {page} in block {block}"
            ))),
        }
    }

    /// True when page `page` of block `block` is present.
    pub fn is_received(&self, block: usize, page: u64) -> bool {
        self.received.get(block).is_some_and(|r| r.is_set(page))
    }

    /// Frees the stale pages the switch moved out of guest RAM, on a thread of its own
    /// (`mig/free-stale`), once the guest runs and the downtime is over.
    pub fn free_stale_pages(&self) {
        let stale = std::mem::take(&mut *self.stale.lock().unwrap_or_else(|p| p.into_inner()));
        if stale.is_empty() {
            return;
        }
        let bytes: u64 = stale.iter().map(DetachedPages::len_bytes).sum();
        let freeing = std::thread::Builder::new()
            .name("mig/free-stale".into())
            .spawn(move || {
                let t0 = Instant::now();
                drop(stale);
                tracing::debug!(
                    bytes,
                    free_us = t0.elapsed().as_micros() as u64,
                    "postcopy: stale pages freed"
                );
            });
        if let Err(e) = freeing {
            // They were moved into the closure, which is dropped here: freed inline.
            tracing::debug!(error = %e, "no thread to free stale pages on");
        }
    }

    /// The pages asked of the source and not landed yet, `(block, page)`: after a
    /// broken connection, what must be asked again on the new one.
    pub fn outstanding(&self) -> Vec<(usize, u64)> {
        self.requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// The pages not present yet, as `(block, runs of (first page, pages))` for the
    /// blocks that lack any: what a resumed stream must bring.
    pub fn missing_runs(&self) -> transport::BlockRuns {
        self.missing
            .iter()
            .enumerate()
            .map(|(b, m)| (b, crate::guest::page_runs(m.iter_set())))
            .filter(|(_, runs)| !runs.is_empty())
            .collect()
    }

    /// Pages not present yet, all blocks.
    pub fn missing_pages(&self) -> u64 {
        self.counters.missing_pages.load(Ordering::Relaxed)
    }

    /// The counters.
    pub fn counters(&self) -> &PostcopyStats {
        &self.counters
    }

    /// Starts one fault thread per block: each fault on a page that is neither present
    /// nor requested becomes one `source.request`. The threads end when `stop` is set
    /// (within 50 ms) or on an error, which they return.
    pub fn serve_faults(
        self: &Arc<Self>,
        source: Arc<dyn PageSource>,
        stop: Arc<AtomicBool>,
    ) -> Result<Vec<JoinHandle<Result<()>>>> {
        (0..self.regions.len())
            .map(|block| {
                let (ram, source, stop) =
                    (Arc::clone(self), Arc::clone(&source), Arc::clone(&stop));
                std::thread::Builder::new()
                    .name(format!("mig/fault{block}"))
                    .spawn(move || ram.fault_loop(block, source.as_ref(), &stop))
                    .map_err(|e| Error::Guest(format!("cannot start a fault thread: {e}")))
            })
            .collect()
    }

    fn fault_loop(&self, block: usize, source: &dyn PageSource, stop: &AtomicBool) -> Result<()> {
        let region = &self.regions[block];
        while !stop.load(Ordering::Acquire) {
            let Some(fault) = region.wait_fault(FAULT_POLL)? else {
                continue;
            };
            self.counters.faults.fetch_add(1, Ordering::Relaxed);
            let page = fault.page_offset_bytes() / PAGE_SIZE;
            if self.received[block].is_set(page) {
                // Not missing: a page the guest never wrote (not mapped: zero), or one
                // that landed meanwhile. The zero page is installed only where nothing
                // is (a landed page is left as it is) and wakes the vCPU either way.
                if region.zero(page * PAGE_SIZE, PAGE_SIZE)? == Filled::AlreadyPresent {
                    region.wake(page * PAGE_SIZE, PAGE_SIZE)?;
                }
                continue;
            }
            let first = self
                .requested
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_insert_at((block, page), Instant::now());
            if first {
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                source.request(block, page).map_err(|e| {
                    Error::Guest(format!("requesting page {page} of block {block}: {e}"))
                })?;
            }
        }
        Ok(())
    }
}
