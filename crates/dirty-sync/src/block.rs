//! RAM blocks and the flat sections that listeners log.

use crate::{HostMemory, PAGE_SHIFT, PAGE_SIZE};

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
    /// Length in bytes, a multiple of [`PAGE_SIZE`]; never more than the host memory's
    /// (the address space checks).
    pub size_bytes: u64,
    /// The host memory backing the block (the VMM's mapping).
    pub memory: HostMemory,
    /// KVM slot number, `(address_space << 16) | slot_id`.
    pub kvm_slot: u32,
    /// Index of the block's first page in the address space's global page-index space.
    pub first_page: u64,
}

impl RamBlock {
    /// A block of all of `memory` at guest physical address `gpa`, KVM slot `kvm_slot`,
    /// starting at global page `first_page`.
    pub fn new(
        id: impl Into<String>,
        gpa: u64,
        memory: HostMemory,
        kvm_slot: u32,
        first_page: u64,
    ) -> RamBlock {
        RamBlock {
            id: id.into(),
            gpa,
            size_bytes: memory.size_bytes(),
            memory,
            kvm_slot,
            first_page,
        }
    }

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
