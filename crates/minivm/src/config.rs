//! What to build: the VM's size, vCPUs, backend and dirtying workload.

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::PAGE_SIZE;

/// 2 MiB: guest RAM must be a multiple of this (one large page).
pub const MEM_ALIGN_BYTES: u64 = 2 << 20;
/// Smallest guest RAM accepted: 1 MiB of low memory plus some data.
pub const MIN_MEM_BYTES: u64 = 4 << 20;
/// Largest guest RAM accepted (limited by the page directories that fit in low memory).
pub const MAX_MEM_BYTES: u64 = 64 << 30;
/// Most vCPUs accepted (limited by the counter pages that fit in low memory).
pub const MAX_VCPUS: u32 = 64;

/// The memory-dirtying program every vCPU runs; each has a ground truth dirty set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Bump the counter and yield to the host (~100 times a second); dirties only counter pages.
    Idle,
    /// Write the round number into each of `pages` pages (whole guest, split across vCPUs), round and round.
    WorkingSet {
        /// Pages in the working set, for the whole guest.
        pages: u64,
    },
    /// Write pages in order through each vCPU's share, paced by the TSC.
    Sweep {
        /// Pages written per second, for the whole guest.
        pages_per_sec: u64,
    },
    /// Seeded xorshift64 page picks: `hot_percent` of writes in the first 1/8 of the share.
    Random {
        /// Seed (each vCPU uses `seed ^ vcpu`).
        seed: u64,
        /// Percentage of writes that land in the hot set (0..=100).
        hot_percent: u8,
    },
    /// Like working-set, but each round rewrites `bytes_per_page` bytes at the start of
    /// each page with incompressible data that changes every round (a xorshift64 stream
    /// seeded by round and page; the first round fills whole pages).
    Dense {
        /// Pages rewritten every round, for the whole guest.
        pages: u64,
        /// Bytes rewritten at the start of each page every round (8..=4096, a multiple of 8).
        bytes_per_page: u64,
    },
    /// A skewed working set, like a cache or a database: each write rewrites one whole
    /// page with fresh incompressible data, the page picked Zipf-like (rank `i` of the
    /// vCPU's part of `pages` drawn with probability about `1/i`), paced by the TSC. Its
    /// unique dirty rate grows with the window.
    Zipf {
        /// Pages the writes land in, for the whole guest.
        pages: u64,
        /// Page writes per second, for the whole guest.
        writes_per_sec: u64,
    },
    /// vCPUs that differ: vCPU 0 runs a working set of `pages` (all of them, in its own
    /// share); every other vCPU rewrites one page round and round, so its counter
    /// counts at full speed while it dirties almost nothing (who a throttle slowed
    /// shows in the counters).
    Lopsided {
        /// Pages vCPU 0 rewrites every round.
        pages: u64,
    },
}

/// Zipf's page writes per second when `zipf=N` gives no rate.
pub const ZIPF_DEFAULT_WRITES_PER_SEC: u64 = 200_000;

impl std::fmt::Display for Workload {
    /// The form [`Workload::from_str`] accepts (`working-set=4096`, `random=42,80`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Idle => write!(f, "idle"),
            Workload::WorkingSet { pages } => write!(f, "working-set={pages}"),
            Workload::Sweep { pages_per_sec } => write!(f, "sweep={pages_per_sec}"),
            Workload::Random { seed, hot_percent } => write!(f, "random={seed},{hot_percent}"),
            Workload::Dense {
                pages,
                bytes_per_page,
            } => write!(f, "dense={pages},{bytes_per_page}"),
            Workload::Zipf {
                pages,
                writes_per_sec,
            } => write!(f, "zipf={pages},{writes_per_sec}"),
            Workload::Lopsided { pages } => write!(f, "lopsided={pages}"),
        }
    }
}

impl FromStr for Workload {
    type Err = Error;

    /// Parses `idle`, `working-set=4096`, `working-set=16M`, `sweep=R`, `random=SEED,HOT%`,
    /// `dense=N[,BYTES]`, `zipf=N[,WRITES_PER_SEC]` and `lopsided=N` (N in pages or as a
    /// size: `16M`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadWorkload {
            input: s.to_string(),
        };
        let t = s.trim();
        if t == "idle" {
            return Ok(Workload::Idle);
        }
        let (name, arg) = t.split_once('=').ok_or_else(bad)?;
        // A page count, or a page-aligned byte size with a K/M/G suffix.
        let pages = |arg: &str| -> Result<u64> {
            let arg = arg.trim();
            if arg.ends_with(['K', 'k', 'M', 'm', 'G', 'g']) {
                let bytes = parse_size_bytes(arg).map_err(|_| bad())?;
                if bytes % PAGE_SIZE != 0 {
                    return Err(bad());
                }
                Ok(bytes / PAGE_SIZE)
            } else {
                arg.parse::<u64>().map_err(|_| bad())
            }
        };
        let number = |arg: &str| arg.trim().parse::<u64>().map_err(|_| bad());
        match name {
            "working-set" => Ok(Workload::WorkingSet { pages: pages(arg)? }),
            "lopsided" => match pages(arg)? {
                0 => Err(bad()),
                pages => Ok(Workload::Lopsided { pages }),
            },
            "dense" => {
                let (n, bytes) = match arg.split_once(',') {
                    Some((n, b)) => (n, number(b)?),
                    None => (arg, PAGE_SIZE),
                };
                if bytes == 0 || bytes > PAGE_SIZE || bytes % 8 != 0 {
                    return Err(bad());
                }
                Ok(Workload::Dense {
                    pages: pages(n)?,
                    bytes_per_page: bytes,
                })
            }
            "zipf" => {
                let (n, rate) = match arg.split_once(',') {
                    Some((n, r)) => (n, number(r)?),
                    None => (arg, ZIPF_DEFAULT_WRITES_PER_SEC),
                };
                let pages = pages(n)?;
                if rate == 0 || pages == 0 {
                    return Err(bad());
                }
                Ok(Workload::Zipf {
                    pages,
                    writes_per_sec: rate,
                })
            }
            "sweep" => {
                let pages_per_sec = arg.parse::<u64>().map_err(|_| bad())?;
                if pages_per_sec == 0 {
                    return Err(bad());
                }
                Ok(Workload::Sweep { pages_per_sec })
            }
            "random" => {
                let (seed, hot) = arg.split_once(',').ok_or_else(bad)?;
                let seed = seed.trim().parse::<u64>().map_err(|_| bad())?;
                let hot = hot.trim().trim_end_matches('%');
                let hot_percent = hot.parse::<u8>().map_err(|_| bad())?;
                if hot_percent > 100 {
                    return Err(bad());
                }
                Ok(Workload::Random { seed, hot_percent })
            }
            _ => Err(bad()),
        }
    }
}

/// Parses a byte size: plain bytes (`4096`) or with a binary K/M/G suffix (`512M`, `1G`).
pub fn parse_size_bytes(s: &str) -> Result<u64> {
    let bad = || Error::BadSize {
        input: s.to_string(),
    };
    let t = s.trim();
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    let n = digits.parse::<u64>().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Which engine runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// KVM if /dev/kvm opens, else host threads.
    #[default]
    Auto,
    /// A real KVM VM (error if /dev/kvm is unusable).
    Kvm,
    /// Host threads writing through vm-memory (no /dev/kvm needed).
    Threads,
}

/// Everything needed to build a [`crate::MiniVm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest RAM in bytes (multiple of 2 MiB, at least 4 MiB). Default 1 GiB.
    pub mem_bytes: u64,
    /// Number of vCPUs (1..=64). Default 1.
    pub vcpus: u32,
    /// The dirtying program. Default idle.
    pub workload: Workload,
    /// Largest KVM memory slot in bytes (multiple of 2 MiB). Default 1 GiB.
    pub slot_bytes: u64,
    /// KVM or host threads.
    pub backend: Backend,
    /// Register slots with `KVM_MEM_LOG_DIRTY_PAGES` from the start.
    pub dirty_log: bool,
    /// Dirty ring entries per vCPU (0 = no ring; else a power of two within the kernel's max).
    pub dirty_ring_entries: u32,
    /// Fault all of guest RAM in when the VM is built (QEMU's `-mem-prealloc`): a
    /// destination then writes incoming pages without a page fault each (~2 µs here).
    pub prealloc: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_bytes: 1 << 30,
            vcpus: 1,
            workload: Workload::Idle,
            slot_bytes: 1 << 30,
            backend: Backend::Auto,
            dirty_log: false,
            dirty_ring_entries: 0,
            prealloc: false,
        }
    }
}

impl VmConfig {
    /// Checks sizes and counts, with an error that says which rule was broken.
    pub fn validate(&self) -> Result<()> {
        let cfg = |m: String| Err(Error::Config(m));
        if self.mem_bytes < MIN_MEM_BYTES || self.mem_bytes & (MEM_ALIGN_BYTES - 1) != 0 {
            return cfg(format!(
                "mem_bytes {} must be a multiple of 2 MiB and at least 4 MiB",
                self.mem_bytes
            ));
        }
        if self.mem_bytes > MAX_MEM_BYTES {
            return cfg(format!(
                "mem_bytes {} exceeds the 64 GiB maximum",
                self.mem_bytes
            ));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return cfg(format!("vcpus {} must be in 1..={MAX_VCPUS}", self.vcpus));
        }
        if self.slot_bytes == 0 || self.slot_bytes & (MEM_ALIGN_BYTES - 1) != 0 {
            return cfg(format!(
                "slot_bytes {} must be a non-zero multiple of 2 MiB",
                self.slot_bytes
            ));
        }
        if self.dirty_ring_entries != 0 && !self.dirty_ring_entries.is_power_of_two() {
            return cfg(format!(
                "dirty_ring_entries {} must be 0 or a power of two",
                self.dirty_ring_entries
            ));
        }
        let layout = crate::guest::Layout::new(self.mem_bytes, self.vcpus);
        if layout.share_pages == 0 {
            return cfg("data region too small for one page per vCPU".to_string());
        }
        match self.workload {
            Workload::WorkingSet { pages }
            | Workload::Dense { pages, .. }
            | Workload::Zipf { pages, .. } => {
                let per_vcpu = pages.div_ceil(u64::from(self.vcpus));
                if per_vcpu > layout.share_pages {
                    return cfg(format!(
                        "working set of {pages} pages does not fit: each of {} vCPUs has {} data pages",
                        self.vcpus, layout.share_pages
                    ));
                }
            }
            Workload::Lopsided { pages } if pages == 0 || pages > layout.share_pages => {
                return cfg(format!(
                    "lopsided working set of {pages} pages must be 1..={} (vCPU 0's share)",
                    layout.share_pages
                ));
            }
            Workload::Sweep { pages_per_sec: 0 } => {
                return cfg("sweep rate must be at least 1 page/s".to_string());
            }
            Workload::Random { hot_percent, .. } if hot_percent > 100 => {
                return cfg(format!("hot_percent {hot_percent} must be 0..=100"));
            }
            _ => {}
        }
        match self.workload {
            Workload::Dense { bytes_per_page, .. }
                if bytes_per_page == 0 || bytes_per_page > PAGE_SIZE || bytes_per_page % 8 != 0 =>
            {
                return cfg(format!(
                    "dense bytes per page {bytes_per_page} must be a multiple of 8 in 8..=4096"
                ));
            }
            Workload::Zipf {
                writes_per_sec: 0, ..
            } => return cfg("zipf rate must be at least 1 write/s".to_string()),
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips() {
        for w in [
            "idle",
            "working-set=4096",
            "sweep=1000",
            "random=42,80",
            "dense=65536,256",
            "zipf=65536,200000",
        ] {
            let parsed: Workload = w.parse().unwrap();
            assert_eq!(parsed.to_string(), w);
        }
        assert_eq!(
            "working-set=16M".parse::<Workload>().unwrap().to_string(),
            "working-set=4096"
        );
    }

    #[test]
    fn parses_workloads() {
        assert_eq!("idle".parse::<Workload>().ok(), Some(Workload::Idle));
        assert_eq!(
            "working-set=4096".parse::<Workload>().ok(),
            Some(Workload::WorkingSet { pages: 4096 })
        );
        assert_eq!(
            "working-set=16M".parse::<Workload>().ok(),
            Some(Workload::WorkingSet { pages: 4096 })
        );
        assert_eq!(
            "sweep=1000".parse::<Workload>().ok(),
            Some(Workload::Sweep {
                pages_per_sec: 1000
            })
        );
        assert_eq!(
            "random=42,80".parse::<Workload>().ok(),
            Some(Workload::Random {
                seed: 42,
                hot_percent: 80
            })
        );
        assert_eq!(
            "dense=4096".parse::<Workload>().ok(),
            Some(Workload::Dense {
                pages: 4096,
                bytes_per_page: 4096
            })
        );
        assert_eq!(
            "dense=256M,256".parse::<Workload>().ok(),
            Some(Workload::Dense {
                pages: 65536,
                bytes_per_page: 256
            })
        );
        assert_eq!(
            "zipf=65536".parse::<Workload>().ok(),
            Some(Workload::Zipf {
                pages: 65536,
                writes_per_sec: ZIPF_DEFAULT_WRITES_PER_SEC
            })
        );
        assert_eq!(
            "zipf=1G,1000".parse::<Workload>().ok(),
            Some(Workload::Zipf {
                pages: 262144,
                writes_per_sec: 1000
            })
        );
    }

    #[test]
    fn rejects_bad_workloads() {
        for s in [
            "",
            "busy",
            "working-set",
            "working-set=x",
            "working-set=5K",
            "sweep=0",
            "sweep=-1",
            "random=42",
            "random=42,101",
            "random=a,5",
            "idle=3",
            "dense=",
            "dense=4096,0",
            "dense=4096,4",
            "dense=4096,8192",
            "dense=4096,x",
            "zipf=0",
            "zipf=4096,0",
            "zipf=4096,",
        ] {
            let e = s.parse::<Workload>().err();
            assert!(
                matches!(e, Some(Error::BadWorkload { .. })),
                "{s:?} -> {e:?}"
            );
            assert!(e
                .map(|e| e.to_string().contains("random=SEED,HOT_PERCENT"))
                .unwrap_or(false));
        }
        // A plain number is a page count; only a byte size must be page aligned.
        assert!("working-set=1001".parse::<Workload>().is_ok());
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size_bytes("4096").ok(), Some(4096));
        assert_eq!(parse_size_bytes("512M").ok(), Some(512 << 20));
        assert_eq!(parse_size_bytes("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size_bytes("8k").ok(), Some(8192));
        for s in ["", "G", "1T", "-1", "1.5G", "99999999999999999999G"] {
            assert!(
                matches!(parse_size_bytes(s), Err(Error::BadSize { .. })),
                "{s:?}"
            );
        }
    }

    #[test]
    fn validates_configs() {
        assert!(VmConfig::default().validate().is_ok());
        let bad = [
            VmConfig {
                mem_bytes: 3 << 20,
                ..Default::default()
            },
            VmConfig {
                mem_bytes: (4 << 20) + 4096,
                ..Default::default()
            },
            VmConfig {
                mem_bytes: 128 << 30,
                ..Default::default()
            },
            VmConfig {
                vcpus: 0,
                ..Default::default()
            },
            VmConfig {
                vcpus: 65,
                ..Default::default()
            },
            VmConfig {
                slot_bytes: 4096,
                ..Default::default()
            },
            VmConfig {
                dirty_ring_entries: 1000,
                ..Default::default()
            },
            VmConfig {
                mem_bytes: 4 << 20,
                workload: Workload::WorkingSet { pages: 1 << 20 },
                ..Default::default()
            },
            VmConfig {
                mem_bytes: 4 << 20,
                workload: Workload::Dense {
                    pages: 1 << 20,
                    bytes_per_page: 4096,
                },
                ..Default::default()
            },
            VmConfig {
                workload: Workload::Dense {
                    pages: 16,
                    bytes_per_page: 12,
                },
                ..Default::default()
            },
            VmConfig {
                workload: Workload::Zipf {
                    pages: 16,
                    writes_per_sec: 0,
                },
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(matches!(c.validate(), Err(Error::Config(_))), "{c:?}");
        }
    }
}
