//! The KVM dirty-bitmap listener: `log_sync` per slot with KVM_GET_DIRTY_LOG, and with
//! manual protect, KVM_CLEAR_DIRTY_LOG of exactly the harvested bits, chunk by chunk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;

use super::ioctls;
use crate::listener::{DirtySink, MemoryListener};
use crate::{Error, RamBlock, Result, BITS_PER_WORD, PAGE_SIZE};

/// How the listener re-arms write protection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtectMode {
    /// KVM_GET_DIRTY_LOG fetches and re-protects the whole slot at once.
    Classic,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET: GET is a copy and
    /// KVM_CLEAR_DIRTY_LOG re-protects only what was harvested.
    Manual,
}

/// Parameters of the [`KvmBitmapListener`].
#[derive(Clone, Copy, Debug)]
pub struct KvmBitmapConfig {
    /// Use manual protect when the kernel offers it (falls back to classic otherwise).
    pub manual_protect: bool,
    /// Bytes of guest RAM per KVM_CLEAR_DIRTY_LOG call (a multiple of 256 KiB; default 1 GiB).
    pub clear_chunk_bytes: u64,
    /// In the migration's lazy syncs, leave harvested pages armed until
    /// [`AddressSpace::clear_dirty_log`] asks, so they are re-protected just before they
    /// are read (QEMU's clear_bmap) and the guest does not fault on pages the sender
    /// will not reach for seconds; only the sample the sync names is re-armed at once
    /// (see [`AddressSpace::global_dirty_log_sync_lazy`]). Default: on (manual protect
    /// only).
    ///
    /// [`AddressSpace::clear_dirty_log`]: crate::AddressSpace::clear_dirty_log
    /// [`AddressSpace::global_dirty_log_sync_lazy`]: crate::AddressSpace::global_dirty_log_sync_lazy
    pub deferred_clear: bool,
}

impl Default for KvmBitmapConfig {
    fn default() -> Self {
        KvmBitmapConfig {
            manual_protect: true,
            clear_chunk_bytes: 1 << 30,
            deferred_clear: true,
        }
    }
}

/// Per-slot buffers, allocated once when logging starts and reused by every sync.
struct SlotLog {
    /// What the last GET returned.
    harvested: Vec<u64>,
    /// Deferred mode: harvested bits not yet cleared in KVM.
    pending_clear: Vec<u64>,
    /// Deferred mode: what this sync clears.
    to_clear: Vec<u64>,
}

/// Harvests KVM's per-slot dirty bitmaps (`log_sync`, one call per slot).
pub struct KvmBitmapListener {
    vm: Arc<VmFd>,
    mode: ProtectMode,
    chunk_pages: u64,
    deferred_clear: bool,
    slots: Mutex<HashMap<u32, SlotLog>>,
    /// Slots with KVM_MEM_LOG_DIRTY_PAGES set. Logging stays armed in KVM after the
    /// last reason stops: flipping the flag costs an SRCU grace period and a zap of the
    /// slot's mappings each time (QEMU defers the stop for that reason), while an armed
    /// slot nobody syncs costs nothing with manual protect (and one fault per page,
    /// once, without). The next start's baseline sync absorbs what accumulated.
    /// The value is the slot's size in pages, as registered by `set_slot_logging`:
    /// the size of the buffer KVM_GET_DIRTY_LOG fills.
    armed: Mutex<std::collections::HashMap<u32, u64>>,
}

impl KvmBitmapListener {
    /// Creates the listener and, if asked and offered, enables manual protect on the VM.
    pub fn new(vm: Arc<VmFd>, config: KvmBitmapConfig) -> Result<Self> {
        let chunk_bytes = config.clear_chunk_bytes;
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(BITS_PER_WORD * PAGE_SIZE) {
            return Err(Error::InvalidParameter(format!(
                "clear chunk of {chunk_bytes} bytes: must be a non-zero multiple of 256 KiB"
            )));
        }
        let mut mode = ProtectMode::Classic;
        if config.manual_protect {
            let offered = vm.check_extension_raw(ioctls::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
            let wanted = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
            if offered > 0 {
                let mut cap = kvm_enable_cap {
                    cap: ioctls::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    ..Default::default()
                };
                cap.args[0] = u64::from(offered as u32 & wanted);
                vm.enable_cap(&cap).map_err(|e| Error::Kvm {
                    op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
                    source: e.into(),
                })?;
                mode = ProtectMode::Manual;
            }
        }
        tracing::debug!(?mode, "KVM dirty bitmap listener ready");
        Ok(KvmBitmapListener {
            vm,
            mode,
            chunk_pages: chunk_bytes / PAGE_SIZE,
            deferred_clear: config.deferred_clear,
            slots: Mutex::new(HashMap::new()),
            armed: Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// The protect mode in use.
    pub fn mode(&self) -> ProtectMode {
        self.mode
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, SlotLog>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Clears in KVM the bits of `bits` (block-relative page `first_page` onwards, `pages`
    /// long, `first_page` a multiple of 64), one ioctl per chunk that has any bit set.
    fn clear_bits(
        &self,
        block: &RamBlock,
        bits: &[u64],
        first_page: u64,
        pages: u64,
    ) -> Result<()> {
        let mut start = 0;
        while start < pages {
            let len = self.chunk_pages.min(pages - start);
            let w0 = (start / BITS_PER_WORD) as usize;
            let w1 = (start + len).div_ceil(BITS_PER_WORD) as usize;
            let words = &bits[w0..w1];
            if words.iter().any(|w| *w != 0) {
                let num = u32::try_from(len).map_err(|_| {
                    Error::InvalidParameter(format!("clear chunk of {len} pages is too large"))
                })?;
                ioctls::clear_dirty_log(&self.vm, block.kvm_slot, first_page + start, num, words)?;
            }
            start += len;
        }
        Ok(())
    }
}

impl MemoryListener for KvmBitmapListener {
    fn name(&self) -> &'static str {
        "kvm-bitmap"
    }

    fn log_start(&self, block: &RamBlock) -> Result<()> {
        let words = block.pages().div_ceil(BITS_PER_WORD) as usize;
        {
            let mut armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
            match armed.get(&block.kvm_slot) {
                None => {
                    ioctls::set_slot_logging(&self.vm, block, true)?;
                    tracing::debug!(
                        slot = block.kvm_slot,
                        block = %block.id,
                        size_bytes = block.size_bytes,
                        "KVM dirty log enabled on the slot"
                    );
                    armed.insert(block.kvm_slot, block.pages());
                }
                // KVM would fill a bitmap of the armed size, not this block's.
                Some(&pages) if pages != block.pages() => {
                    return Err(Error::InvalidBlocks(format!(
                        "block {} has {} pages but slot {} was armed with {pages}",
                        block.id,
                        block.pages(),
                        block.kvm_slot
                    )));
                }
                Some(_) => {}
            }
        }
        self.lock().insert(
            block.kvm_slot,
            SlotLog {
                harvested: vec![0; words],
                pending_clear: if self.defers_clear() {
                    vec![0; words]
                } else {
                    Vec::new()
                },
                to_clear: if self.defers_clear() {
                    vec![0; words]
                } else {
                    Vec::new()
                },
            },
        );
        Ok(())
    }

    fn log_stop(&self, block: &RamBlock) -> Result<()> {
        // The buffers go; the slot stays armed in KVM (see `armed`).
        self.lock().remove(&block.kvm_slot);
        Ok(())
    }

    fn log_sync(&self, block: &RamBlock, sink: &mut DirtySink<'_>) -> Result<()> {
        let mut slots = self.lock();
        let log = slots.get_mut(&block.kvm_slot).ok_or_else(|| {
            Error::NoSuchMemory(format!("slot {} is not logging", block.kvm_slot))
        })?;
        ioctls::get_dirty_log(&self.vm, block, &mut log.harvested)?;
        if !self.defers_clear() {
            sink.merge_le(block.first_page, &log.harvested, block.pages());
            // The last sync before logging stops re-protects nothing: the guest would
            // fault on its whole working set again for nobody (the bits stay set in
            // KVM; the next start's baseline sync absorbs them).
            if self.mode == ProtectMode::Manual && !sink.stops_logging() {
                self.clear_bits(block, &log.harvested, 0, block.pages())?;
            }
            return Ok(());
        }
        // A page still pending is reported by KVM whether written again or not: it is
        // not reported again (its reader holds it dirty until it re-arms it).
        let defer = sink.may_defer_clear();
        // Re-armed now even when deferring, pending pages of it included.
        let sample = sink.rearm_sample();
        let SlotLog {
            harvested,
            pending_clear,
            to_clear,
        } = log;
        for (i, ((h, p), c)) in harvested
            .iter_mut()
            .zip(pending_clear.iter_mut())
            .zip(to_clear.iter_mut())
            .enumerate()
        {
            if *h | *p == 0 {
                *c = 0; // nothing harvested, nothing pending: most words, most syncs
                continue;
            }
            if defer {
                let sampled = sample.mask_at(block.first_page + i as u64 * BITS_PER_WORD);
                *c = (*h | *p) & sampled;
                let fresh = *h & !*p;
                *p = (*p | *h) & !sampled;
                *h = fresh;
            } else {
                // A measurement is logging too: re-arm everything, pending included.
                *c = *h;
                *h &= !*p;
                *p = 0;
            }
        }
        sink.merge_le(block.first_page, harvested, block.pages());
        if sink.stops_logging() {
            return Ok(()); // as above: nobody reads what a re-arm would log
        }
        self.clear_bits(block, to_clear, 0, block.pages())
    }

    fn defers_clear(&self) -> bool {
        self.mode == ProtectMode::Manual && self.deferred_clear
    }

    fn log_clear(&self, block: &RamBlock, first_page: u64, pages: u64) -> Result<()> {
        if !self.defers_clear() {
            return Ok(());
        }
        let end = first_page
            .checked_add(pages)
            .filter(|e| *e <= block.pages())
            .ok_or_else(|| {
                Error::NoSuchMemory(format!("pages {first_page}+{pages} of {}", block.id))
            })?;
        // The kernel clears in 64-page units: widen to whole words. Only bits in
        // pending_clear (harvested, not yet cleared) are passed, so the widening can never
        // clear a page that was dirtied but not harvested.
        let lo = first_page / BITS_PER_WORD * BITS_PER_WORD;
        let hi = (end.div_ceil(BITS_PER_WORD) * BITS_PER_WORD).min(block.pages());
        let mut slots = self.lock();
        let log = slots.get_mut(&block.kvm_slot).ok_or_else(|| {
            Error::NoSuchMemory(format!("slot {} is not logging", block.kvm_slot))
        })?;
        let (w0, w1) = (
            (lo / BITS_PER_WORD) as usize,
            hi.div_ceil(BITS_PER_WORD) as usize,
        );
        self.clear_bits(block, &log.pending_clear[w0..w1], lo, hi - lo)?;
        log.pending_clear[w0..w1].iter_mut().for_each(|w| *w = 0);
        Ok(())
    }
}
