//! Guest RAM: one vm-memory region per KVM memory slot, mapped lazily.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{kvm, Error, Result};

/// The guest memory type every backend uses (vm-memory tracks VMM writes in its bitmap).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// One KVM memory slot: which guest range it covers and where it is mapped in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotInfo {
    /// KVM slot number.
    pub slot: u32,
    /// First guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size_bytes: u64,
    /// Host virtual address of the first byte.
    pub host_addr: u64,
}

/// Maps `[0, mem_bytes)` as regions of at most `slot_bytes` each (anonymous, lazily faulted).
pub fn create(mem_bytes: u64, slot_bytes: u64) -> Result<(GuestMemory, Vec<SlotInfo>)> {
    let mut ranges = Vec::new();
    let mut gpa = 0u64;
    while gpa < mem_bytes {
        let size = slot_bytes.min(mem_bytes - gpa);
        let size_usize = usize::try_from(size).map_err(|_| Error::MapMemory {
            mem_bytes,
            reason: "slot larger than the host address space".to_string(),
        })?;
        ranges.push((GuestAddress(gpa), size_usize));
        gpa += size;
    }
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| Error::MapMemory {
        mem_bytes,
        reason: e.to_string(),
    })?;
    let mut slots = Vec::with_capacity(ranges.len());
    for (i, (start, size)) in ranges.iter().enumerate() {
        let host = mem.get_host_address(*start)?;
        slots.push(SlotInfo {
            slot: u32::try_from(i).map_err(|_| Error::Config("too many slots".to_string()))?,
            gpa: start.0,
            size_bytes: *size as u64,
            host_addr: host as u64,
        });
    }
    Ok((mem, slots))
}

/// Faults every page of every slot in (writable, zero-filled), so later writes by the
/// VMM or the guest take no page fault.
pub fn populate(slots: &[SlotInfo]) -> Result<()> {
    for s in slots {
        // SAFETY: the range is a live private anonymous mapping of this process; asking
        // the kernel to populate it changes no byte of it (it reads as zero either way).
        let r = unsafe {
            libc::madvise(
                s.host_addr as *mut libc::c_void,
                s.size_bytes as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(Error::MapMemory {
                mem_bytes: s.size_bytes,
                reason: format!(
                    "preallocating slot {}: {}",
                    s.slot,
                    std::io::Error::last_os_error()
                ),
            });
        }
    }
    Ok(())
}

/// Registers every slot with KVM, with `KVM_MEM_LOG_DIRTY_PAGES` iff `dirty_log`.
pub fn register(vm: &VmFd, slots: &[SlotInfo], dirty_log: bool) -> Result<()> {
    for s in slots {
        let region = kvm_userspace_memory_region {
            slot: s.slot,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: s.gpa,
            memory_size: s.size_bytes,
            userspace_addr: s.host_addr,
        };
        // SAFETY: the host range [host_addr, host_addr + size_bytes) is a live mmap owned by
        // the GuestMemoryMmap that MiniVm keeps alive at least as long as the VmFd.
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_gib_in_eight_slots_without_touching() {
        let (mem, slots) = create(8 << 30, 1 << 30).expect("8 GiB maps lazily");
        assert_eq!(slots.len(), 8);
        assert_eq!(slots[7].gpa, 7 << 30);
        assert_eq!(mem.num_regions(), 8);
    }

    #[test]
    fn last_slot_may_be_smaller() {
        let (_mem, slots) = create(6 << 20, 4 << 20).expect("small map");
        let sizes: Vec<u64> = slots.iter().map(|s| s.size_bytes).collect();
        assert_eq!(sizes, vec![4 << 20, 2 << 20]);
    }

    /// Pages of `s` the host has mapped, from /proc/self/pagemap.
    fn present_pages(s: &SlotInfo) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        f.seek(SeekFrom::Start(s.host_addr / 4096 * 8)).unwrap();
        let mut buf = vec![0u8; (s.size_bytes / 4096 * 8) as usize];
        f.read_exact(&mut buf).unwrap();
        buf.chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) & (1 << 63) != 0)
            .count() as u64
    }

    #[test]
    fn populate_maps_every_page_and_keeps_it_zero() {
        let (mem, slots) = create(6 << 20, 4 << 20).expect("small map");
        assert_eq!(slots.iter().map(present_pages).sum::<u64>(), 0);
        populate(&slots).expect("populate");
        for s in &slots {
            assert_eq!(present_pages(s), s.size_bytes / 4096, "slot {}", s.slot);
        }
        let mut page = [1u8; 4096];
        vm_memory::Bytes::read_slice(&mem, &mut page, GuestAddress(5 << 20)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
    }
}
