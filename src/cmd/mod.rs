//! The `ferry` subcommands and the flags they share.

pub mod demo;
pub mod dirty_rate;
pub mod progress;
pub mod receive;
pub mod send;
pub mod vm;

use clap::Args;
use dirty_sync::kvm::KvmBitmapConfig;
use ferry::migration_core::{Capability, CompressionParam, MigrationSource, ParametersUpdate};
use minivm::{parse_size_bytes, Backend, DirtyTracking, VmConfig, Workload};

/// Parses a byte size with an optional K/M/G suffix.
pub fn size(s: &str) -> Result<u64, String> {
    parse_size_bytes(s).map_err(|e| e.to_string())
}

/// The guest to boot.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Guest RAM (bytes, or with a K/M/G suffix).
    #[arg(long, default_value = "1G", value_parser = size)]
    pub mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// idle | working-set=W (pages, or a size like 16M) | dense=N[,BYTES] (N pages rewritten
    /// with fresh data, BYTES of each a round) | zipf=N[,WRITES/S] (skewed whole-page writes)
    /// | sweep=R (pages/s) | random=SEED,HOT%.
    #[arg(long, default_value = "working-set=16M")]
    pub workload: Workload,
    /// Run the workload on host threads even where /dev/kvm exists.
    #[arg(long)]
    pub threads: bool,
    /// Fault all guest RAM in at start (QEMU's -mem-prealloc); for a destination, no
    /// page fault per incoming page. `ferry demo` passes it to its destination only.
    #[arg(long)]
    pub prealloc: bool,
}

impl VmArgs {
    /// The minivm configuration.
    pub fn config(&self) -> VmConfig {
        VmConfig {
            mem_bytes: self.mem,
            vcpus: self.vcpus,
            workload: self.workload,
            backend: if self.threads {
                Backend::Threads
            } else {
                Backend::Auto
            },
            prealloc: self.prealloc,
            ..Default::default()
        }
    }

    /// Dirty tracking: the KVM bitmap with manual protect.
    pub fn tracking(&self) -> DirtyTracking {
        DirtyTracking::Bitmap(KvmBitmapConfig::default())
    }

    /// The same flags as command-line words (to start a matching destination).
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--mem".into(),
            self.mem.to_string(),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--workload".into(),
            self.workload.to_string(),
        ];
        if self.threads {
            v.push("--threads".into());
        }
        if self.prealloc {
            v.push("--prealloc".into());
        }
        v
    }
}

/// How to migrate.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Bandwidth cap in bytes/s (K/M/G suffix); 0 = unlimited. (QMP keeps QEMU's 128M.)
    #[arg(long, default_value = "0", value_parser = size)]
    pub max_bandwidth: u64,
    /// Longest acceptable pause of the guest, ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Parallel connections (> 1 turns the multifd capability on).
    #[arg(long, default_value_t = 1)]
    pub channels: u8,
    /// Throttle the vCPUs when the guest dirties memory faster than it can be sent.
    #[arg(long)]
    pub auto_converge: bool,
    /// Compress page batches with zstd.
    #[arg(long)]
    pub zstd: bool,
    /// Send every non-zero page whole (no sparse pages: pages with a few non-zero
    /// words normally travel as those words).
    #[arg(long)]
    pub no_sparse_pages: bool,
}

impl MigrateArgs {
    /// Applies the flags to a source.
    pub fn apply(&self, source: &MigrationSource) -> Result<(), String> {
        source
            .set_parameters(&ParametersUpdate {
                max_bandwidth: Some(self.max_bandwidth),
                downtime_limit: Some(self.downtime_limit),
                multifd_channels: Some(self.channels.max(1)),
                multifd_compression: Some(if self.zstd {
                    CompressionParam::Zstd
                } else {
                    CompressionParam::None
                }),
                x_ferry_sparse_pages: Some(!self.no_sparse_pages),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
        source
            .set_capability(Capability::Multifd, self.channels > 1)
            .map_err(|e| e.to_string())?;
        source
            .set_capability(Capability::AutoConverge, self.auto_converge)
            .map_err(|e| e.to_string())
    }
}
