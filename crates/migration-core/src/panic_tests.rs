//! A panic on an engine thread (the engine's own code, a VMM callback, a dirty-log
//! listener) never wedges the engine: the migration ends `failed` saying it panicked
//! and why, the source guest runs again if the engine paused it, and the next
//! migration works; a dirty-rate measurement ends with the error and the next one runs.
//!
//! The panics come from [`PanickyVm`], through the public `MigratableVm` and
//! `MemoryListener` traits, where a real VMM's bug would panic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use stats::{DirtyRateMode, DirtyRateStatus, MigrationStatus};

use crate::test_vm::{PanicAt, PanickyVm, DIRTY_PER_SYNC};
use crate::{
    incoming, DirtyRateArgs, DirtyRateJob, IncomingReport, MigratableVm, MigrationEvent,
    MigrationSource, ParametersUpdate, Result, RunState,
};

/// Guest size: 1 MiB.
const PAGES: u64 = 256;

/// A `mem:` URI no other test uses.
fn mem_uri() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("mem:panic-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Migrates `source` into a fresh guest: the final status, the destination guest and
/// what its receiving side returned.
fn migrate(source: &MigrationSource) -> (MigrationStatus, Arc<PanickyVm>, Result<IncomingReport>) {
    migrate_to(source, PAGES)
}

/// [`migrate`] into a guest of `pages` pages.
fn migrate_to(
    source: &MigrationSource,
    pages: u64,
) -> (MigrationStatus, Arc<PanickyVm>, Result<IncomingReport>) {
    let dst = PanickyVm::new(pages, 0x80);
    let inc = incoming(dst.clone(), &mem_uri(), false).expect("bind the destination");
    source
        .migrate(&inc.uri().to_string())
        .expect("migrate starts");
    let status = source.wait();
    (status, dst, inc.wait())
}

/// Arms `at`'s `nth` call to panic, migrates, and checks the failure; then migrates
/// again, which must complete. `paused`: the engine had paused the guest when it
/// panicked (and must have resumed it exactly once).
fn panic_then_migrate_again(at: PanicAt, nth: u64, paused: bool) {
    let src = PanickyVm::new(PAGES, 1);
    let source = MigrationSource::new(src.clone());
    let events = source.subscribe();
    src.trap.arm(at, nth);
    let (status, dst, received) = migrate(&source);
    let info = source.query();
    assert!(!src.trap.armed(), "{at:?}: the injected panic happened");
    assert_eq!(status, MigrationStatus::Failed, "{at:?}: {info:?}");
    let desc = info.error_desc.clone().unwrap_or_default();
    assert!(
        desc.contains("panicked") && desc.contains(&format!("injected panic in {at:?}")),
        "{at:?}: error-desc {desc:?}"
    );
    assert!(
        received.is_err(),
        "{at:?}: the destination got a whole stream"
    );
    assert_eq!(dst.resumes.load(Ordering::SeqCst), 0, "{at:?}: two copies");
    let (pauses, resumes) = (
        src.pauses.load(Ordering::SeqCst),
        src.resumes.load(Ordering::SeqCst),
    );
    let want = if paused { (1, 1) } else { (0, 0) };
    assert_eq!((pauses, resumes), want, "{at:?}: pauses and resumes");
    assert_eq!(source.run_control().state(), RunState::Running, "{at:?}");
    assert!(!source.is_active(), "{at:?}");
    assert!(
        !src.address_space().logging(),
        "{at:?}: the MIGRATION reason was dropped"
    );
    let statuses: Vec<_> = events
        .try_iter()
        .filter_map(|e| match e {
            MigrationEvent::Status(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(
        statuses.last(),
        Some(&MigrationStatus::Failed),
        "{at:?}: {statuses:?}"
    );

    let (status, dst, received) = migrate(&source);
    assert_eq!(
        status,
        MigrationStatus::Completed,
        "{at:?}, second migration: {:?}",
        source.query()
    );
    assert!(received.expect("the destination completes").resumed);
    assert!(
        dst.ram() == src.ram(),
        "{at:?}: the destination has the RAM"
    );
    assert_eq!(source.run_control().state(), RunState::Postmigrate);
}

#[test]
fn a_panic_in_the_first_dirty_log_sync_fails_the_migration_and_the_next_works() {
    // Sync 1 is the setup's; sync 2 ends the first pass, the guest running.
    panic_then_migrate_again(PanicAt::LogSync, 2, false);
}

#[test]
fn a_panic_in_a_sync_during_a_long_pass_stops_the_pass_and_the_next_migration_works() {
    // 32 MiB at 1 MiB/s: the dirty-rate period (1 s) is due long before the first
    // pass could end, and its sync (the second) panics.
    let pages = 8192;
    let src = PanickyVm::new(pages, 1);
    let source = MigrationSource::new(src.clone());
    let limit = |bytes_per_sec| ParametersUpdate {
        max_bandwidth: Some(bytes_per_sec),
        ..Default::default()
    };
    source.set_parameters(&limit(1 << 20)).unwrap();
    src.trap.arm(PanicAt::LogSync, 2);
    let (status, _dst, received) = migrate_to(&source, pages);
    assert!(!src.trap.armed(), "the injected panic happened");
    assert_failed_with_panic(&source, status, PanicAt::LogSync);
    assert!(received.is_err());
    let stats = source.stats();
    let sent =
        stats.normal_pages.load(Ordering::Relaxed) + stats.zero_pages.load(Ordering::Relaxed);
    assert!(
        sent < pages,
        "the sender thread stopped when the sync panicked: {sent} of {pages} pages sent"
    );
    assert_eq!(src.pauses.load(Ordering::SeqCst), 0);
    assert_eq!(source.run_control().state(), RunState::Running);
    source.set_parameters(&limit(0)).unwrap();
    let (status, dst, received) = migrate_to(&source, pages);
    assert_eq!(status, MigrationStatus::Completed, "{:?}", source.query());
    received.expect("the destination completes");
    assert!(dst.ram() == src.ram());
}

#[test]
fn a_panic_on_a_sender_thread_during_the_first_pass_fails_the_migration_and_the_next_works() {
    // Call 1 is `migrate`'s own; page reads on the sender thread make the rest.
    panic_then_migrate_again(PanicAt::AddressSpace, PAGES / 4, false);
}

#[test]
fn a_panic_in_pause_vcpus_resumes_the_guest_and_the_next_migration_works() {
    panic_then_migrate_again(PanicAt::PauseVcpus, 1, true);
}

#[test]
fn a_panic_on_a_final_pass_sender_thread_resumes_the_guest_and_the_next_migration_works() {
    panic_then_migrate_again(PanicAt::AddressSpaceWhilePaused, 1, true);
}

/// The must-show case.
#[test]
fn a_panic_inside_the_migration_thread_leaves_the_source_running_status_failed_and_a_second_migration_succeeds(
) {
    panic_then_migrate_again(PanicAt::SaveDeviceState, 1, true);
}

/// The destination's side: a panic while it loads the device state (before the
/// commit) ends it `failed` saying so, the source resumes its guest, and the next
/// destination receives it.
#[test]
fn a_panic_on_the_incoming_thread_fails_that_side_and_the_source_resumes_its_guest() {
    let src = PanickyVm::new(PAGES, 1);
    let source = MigrationSource::new(src.clone());
    let dst = PanickyVm::new(PAGES, 0x80);
    dst.trap.arm(PanicAt::LoadDeviceState, 1);
    let inc = incoming(dst.clone(), &mem_uri(), false).expect("bind the destination");
    let dst_stats = inc.stats().clone();
    source
        .migrate(&inc.uri().to_string())
        .expect("migrate starts");
    let status = source.wait();
    let received = inc.wait();
    assert!(!dst.trap.armed(), "the injected panic happened");
    let err = received.expect_err("the destination failed").to_string();
    assert!(
        err.contains("the incoming thread panicked") && err.contains("LoadDeviceState"),
        "{err}"
    );
    let dst_info = dst_stats.snapshot();
    assert_eq!(dst_info.status, MigrationStatus::Failed, "{dst_info:?}");
    assert!(
        dst_info.error_desc.unwrap_or_default().contains("panicked"),
        "the destination's query-migrate says why"
    );
    assert_eq!(dst.resumes.load(Ordering::SeqCst), 0, "two copies");
    assert_eq!(status, MigrationStatus::Failed, "{:?}", source.query());
    assert_eq!(source.run_control().state(), RunState::Running);
    assert_eq!(src.resumes.load(Ordering::SeqCst), 1, "resumed once");
    assert_next_migration_completes(&source, &src);
}

/// Asserts the migration failed with a panic at `at` in its error-desc.
fn assert_failed_with_panic(source: &MigrationSource, status: MigrationStatus, at: PanicAt) {
    let info = source.query();
    assert_eq!(status, MigrationStatus::Failed, "{at:?}: {info:?}");
    let desc = info.error_desc.unwrap_or_default();
    assert!(
        desc.contains("the migration thread panicked")
            && desc.contains(&format!("injected panic in {at:?}")),
        "{at:?}: error-desc {desc:?}"
    );
    assert!(!source.is_active());
}

/// Completes a migration of `src` through `source`.
fn assert_next_migration_completes(source: &MigrationSource, src: &PanickyVm) {
    let (status, dst, received) = migrate(source);
    assert_eq!(status, MigrationStatus::Completed, "{:?}", source.query());
    received.expect("the destination completes");
    assert!(dst.ram() == src.ram(), "the destination has the RAM");
}

#[test]
fn a_resume_that_panics_after_a_failed_switchover_leaves_the_guest_paused_for_cont() {
    let src = PanickyVm::new(PAGES, 1);
    let source = MigrationSource::new(src.clone());
    src.trap.arm(PanicAt::SaveDeviceState, 1);
    src.trap.arm(PanicAt::ResumeVcpus, 1);
    let (status, _dst, received) = migrate(&source);
    assert!(!src.trap.armed(), "both injected panics happened");
    // The resume's panic, during the clean-up, is the one reported.
    assert_failed_with_panic(&source, status, PanicAt::ResumeVcpus);
    assert!(received.is_err());
    // Not stuck in finish-migrate: paused, as the vCPUs may be.
    assert_eq!(source.run_control().state(), RunState::Paused);
    assert!(!src.address_space().logging());
    source.run_control().cont().expect("cont");
    assert_eq!(src.resumes.load(Ordering::SeqCst), 1);
    assert_eq!(source.run_control().state(), RunState::Running);
    assert_next_migration_completes(&source, &src);
}

#[test]
fn a_panic_while_ending_a_failed_migration_still_ends_it_failed() {
    let src = PanickyVm::new(PAGES, 1);
    let source = MigrationSource::new(src.clone());
    // A destination of another size refuses the stream; the failure's clean-up
    // resets the throttle, which panics.
    src.trap.arm(PanicAt::SetThrottle, 1);
    let (status, _dst, received) = migrate_to(&source, PAGES / 2);
    assert!(!src.trap.armed(), "the injected panic happened");
    assert_failed_with_panic(&source, status, PanicAt::SetThrottle);
    assert!(received.is_err());
    assert_eq!(source.run_control().state(), RunState::Running);
    assert_eq!(
        src.pauses.load(Ordering::SeqCst),
        src.resumes.load(Ordering::SeqCst)
    );
    assert!(
        !src.address_space().logging(),
        "the MIGRATION reason was dropped"
    );
    assert_next_migration_completes(&source, &src);
}

#[test]
fn a_panic_after_the_commit_leaves_the_source_paused_in_doubt() {
    let src = PanickyVm::new(PAGES, 1);
    let source = MigrationSource::new(src.clone());
    // Reset once the destination acknowledged: the commit went out.
    src.trap.arm(PanicAt::SetThrottle, 1);
    let (status, dst, received) = migrate(&source);
    assert!(!src.trap.armed(), "the injected panic happened");
    assert_failed_with_panic(&source, status, PanicAt::SetThrottle);
    assert!(
        source
            .query()
            .error_desc
            .is_some_and(|d| d.contains("stays paused")),
        "{:?}",
        source.query()
    );
    // The destination has the guest; the source must not run a second copy.
    assert!(received.expect("the destination completes").resumed);
    assert!(dst.ram() == src.ram());
    assert_eq!(
        (
            src.pauses.load(Ordering::SeqCst),
            src.resumes.load(Ordering::SeqCst)
        ),
        (1, 0)
    );
    let rc = source.run_control();
    assert_eq!(rc.state(), RunState::Postmigrate);
    assert!(rc.in_doubt());
    assert!(source.migrate(&mem_uri()).is_err(), "refused until cont");
    rc.cont()
        .expect("the operator says the destination does not run it");
    assert_next_migration_completes(&source, &src);
}

/// Arms `at`'s `nth` call, measures in `mode`: the measurement ends with the panic's
/// error; the next measurement runs and measures.
fn dirty_rate_panic_then_measure_again(mode: DirtyRateMode, at: PanicAt, nth: u64) {
    let vm = PanickyVm::new(PAGES, 0);
    let job = DirtyRateJob::new(vm.clone());
    vm.trap.arm(at, nth);
    job.calc(&DirtyRateArgs::millis(50, mode))
        .expect("calc starts");
    let q = job.wait(None);
    assert!(
        !vm.trap.armed(),
        "{mode:?} {at:?}: the injected panic happened"
    );
    assert_eq!(q.status, DirtyRateStatus::Measured, "{q:?}");
    assert_eq!(q.dirty_rate, Some(-1), "{q:?}");
    let error = q.ferry.and_then(|f| f.error).unwrap_or_default();
    assert!(
        error.contains("panicked") && error.contains(&format!("injected panic in {at:?}")),
        "{mode:?} {at:?}: error {error:?}"
    );
    assert!(
        !vm.address_space().logging(),
        "{mode:?} {at:?}: the DIRTY_RATE reason was dropped"
    );

    job.calc(&DirtyRateArgs::millis(50, mode))
        .expect("a new measurement starts");
    let q = job.wait(None);
    assert_eq!(q.status, DirtyRateStatus::Measured, "{q:?}");
    let ferry = q.ferry.expect("ferry fields");
    assert_eq!(ferry.error, None, "{mode:?} {at:?}");
    if mode != DirtyRateMode::PageSampling {
        assert_eq!(ferry.dirty_pages, DIRTY_PER_SYNC as f64, "{mode:?} {at:?}");
    }
}

#[test]
fn a_panic_in_the_dirty_rate_thread_ends_the_measurement_with_an_error_and_the_next_one_runs() {
    // `calc` reads the ring once to check the mode; the thread's baseline is call 2.
    dirty_rate_panic_then_measure_again(DirtyRateMode::DirtyRing, PanicAt::VcpuDirtyEntries, 2);
    // The baseline sync panics under the address space's lock.
    dirty_rate_panic_then_measure_again(DirtyRateMode::DirtyBitmap, PanicAt::LogSync, 1);
    // Page sampling reads RAM through the VM on the thread.
    dirty_rate_panic_then_measure_again(DirtyRateMode::PageSampling, PanicAt::AddressSpace, 1);
}
