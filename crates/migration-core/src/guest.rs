//! What a VMM hands the engine: its guest, behind [`MigratableVm`], and raw access to RAM.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use dirty_sync::{AddressSpace, DirtyBitmap, HostPage, RamBlock, PAGE_SIZE};

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
    /// Makes vCPU `vcpu` alone sleep `ppm` millionths of its time (dirty limit), or the
    /// global throttle's share if larger; 0 = full speed. False when the VMM cannot
    /// throttle one vCPU (then dirty limit is not available).
    fn set_vcpu_throttle_ppm(&self, _vcpu: usize, _ppm: u32) -> bool {
        false
    }
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
    /// Entries of each vCPU's dirty ring, or None without one.
    fn dirty_ring_entries(&self) -> Option<u32> {
        None
    }
    /// Starts counting the distinct pages each vCPU dirties (dirty ring), in a window
    /// that opens at the next dirty-log sync; false when the guest cannot (no ring).
    fn vcpu_dirty_pages_start(&self) -> bool {
        false
    }
    /// Per vCPU: distinct pages dirtied from the sync after
    /// [`MigratableVm::vcpu_dirty_pages_start`] to the latest sync, and stops counting;
    /// None when nothing was counting.
    fn vcpu_dirty_pages_take(&self) -> Option<Vec<u64>> {
        None
    }
}

/// Access to guest RAM, page by page, through the blocks' [`HostMemory`](dirty_sync::HostMemory).
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

    /// Page `page` of block `block`, or None when there is no such page.
    ///
    /// The guest may write the page while it is read; the bytes are then a mix that
    /// the dirty log will make the sender resend.
    pub fn page(&self, block: usize, page: u64) -> Option<HostPage<'_>> {
        let b = self.blocks().get(block)?;
        if page >= b.pages() {
            return None;
        }
        b.memory.page(page)
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
    f.seek(SeekFrom::Start(
        block.memory.as_ptr() as u64 / PAGE_SIZE * 8,
    ))?;
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
        let memory = dirty_sync::HostMemory::anonymous(64 * 4096).unwrap();
        assert!(memory.write_volatile(3 * 4096, &[1]));
        assert!(memory.write_volatile(40 * 4096 + 5, &[1]));
        let block = RamBlock::new("t", 0, memory, 0, 0);
        let bm = DirtyBitmap::new(64);
        let n = mark_touched_pages(&block, &bm).unwrap();
        // THP may populate neighbours; the touched pages must be there.
        assert!(bm.is_set(3) && bm.is_set(40));
        assert!(n >= 2);
    }
}

/// The runs of consecutive pages in `pages` (increasing), as `(first, count)`: one
/// system call per run where the kernel takes ranges.
pub(crate) fn page_runs(pages: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod runs_tests {
    use super::page_runs;

    #[test]
    fn runs_of_consecutive_pages() {
        assert_eq!(
            page_runs([2, 3, 4, 10, 11, 64]),
            vec![(2, 3), (10, 2), (64, 1)]
        );
        assert!(page_runs([]).is_empty());
    }
}
