//! The guest's run state (QEMU's RunState), one machine shared by the engine and the
//! VMM's monitor.
//!
//! Every pause and resume of the vCPUs goes through [`RunControl`]: the operator's
//! `stop` and `cont`, the source's switch-over, the destination's start after the
//! commit. It holds the state under one lock while it moves the vCPUs, so the
//! reported state is always the real one, and it emits `STOP` / `RESUME` only when
//! the vCPUs really stop or start.
//!
//! ```text
//!  source                                       destination
//!  running --stop--> paused                     inmigrate --(commit, autostart and
//!     |  <--cont---                                 |        the source was running)--> running
//!     |  (migrate: precopy, state unchanged)        +--(commit otherwise)--> paused
//!     v
//!  finish-migrate (vCPUs paused; STOP if they ran)
//!     |-- completed -----------------> postmigrate (migrate refused; cont resumes)
//!     |-- commit sent, no answer ----> postmigrate, in doubt (the same, and says why)
//!     '-- failed before the commit --> the state before the switch-over
//!                                      (running: RESUME; paused: stays paused)
//! ```
//!
//! The invariant the tests check: at most one running copy of the guest, and the
//! state reported here is the state of the vCPUs.

use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_channel::Receiver;
use serde::Serialize;
use tracing::{debug, info};

use crate::guest::MigratableVm;
use crate::{Error, Result};

/// QEMU's RunState: the values Ferry has (`query-status`'s `status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Stopped by `stop`, or a destination held by `-S`.
    Paused,
    /// A destination waiting for or receiving its guest.
    Inmigrate,
    /// Stop-and-copy of an outgoing migration: vCPUs paused, the rest being sent.
    FinishMigrate,
    /// An outgoing migration handed the guest over (or may have: in doubt). The vCPUs
    /// stay paused and a new migration is refused until `cont`.
    Postmigrate,
    /// `quit` was received.
    Shutdown,
}

impl RunState {
    /// True only when the vCPUs run (`query-status`'s `running`).
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }

    /// QEMU's name (`running`, `finish-migrate`, ...).
    pub fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Inmigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Postmigrate => "postmigrate",
            RunState::Shutdown => "shutdown",
        }
    }
}

/// Something that happened to the guest or its migration, in the order it happened
/// (QMP events are made from these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationEvent {
    /// The outgoing migration's status changed (QMP `MIGRATION`).
    Status(stats::MigrationStatus),
    /// A dirty-log sync finished pass `n` (QMP `MIGRATION_PASS`).
    Pass(u64),
    /// The vCPUs stopped (QMP `STOP`).
    Stop,
    /// The vCPUs started (QMP `RESUME`).
    Resume,
}

/// How an outgoing switch-over ended, for [`RunControl::end_switchover`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SwitchoverEnd {
    /// The destination acknowledged: it has the guest.
    Completed,
    /// Failed or cancelled before the commit: the guest is still ours.
    Failed,
    /// The commit went out and no answer came: the destination may run the guest.
    InDoubt,
}

type Listener = Box<dyn Fn(MigrationEvent) -> bool + Send + Sync>;

struct Inner {
    state: RunState,
    /// What a switch-over that fails returns to (QEMU's `vm_old_state`); a `stop`
    /// during finish-migrate makes it `Paused`.
    before_switchover: RunState,
    /// Destination: start the guest once it is in (QEMU's autostart; `-S` clears it,
    /// so do `stop` during inmigrate; `cont` sets it).
    autostart: bool,
    /// The last switch-over was left in doubt and nobody has decided since.
    in_doubt: bool,
}

/// The run state of one guest, and the only way its vCPUs are paused and resumed.
pub struct RunControl {
    vm: Arc<dyn MigratableVm>,
    inner: Mutex<Inner>,
    listeners: Mutex<Vec<Listener>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RunControl {
    /// A guest whose vCPUs run (a booted source).
    pub fn running(vm: Arc<dyn MigratableVm>) -> Arc<RunControl> {
        Self::with_state(vm, RunState::Running, true)
    }

    /// A destination guest, not started: it starts after its incoming migration if
    /// `autostart` (QEMU's default; `-S` is `false`), else waits for `cont`.
    pub fn incoming(vm: Arc<dyn MigratableVm>, autostart: bool) -> Arc<RunControl> {
        Self::with_state(vm, RunState::Inmigrate, autostart)
    }

    fn with_state(vm: Arc<dyn MigratableVm>, state: RunState, autostart: bool) -> Arc<Self> {
        Arc::new(RunControl {
            vm,
            inner: Mutex::new(Inner {
                state,
                before_switchover: state,
                autostart,
                in_doubt: false,
            }),
            listeners: Mutex::new(Vec::new()),
        })
    }

    /// The guest.
    pub fn vm(&self) -> &Arc<dyn MigratableVm> {
        &self.vm
    }

    /// The current state.
    pub fn state(&self) -> RunState {
        lock(&self.inner).state
    }

    /// True while the last switch-over is in doubt (the destination may run the
    /// guest) and neither `cont` nor a new migration has settled it.
    pub fn in_doubt(&self) -> bool {
        lock(&self.inner).in_doubt
    }

    /// Whether a destination starts its guest after the migration (QEMU's autostart).
    pub fn autostart(&self) -> bool {
        lock(&self.inner).autostart
    }

    /// Calls `f` with every event from now on, on the thread that caused it and in
    /// order; `f` returns false to unsubscribe. `f` must not block nor call back into
    /// this run control.
    pub fn on_event(&self, f: impl Fn(MigrationEvent) -> bool + Send + Sync + 'static) {
        lock(&self.listeners).push(Box::new(f));
    }

    /// Every event from now on, over a channel.
    pub fn subscribe(&self) -> Receiver<MigrationEvent> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.on_event(move |ev| tx.send(ev).is_ok());
        rx
    }

    /// Tells every listener about `ev`.
    pub(crate) fn emit(&self, ev: MigrationEvent) {
        lock(&self.listeners).retain(|f| f(ev));
    }

    /// The operator's `stop`: pauses a running guest (`STOP`). During inmigrate it
    /// clears autostart; during finish-migrate it makes a failed switch-over leave the
    /// guest paused. Elsewhere it changes nothing, as QEMU's.
    pub fn stop(&self) -> Result<()> {
        let mut st = lock(&self.inner);
        match st.state {
            RunState::Running => {
                self.vm
                    .pause_vcpus()
                    .map_err(|e| Error::Guest(format!("pausing vCPUs: {e}")))?;
                st.state = RunState::Paused;
                debug!("run state: running -> paused (stop)");
                self.emit(MigrationEvent::Stop);
            }
            RunState::Inmigrate => st.autostart = false,
            RunState::FinishMigrate => st.before_switchover = RunState::Paused,
            RunState::Paused | RunState::Postmigrate | RunState::Shutdown => {}
        }
        Ok(())
    }

    /// The operator's `cont`: starts a paused guest (`RESUME`), also after a migration
    /// (postmigrate, and an in-doubt switch-over: the operator says the destination
    /// does not run it). During inmigrate it sets autostart. Refused during
    /// finish-migrate and after `quit`.
    pub fn cont(&self) -> Result<()> {
        let mut st = lock(&self.inner);
        match st.state {
            RunState::Paused | RunState::Postmigrate => {
                self.vm
                    .resume_vcpus()
                    .map_err(|e| Error::Guest(format!("resuming vCPUs: {e}")))?;
                debug!(from = st.state.name(), "run state: -> running (cont)");
                st.state = RunState::Running;
                st.in_doubt = false;
                self.emit(MigrationEvent::Resume);
            }
            RunState::Inmigrate => st.autostart = true,
            RunState::FinishMigrate => {
                return Err(Error::Busy(
                    "Migration is not finalized yet (finish-migrate)".into(),
                ))
            }
            RunState::Shutdown => {
                return Err(Error::Busy("The guest is shutting down".into()));
            }
            RunState::Running => {}
        }
        Ok(())
    }

    /// `quit`: the state becomes shutdown (the vCPUs are left as they are; the
    /// process ends).
    pub fn shutdown(&self) {
        lock(&self.inner).state = RunState::Shutdown;
    }

    /// Refuses an outgoing migration in the states QEMU refuses it in, with its texts.
    pub(crate) fn check_can_migrate(&self) -> Result<()> {
        let st = lock(&self.inner);
        match st.state {
            RunState::Running | RunState::Paused => Ok(()),
            RunState::Inmigrate => Err(Error::Busy(
                "Guest is waiting for an incoming migration".into(),
            )),
            RunState::Postmigrate if st.in_doubt => Err(Error::Busy(
                "Can't migrate the vm that was paused due to previous migration: its \
                 switch-over is in doubt (the destination may run it); cont only if it \
                 does not"
                    .into(),
            )),
            RunState::Postmigrate => Err(Error::Busy(
                "Can't migrate the vm that was paused due to previous migration".into(),
            )),
            RunState::FinishMigrate => Err(Error::Busy(
                "There's a migration process in progress".into(),
            )),
            RunState::Shutdown => Err(Error::Busy("The guest is shutting down".into())),
        }
    }

    /// The source's stop-and-copy begins: pauses the vCPUs if they run (`STOP`) and
    /// remembers what a failure returns to. Returns whether the guest was running.
    pub(crate) fn begin_switchover(&self) -> Result<bool> {
        let mut st = lock(&self.inner);
        let was = st.state;
        if !matches!(was, RunState::Running | RunState::Paused) {
            return Err(Error::Busy(format!(
                "cannot switch over from run state {}",
                was.name()
            )));
        }
        // In finish-migrate before the pause: a pause that panics leaves the vCPUs in
        // an unknown state, and the end of the switch-over (`end_switchover`, which
        // the migration thread calls however it ends) then returns them to `was`.
        debug!(from = was.name(), "run state: -> finish-migrate");
        st.before_switchover = was;
        st.state = RunState::FinishMigrate;
        if was == RunState::Running {
            if let Err(e) = self.vm.pause_vcpus() {
                st.state = was;
                return Err(Error::Guest(format!("pausing vCPUs: {e}")));
            }
            self.emit(MigrationEvent::Stop);
        }
        Ok(was == RunState::Running)
    }

    /// The source's stop-and-copy ended. After a failure before the commit the guest
    /// returns to the state before it (resumed, `RESUME`, only if it ran and nobody
    /// stopped it since); otherwise it stays paused in postmigrate.
    pub(crate) fn end_switchover(&self, end: SwitchoverEnd) -> Result<()> {
        let mut st = lock(&self.inner);
        if st.state != RunState::FinishMigrate {
            return Ok(());
        }
        debug!(?end, "run state: the switch-over ended");
        match end {
            SwitchoverEnd::Completed => st.state = RunState::Postmigrate,
            SwitchoverEnd::InDoubt => {
                st.state = RunState::Postmigrate;
                st.in_doubt = true;
            }
            SwitchoverEnd::Failed => {
                // Paused until the vCPUs really run: a resume that fails or panics
                // leaves the guest paused, for `cont` to retry.
                st.state = RunState::Paused;
                if st.before_switchover == RunState::Running {
                    self.vm
                        .resume_vcpus()
                        .map_err(|e| Error::Guest(format!("resuming vCPUs: {e}")))?;
                    st.state = RunState::Running;
                    self.emit(MigrationEvent::Resume);
                }
            }
        }
        Ok(())
    }

    /// The destination's guest is in and the source committed: starts it (`RESUME`)
    /// if autostart is on and the source's guest was running, else leaves it paused.
    /// Returns whether it started. Decided under the lock, so a `stop` or `cont` that
    /// races with the commit is never lost.
    pub(crate) fn finish_incoming(&self, source_was_running: bool) -> Result<bool> {
        let mut st = lock(&self.inner);
        if st.state != RunState::Inmigrate {
            return Err(Error::Busy(format!(
                "the guest is {}, not waiting for an incoming migration",
                st.state.name()
            )));
        }
        if st.autostart && source_was_running {
            self.vm
                .resume_vcpus()
                .map_err(|e| Error::Guest(format!("resuming: {e}")))?;
            st.state = RunState::Running;
            info!("guest resumed on the destination");
            self.emit(MigrationEvent::Resume);
            Ok(true)
        } else {
            st.state = RunState::Paused;
            info!(
                autostart = st.autostart,
                source_was_running, "guest held paused on the destination (waits for cont)"
            );
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dirty_sync::{AddressSpace, RamBlock};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// A guest whose only state is whether its vCPUs run; it counts pauses and
    /// resumes that did nothing (a pause of paused vCPUs is a bug in the caller).
    struct Vcpus {
        space: Arc<AddressSpace>,
        running: AtomicBool,
        redundant: AtomicU64,
        fail_resume: AtomicBool,
    }

    impl Vcpus {
        fn new(running: bool) -> Arc<Self> {
            let block = RamBlock::new(
                "ram0",
                0,
                dirty_sync::HostMemory::anonymous(4096).unwrap(),
                0,
                0,
            );
            Arc::new(Vcpus {
                space: Arc::new(AddressSpace::new(vec![block]).expect("block")),
                running: AtomicBool::new(running),
                redundant: AtomicU64::new(0),
                fail_resume: AtomicBool::new(false),
            })
        }
    }

    impl MigratableVm for Vcpus {
        fn address_space(&self) -> &Arc<AddressSpace> {
            &self.space
        }
        fn pause_vcpus(&self) -> std::result::Result<(), crate::GuestError> {
            if !self.running.swap(false, Ordering::SeqCst) {
                self.redundant.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
        fn resume_vcpus(&self) -> std::result::Result<(), crate::GuestError> {
            if self.fail_resume.load(Ordering::SeqCst) {
                return Err("resume failed".into());
            }
            if self.running.swap(true, Ordering::SeqCst) {
                self.redundant.fetch_add(1, Ordering::SeqCst);
            }
            Ok(())
        }
        fn save_device_state(&self) -> std::result::Result<Vec<u8>, crate::GuestError> {
            Ok(Vec::new())
        }
        fn load_device_state(&self, _: &[u8]) -> std::result::Result<(), crate::GuestError> {
            Ok(())
        }
    }

    /// One step of the model: what an operator or a migration does to the pair.
    #[derive(Clone, Copy, Debug)]
    enum Op {
        Stop(bool),
        Cont(bool),
        /// A whole migration source → destination ending as given, with `stop` on
        /// the source during its finish-migrate if the flag says so.
        Migrate(SwitchoverEnd, bool),
        /// A migration the other way.
        MigrateBack(SwitchoverEnd),
    }

    struct Side {
        vm: Arc<Vcpus>,
        rc: Arc<RunControl>,
        events: Receiver<MigrationEvent>,
    }

    impl Side {
        fn new(rc: Arc<RunControl>, vm: Arc<Vcpus>) -> Side {
            let events = rc.subscribe();
            Side { vm, rc, events }
        }
        fn running(&self) -> bool {
            self.vm.running.load(Ordering::SeqCst)
        }
        fn check(&self, what: &str) {
            assert_eq!(
                self.rc.state().is_running(),
                self.running(),
                "{what}: reported {:?}, vCPUs running {}",
                self.rc.state(),
                self.running()
            );
            assert_eq!(self.vm.redundant.load(Ordering::SeqCst), 0, "{what}");
            // Events alternate with the real changes: never two STOPs in a row.
            let mut last = None;
            for ev in self.events.try_iter() {
                assert_ne!(Some(ev), last, "{what}: {ev:?} twice in a row");
                last = Some(ev);
            }
            if let Some(ev) = last {
                assert_eq!(ev == MigrationEvent::Resume, self.running(), "{what}");
            }
        }
    }

    /// Runs one migration from `a` to `b` as the engine does, ending as `end`.
    fn migrate(a: &Side, b: &Side, end: SwitchoverEnd, stop_in_final: bool) -> bool {
        if a.rc.check_can_migrate().is_err() {
            return false;
        }
        let was_running = a.rc.begin_switchover().expect("switch-over");
        if stop_in_final {
            a.rc.stop().unwrap();
        }
        if matches!(end, SwitchoverEnd::Completed | SwitchoverEnd::InDoubt) {
            // The destination got the commit (in doubt: its Ack was lost).
            b.rc.finish_incoming(was_running).unwrap();
        }
        a.rc.end_switchover(end).unwrap();
        true
    }

    /// Random sequences of stop, cont and migrations that complete, fail or end in
    /// doubt, between two guests: never two running copies, and the reported state is
    /// always the vCPUs' real one.
    #[test]
    fn never_two_running_copies_and_the_state_is_true() {
        use proptest::prelude::*;
        let op = prop_oneof![
            any::<bool>().prop_map(Op::Stop),
            any::<bool>().prop_map(Op::Cont),
            (0..3u8, any::<bool>()).prop_map(|(e, s)| Op::Migrate(end_of(e), s)),
            (0..3u8).prop_map(|e| Op::MigrateBack(end_of(e))),
        ];
        fn end_of(e: u8) -> SwitchoverEnd {
            [
                SwitchoverEnd::Completed,
                SwitchoverEnd::Failed,
                SwitchoverEnd::InDoubt,
            ][usize::from(e % 3)]
        }
        proptest!(ProptestConfig::with_cases(2000), |(ops in prop::collection::vec(op, 1..40))| {
            let va = Vcpus::new(true);
            let a = Side::new(RunControl::running(va.clone()), va);
            // Each migration gets a fresh destination, as a real one would.
            let mut b_slot: Option<Side> = None;
            let mut a_slot = Some(a);
            for op in ops {
                let fresh = || {
                    let v = Vcpus::new(false);
                    Side::new(RunControl::incoming(v.clone(), true), v)
                };
                match op {
                    Op::Stop(on_a) | Op::Cont(on_a) => {
                        let (side, other) = if on_a {
                            (a_slot.as_ref(), b_slot.as_ref())
                        } else {
                            (b_slot.as_ref(), a_slot.as_ref())
                        };
                        if let Some(s) = side {
                            if matches!(op, Op::Stop(_)) {
                                s.rc.stop().unwrap();
                            } else if !other.is_some_and(Side::running) {
                                // The operator starts a copy only while the other
                                // does not run (a `cont` beside a running copy is
                                // the operator's doing, which QEMU allows too):
                                // what is checked is that the engine never starts
                                // a second copy by itself.
                                s.rc.cont().unwrap();
                            }
                        }
                    }
                    Op::Migrate(end, stop) => {
                        if let Some(a) = a_slot.as_ref() {
                            let b = fresh();
                            if migrate(a, &b, end, stop) && end != SwitchoverEnd::Failed {
                                b_slot = Some(b);
                            }
                        }
                    }
                    Op::MigrateBack(end) => {
                        if let Some(b) = b_slot.as_ref() {
                            let a = fresh();
                            if migrate(b, &a, end, false) && end != SwitchoverEnd::Failed {
                                a_slot = Some(a);
                            }
                        }
                    }
                }
                let sides: Vec<&Side> = a_slot.iter().chain(b_slot.iter()).collect();
                for s in &sides {
                    s.check(&format!("after {op:?}"));
                }
                let running = sides.iter().filter(|s| s.running()).count();
                // `cont` on a postmigrate source is the operator overriding the
                // engine; the model never sends one there unless in doubt was settled,
                // so two running copies are the engine's fault only.
                prop_assert!(running <= 1, "two running copies after {:?}", op);
            }
        });
    }

    #[test]
    fn stop_during_the_final_phase_keeps_a_failed_migration_paused() {
        let v = Vcpus::new(true);
        let rc = RunControl::running(v.clone());
        assert!(rc.begin_switchover().unwrap());
        rc.stop().unwrap();
        rc.end_switchover(SwitchoverEnd::Failed).unwrap();
        assert_eq!(rc.state(), RunState::Paused);
        assert!(!v.running.load(Ordering::SeqCst));
    }

    #[test]
    fn postmigrate_refuses_migrate_until_cont() {
        let v = Vcpus::new(true);
        let rc = RunControl::running(v.clone());
        rc.begin_switchover().unwrap();
        rc.end_switchover(SwitchoverEnd::InDoubt).unwrap();
        assert_eq!(rc.state(), RunState::Postmigrate);
        assert!(rc.in_doubt());
        let e = rc.check_can_migrate().unwrap_err().to_string();
        assert!(e.contains("in doubt"), "{e}");
        rc.cont().unwrap();
        assert!(!rc.in_doubt());
        assert!(rc.check_can_migrate().is_ok());
        assert!(v.running.load(Ordering::SeqCst));
    }

    #[test]
    fn a_resume_that_fails_reports_paused() {
        let v = Vcpus::new(true);
        let rc = RunControl::running(v.clone());
        rc.begin_switchover().unwrap();
        v.fail_resume.store(true, Ordering::SeqCst);
        assert!(rc.end_switchover(SwitchoverEnd::Failed).is_err());
        assert_eq!(rc.state(), RunState::Paused);
    }

    #[test]
    fn stop_and_cont_emit_only_on_change() {
        let v = Vcpus::new(true);
        let rc = RunControl::running(v);
        let rx = rc.subscribe();
        rc.cont().unwrap();
        rc.stop().unwrap();
        rc.stop().unwrap();
        rc.cont().unwrap();
        rc.cont().unwrap();
        let evs: Vec<_> = rx.try_iter().collect();
        assert_eq!(evs, vec![MigrationEvent::Stop, MigrationEvent::Resume]);
    }
}
