//! Counters of the global dirty-log sync.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Counters of the global dirty-log sync: how many, what they found, what they cost.
#[derive(Debug, Default)]
pub struct DirtyLogStats {
    syncs: AtomicU64,
    dirty_pages_reported: AtomicU64,
    last_dirty_pages: AtomicU64,
    last_sync_ns: AtomicU64,
    total_sync_ns: AtomicU64,
    max_sync_ns: AtomicU64,
}

/// A point-in-time copy of [`DirtyLogStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirtyLogSnapshot {
    /// Syncs done.
    pub syncs: u64,
    /// Pages reported by all syncs together.
    pub dirty_pages_reported: u64,
    /// Pages reported by the last sync.
    pub last_dirty_pages: u64,
    /// Duration of the last sync, ns.
    pub last_sync_ns: u64,
    /// Duration of all syncs together, ns.
    pub total_sync_ns: u64,
    /// Longest sync, ns.
    pub max_sync_ns: u64,
}

impl DirtyLogStats {
    /// Records one sync that reported `pages` dirty pages in `sync_ns` nanoseconds.
    pub fn record_sync(&self, pages: u64, sync_ns: u64) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.dirty_pages_reported
            .fetch_add(pages, Ordering::Relaxed);
        self.last_dirty_pages.store(pages, Ordering::Relaxed);
        self.last_sync_ns.store(sync_ns, Ordering::Relaxed);
        self.total_sync_ns.fetch_add(sync_ns, Ordering::Relaxed);
        self.max_sync_ns.fetch_max(sync_ns, Ordering::Relaxed);
    }

    /// Reads every counter (each individually atomic; the set is not one transaction).
    pub fn snapshot(&self) -> DirtyLogSnapshot {
        DirtyLogSnapshot {
            syncs: self.syncs.load(Ordering::Relaxed),
            dirty_pages_reported: self.dirty_pages_reported.load(Ordering::Relaxed),
            last_dirty_pages: self.last_dirty_pages.load(Ordering::Relaxed),
            last_sync_ns: self.last_sync_ns.load(Ordering::Relaxed),
            total_sync_ns: self.total_sync_ns.load(Ordering::Relaxed),
            max_sync_ns: self.max_sync_ns.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_snapshots() {
        let s = DirtyLogStats::default();
        s.record_sync(10, 500);
        s.record_sync(3, 200);
        let snap = s.snapshot();
        assert_eq!(snap.syncs, 2);
        assert_eq!(snap.dirty_pages_reported, 13);
        assert_eq!(snap.last_dirty_pages, 3);
        assert_eq!(snap.last_sync_ns, 200);
        assert_eq!(snap.total_sync_ns, 700);
        assert_eq!(snap.max_sync_ns, 500);
    }
}
