//! Enabling KVM's per-vCPU dirty ring (must happen before any vCPU exists).

use kvm_bindings::kvm_enable_cap;
use kvm_ioctls::VmFd;

use crate::error::{kvm, Error, Result};

/// `KVM_CAP_DIRTY_LOG_RING`.
pub const CAP_DIRTY_LOG_RING: u32 = 192;
/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL`.
pub const CAP_DIRTY_LOG_RING_ACQ_REL: u32 = 223;
/// Bytes per dirty ring entry (`struct kvm_dirty_gfn`).
pub const DIRTY_GFN_BYTES: u64 = 16;

/// Enables the dirty ring (ACQ_REL flavour if offered) with `entries` entries per vCPU.
/// Returns the capability that was enabled (223 = ACQ_REL, 192 = plain).
pub fn enable(vm: &VmFd, entries: u32) -> Result<u32> {
    let bytes = u64::from(entries) * DIRTY_GFN_BYTES;
    let acq_rel_max = vm.check_extension_raw(u64::from(CAP_DIRTY_LOG_RING_ACQ_REL));
    let (cap, max_bytes) = if acq_rel_max > 0 {
        (CAP_DIRTY_LOG_RING_ACQ_REL, acq_rel_max)
    } else {
        (
            CAP_DIRTY_LOG_RING,
            vm.check_extension_raw(u64::from(CAP_DIRTY_LOG_RING)),
        )
    };
    if max_bytes <= 0 {
        return Err(Error::DirtyRing(
            "this KVM does not support the dirty ring".to_string(),
        ));
    }
    if bytes > max_bytes as u64 {
        return Err(Error::DirtyRing(format!(
            "{entries} entries ({bytes} bytes) exceed the kernel maximum of {} entries ({max_bytes} bytes)",
            max_bytes as u64 / DIRTY_GFN_BYTES
        )));
    }
    let mut cap_req = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    cap_req.args[0] = bytes;
    vm.enable_cap(&cap_req)
        .map_err(kvm("KVM_ENABLE_CAP(dirty ring)"))?;
    tracing::debug!(
        entries,
        acq_rel = cap == CAP_DIRTY_LOG_RING_ACQ_REL,
        "KVM dirty ring enabled"
    );
    Ok(cap)
}
