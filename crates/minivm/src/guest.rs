//! What lives in guest memory: the low-memory layout, identity page tables, the GDT
//! and the hand-assembled workload program (source in `asm/program.S`).

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::Workload;
use crate::error::Result;
use crate::PAGE_SIZE;

/// GPA of the PML4 (one page).
pub const PML4_GPA: u64 = 0x1000;
/// GPA of the PDPT (one page).
pub const PDPT_GPA: u64 = 0x2000;
/// GPA of the GDT (one page; entries 3 = user code, 4 = user data).
pub const GDT_GPA: u64 = 0x3000;
/// GPA of the program code.
pub const CODE_GPA: u64 = 0x4000;
/// GPA of the first page directory (up to 64 follow, one per GiB).
pub const PD_GPA: u64 = 0x10000;
/// GPA of vCPU 0's counter page; vCPU n's is `COUNTER_GPA + n * PAGE_SIZE`.
pub const COUNTER_GPA: u64 = 0x80000;
/// GPA where the data region (the workloads' pages) starts: 1 MiB.
pub const DATA_GPA: u64 = 0x10_0000;
/// Code segment selector: GDT index 3, RPL 3.
pub const CODE_SELECTOR: u16 = 0x1b;
/// Data segment selector: GDT index 4, RPL 3.
pub const DATA_SELECTOR: u16 = 0x23;
/// I/O port the idle loop writes to yield to the host for ~10 ms.
pub const IDLE_PORT: u16 = 0x80;
/// I/O port the sweep loop writes to yield when ahead of schedule.
pub const SWEEP_YIELD_PORT: u16 = 0x81;

const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;
/// Present | writable | user | accessed (set so the CPU never writes page tables).
const TABLE_FLAGS: u64 = 0x27;
/// Present | writable | user | accessed | dirty | 2 MiB page.
const LARGE_PAGE_FLAGS: u64 = 0xe7;
/// 64-bit DPL 3 code segment, accessed (G=1, L=1, P=1, S=1, type 0xb).
const GDT_USER_CODE: u64 = 0x00af_fb00_0000_ffff;
/// DPL 3 read/write data segment, accessed (G=1, D/B=1, P=1, S=1, type 0x3).
const GDT_USER_DATA: u64 = 0x00cf_f300_0000_ffff;

/// Offsets of the entry points in [`PROGRAM`].
pub const ENTRY_IDLE: u64 = 0x00;
/// Working-set entry point.
pub const ENTRY_WORKING_SET: u64 = 0x08;
/// Sweep entry point.
pub const ENTRY_SWEEP: u64 = 0x2a;
/// Random entry point.
pub const ENTRY_RANDOM: u64 = 0x7f;

/// The guest program: x86-64 machine code, CPL 3, no stack, never faults.
/// Registers in: rdi = share base GPA, rsi = pages, r12 = counter GPA;
/// sweep: r8 = TSC ticks per page, r10 = max lag ticks;
/// random: r8 = xorshift state, r9 = hot pages, r10 = hot threshold (of 256).
#[rustfmt::skip]
pub const PROGRAM: [u8; 0xd2] = [
    // idle (0x00):
    0x49, 0xff, 0x04, 0x24,                   // 00: inc qword [r12]        ; counter += 1
    0xe6, 0x80,                               // 04: out 0x80, al           ; exit to host, which naps ~10 ms
    0xeb, 0xf8,                               // 06: jmp idle
    // working-set (0x08):
    0x49, 0x8b, 0x04, 0x24,                   // 08: mov rax, [r12]         ; rax = rounds done
    0x48, 0xff, 0xc0,                         // 0c: inc rax                ; ws_round: this round's number
    0x48, 0x89, 0xf1,                         // 0f: mov rcx, rsi           ; pages left
    0x48, 0x89, 0xfb,                         // 12: mov rbx, rdi           ; page pointer
    0x48, 0x89, 0x03,                         // 15: mov [rbx], rax         ; ws_page: write round number
    0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // 18: add rbx, 0x1000        ; next page
    0x48, 0xff, 0xc9,                         // 1f: dec rcx
    0x75, 0xf1,                               // 22: jnz ws_page
    0x49, 0x89, 0x04, 0x24,                   // 24: mov [r12], rax         ; counter = round
    0xeb, 0xe2,                               // 28: jmp ws_round
    // sweep (0x2a):
    0x0f, 0x31,                               // 2a: rdtsc
    0x48, 0xc1, 0xe2, 0x20,                   // 2c: shl rdx, 32
    0x48, 0x09, 0xd0,                         // 30: or rax, rdx            ; rax = TSC
    0x49, 0x89, 0xc1,                         // 33: mov r9, rax            ; next deadline = now
    0x31, 0xdb,                               // 36: xor ebx, ebx           ; page index = 0
    0x0f, 0x31,                               // 38: rdtsc                  ; sweep_loop:
    0x48, 0xc1, 0xe2, 0x20,                   // 3a: shl rdx, 32
    0x48, 0x09, 0xd0,                         // 3e: or rax, rdx            ; rax = TSC
    0x4c, 0x39, 0xc8,                         // 41: cmp rax, r9
    0x73, 0x04,                               // 44: jae sweep_due          ; deadline reached
    0xe6, 0x81,                               // 46: out 0x81, al           ; ahead: host naps briefly
    0xeb, 0xee,                               // 48: jmp sweep_loop
    0x48, 0x89, 0xc1,                         // 4a: mov rcx, rax           ; sweep_due:
    0x4c, 0x29, 0xc9,                         // 4d: sub rcx, r9            ; lag = now - deadline
    0x4c, 0x39, 0xd1,                         // 50: cmp rcx, r10
    0x76, 0x03,                               // 53: jbe sweep_write
    0x49, 0x89, 0xc1,                         // 55: mov r9, rax            ; too far behind: resync, no burst
    0x48, 0x89, 0xd8,                         // 58: mov rax, rbx           ; sweep_write:
    0x48, 0xc1, 0xe0, 0x0c,                   // 5b: shl rax, 12
    0x48, 0x01, 0xf8,                         // 5f: add rax, rdi           ; rax = page GPA
    0x49, 0x8b, 0x0c, 0x24,                   // 62: mov rcx, [r12]
    0x48, 0xff, 0xc1,                         // 66: inc rcx                ; pages written so far
    0x48, 0x89, 0x08,                         // 69: mov [rax], rcx         ; write the page
    0x49, 0x89, 0x0c, 0x24,                   // 6c: mov [r12], rcx         ; counter = pages written
    0x4d, 0x01, 0xc1,                         // 70: add r9, r8             ; next deadline
    0x48, 0xff, 0xc3,                         // 73: inc rbx
    0x48, 0x39, 0xf3,                         // 76: cmp rbx, rsi
    0x72, 0xbd,                               // 79: jb sweep_loop
    0x31, 0xdb,                               // 7b: xor ebx, ebx           ; wrap to the first page
    0xeb, 0xb9,                               // 7d: jmp sweep_loop
    // random (0x7f):
    0x4c, 0x89, 0xc0,                         // 7f: mov rax, r8            ; xorshift64: x ^= x << 13
    0x48, 0xc1, 0xe0, 0x0d,                   // 82: shl rax, 13
    0x49, 0x31, 0xc0,                         // 86: xor r8, rax
    0x4c, 0x89, 0xc0,                         // 89: mov rax, r8            ; x ^= x >> 7
    0x48, 0xc1, 0xe8, 0x07,                   // 8c: shr rax, 7
    0x49, 0x31, 0xc0,                         // 90: xor r8, rax
    0x4c, 0x89, 0xc0,                         // 93: mov rax, r8            ; x ^= x << 17
    0x48, 0xc1, 0xe0, 0x11,                   // 96: shl rax, 17
    0x49, 0x31, 0xc0,                         // 9a: xor r8, rax
    0x4c, 0x89, 0xc0,                         // 9d: mov rax, r8
    0x0f, 0xb6, 0xc8,                         // a0: movzx ecx, al          ; low byte decides hot/cold
    0x48, 0xc1, 0xe8, 0x08,                   // a3: shr rax, 8             ; rest picks the page
    0x31, 0xd2,                               // a7: xor edx, edx
    0x4c, 0x39, 0xd1,                         // a9: cmp rcx, r10
    0x72, 0x05,                               // ac: jb random_hot
    0x48, 0xf7, 0xf6,                         // ae: div rsi                ; rdx = page in share
    0xeb, 0x03,                               // b1: jmp random_write
    0x49, 0xf7, 0xf1,                         // b3: div r9                 ; random_hot: rdx = page in hot set
    0x48, 0xc1, 0xe2, 0x0c,                   // b6: shl rdx, 12            ; random_write:
    0x48, 0x01, 0xfa,                         // ba: add rdx, rdi           ; rdx = page GPA
    0x49, 0xff, 0xc5,                         // bd: inc r13                ; sequence number
    0x4c, 0x89, 0x2a,                         // c0: mov [rdx], r13         ; write it
    0x41, 0xf7, 0xc5, 0xff, 0x0f, 0x00, 0x00, // c3: test r13d, 0xfff
    0x75, 0xb3,                               // ca: jnz random
    0x49, 0xff, 0x04, 0x24,                   // cc: inc qword [r12]        ; every 4096 writes: counter += 1
    0xeb, 0xad,                               // d0: jmp random
];

/// Where each vCPU's pages are: derived from guest RAM size and vCPU count only,
/// so source and destination agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Pages in each vCPU's share of the data region.
    pub share_pages: u64,
}

impl Layout {
    /// Computes the layout (the data region `[1 MiB, mem_bytes)` split evenly).
    pub fn new(mem_bytes: u64, vcpus: u32) -> Layout {
        let data_pages = mem_bytes.saturating_sub(DATA_GPA) / PAGE_SIZE;
        let share_pages = data_pages / u64::from(vcpus.max(1));
        Layout {
            mem_bytes,
            vcpus,
            share_pages,
        }
    }

    /// GPA of a vCPU's counter.
    pub fn counter_gpa(&self, vcpu: u32) -> u64 {
        COUNTER_GPA + u64::from(vcpu) * PAGE_SIZE
    }

    /// GPA of the first page of a vCPU's share.
    pub fn share_gpa(&self, vcpu: u32) -> u64 {
        DATA_GPA + u64::from(vcpu) * self.share_pages * PAGE_SIZE
    }

    /// Pages of its share a vCPU's workload writes (working set: its part of W; idle: 0).
    pub fn touched_pages(&self, workload: &Workload, vcpu: u32) -> u64 {
        match *workload {
            Workload::Idle => 0,
            Workload::WorkingSet { pages } => {
                let n = u64::from(self.vcpus);
                pages / n + u64::from(u64::from(vcpu) < pages % n)
            }
            Workload::Sweep { .. } | Workload::Random { .. } => self.share_pages,
        }
    }

    /// Pages of a vCPU's share in the random workload's hot set (the first 1/8, at least 1).
    pub fn hot_pages(&self) -> u64 {
        (self.share_pages / 8).max(1)
    }
}

/// Register values a vCPU starts the program with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryRegs {
    /// Instruction pointer (an entry point).
    pub rip: u64,
    /// Share base GPA.
    pub rdi: u64,
    /// Pages.
    pub rsi: u64,
    /// Sweep: ticks per page; random: xorshift state.
    pub r8: u64,
    /// Random: hot pages.
    pub r9: u64,
    /// Sweep: max lag ticks; random: hot threshold of 256.
    pub r10: u64,
    /// Counter GPA.
    pub r12: u64,
}

/// A never-zero xorshift64 seed for one vCPU.
pub fn xorshift_seed(seed: u64, vcpu: u32) -> u64 {
    let s = seed ^ u64::from(vcpu);
    if s == 0 {
        0x9e37_79b9_7f4a_7c15
    } else {
        s
    }
}

/// The registers that start `workload` on `vcpu`; `tsc_hz` paces the sweep.
pub fn entry_regs(layout: &Layout, workload: &Workload, vcpu: u32, tsc_hz: u64) -> EntryRegs {
    let base = EntryRegs {
        rip: CODE_GPA + ENTRY_IDLE,
        rdi: layout.share_gpa(vcpu),
        rsi: layout.touched_pages(workload, vcpu),
        r12: layout.counter_gpa(vcpu),
        ..Default::default()
    };
    match *workload {
        Workload::Idle => base,
        Workload::WorkingSet { .. } if base.rsi == 0 => base,
        Workload::WorkingSet { .. } => EntryRegs {
            rip: CODE_GPA + ENTRY_WORKING_SET,
            ..base
        },
        Workload::Sweep { pages_per_sec } => {
            let per_vcpu = (pages_per_sec / u64::from(layout.vcpus)).max(1);
            EntryRegs {
                rip: CODE_GPA + ENTRY_SWEEP,
                r8: (tsc_hz / per_vcpu).max(1),
                // Never catch up more than 20 ms of missed writes in a burst.
                r10: tsc_hz / 50,
                ..base
            }
        }
        Workload::Random { seed, hot_percent } => EntryRegs {
            rip: CODE_GPA + ENTRY_RANDOM,
            r8: xorshift_seed(seed, vcpu),
            r9: layout.hot_pages(),
            r10: u64::from(hot_percent.min(100)) * 256 / 100,
            ..base
        },
    }
}

/// Writes page tables, GDT and program into low memory; the data region is left untouched.
pub fn write_low_memory(
    mem: &GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>,
    layout: &Layout,
) -> Result<()> {
    mem.write_obj(PDPT_GPA | TABLE_FLAGS, GuestAddress(PML4_GPA))?;
    let pds = layout.mem_bytes.div_ceil(ONE_GIB);
    for i in 0..pds {
        let pd = PD_GPA + i * PAGE_SIZE;
        mem.write_obj(pd | TABLE_FLAGS, GuestAddress(PDPT_GPA + i * 8))?;
    }
    let large_pages = layout.mem_bytes / TWO_MIB;
    for j in 0..large_pages {
        mem.write_obj(
            (j * TWO_MIB) | LARGE_PAGE_FLAGS,
            GuestAddress(PD_GPA + j * 8),
        )?;
    }
    mem.write_obj(GDT_USER_CODE, GuestAddress(GDT_GPA + 3 * 8))?;
    mem.write_obj(GDT_USER_DATA, GuestAddress(GDT_GPA + 4 * 8))?;
    mem.write_slice(&PROGRAM, GuestAddress(CODE_GPA))?;
    for v in 0..layout.vcpus {
        mem.store(0u64, GuestAddress(layout.counter_gpa(v)), Ordering::Release)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_low_memory() {
        let l = Layout::new(crate::config::MAX_MEM_BYTES, crate::config::MAX_VCPUS);
        assert!(PD_GPA + (l.mem_bytes / ONE_GIB) * PAGE_SIZE <= COUNTER_GPA);
        assert!(l.counter_gpa(l.vcpus - 1) + PAGE_SIZE <= DATA_GPA);
        assert!(CODE_GPA + PROGRAM.len() as u64 <= PD_GPA);
        let l = Layout::new(8 << 20, 2);
        assert_eq!(l.share_pages, (7 << 20) / 4096 / 2);
        assert_eq!(l.share_gpa(1), DATA_GPA + l.share_pages * 4096);
    }

    #[test]
    fn working_set_split() {
        let l = Layout::new(64 << 20, 3);
        let w = Workload::WorkingSet { pages: 10 };
        let parts: Vec<u64> = (0..3).map(|v| l.touched_pages(&w, v)).collect();
        assert_eq!(parts, vec![4, 3, 3]);
    }
}
