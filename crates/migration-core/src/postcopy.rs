//! Postcopy's destination memory: guest RAM whose missing pages fault, each fault
//! turned into one request to the source, and every page (requested or pushed in the
//! background) landing once, atomically (see `docs/postcopy.md`).
//!
//! This is the building block the postcopy protocol will drive; the protocol itself
//! (records, the switch, recovery) is not built yet. [`PostcopyRam`] holds a
//! [`UffdRegion`] per RAM block and the **received map**; [`PostcopyRam::serve_faults`]
//! runs the fault threads, which ask a [`PageSource`] for each missing page once,
//! however many vCPUs touch it; the receive path hands every page it gets to
//! [`PostcopyRam::land`].

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use dirty_sync::{DirtyBitmap, RamBlock, PAGE_SIZE};
use uffd::{Filled, UffdRegion};

use crate::{Error, Result};

/// Where missing pages come from: the source, over the back-channel (or a test).
pub trait PageSource: Send + Sync {
    /// Asks for page `page` of block `block` (indices in the destination's blocks); the
    /// page arrives later through [`PostcopyRam::land`]. Called once per missing page
    /// while its request is outstanding.
    fn request(&self, block: usize, page: u64) -> std::result::Result<(), String>;
}

/// How often a fault thread looks at its stop flag while no fault comes.
const FAULT_POLL: Duration = Duration::from_millis(50);

/// Counters of the missing-page plane.
#[derive(Debug, Default)]
pub struct PostcopyCounters {
    /// Faults read (several vCPUs on one page count once each).
    pub faults: AtomicU64,
    /// Requests sent to the source (one per page at most while it is missing).
    pub requests: AtomicU64,
    /// Pages installed.
    pub landed_pages: AtomicU64,
    /// Installs of a page that was already there (a pushed page racing its request).
    pub already_present: AtomicU64,
}

/// The destination's RAM while postcopy fills it.
pub struct PostcopyRam {
    regions: Vec<UffdRegion>,
    /// Per block: the pages present (sent during precopy, or landed since).
    received: Vec<DirtyBitmap>,
    /// (block, page) asked of the source and not landed yet.
    requested: Mutex<HashSet<(usize, u64)>>,
    /// Pages still missing, all blocks.
    missing_pages: AtomicU64,
    counters: PostcopyCounters,
}

impl PostcopyRam {
    /// Registers every block's memory for missing-page faults. `missing[i]` holds the
    /// pages of block `i` that are not there yet (the rest arrived during precopy and
    /// never fault). Call before the vCPUs run.
    pub fn register(blocks: &[RamBlock], missing: &[DirtyBitmap]) -> Result<Arc<Self>> {
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
        let mut missing_pages = 0;
        for (b, m) in blocks.iter().zip(missing) {
            regions.push(UffdRegion::register(b.memory.clone())?);
            let r = DirtyBitmap::new(b.pages());
            r.set_all();
            for p in m.iter_set() {
                r.test_and_clear(p);
                missing_pages += 1;
            }
            received.push(r);
        }
        Ok(Arc::new(PostcopyRam {
            regions,
            received,
            requested: Mutex::new(HashSet::new()),
            missing_pages: AtomicU64::new(missing_pages),
            counters: PostcopyCounters::default(),
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
            Filled::Done => {
                self.counters.landed_pages.fetch_add(1, Ordering::Relaxed);
                if !self.received[block].set(page) {
                    // Present already by our map but the kernel took it: impossible
                    // unless pages were installed behind our back.
                    tracing::warn!(block, page, "a page landed that the received map had");
                } else {
                    self.missing_pages.fetch_sub(1, Ordering::Relaxed);
                }
            }
            Filled::AlreadyPresent => {
                self.counters
                    .already_present
                    .fetch_add(1, Ordering::Relaxed);
                self.received[block].set(page);
            }
        }
        self.requested
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(block, page));
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

    /// Pages not present yet, all blocks.
    pub fn missing_pages(&self) -> u64 {
        self.missing_pages.load(Ordering::Relaxed)
    }

    /// The counters.
    pub fn counters(&self) -> &PostcopyCounters {
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
            // Landed meanwhile: the install woke the vCPU already.
            if self.received[block].is_set(page) {
                continue;
            }
            let first = self
                .requested
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((block, page));
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
