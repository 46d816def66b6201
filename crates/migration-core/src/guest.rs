//! What a VMM hands the engine: its guest, behind [`MigratableVm`], and raw access to RAM.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use dirty_sync::{AddressSpace, DirtyBitmap, RamBlock, PAGE_SIZE};

/// Error type the VMM's callbacks return.
pub type GuestError = Box<dyn std::error::Error + Send + Sync>;

/// The guest as the engine needs it: memory (through its address space), vCPU control,
/// device state and throttling. Implemented by the VMM (minivm in tests and the demo).
pub trait MigratableVm: Send + Sync {
    /// The guest's RAM blocks and dirty-log listeners.
    fn address_space(&self) -> &Arc<AddressSpace>;
    /// Stops every vCPU; returns once none runs.
    fn pause_vcpus(&self) -> Result<(), GuestError>;
    /// Lets the vCPUs run again.
    fn resume_vcpus(&self) -> Result<(), GuestError>;
    /// Serializes the device state (vCPU registers and the like); vCPUs are paused.
    fn save_device_state(&self) -> Result<Vec<u8>, GuestError>;
    /// Loads device state saved by the source's `save_device_state`.
    fn load_device_state(&self, state: &[u8]) -> Result<(), GuestError>;
    /// Makes vCPUs sleep `percent` % of the time (auto-converge); 0 = full speed.
    fn set_throttle_percent(&self, _percent: u8) {}
    /// True when guest RAM is private anonymous memory: a page the host never mapped
    /// reads as zero and need not be read (nor sent to a fresh destination).
    fn untouched_ram_is_zero(&self) -> bool {
        false
    }
    /// Per vCPU: dirty-ring entries harvested so far (QEMU's `cpu->dirty_pages`), or
    /// None when the guest has no dirty ring (calc-dirty-rate's dirty-ring mode needs it).
    fn vcpu_dirty_entries(&self) -> Option<Vec<u64>> {
        None
    }
}

/// Byte-level access to guest RAM through the blocks' host addresses.
///
/// Holding the VM keeps the mappings alive: `RamBlock::host_addr` is valid for
/// `size_bytes` for as long as the `MigratableVm` lives (its implementor's promise).
#[derive(Clone)]
pub struct GuestRam {
    vm: Arc<dyn MigratableVm>,
}

impl GuestRam {
    /// Access to `vm`'s RAM.
    pub fn new(vm: Arc<dyn MigratableVm>) -> Self {
        GuestRam { vm }
    }

    /// The blocks.
    pub fn blocks(&self) -> &[RamBlock] {
        self.vm.address_space().blocks()
    }

    /// Page `page` of block `block` (caller checks bounds with [`GuestRam::blocks`]).
    ///
    /// The guest may write the page while it is read; the bytes are then a mix that
    /// the dirty log will make the sender resend.
    pub fn page(&self, block: usize, page: u64) -> &[u8] {
        let b = &self.blocks()[block];
        assert!(page < b.pages(), "page {page} beyond block {}", b.id);
        // SAFETY: the block maps size_bytes at host_addr for the VM's lifetime (held by
        // self), and page < pages keeps the slice inside it.
        unsafe {
            std::slice::from_raw_parts(
                (b.host_addr + page * PAGE_SIZE) as *const u8,
                PAGE_SIZE as usize,
            )
        }
    }

    /// `n` consecutive pages of block `block` starting at `page`.
    pub fn pages(&self, block: usize, page: u64, n: u64) -> &[u8] {
        let b = &self.blocks()[block];
        assert!(
            page + n <= b.pages(),
            "pages {page}+{n} beyond block {}",
            b.id
        );
        // SAFETY: as in `page`, the range is inside the block's mapping.
        unsafe {
            std::slice::from_raw_parts(
                (b.host_addr + page * PAGE_SIZE) as *const u8,
                (n * PAGE_SIZE) as usize,
            )
        }
    }

    /// Mutable access to a page of a guest that is not running (the destination).
    ///
    /// # Safety
    /// No vCPU may run and no other thread may access the same page concurrently.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn page_mut(&self, block: usize, page: u64) -> &mut [u8] {
        let b = &self.blocks()[block];
        assert!(page < b.pages(), "page {page} beyond block {}", b.id);
        // SAFETY: inside the mapping (as in `page`); exclusivity is the caller's contract.
        unsafe {
            std::slice::from_raw_parts_mut(
                (b.host_addr + page * PAGE_SIZE) as *mut u8,
                PAGE_SIZE as usize,
            )
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<dyn MigratableVm> {
        &self.vm
    }
}

/// Marks in `bitmap` (global page indices) every page of `block` that the host has
/// mapped or swapped, read from /proc/self/pagemap: pages never touched are left clear.
pub fn mark_touched_pages(block: &RamBlock, bitmap: &DirtyBitmap) -> std::io::Result<u64> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let mut f = File::open("/proc/self/pagemap")?;
    let host_page = host_page_size();
    if host_page != PAGE_SIZE {
        return Err(std::io::Error::other("pagemap scan needs 4 KiB host pages"));
    }
    f.seek(SeekFrom::Start(block.host_addr / PAGE_SIZE * 8))?;
    let mut buf = vec![0u8; 8 * 8192];
    let mut done = 0u64;
    let mut touched = 0u64;
    while done < block.pages() {
        let n = (block.pages() - done).min(8192);
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact(bytes)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            if u64::from_ne_bytes(w) & (PRESENT | SWAPPED) != 0 {
                bitmap.set(block.first_page + done + i as u64);
                touched += 1;
            }
        }
        done += n;
    }
    Ok(touched)
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_sees_only_touched_pages() {
        let len = 64 * 4096usize;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: inside the mapping.
        unsafe {
            *(addr as *mut u8).add(3 * 4096) = 1;
            *(addr as *mut u8).add(40 * 4096 + 5) = 1;
        }
        let block = RamBlock {
            id: "t".into(),
            gpa: 0,
            size_bytes: len as u64,
            host_addr: addr as u64,
            kvm_slot: 0,
            first_page: 0,
        };
        let bm = DirtyBitmap::new(64);
        let n = mark_touched_pages(&block, &bm).unwrap();
        // THP may populate neighbours; the touched pages must be there.
        assert!(bm.is_set(3) && bm.is_set(40));
        assert!(n >= 2);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(addr, len) };
    }
}
