//! The machine as the QMP server sees it: run state and the stop/cont/quit controls.
//! The VMM implements [`Machine`]; the server never touches vCPUs itself.

use serde::Serialize;

/// QEMU's RunState, the values Ferry reports (`query-status`'s `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Stopped by `stop` (or not started).
    Paused,
    /// Waiting for or receiving an incoming migration.
    Inmigrate,
    /// Stop-and-copy of an outgoing migration: vCPUs paused, the rest being sent.
    FinishMigrate,
    /// An outgoing migration completed; the guest runs on the destination now.
    Postmigrate,
    /// `quit` was received.
    Shutdown,
}

impl RunState {
    /// True for the states in which vCPUs run (`query-status`'s `running`).
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }
}

/// The VMM's side of `query-status`, `stop`, `cont` and `quit`.
pub trait Machine: Send + Sync {
    /// Whether the vCPUs run ([`RunState::Running`]) or not ([`RunState::Paused`]);
    /// the server layers the migration states on top.
    fn status(&self) -> RunState;
    /// Pauses every vCPU; returns once none runs.
    fn stop(&self) -> Result<(), String>;
    /// Lets the vCPUs run again (starts them on a destination that never ran).
    fn cont(&self) -> Result<(), String>;
    /// Ends the process (called after the reply to `quit` was written).
    fn quit(&self);
    /// An incoming migration failed and the VMM should exit, as QEMU does; by
    /// default prints the reason and calls [`Machine::quit`].
    fn incoming_failed(&self, reason: &str) {
        eprintln!("incoming migration failed: {reason}");
        self.quit();
    }
}
