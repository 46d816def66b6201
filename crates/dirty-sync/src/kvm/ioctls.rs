//! Raw KVM ioctls that kvm-ioctls 0.25 lacks or allocates in, built with vmm-sys-util.

use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};

use crate::{Error, RamBlock, Result};
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// The ioctl request numbers (the macros generate undocumented functions).
#[allow(missing_docs)]
mod nr {
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, KVMIO};
    use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

/// KVM capability number of the manual dirty-log protect interface (version 2).
pub(crate) const KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: u32 =
    kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;

fn kvm_err(op: &'static str) -> Error {
    Error::Kvm {
        op,
        source: errno::Error::last().into(),
    }
}

/// `KVM_GET_DIRTY_LOG` of `block`'s slot into a caller-owned buffer of at least
/// `ceil(pages / 64)` words (refused otherwise).
///
/// The slot's size is the block's: logging was turned on by [`set_slot_logging`],
/// which registers the slot with the block's size, and KVM refuses to resize a slot.
pub(crate) fn get_dirty_log(vm: &VmFd, block: &RamBlock, bitmap: &mut [u64]) -> Result<()> {
    if (bitmap.len() as u64) < block.pages().div_ceil(64) {
        return Err(Error::InvalidParameter(format!(
            "a dirty bitmap of {} words for block {} of {} pages",
            bitmap.len(),
            block.id,
            block.pages()
        )));
    }
    let mut log = kvm_dirty_log {
        slot: block.kvm_slot,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: the ioctl reads `log` and writes the slot's bitmap into `bitmap`: the
    // kernel writes ALIGN(npages, 64) / 8 bytes, and the slot has the block's pages
    // (see above), for which the buffer was checked to be large enough.
    let ret = unsafe { ioctl_with_mut_ref(vm, KVM_GET_DIRTY_LOG(), &mut log) };
    if ret < 0 {
        return Err(kvm_err("KVM_GET_DIRTY_LOG"));
    }
    Ok(())
}

/// `KVM_CLEAR_DIRTY_LOG`: re-protects the pages whose bits are set in `bitmap`, which
/// describes pages `[first_page, first_page + num_pages)` of `slot`.
///
/// The kernel wants `first_page` and `num_pages` multiples of 64, except that the range
/// may end at the slot's end.
pub(crate) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<()> {
    if (bitmap.len() as u64) < u64::from(num_pages).div_ceil(64) {
        return Err(Error::InvalidParameter(format!(
            "a clear bitmap of {} words for {num_pages} pages",
            bitmap.len()
        )));
    }
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    // The kernel only reads through this pointer.
    clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr().cast_mut().cast();
    // SAFETY: the kernel reads `clear` and ceil(num_pages / 64) words from `bitmap`, which
    // holds at least that many (checked above); it checks the page range against the
    // slot itself.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(kvm_err("KVM_CLEAR_DIRTY_LOG"));
    }
    Ok(())
}

/// `KVM_RESET_DIRTY_RINGS`: re-protects every collected ring entry; returns how many.
pub(crate) fn reset_dirty_rings(vm: &VmFd) -> Result<u64> {
    // SAFETY: the ioctl takes no argument and only touches kernel state of this VM.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(kvm_err("KVM_RESET_DIRTY_RINGS"));
    }
    Ok(ret as u64)
}

/// Turns KVM_MEM_LOG_DIRTY_PAGES on or off for the slot backing `block`.
pub(crate) fn set_slot_logging(vm: &VmFd, block: &RamBlock, on: bool) -> Result<()> {
    if block.size_bytes > block.memory.size_bytes() {
        return Err(Error::InvalidBlocks(format!(
            "block {} is larger than its host memory",
            block.id
        )));
    }
    let region = kvm_userspace_memory_region {
        slot: block.kvm_slot,
        flags: if on {
            kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: block.gpa,
        memory_size: block.size_bytes,
        userspace_addr: block.memory.as_ptr() as u64,
    };
    // SAFETY: the range is the block's host memory, which stays mapped while the block
    // lives (HostMemory's contract) and holds size_bytes (checked above). For a slot
    // that already exists KVM accepts a change of the flags only (a different address
    // or size is refused), so the slot keeps mapping exactly this memory.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| Error::Kvm {
        op: "KVM_SET_USER_MEMORY_REGION",
        source: e.into(),
    })
}
