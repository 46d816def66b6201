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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::Bytes;

    use super::*;
    use crate::{AddressSpace, DirtyReason};

    #[test]
    fn writes_through_vm_memory_are_harvested_once() {
        let size = 1u64 << 20;
        let mem: GuestMemoryMmap<AtomicBitmap> = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), size as usize),
            (GuestAddress(size), size as usize),
        ])
        .unwrap();
        let blocks = crate::ram_blocks(&mem).unwrap();
        let space = AddressSpace::new(blocks).unwrap();
        space
            .register_listener(Arc::new(VmmWritesListener::new(mem.clone())))
            .unwrap();
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap(); // before logging: forgotten
        let bitmap = space
            .global_dirty_log_start(DirtyReason::Migration)
            .unwrap();
        mem.write_obj(2u64, GuestAddress(0x3008)).unwrap();
        mem.write_slice(&[7u8; 8192], GuestAddress(size + 0x2000))
            .unwrap();
        let r = space.global_dirty_log_sync(None).unwrap();
        assert_eq!(
            bitmap.iter_set().collect::<Vec<_>>(),
            vec![3, 256 + 2, 256 + 3]
        );
        assert_eq!(r.new_pages(DirtyReason::Migration), 3);
        bitmap.clear_all();
        space.global_dirty_log_sync(None).unwrap();
        assert_eq!(bitmap.count(), 0, "harvested writes are not reported twice");
    }

    #[test]
    fn a_block_without_a_matching_region_is_an_error() {
        let mem: GuestMemoryMmap<AtomicBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let l = VmmWritesListener::new(mem);
        let bogus = RamBlock::new("x", 0, crate::HostMemory::anonymous(2 << 20).unwrap(), 0, 0);
        assert!(l.log_start(&bogus).is_err());
    }
}
