//! KVM dirty tracking: the dirty-bitmap and dirty-ring listeners and the raw ioctls they need.

mod bitmap_listener;
mod ioctls;
mod ring_listener;
mod ring_memory;
mod vm;

pub use bitmap_listener::{KvmBitmapConfig, KvmBitmapListener, ProtectMode};
pub use ring_listener::{
    KvmRingConfig, KvmRingListener, RingStats, VcpuKick, DEFAULT_RING_ENTRIES, DIRTY_GFN_BYTES,
    KVM_DIRTY_GFN_F_DIRTY, KVM_DIRTY_GFN_F_RESET,
};
pub use vm::{
    enable_dirty_ring, DirtyTracking, KvmDirtyLog, CAP_DIRTY_LOG_RING, CAP_DIRTY_LOG_RING_ACQ_REL,
};
