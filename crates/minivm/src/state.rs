//! The device state a migration carries: every vCPU's architectural state (KVM) or the
//! host threads' progress (fallback), as one versioned little-endian blob.
//!
//! Layout: magic `b"FERRYMVM"` (8 bytes), format version `u32`, backend `u32`
//! (1 = KVM, 2 = host threads), vCPU count `u32`, then one record per vCPU.
//! KVM record: sections `regs`, `sregs`, `fpu`, `xcrs`, `vcpu_events`, each a `u32` byte
//! length plus the kernel struct's raw bytes (length must match this build's struct),
//! then MSRs: `u32` count plus `count × (u32 index, u64 data)`.
//! Host-thread record: 4 × `u64` ([`ThreadProgress`]).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::error::{kvm, Error, Result};

/// Magic bytes at the start of every state blob.
pub const MAGIC: [u8; 8] = *b"FERRYMVM";
/// The blob format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Backend tag for KVM records.
pub const BACKEND_KVM: u32 = 1;
/// Backend tag for host-thread records.
pub const BACKEND_THREADS: u32 = 2;

/// MSRs saved when the host KVM lists them: TSC, SYSENTER_*, MISC_ENABLE, PAT,
/// STAR/LSTAR/CSTAR/SFMASK, KERNEL_GS_BASE, TSC_AUX.
const WANTED_MSRS: [u32; 12] = [
    0x10,
    0x174,
    0x175,
    0x176,
    0x1a0,
    0x277,
    0xc000_0081,
    0xc000_0082,
    0xc000_0083,
    0xc000_0084,
    0xc000_0102,
    0xc000_0103,
];

/// The kernel structs saved as raw bytes: kvm-bindings derives zerocopy's byte
/// conversions for them (its `serde` feature), so no `unsafe` is needed here.
trait KernelBytes: IntoBytes + FromBytes + Immutable {}
impl KernelBytes for kvm_regs {}
impl KernelBytes for kvm_sregs {}
impl KernelBytes for kvm_xcrs {}
impl KernelBytes for kvm_vcpu_events {}

/// `kvm_fpu`'s bytes in the kernel's layout (kvm-bindings derives no byte conversion
/// for it): every field little-endian in declaration order; the struct has no
/// implicit padding, so these are its raw bytes on x86-64.
fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut out = Vec::with_capacity(FPU_BYTES);
    for r in &f.fpr {
        out.extend_from_slice(r);
    }
    out.extend_from_slice(&f.fcw.to_le_bytes());
    out.extend_from_slice(&f.fsw.to_le_bytes());
    out.push(f.ftwx);
    out.push(f.pad1);
    out.extend_from_slice(&f.last_opcode.to_le_bytes());
    out.extend_from_slice(&f.last_ip.to_le_bytes());
    out.extend_from_slice(&f.last_dp.to_le_bytes());
    for x in &f.xmm {
        out.extend_from_slice(x);
    }
    out.extend_from_slice(&f.mxcsr.to_le_bytes());
    out.extend_from_slice(&f.pad2.to_le_bytes());
    out
}

/// Size of `kvm_fpu`.
const FPU_BYTES: usize = std::mem::size_of::<kvm_fpu>();

/// The inverse of [`fpu_bytes`]; None unless `b` is exactly [`FPU_BYTES`] long.
fn fpu_from_bytes(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != FPU_BYTES {
        return None;
    }
    let mut at = 0;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    let mut f = kvm_fpu::default();
    for r in &mut f.fpr {
        r.copy_from_slice(take(16));
    }
    f.fcw = u16::from_le_bytes(take(2).try_into().ok()?);
    f.fsw = u16::from_le_bytes(take(2).try_into().ok()?);
    f.ftwx = take(1)[0];
    f.pad1 = take(1)[0];
    f.last_opcode = u16::from_le_bytes(take(2).try_into().ok()?);
    f.last_ip = u64::from_le_bytes(take(8).try_into().ok()?);
    f.last_dp = u64::from_le_bytes(take(8).try_into().ok()?);
    for x in &mut f.xmm {
        x.copy_from_slice(take(16));
    }
    f.mxcsr = u32::from_le_bytes(take(4).try_into().ok()?);
    f.pad2 = u32::from_le_bytes(take(4).try_into().ok()?);
    Some(f)
}

/// One KVM vCPU's architectural state.
#[derive(Clone, Default)]
pub struct KvmVcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Pending exceptions, interrupts, NMI state.
    pub events: kvm_vcpu_events,
    /// (index, value) of each saved MSR.
    pub msrs: Vec<(u32, u64)>,
}

/// The host-thread fallback's per-vCPU progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadProgress {
    /// Next page index in the share (working set, sweep).
    pub position: u64,
    /// xorshift64 state (random).
    pub rng: u64,
    /// Running sequence number (random, sweep).
    pub seq: u64,
    /// Reserved, zero.
    pub reserved: u64,
}

/// The MSRs to save: the wanted list filtered by what this KVM supports.
pub fn msr_indices(kvm_fd: &Kvm) -> Vec<u32> {
    match kvm_fd.get_msr_index_list() {
        Ok(list) => {
            let supported = list.as_slice();
            WANTED_MSRS
                .iter()
                .copied()
                .filter(|m| supported.contains(m))
                .collect()
        }
        // Without a list, TSC alone (it is always there on x86-64 KVM).
        Err(_) => vec![0x10],
    }
}

/// Reads a vCPU's state (the vCPU must be out of KVM_RUN).
pub fn save_kvm(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<KvmVcpuState> {
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::Config(format!("too many MSRs to save: {e:?}")))?;
    let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    Ok(KvmVcpuState {
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
        xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        msrs: msrs
            .as_slice()
            .iter()
            .take(n)
            .map(|e| (e.index, e.data))
            .collect(),
    })
}

/// Writes a vCPU's state (the vCPU must be out of KVM_RUN).
pub fn restore_kvm(vcpu: &VcpuFd, s: &KvmVcpuState) -> Result<()> {
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_fpu(&s.fpu).map_err(kvm("KVM_SET_FPU"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::Truncated(format!("too many MSRs in blob: {e:?}")))?;
    let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(Error::Kvm {
            op: "KVM_SET_MSRS (not all MSRs accepted)",
            source: vmm_sys_util::errno::Error::new(libc::EINVAL),
        });
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_section(out: &mut Vec<u8>, bytes: &[u8]) {
    // Kernel structs are a few KiB at most, far below u32::MAX.
    put_u32(out, bytes.len() as u32);
    out.extend_from_slice(bytes);
}

fn header(backend: u32, vcpus: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    put_u32(&mut out, FORMAT_VERSION);
    put_u32(&mut out, backend);
    put_u32(&mut out, vcpus);
    out
}

/// Encodes KVM vCPU states.
pub fn encode_kvm(states: &[KvmVcpuState]) -> Vec<u8> {
    let mut out = header(BACKEND_KVM, states.len() as u32);
    for s in states {
        put_section(&mut out, s.regs.as_bytes());
        put_section(&mut out, s.sregs.as_bytes());
        put_section(&mut out, &fpu_bytes(&s.fpu));
        put_section(&mut out, s.xcrs.as_bytes());
        put_section(&mut out, s.events.as_bytes());
        put_u32(&mut out, s.msrs.len() as u32);
        for &(i, d) in &s.msrs {
            put_u32(&mut out, i);
            put_u64(&mut out, d);
        }
    }
    out
}

/// Encodes host-thread progress records.
pub fn encode_threads(progress: &[ThreadProgress]) -> Vec<u8> {
    let mut out = header(BACKEND_THREADS, progress.len() as u32);
    for p in progress {
        for v in [p.position, p.rng, p.seq, p.reserved] {
            put_u64(&mut out, v);
        }
    }
    out
}

/// A cursor over a blob that turns every short read into [`Error::Truncated`].
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Error::Truncated(format!(
                    "{what}: need {n} bytes at offset {}, blob has {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn section<T: KernelBytes>(&mut self, what: &str) -> Result<T> {
        let len = self.u32(what)? as usize;
        let b = self.take(len, what)?;
        T::read_from_bytes(b).map_err(|_| {
            Error::Truncated(format!(
                "{what}: {len} bytes, this build expects {}",
                std::mem::size_of::<T>()
            ))
        })
    }
}

/// A decoded blob.
pub enum Decoded {
    /// KVM vCPU states.
    Kvm(Vec<KvmVcpuState>),
    /// Host-thread progress.
    Threads(Vec<ThreadProgress>),
}

fn backend_name(tag: u32) -> &'static str {
    match tag {
        BACKEND_KVM => crate::BACKEND_NAME_KVM,
        BACKEND_THREADS => crate::BACKEND_NAME_THREADS,
        _ => "unknown",
    }
}

/// Decodes and validates a blob for a VM with `vcpus` vCPUs on backend `want_backend`.
pub fn decode(blob: &[u8], vcpus: u32, want_backend: u32) -> Result<Decoded> {
    let mut r = Reader { buf: blob, pos: 0 };
    let magic = r.take(MAGIC.len(), "magic").map_err(|_| Error::BadMagic)?;
    if magic != MAGIC {
        return Err(Error::BadMagic);
    }
    let version = r.u32("version")?;
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let backend = r.u32("backend")?;
    if backend != want_backend {
        return Err(Error::BackendMismatch {
            blob: backend_name(backend),
            vm: backend_name(want_backend),
        });
    }
    let n = r.u32("vcpu count")?;
    if n != vcpus {
        return Err(Error::VcpuCountMismatch { blob: n, vm: vcpus });
    }
    let decoded = if backend == BACKEND_KVM {
        let mut states = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut s = KvmVcpuState {
                regs: r.section("regs")?,
                sregs: r.section("sregs")?,
                fpu: {
                    let len = r.u32("fpu")? as usize;
                    fpu_from_bytes(r.take(len, "fpu")?).ok_or_else(|| {
                        Error::Truncated(format!(
                            "fpu: {len} bytes, this build expects {FPU_BYTES}"
                        ))
                    })?
                },
                xcrs: r.section("xcrs")?,
                events: r.section("vcpu_events")?,
                msrs: Vec::new(),
            };
            let count = r.u32("msr count")?;
            if count as usize > kvm_bindings::KVM_MAX_MSR_ENTRIES {
                return Err(Error::Truncated(format!(
                    "{count} MSRs is more than KVM accepts"
                )));
            }
            for _ in 0..count {
                let i = r.u32("msr index")?;
                s.msrs.push((i, r.u64("msr data")?));
            }
            states.push(s);
        }
        Decoded::Kvm(states)
    } else {
        let mut progress = Vec::with_capacity(n as usize);
        for _ in 0..n {
            progress.push(ThreadProgress {
                position: r.u64("position")?,
                rng: r.u64("rng")?,
                seq: r.u64("seq")?,
                reserved: r.u64("reserved")?,
            });
        }
        Decoded::Threads(progress)
    };
    if r.pos != blob.len() {
        return Err(Error::Truncated(format!(
            "{} trailing bytes",
            blob.len() - r.pos
        )));
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_bytes_are_the_kernel_struct_and_round_trip() {
        let mut f = kvm_fpu::default();
        for (i, r) in f.fpr.iter_mut().enumerate() {
            r.fill(i as u8 + 1);
        }
        (f.fcw, f.fsw, f.ftwx, f.pad1, f.last_opcode) = (0x37f, 0x1234, 0xaa, 0, 0x5678);
        (f.last_ip, f.last_dp) = (0x1122_3344_5566_7788, 0x99aa_bbcc_ddee_ff00);
        for (i, x) in f.xmm.iter_mut().enumerate() {
            x.fill(0x80 | i as u8);
        }
        (f.mxcsr, f.pad2) = (0x1f80, 0);
        let b = fpu_bytes(&f);
        // SAFETY: kvm_fpu is a repr(C) struct of integers without padding; reading its
        // bytes is what the format promises to match.
        let raw =
            unsafe { std::slice::from_raw_parts((&f as *const kvm_fpu).cast::<u8>(), FPU_BYTES) };
        assert_eq!(b, raw);
        assert_eq!(fpu_from_bytes(&b), Some(f));
        assert_eq!(fpu_from_bytes(&b[1..]), None);
    }

    #[test]
    fn kvm_blob_round_trips_and_rejects_damage() {
        let mut s = KvmVcpuState::default();
        s.regs.rip = 0x4008;
        s.msrs = vec![(0x10, 12345)];
        let blob = encode_kvm(&[s.clone(), s]);
        match decode(&blob, 2, BACKEND_KVM) {
            Ok(Decoded::Kvm(v)) => {
                assert_eq!(v.len(), 2);
                assert_eq!(v[1].regs.rip, 0x4008);
                assert_eq!(v[0].msrs, vec![(0x10, 12345)]);
            }
            _ => panic!("round trip failed"),
        }
        assert!(matches!(
            decode(&blob, 1, BACKEND_KVM),
            Err(Error::VcpuCountMismatch { blob: 2, vm: 1 })
        ));
        assert!(matches!(
            decode(&blob, 2, BACKEND_THREADS),
            Err(Error::BackendMismatch { .. })
        ));
        assert!(matches!(
            decode(&blob[..blob.len() - 3], 2, BACKEND_KVM),
            Err(Error::Truncated(_))
        ));
        assert!(matches!(
            decode(&blob[..5], 2, BACKEND_KVM),
            Err(Error::BadMagic)
        ));
        let mut bad = blob.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad, 2, BACKEND_KVM), Err(Error::BadMagic)));
        let mut bad = blob;
        bad[8] = 9;
        assert!(matches!(
            decode(&bad, 2, BACKEND_KVM),
            Err(Error::UnsupportedVersion {
                found: 9,
                expected: 1
            })
        ));
    }

    #[test]
    fn thread_blob_round_trips() {
        let p = ThreadProgress {
            position: 3,
            rng: 4,
            seq: 5,
            reserved: 0,
        };
        let blob = encode_threads(&[p]);
        assert!(
            matches!(decode(&blob, 1, BACKEND_THREADS), Ok(Decoded::Threads(v)) if v == vec![p])
        );
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(
            decode(&long, 1, BACKEND_THREADS),
            Err(Error::Truncated(_))
        ));
    }
}
