//! The memory of one vCPU's dirty ring, shared with the kernel: the only `unsafe`
//! of the ring listener. Entries are reached through the ring's index (wrapped to its
//! size), their flags through atomics, their fields with volatile reads ordered by an
//! acquire load of the flags (KVM's protocol: the kernel writes slot and offset, then
//! release-stores DIRTY; userspace reads them, then release-stores RESET).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};

use super::ring_listener::{DIRTY_GFN_BYTES, KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET};
use crate::{Error, Result};

/// Who owns a ring's memory.
enum RingOwner {
    /// The kernel's ring, mmapped from the vCPU fd.
    Mmap { len_bytes: usize },
    /// A heap ring (tests stand in for the kernel).
    #[cfg(test)]
    Heap,
}

/// Blocks every blockable signal on this thread until dropped (then restores the mask).
pub(super) struct SignalsBlocked {
    old: Option<libc::sigset_t>,
}

impl SignalsBlocked {
    pub(super) fn new() -> Self {
        // SAFETY: sigset_t is plain data, filled by sigfillset before use; pthread_sigmask
        // only changes this thread's mask and writes the old one into `old`.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            let ok = libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) == 0;
            SignalsBlocked {
                old: ok.then_some(old),
            }
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            // SAFETY: restores the mask saved by `new` on this same thread (the guard is
            // a local that never leaves the function that made it).
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
        }
    }
}

/// One vCPU's ring of `kvm_dirty_gfn` entries.
pub(super) struct RingMemory {
    base: NonNull<kvm_dirty_gfn>,
    entries: u32,
    owner: RingOwner,
}

// SAFETY: the ring is plain shared memory; every access goes through atomics (flags) or
// volatile reads of fields the kernel published before a release store of the flags, and
// all reaping happens under the listener's lock.
unsafe impl Send for RingMemory {}
// SAFETY: as above.
unsafe impl Sync for RingMemory {}

impl RingMemory {
    /// Entries in the ring (a power of two).
    pub(super) fn entries(&self) -> u32 {
        self.entries
    }

    /// Maps the ring of the vCPU behind `fd`.
    pub(super) fn map(fd: BorrowedFd<'_>, entries: u32) -> Result<Self> {
        // SAFETY: sysconf has no memory effects.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page_size = u64::try_from(page_size).unwrap_or(4096);
        let len_bytes = usize::try_from(u64::from(entries) * DIRTY_GFN_BYTES)
            .map_err(|_| Error::InvalidParameter(format!("ring of {entries} entries")))?;
        let offset = libc::off_t::try_from(u64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page_size)
            .map_err(|_| Error::InvalidParameter("ring offset".into()))?;
        // SAFETY: a fresh shared mapping of the vCPU fd's ring pages; the kernel checks
        // the offset and length against the ring it allocated; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Kvm {
                op: "mmap(vCPU dirty ring)",
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(ptr.cast()).ok_or_else(|| Error::Kvm {
            op: "mmap(vCPU dirty ring)",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        Ok(RingMemory {
            base,
            entries,
            owner: RingOwner::Mmap { len_bytes },
        })
    }

    /// A zeroed heap ring, for tests.
    #[cfg(test)]
    pub(super) fn heap(entries: u32) -> Self {
        let boxed: Box<[kvm_dirty_gfn]> = vec![kvm_dirty_gfn::default(); entries as usize].into();
        let raw = Box::into_raw(boxed);
        RingMemory {
            // SAFETY: Box::into_raw never returns null.
            base: unsafe { NonNull::new_unchecked(raw.cast()) },
            entries,
            owner: RingOwner::Heap,
        }
    }

    /// Entry `index` modulo the ring size.
    #[inline]
    pub(super) fn entry(&self, index: u32) -> *mut kvm_dirty_gfn {
        let i = (index & (self.entries - 1)) as usize;
        // SAFETY: i < entries, so the pointer stays inside the mapping.
        unsafe { self.base.as_ptr().add(i) }
    }

    /// The entry's flags as an atomic.
    #[inline]
    pub(super) fn flags(&self, index: u32) -> &AtomicU32 {
        let e = self.entry(index);
        // SAFETY: `flags` is a 4-byte-aligned u32 inside the live mapping (kvm_dirty_gfn
        // is 8-aligned), shared with the kernel, which also accesses it atomically; the
        // reference does not outlive `self`.
        unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) }
    }

    /// True when the entry at `index` holds a dirty GFN not yet collected.
    #[inline]
    pub(super) fn is_dirty(&self, index: u32) -> bool {
        self.flags(index).load(Ordering::Acquire) == KVM_DIRTY_GFN_F_DIRTY
    }

    /// Reads (slot, offset) of an entry whose DIRTY flag was acquire-loaded.
    #[inline]
    pub(super) fn read(&self, index: u32) -> (u32, u64) {
        let e = self.entry(index);
        // SAFETY: inside the mapping; the kernel wrote these fields before its release
        // store of DIRTY, which our acquire load observed, and leaves them alone until
        // we store RESET.
        unsafe {
            (
                std::ptr::addr_of!((*e).slot).read_volatile(),
                std::ptr::addr_of!((*e).offset).read_volatile(),
            )
        }
    }

    /// Marks the entry collected (release: our reads happen before the kernel reuses it).
    #[inline]
    pub(super) fn set_collected(&self, index: u32) {
        self.flags(index)
            .store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
    }

    /// Test hook: the kernel's push.
    #[cfg(test)]
    pub(super) fn push(&self, index: u32, slot: u32, offset: u64) {
        let e = self.entry(index);
        // SAFETY: inside the heap ring; the flags are published with release below.
        unsafe {
            std::ptr::addr_of_mut!((*e).slot).write_volatile(slot);
            std::ptr::addr_of_mut!((*e).offset).write_volatile(offset);
        }
        self.flags(index)
            .store(KVM_DIRTY_GFN_F_DIRTY, Ordering::Release);
    }

    /// Test hook: the kernel's reset of collected entries.
    #[cfg(test)]
    pub(super) fn kernel_reset(&self) -> u64 {
        let mut n = 0;
        for i in 0..self.entries {
            let f = self.flags(i);
            if f.load(Ordering::Acquire) == KVM_DIRTY_GFN_F_RESET {
                f.store(0, Ordering::Release);
                n += 1;
            }
        }
        n
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        match self.owner {
            RingOwner::Mmap { len_bytes } => {
                // SAFETY: base/len are exactly the mapping made in `map`, unmapped once.
                unsafe { libc::munmap(self.base.as_ptr().cast(), len_bytes) };
            }
            #[cfg(test)]
            RingOwner::Heap => {
                let slice =
                    std::ptr::slice_from_raw_parts_mut(self.base.as_ptr(), self.entries as usize);
                // SAFETY: the pointer came from Box::into_raw of a slice of this length.
                drop(unsafe { Box::from_raw(slice) });
            }
        }
    }
}
