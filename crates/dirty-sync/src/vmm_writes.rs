//! The VMM-writes listener: pages the VMM itself wrote through vm-memory (device DMA),
//! recorded by vm-memory's `AtomicBitmap`.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::listener::{DirtySink, MemoryListener};
use crate::{Error, RamBlock, Result};

/// Harvests vm-memory's per-region dirty bitmaps (one region per [`RamBlock`]).
pub struct VmmWritesListener {
    memory: GuestMemoryMmap<AtomicBitmap>,
}

impl VmmWritesListener {
    /// Listens to writes made through `memory` (a cheap clone of the VMM's guest memory).
    pub fn new(memory: GuestMemoryMmap<AtomicBitmap>) -> Self {
        VmmWritesListener { memory }
    }
}

impl MemoryListener for VmmWritesListener {
    fn name(&self) -> &'static str {
        "vmm-writes"
    }

    fn log_start(&self, block: &RamBlock) -> Result<()> {
        // Forget writes made while nobody was logging.
        let region = self.region(block)?;
        MmapRegion::bitmap(region).reset();
        Ok(())
    }

    fn log_sync(&self, block: &RamBlock, sink: &mut DirtySink<'_>) -> Result<()> {
        let region = self.region(block)?;
        // Swaps every word with zero: a write racing the harvest lands in this sync or the next.
        let words = MmapRegion::bitmap(region).get_and_reset();
        sink.merge_le(block.first_page, &words, block.pages());
        Ok(())
    }
}

impl VmmWritesListener {
    fn region(&self, block: &RamBlock) -> Result<&vm_memory::GuestRegionMmap<AtomicBitmap>> {
        self.memory
            .find_region(GuestAddress(block.gpa))
            .filter(|r| r.start_addr() == GuestAddress(block.gpa) && r.len() == block.size_bytes)
            .ok_or_else(|| {
                Error::NoSuchMemory(format!(
                    "no vm-memory region matches block {} ({:#x}+{:#x})",
                    block.id, block.gpa, block.size_bytes
                ))
            })
    }
}
