//! RAM blocks and the flat sections that listeners log.

use crate::{PAGE_SHIFT, PAGE_SIZE};

/// One contiguous piece of guest RAM backed by host memory and registered as one KVM slot.
///
/// Blocks are laid end to end in a single page-index space (QEMU's `ram_addr_t`), so a
/// global page index names any page of the guest; `first_page` is where this block starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// A stable name for the block, carried on the wire (QEMU's idstr), e.g. `"ram0"`.
    pub id: String,
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes, a multiple of [`PAGE_SIZE`].
    pub size_bytes: u64,
    /// Host virtual address of the first byte (the mmap backing the block).
    pub host_addr: u64,
    /// KVM slot number, `(address_space << 16) | slot_id`.
    pub kvm_slot: u32,
    /// Index of the block's first page in the address space's global page-index space.
    pub first_page: u64,
}

impl RamBlock {
    /// Number of pages in the block.
    pub fn pages(&self) -> u64 {
        self.size_bytes >> PAGE_SHIFT
    }

    /// True when `gpa` falls inside the block.
    pub fn contains_gpa(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size_bytes
    }

    /// Global page index of the page at guest physical address `gpa` (must be inside).
    pub fn page_of_gpa(&self, gpa: u64) -> u64 {
        self.first_page + ((gpa - self.gpa) / PAGE_SIZE)
    }
}
