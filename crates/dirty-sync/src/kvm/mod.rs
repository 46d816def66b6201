//! KVM dirty tracking: the dirty-bitmap listener and the raw ioctls it needs.

mod bitmap_listener;
pub mod ioctls;

pub use bitmap_listener::{KvmBitmapConfig, KvmBitmapListener, ProtectMode};
