//! The machine as the QMP server sees it: the process controls. The run state and
//! the vCPUs belong to `migration_core::RunControl`, which the monitor drives.

/// The VMM's side of `quit` and of a failed incoming migration.
pub trait Machine: Send + Sync {
    /// Per vCPU, a count that grows while the vCPU runs guest code (minivm's round
    /// counters), for `x-ferry-query-guest-progress`: lets a tool see from the guest
    /// itself whether it runs. `None` (the default) when the VMM has none.
    fn guest_progress(&self) -> Option<Vec<u64>> {
        None
    }
    /// Ends the process (called after the reply to `quit` was written).
    fn quit(&self);
    /// An incoming migration failed and the VMM should exit, as QEMU does; by
    /// default logs the reason (an `error` event) and calls [`Machine::quit`].
    fn incoming_failed(&self, reason: &str) {
        tracing::error!(reason, "incoming migration failed: quitting");
        self.quit();
    }
}
