//! userfaultfd(2) over a [`HostMemory`]: the memory a postcopy destination runs its
//! guest on before every page has arrived.
//!
//! A [`UffdRegion`] registers a private anonymous mapping in *missing* mode: the first
//! touch of a page that was never filled (by a vCPU, or by the VMM) blocks the touching
//! thread and queues a [`Fault`] on the region's descriptor. A handler thread takes it
//! with [`UffdRegion::wait_fault`], gets the page's bytes (from the source, in
//! postcopy) and installs them with [`UffdRegion::copy`] (or [`UffdRegion::zero`]): the
//! kernel maps the page atomically, with its contents, and wakes the blocked threads.
//! A page is installed at most once: installing one that is already there reports
//! [`Filled::AlreadyPresent`] and changes nothing, which is what lets a page pushed in
//! the background and the same page requested by a fault race safely.
//!
//! Every operation is bounds-checked against the registered memory; nothing here
//! takes an address from the caller.
//!
//! ```no_run
//! use dirty_sync::HostMemory;
//! use uffd::{Filled, UffdRegion};
//! use std::time::Duration;
//!
//! let ram = HostMemory::anonymous(1 << 20)?;
//! let region = UffdRegion::register(ram.clone())?;
//! // ... vCPUs run on `ram`; a handler thread serves their faults:
//! while let Some(fault) = region.wait_fault(Duration::from_millis(100))? {
//!     let page = vec![0u8; 4096]; // the page's bytes, from the source
//!     let _: Filled = region.copy(fault.page_offset_bytes(), &page)?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use dirty_sync::{HostMemory, PAGE_SIZE};

/// The crate's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// userfaultfd cannot be opened here (no /dev/userfaultfd access and the system
    /// call refused, e.g. `vm.unprivileged_userfaultfd` = 0 without CAP_SYS_PTRACE).
    #[error("userfaultfd is not available: {0}")]
    Unavailable(std::io::Error),
    /// The kernel lacks something the region needs.
    #[error("userfaultfd lacks {0}")]
    Unsupported(&'static str),
    /// An offset or length outside the registered memory, or not page-aligned.
    #[error("{what}: {offset_bytes:#x}+{len_bytes:#x} is not whole pages inside the {size_bytes:#x}-byte region")]
    OutOfRange {
        /// The operation.
        what: &'static str,
        /// Offset asked for.
        offset_bytes: u64,
        /// Length asked for.
        len_bytes: u64,
        /// The region's size.
        size_bytes: u64,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// Which.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The descriptor delivered an event this crate does not expect.
    #[error("unexpected userfaultfd event {0:#x}")]
    UnexpectedEvent(u8),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

// The kernel's ABI (include/uapi/linux/userfaultfd.h); libc does not carry it.
const UFFD_API: u64 = 0xaa;
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
/// `_UFFDIO_COPY` and `_UFFDIO_ZEROPAGE` bits of a registration's `ioctls`.
const RANGE_IOCTLS_NEEDED: u64 = (1 << 0x03) | (1 << 0x04);

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes, packed): event at 0, pagefault flags at 8, address at 16.
const MSG_BYTES: usize = 32;

/// A missing page someone touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Offset of the touched byte in the region (the kernel may round it to the page).
    pub offset_bytes: u64,
    /// The touch was a write.
    pub write: bool,
}

impl Fault {
    /// Offset of the faulting page in the region.
    pub fn page_offset_bytes(&self) -> u64 {
        self.offset_bytes / PAGE_SIZE * PAGE_SIZE
    }
}

/// What an install did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filled {
    /// The pages were missing and now hold the bytes; threads waiting on them run.
    Done,
    /// Some page of the range was already there: nothing was written to it (a page
    /// lands once).
    AlreadyPresent,
}

/// Memory registered with userfaultfd in missing mode, and the descriptor its faults
/// arrive on. Dropping it unregisters the range (later touches of missing pages then
/// fill them with zeros, as for any anonymous memory) and closes the descriptor.
pub struct UffdRegion {
    fd: OwnedFd,
    mem: HostMemory,
}

/// Opens a userfaultfd descriptor: /dev/userfaultfd (the kernel's access control by
/// file permissions) first, then the system call.
fn open_uffd() -> Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd");
    if let Ok(dev) = dev {
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new
        // descriptor or -1; `dev` is open for the call.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    // SAFETY: the system call takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(Error::Unavailable(std::io::Error::last_os_error()));
    }
    let fd = i32::try_from(fd).map_err(|_| Error::Unsupported("a small descriptor"))?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ioctl(fd, req, arg)` on a `repr(C)` argument of the size `req` encodes.
///
/// # Safety
/// `T` must be the structure the kernel expects for `req`, and every address inside it
/// must be valid for what `req` does with it.
unsafe fn ioctl<T>(fd: &OwnedFd, op: &'static str, req: libc::c_ulong, arg: &mut T) -> Result<()> {
    // SAFETY: the caller's contract; `arg` is a live, exclusively borrowed structure.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        return Err(Error::Os {
            op,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

impl UffdRegion {
    /// Registers `mem` (private anonymous memory, e.g. [`HostMemory::anonymous`] or a
    /// VMM's guest RAM mapped so) for missing-page faults. Pages already present stay
    /// as they are; every other page faults on its first touch until installed.
    pub fn register(mem: HostMemory) -> Result<UffdRegion> {
        let fd = open_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `UffdioApi`
        // mirrors; it holds no address.
        unsafe { ioctl(&fd, "UFFDIO_API", UFFDIO_API, &mut api)? };
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: mem.as_ptr() as u64,
                len: mem.size_bytes(),
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the range
        // is `mem`'s own mapping (page-aligned, a whole number of pages: HostMemory's
        // invariants), which `mem`, kept in the region, keeps mapped.
        unsafe { ioctl(&fd, "UFFDIO_REGISTER", UFFDIO_REGISTER, &mut reg)? };
        if reg.ioctls & RANGE_IOCTLS_NEEDED != RANGE_IOCTLS_NEEDED {
            return Err(Error::Unsupported(
                "UFFDIO_COPY and UFFDIO_ZEROPAGE on this memory",
            ));
        }
        Ok(UffdRegion { fd, mem })
    }

    /// The registered memory.
    pub fn memory(&self) -> &HostMemory {
        &self.mem
    }

    /// The kernel address of `[offset, offset + len)`, whole pages inside the region.
    fn range(&self, what: &'static str, offset_bytes: u64, len_bytes: u64) -> Result<u64> {
        let whole = offset_bytes.is_multiple_of(PAGE_SIZE)
            && len_bytes.is_multiple_of(PAGE_SIZE)
            && len_bytes > 0;
        match self.mem.range_ptr(offset_bytes, len_bytes) {
            Some(p) if whole => Ok(p as u64),
            _ => Err(Error::OutOfRange {
                what,
                offset_bytes,
                len_bytes,
                size_bytes: self.mem.size_bytes(),
            }),
        }
    }

    /// Waits up to `timeout` for a fault; `None` when none came.
    pub fn wait_fault(&self, timeout: Duration) -> Result<Option<Fault>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd, live for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(Error::Os {
                op: "poll(userfaultfd)",
                source: e,
            });
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = [0u8; MSG_BYTES];
        // SAFETY: reads at most MSG_BYTES into the local buffer.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), MSG_BYTES) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            // Another handler thread took it, or the page was filled meanwhile.
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(Error::Os {
                op: "read(userfaultfd)",
                source: e,
            });
        }
        if r as usize != MSG_BYTES {
            return Err(Error::Os {
                op: "read(userfaultfd)",
                source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short message"),
            });
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            return Err(Error::UnexpectedEvent(msg[0]));
        }
        let word = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8 bytes"));
        let (flags, address) = (word(8), word(16));
        let base = self.mem.as_ptr() as u64;
        let offset_bytes = address
            .checked_sub(base)
            .filter(|o| *o < self.mem.size_bytes())
            .ok_or(Error::OutOfRange {
                what: "fault address",
                offset_bytes: address,
                len_bytes: 0,
                size_bytes: self.mem.size_bytes(),
            })?;
        Ok(Some(Fault {
            offset_bytes,
            write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
        }))
    }

    /// Installs `data` (whole pages) at `offset_bytes` and wakes whoever waits on
    /// them; [`Filled::AlreadyPresent`] if a page of the range is there already.
    pub fn copy(&self, offset_bytes: u64, data: &[u8]) -> Result<Filled> {
        let dst = self.range("UFFDIO_COPY", offset_bytes, data.len() as u64)?;
        let mut c = UffdioCopy {
            dst,
            src: data.as_ptr() as u64,
            len: data.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads `len` bytes at `src` (the borrowed slice) and maps
        // them at `dst`, whole pages inside this region's registered memory (checked
        // above), which the region keeps mapped.
        match unsafe { ioctl(&self.fd, "UFFDIO_COPY", UFFDIO_COPY, &mut c) } {
            Ok(()) => Ok(Filled::Done),
            Err(Error::Os { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(Filled::AlreadyPresent)
            }
            Err(e) => Err(e),
        }
    }

    /// Installs zero pages at `[offset_bytes, offset_bytes + len_bytes)` and wakes
    /// whoever waits on them; [`Filled::AlreadyPresent`] as for [`Self::copy`].
    pub fn zero(&self, offset_bytes: u64, len_bytes: u64) -> Result<Filled> {
        let start = self.range("UFFDIO_ZEROPAGE", offset_bytes, len_bytes)?;
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start,
                len: len_bytes,
            },
            ..Default::default()
        };
        // SAFETY: UFFDIO_ZEROPAGE maps zero pages over the range, whole pages inside
        // this region's registered memory (checked above).
        match unsafe { ioctl(&self.fd, "UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE, &mut z) } {
            Ok(()) => Ok(Filled::Done),
            Err(Error::Os { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(Filled::AlreadyPresent)
            }
            Err(e) => Err(e),
        }
    }

    /// Wakes the threads waiting on `[offset_bytes, offset_bytes + len_bytes)` (after
    /// the pages were installed some other way).
    pub fn wake(&self, offset_bytes: u64, len_bytes: u64) -> Result<()> {
        let start = self.range("UFFDIO_WAKE", offset_bytes, len_bytes)?;
        let mut r = UffdioRange {
            start,
            len: len_bytes,
        };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range` inside the region.
        unsafe { ioctl(&self.fd, "UFFDIO_WAKE", UFFDIO_WAKE, &mut r) }
    }
}

impl Drop for UffdRegion {
    fn drop(&mut self) {
        let mut r = UffdioRange {
            start: self.mem.as_ptr() as u64,
            len: self.mem.size_bytes(),
        };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`: the range registered
        // in `register`, still mapped (`self.mem`).
        // A failure changes nothing: closing the descriptor unregisters it as well.
        let _ = unsafe { ioctl(&self.fd, "UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, &mut r) };
    }
}
