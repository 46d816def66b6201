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
/// Offset in a vCPU's counter page of its page-write count (u64): every workload but
/// idle adds 1 per page it writes.
pub const PAGE_WRITES_OFFSET: u64 = 8;
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
pub const ENTRY_SWEEP: u64 = 0x2f;
/// Random entry point.
pub const ENTRY_RANDOM: u64 = 0x89;
/// Dense entry point.
pub const ENTRY_DENSE: u64 = 0xe1;
/// Zipf entry point.
pub const ENTRY_ZIPF: u64 = 0x15c;

/// The guest program: x86-64 machine code, CPL 3, no stack, never faults.
/// Registers in: rdi = share base GPA, rsi = pages, r12 = counter GPA;
/// sweep: r8 = TSC ticks per page, r10 = max lag ticks;
/// random: r8 = xorshift state, r9 = hot pages, r10 = hot threshold (of 256);
/// dense: r8 = words per page after the first round;
/// zipf: r8 = TSC ticks per write, r9 = xorshift state, r10 = max lag ticks, r11 = levels.
#[rustfmt::skip]
pub const PROGRAM: [u8; 0x234] = [
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
    0x49, 0xff, 0x44, 0x24, 0x08,             // 18: inc qword [r12+8]      ; page writes += 1
    0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // 1d: add rbx, 0x1000        ; next page
    0x48, 0xff, 0xc9,                         // 24: dec rcx
    0x75, 0xec,                               // 27: jnz ws_page
    0x49, 0x89, 0x04, 0x24,                   // 29: mov [r12], rax         ; counter = round
    0xeb, 0xdd,                               // 2d: jmp ws_round
    // sweep (0x2f):
    0x0f, 0x31,                               // 2f: rdtsc
    0x48, 0xc1, 0xe2, 0x20,                   // 31: shl rdx, 32
    0x48, 0x09, 0xd0,                         // 35: or rax, rdx            ; rax = TSC
    0x49, 0x89, 0xc1,                         // 38: mov r9, rax            ; next deadline = now
    0x31, 0xdb,                               // 3b: xor ebx, ebx           ; page index = 0
    0x0f, 0x31,                               // 3d: rdtsc                  ; sweep_loop:
    0x48, 0xc1, 0xe2, 0x20,                   // 3f: shl rdx, 32
    0x48, 0x09, 0xd0,                         // 43: or rax, rdx            ; rax = TSC
    0x4c, 0x39, 0xc8,                         // 46: cmp rax, r9
    0x73, 0x04,                               // 49: jae sweep_due          ; deadline reached
    0xe6, 0x81,                               // 4b: out 0x81, al           ; ahead: host naps briefly
    0xeb, 0xee,                               // 4d: jmp sweep_loop
    0x48, 0x89, 0xc1,                         // 4f: mov rcx, rax           ; sweep_due:
    0x4c, 0x29, 0xc9,                         // 52: sub rcx, r9            ; lag = now - deadline
    0x4c, 0x39, 0xd1,                         // 55: cmp rcx, r10
    0x76, 0x03,                               // 58: jbe sweep_write
    0x49, 0x89, 0xc1,                         // 5a: mov r9, rax            ; too far behind: resync, no burst
    0x48, 0x89, 0xd8,                         // 5d: mov rax, rbx           ; sweep_write:
    0x48, 0xc1, 0xe0, 0x0c,                   // 60: shl rax, 12
    0x48, 0x01, 0xf8,                         // 64: add rax, rdi           ; rax = page GPA
    0x49, 0x8b, 0x0c, 0x24,                   // 67: mov rcx, [r12]
    0x48, 0xff, 0xc1,                         // 6b: inc rcx                ; pages written so far
    0x48, 0x89, 0x08,                         // 6e: mov [rax], rcx         ; write the page
    0x49, 0x89, 0x0c, 0x24,                   // 71: mov [r12], rcx         ; counter = pages written
    0x49, 0xff, 0x44, 0x24, 0x08,             // 75: inc qword [r12+8]      ; page writes += 1
    0x4d, 0x01, 0xc1,                         // 7a: add r9, r8             ; next deadline
    0x48, 0xff, 0xc3,                         // 7d: inc rbx
    0x48, 0x39, 0xf3,                         // 80: cmp rbx, rsi
    0x72, 0xb8,                               // 83: jb sweep_loop
    0x31, 0xdb,                               // 85: xor ebx, ebx           ; wrap to the first page
    0xeb, 0xb4,                               // 87: jmp sweep_loop
    // random (0x89):
    0x4c, 0x89, 0xc0,                         // 89: mov rax, r8            ; xorshift64: x ^= x << 13
    0x48, 0xc1, 0xe0, 0x0d,                   // 8c: shl rax, 13
    0x49, 0x31, 0xc0,                         // 90: xor r8, rax
    0x4c, 0x89, 0xc0,                         // 93: mov rax, r8            ; x ^= x >> 7
    0x48, 0xc1, 0xe8, 0x07,                   // 96: shr rax, 7
    0x49, 0x31, 0xc0,                         // 9a: xor r8, rax
    0x4c, 0x89, 0xc0,                         // 9d: mov rax, r8            ; x ^= x << 17
    0x48, 0xc1, 0xe0, 0x11,                   // a0: shl rax, 17
    0x49, 0x31, 0xc0,                         // a4: xor r8, rax
    0x4c, 0x89, 0xc0,                         // a7: mov rax, r8
    0x0f, 0xb6, 0xc8,                         // aa: movzx ecx, al          ; low byte decides hot/cold
    0x48, 0xc1, 0xe8, 0x08,                   // ad: shr rax, 8             ; rest picks the page
    0x31, 0xd2,                               // b1: xor edx, edx
    0x4c, 0x39, 0xd1,                         // b3: cmp rcx, r10
    0x72, 0x05,                               // b6: jb random_hot
    0x48, 0xf7, 0xf6,                         // b8: div rsi                ; rdx = page in share
    0xeb, 0x03,                               // bb: jmp random_write
    0x49, 0xf7, 0xf1,                         // bd: div r9                 ; random_hot: rdx = page in hot set
    0x48, 0xc1, 0xe2, 0x0c,                   // c0: shl rdx, 12            ; random_write:
    0x48, 0x01, 0xfa,                         // c4: add rdx, rdi           ; rdx = page GPA
    0x49, 0xff, 0xc5,                         // c7: inc r13                ; sequence number
    0x4c, 0x89, 0x2a,                         // ca: mov [rdx], r13         ; write it
    0x49, 0xff, 0x44, 0x24, 0x08,             // cd: inc qword [r12+8]      ; page writes += 1
    0x41, 0xf7, 0xc5, 0xff, 0x0f, 0x00, 0x00, // d2: test r13d, 0xfff
    0x75, 0xae,                               // d9: jnz random
    0x49, 0xff, 0x04, 0x24,                   // db: inc qword [r12]        ; every 4096 writes: counter += 1
    0xeb, 0xa8,                               // df: jmp random
    // dense (0xe1):
    0x49, 0xbb, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e,// e1: movabs r11,0x9e3779b97f4a7c15
    0x49, 0x8b, 0x04, 0x24,                   // eb: mov rax,qword [r12]
    // dense_round (0xef):
    0x48, 0xff, 0xc0,                         // ef: inc rax
    0x49, 0x89, 0xc5,                         // f2: mov r13,rax
    0x4d, 0x0f, 0xaf, 0xeb,                   // f5: imul r13,r11
    0x48, 0x89, 0xf1,                         // f9: mov rcx,rsi
    0x48, 0x89, 0xfb,                         // fc: mov rbx,rdi
    // dense_page (0xff):
    0x4d, 0x89, 0xc7,                         // ff: mov r15,r8
    0x48, 0x83, 0xf8, 0x01,                   // 102: cmp rax,0x1
    0x75, 0x06,                               // 106: jne ff <dense_fill>
    0x41, 0xbf, 0x00, 0x02, 0x00, 0x00,       // 108: mov r15d,0x200
    // dense_fill (0x10e):
    0x48, 0x89, 0xda,                         // 10e: mov rdx,rbx
    0x4c, 0x31, 0xea,                         // 111: xor rdx,r13
    0x48, 0x83, 0xca, 0x01,                   // 114: or rdx,0x1
    0x49, 0x89, 0xde,                         // 118: mov r14,rbx
    // dense_word (0x11b):
    0x49, 0x89, 0xd2,                         // 11b: mov r10,rdx
    0x49, 0xc1, 0xe2, 0x0d,                   // 11e: shl r10,0xd
    0x4c, 0x31, 0xd2,                         // 122: xor rdx,r10
    0x49, 0x89, 0xd2,                         // 125: mov r10,rdx
    0x49, 0xc1, 0xea, 0x07,                   // 128: shr r10,0x7
    0x4c, 0x31, 0xd2,                         // 12c: xor rdx,r10
    0x49, 0x89, 0xd2,                         // 12f: mov r10,rdx
    0x49, 0xc1, 0xe2, 0x11,                   // 132: shl r10,0x11
    0x4c, 0x31, 0xd2,                         // 136: xor rdx,r10
    0x49, 0x89, 0x16,                         // 139: mov qword [r14],rdx
    0x49, 0x83, 0xc6, 0x08,                   // 13c: add r14,0x8
    0x49, 0xff, 0xcf,                         // 140: dec r15
    0x75, 0xd6,                               // 143: jne 10c <dense_word>
    0x49, 0xff, 0x44, 0x24, 0x08,             // 145: inc qword [r12+8]      ; page writes += 1
    0x48, 0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // 14a: add rbx,0x1000
    0x48, 0xff, 0xc9,                         // 151: dec rcx
    0x75, 0xa9,                               // 154: jne f0 <dense_page>
    0x49, 0x89, 0x04, 0x24,                   // 156: mov qword [r12],rax
    0xeb, 0x93,                               // 15a: jmp e0 <dense_round>
    // zipf (0x15c):
    0x49, 0xbf, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e,// 15c: movabs r15,0x9e3779b97f4a7c15
    0x0f, 0x31,                               // 166: rdtsc
    0x48, 0xc1, 0xe2, 0x20,                   // 168: shl rdx,0x20
    0x48, 0x09, 0xd0,                         // 16c: or rax,rdx
    0x49, 0x89, 0xc5,                         // 16f: mov r13,rax
    // zipf_loop (0x172):
    0x0f, 0x31,                               // 172: rdtsc
    0x48, 0xc1, 0xe2, 0x20,                   // 174: shl rdx,0x20
    0x48, 0x09, 0xd0,                         // 178: or rax,rdx
    0x4c, 0x39, 0xe8,                         // 17b: cmp rax,r13
    0x73, 0x04,                               // 17e: jae 170 <zipf_due>
    0xe6, 0x81,                               // 180: out 0x81,al
    0xeb, 0xee,                               // 182: jmp 15e <zipf_loop>
    // zipf_due (0x184):
    0x48, 0x89, 0xc1,                         // 184: mov rcx,rax
    0x4c, 0x29, 0xe9,                         // 187: sub rcx,r13
    0x4c, 0x39, 0xd1,                         // 18a: cmp rcx,r10
    0x76, 0x03,                               // 18d: jbe 17e <zipf_pick>
    0x49, 0x89, 0xc5,                         // 18f: mov r13,rax
    // zipf_pick (0x192):
    0x4d, 0x01, 0xc5,                         // 192: add r13,r8
    0x4c, 0x89, 0xc8,                         // 195: mov rax,r9
    0x48, 0xc1, 0xe0, 0x0d,                   // 198: shl rax,0xd
    0x49, 0x31, 0xc1,                         // 19c: xor r9,rax
    0x4c, 0x89, 0xc8,                         // 19f: mov rax,r9
    0x48, 0xc1, 0xe8, 0x07,                   // 1a2: shr rax,0x7
    0x49, 0x31, 0xc1,                         // 1a6: xor r9,rax
    0x4c, 0x89, 0xc8,                         // 1a9: mov rax,r9
    0x48, 0xc1, 0xe0, 0x11,                   // 1ac: shl rax,0x11
    0x49, 0x31, 0xc1,                         // 1b0: xor r9,rax
    0x41, 0x0f, 0xb7, 0xc1,                   // 1b3: movzx eax,r9w
    0x31, 0xd2,                               // 1b7: xor edx,edx
    0x49, 0xf7, 0xf3,                         // 1b9: div r11
    0x89, 0xd1,                               // 1bc: mov ecx,edx
    0x4c, 0x89, 0xc8,                         // 1be: mov rax,r9
    0x48, 0xc1, 0xe8, 0x10,                   // 1c1: shr rax,0x10
    0xbb, 0x01, 0x00, 0x00, 0x00,             // 1c5: mov ebx,0x1
    0x48, 0xd3, 0xe3,                         // 1ca: shl rbx,cl
    0x48, 0xff, 0xcb,                         // 1cd: dec rbx
    0x48, 0x21, 0xd8,                         // 1d0: and rax,rbx
    0x31, 0xd2,                               // 1d3: xor edx,edx
    0x48, 0xf7, 0xf6,                         // 1d5: div rsi
    0x48, 0xc1, 0xe2, 0x0c,                   // 1d8: shl rdx,0xc
    0x48, 0x01, 0xfa,                         // 1dc: add rdx,rdi
    0x48, 0x89, 0xd3,                         // 1df: mov rbx,rdx
    0x4d, 0x8b, 0x34, 0x24,                   // 1e2: mov r14,qword [r12]
    0x49, 0xff, 0xc6,                         // 1e6: inc r14
    0x4c, 0x89, 0xf2,                         // 1e9: mov rdx,r14
    0x49, 0x0f, 0xaf, 0xd7,                   // 1ec: imul rdx,r15
    0x48, 0x31, 0xda,                         // 1f0: xor rdx,rbx
    0x48, 0x83, 0xca, 0x01,                   // 1f3: or rdx,0x1
    0xb9, 0x00, 0x02, 0x00, 0x00,             // 1f7: mov ecx,0x200
    // zipf_word (0x1fc):
    0x48, 0x89, 0xd0,                         // 1fc: mov rax,rdx
    0x48, 0xc1, 0xe0, 0x0d,                   // 1ff: shl rax,0xd
    0x48, 0x31, 0xc2,                         // 203: xor rdx,rax
    0x48, 0x89, 0xd0,                         // 206: mov rax,rdx
    0x48, 0xc1, 0xe8, 0x07,                   // 209: shr rax,0x7
    0x48, 0x31, 0xc2,                         // 20d: xor rdx,rax
    0x48, 0x89, 0xd0,                         // 210: mov rax,rdx
    0x48, 0xc1, 0xe0, 0x11,                   // 213: shl rax,0x11
    0x48, 0x31, 0xc2,                         // 217: xor rdx,rax
    0x48, 0x89, 0x13,                         // 21a: mov qword [rbx],rdx
    0x48, 0x83, 0xc3, 0x08,                   // 21d: add rbx,0x8
    0x48, 0xff, 0xc9,                         // 221: dec rcx
    0x75, 0xd6,                               // 224: jne 1e8 <zipf_word>
    0x49, 0xff, 0x44, 0x24, 0x08,             // 226: inc qword [r12+8]      ; page writes += 1
    0x4d, 0x89, 0x34, 0x24,                   // 22b: mov qword [r12],r14
    0xe9, 0x3e, 0xff, 0xff, 0xff,             // 22f: jmp 15e <zipf_loop>
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

    /// Pages of its share a vCPU's workload writes (working set, dense, zipf: its part
    /// of N; idle: 0).
    pub fn touched_pages(&self, workload: &Workload, vcpu: u32) -> u64 {
        match *workload {
            Workload::Idle => 0,
            Workload::WorkingSet { pages }
            | Workload::Dense { pages, .. }
            | Workload::Zipf { pages, .. } => {
                let n = u64::from(self.vcpus);
                pages / n + u64::from(u64::from(vcpu) < pages % n)
            }
            Workload::Sweep { .. } | Workload::Random { .. } => self.share_pages,
            Workload::Lopsided { pages } if vcpu == 0 => pages,
            Workload::Lopsided { .. } => 1,
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
    /// Random: hot pages; zipf: xorshift state.
    pub r9: u64,
    /// Sweep, zipf: max lag ticks; random: hot threshold of 256.
    pub r10: u64,
    /// Zipf: levels ([`zipf_levels`]).
    pub r11: u64,
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

/// Seed of the zipf workload's page picks (vCPU `v` starts from `xorshift_seed(ZIPF_SEED, v)`).
pub const ZIPF_SEED: u64 = 0x5eed_2f1f;
/// Multiplier that spreads a round or write number over a page's seed.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// One xorshift64 step (13, 7, 17), as the guest program computes it.
pub fn xorshift_next(x: u64) -> u64 {
    let x = x ^ (x << 13);
    let x = x ^ (x >> 7);
    x ^ (x << 17)
}

/// The words a dense or zipf write puts at the start of the page at `gpa`: a xorshift64
/// stream seeded by `tag` (dense: the round; zipf: the write's sequence number) and the
/// page, so content is incompressible and differs between pages and between rounds.
pub fn page_words(gpa: u64, tag: u64) -> impl Iterator<Item = u64> {
    let mut x = (tag.wrapping_mul(GOLDEN) ^ gpa) | 1;
    std::iter::repeat_with(move || {
        x = xorshift_next(x);
        x
    })
}

/// Zipf levels for `pages` pages: the smallest L with 2^(L-1) >= pages (at least 1).
pub fn zipf_levels(pages: u64) -> u64 {
    u64::from(64 - pages.saturating_sub(1).leading_zeros()) + 1
}

/// The page (index in the vCPU's part) a zipf write picks from xorshift state `x`: a
/// level k uniform in [0, levels), then a page uniform below 2^k, so rank i is drawn
/// with probability about 1 / (i · levels).
pub fn zipf_page(x: u64, levels: u64, pages: u64) -> u64 {
    let k = (x & 0xffff) % levels.max(1);
    let mask = (1u64 << k) - 1;
    ((x >> 16) & mask) % pages.max(1)
}

/// The registers that start `workload` on `vcpu`; `tsc_hz` paces the sweep and zipf.
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
        Workload::WorkingSet { .. } | Workload::Lopsided { .. } => EntryRegs {
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
        Workload::Dense { .. } | Workload::Zipf { .. } if base.rsi == 0 => base,
        Workload::Dense { bytes_per_page, .. } => EntryRegs {
            rip: CODE_GPA + ENTRY_DENSE,
            r8: (bytes_per_page / 8).clamp(1, PAGE_SIZE / 8),
            ..base
        },
        Workload::Zipf { writes_per_sec, .. } => {
            let per_vcpu = (writes_per_sec / u64::from(layout.vcpus)).max(1);
            EntryRegs {
                rip: CODE_GPA + ENTRY_ZIPF,
                r8: (tsc_hz / per_vcpu).max(1),
                r9: xorshift_seed(ZIPF_SEED, vcpu),
                r10: tsc_hz / 50,
                r11: zipf_levels(base.rsi),
                ..base
            }
        }
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

    /// The embedded bytes are what `asm/program.S` assembles to (checked where GNU as
    /// is installed; the bytes are committed, so building never needs it).
    #[test]
    fn program_matches_its_source() {
        let dir = std::env::temp_dir().join(format!("minivm-asm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let obj = dir.join("p.o");
        let bin = dir.join("p.bin");
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/asm/program.S");
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
            std::process::Command::new(cmd)
                .args(args)
                .status()
                .map(|s| s.success())
        };
        match run(
            "as",
            &[
                "--64".as_ref(),
                src.as_ref(),
                "-o".as_ref(),
                obj.as_os_str(),
            ],
        ) {
            Ok(true) => {}
            Ok(false) => panic!("as failed on {src}"),
            Err(_) => {
                eprintln!("skipped: GNU as is not installed");
                return;
            }
        }
        let copied = run(
            "objcopy",
            &[
                "-O".as_ref(),
                "binary".as_ref(),
                "-j".as_ref(),
                ".text".as_ref(),
                obj.as_os_str(),
                bin.as_os_str(),
            ],
        );
        assert!(matches!(copied, Ok(true)), "objcopy failed");
        let bytes = std::fs::read(&bin).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(bytes.len(), PROGRAM.len(), "program length");
        let first_diff = bytes.iter().zip(PROGRAM.iter()).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "PROGRAM differs from asm/program.S");
    }

    #[test]
    fn dense_words_differ_by_page_and_round() {
        let a: Vec<u64> = page_words(DATA_GPA, 1).take(512).collect();
        let b: Vec<u64> = page_words(DATA_GPA, 2).take(512).collect();
        let c: Vec<u64> = page_words(DATA_GPA + PAGE_SIZE, 1).take(512).collect();
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert!(a.iter().zip(&c).all(|(x, y)| x != y));
        // Incompressible enough: no zero word, no repeated word in a page.
        let distinct: std::collections::BTreeSet<u64> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 512);
        assert!(!a.contains(&0));
    }

    #[test]
    fn zipf_is_skewed_and_its_unique_set_grows_with_the_window() {
        let pages = 32768;
        let levels = zipf_levels(pages);
        assert_eq!(levels, 16);
        assert_eq!(zipf_levels(1), 1);
        assert_eq!(zipf_levels(2), 2);
        assert_eq!(zipf_levels(3), 3);
        let mut x = xorshift_seed(ZIPF_SEED, 0);
        let mut hits = vec![0u64; pages as usize];
        let mut unique_at = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for n in 1..=400_000u64 {
            x = xorshift_next(x);
            let p = zipf_page(x, levels, pages);
            assert!(p < pages);
            hits[p as usize] += 1;
            seen.insert(p);
            if [25_000, 100_000, 400_000].contains(&n) {
                unique_at.push(seen.len() as f64);
            }
        }
        // The hottest 1 % of pages take most writes; the coldest half few.
        let hot: u64 = hits[..(pages as usize / 100)].iter().sum();
        let cold: u64 = hits[(pages as usize / 2)..].iter().sum();
        assert!(hot > 400_000 / 2, "hot {hot}");
        assert!(cold < 400_000 / 10, "cold {cold}");
        // Unique pages grow with the window, but slower than it: a rate measured over
        // one window does not predict another.
        assert!(unique_at[1] > unique_at[0] * 1.5 && unique_at[1] < unique_at[0] * 3.5);
        assert!(unique_at[2] > unique_at[1] * 1.2 && unique_at[2] < unique_at[1] * 3.5);
    }

    #[test]
    fn working_set_split() {
        let l = Layout::new(64 << 20, 3);
        let w = Workload::WorkingSet { pages: 10 };
        let parts: Vec<u64> = (0..3).map(|v| l.touched_pages(&w, v)).collect();
        assert_eq!(parts, vec![4, 3, 3]);
    }
}
