//! End-to-end precopy: a source guest in this process, a `ferry receive` destination
//! in another, over loopback TCP and Unix sockets; faults and cancel.
//!
//! A migration is correct when the destination's RAM digest (taken before it resumes)
//! equals the source's at switch-over, and the guest's counters advance there.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{config, ferry, guest_lock, wait_all, Dest, TIMEOUT};
use ferry::migration_core::{
    incoming_with, ram_digest, Capability, GuestRam, IncomingOptions, MigratableVm,
    MigrationSource, ParametersUpdate, RunControl, RunState,
};
use ferry::stats::{Convergence, MigrationStatus};
use ferry::GuestVm;
use minivm::{DirtyTracking, VmConfig, Workload};

fn source_for(guest: &Arc<GuestVm>, max_bandwidth: u64, channels: u8) -> MigrationSource {
    let s = MigrationSource::new(guest.clone());
    s.set_parameters(&ParametersUpdate {
        max_bandwidth: Some(max_bandwidth),
        multifd_channels: Some(channels),
        ..Default::default()
    })
    .unwrap();
    s.set_capability(Capability::Multifd, channels > 1).unwrap();
    s
}

/// Like [`source_for`], with every written page sent whole (no sparse pages): the
/// workloads write one word per page, and sparse pages would make every stream
/// tiny. For tests that need a stream that is long, large or cannot converge.
fn whole_pages_source(guest: &Arc<GuestVm>, max_bandwidth: u64, channels: u8) -> MigrationSource {
    let s = source_for(guest, max_bandwidth, channels);
    s.set_parameters(&ParametersUpdate {
        x_ferry_sparse_pages: Some(false),
        ..Default::default()
    })
    .unwrap();
    s
}

fn boot(cfg: &VmConfig) -> Arc<GuestVm> {
    let tracking = DirtyTracking::from_ring_entries(cfg.dirty_ring_entries);
    let g = Arc::new(GuestVm::boot(cfg.clone(), tracking).unwrap());
    wait_all(&g.vm(), 2);
    g
}

/// The source guest runs again: every vCPU advances.
fn assert_source_runs(guest: &GuestVm) {
    wait_all(&guest.vm(), 2);
}

/// Sparse pages on (the default) or every page whole.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pages {
    Sparse,
    Whole,
}

fn full_migration(workload: Workload, uri: &str, channels: u8, pages: Pages) {
    let _g = guest_lock();
    let cfg = config(1 << 30, 2, workload);
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, uri);
    let source = match pages {
        Pages::Sparse => source_for(&guest, 0, channels),
        Pages::Whole => whole_pages_source(&guest, 0, channels),
    };
    source.migrate(&dest.uri).unwrap();
    let status = source.wait();
    let info = source.query();
    assert_eq!(
        status,
        MigrationStatus::Completed,
        "{workload} over {uri} x{channels} {pages:?}: {info:?}"
    );
    let digest = ram_digest(&GuestRam::new(guest.clone()));
    dest.check_completed(digest);
    let ram = info.ram.unwrap();
    assert_eq!(
        ram.dirty_sync_count,
        guest.address_space().stats().snapshot().syncs,
        "one count per sync"
    );
    assert!(info.downtime.is_some());
    // Every byte on the wire was sent either before the pause or during it, counted
    // once however many channels sent at the same time.
    assert_eq!(
        ram.precopy_bytes + ram.downtime_bytes,
        ram.transferred,
        "{workload} x{channels}: precopy + downtime bytes"
    );
    let sparse = info.ferry.unwrap().sparse_pages;
    match (pages, workload) {
        (Pages::Whole, _) => assert_eq!(sparse, 0),
        (Pages::Sparse, Workload::WorkingSet { pages }) => assert!(sparse >= pages),
        _ => {}
    }
}

fn unix_uri(tag: &str) -> String {
    let path = std::env::temp_dir().join(format!("ferry-test-{}-{tag}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    format!("unix:{}", path.display())
}

const WORKLOADS: [Workload; 6] = [
    Workload::Idle,
    Workload::WorkingSet { pages: 4096 },
    Workload::WorkingSet { pages: 65536 },
    Workload::Sweep {
        pages_per_sec: 20_000,
    },
    Workload::Dense {
        pages: 4096,
        bytes_per_page: 256,
    },
    Workload::Zipf {
        pages: 65536,
        writes_per_sec: 100_000,
    },
];

#[test]
fn tcp_one_channel_every_workload() {
    for w in WORKLOADS {
        full_migration(w, "tcp:127.0.0.1:0", 1, Pages::Sparse);
        full_migration(w, "tcp:127.0.0.1:0", 1, Pages::Whole);
    }
}

#[test]
fn tcp_two_channels_every_workload() {
    for w in WORKLOADS {
        full_migration(w, "tcp:127.0.0.1:0", 2, Pages::Sparse);
        full_migration(w, "tcp:127.0.0.1:0", 2, Pages::Whole);
    }
}

#[test]
fn unix_one_and_two_channels_every_workload() {
    for (i, w) in WORKLOADS.into_iter().enumerate() {
        full_migration(w, &unix_uri(&format!("a{i}")), 1, Pages::Sparse);
        full_migration(w, &unix_uri(&format!("b{i}")), 2, Pages::Whole);
    }
}

#[test]
fn dirty_ring_tracking_migrates() {
    let _g = guest_lock();
    let mut cfg = config(1 << 30, 2, Workload::WorkingSet { pages: 4096 });
    if !common::kvm_or_skip() {
        return; // the ring is a KVM feature; the bitmap tests cover the fallback
    }
    cfg.dirty_ring_entries = 65536;
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    // Capped so the migration iterates and the ring carries several syncs.
    let source = source_for(&guest, 256 << 20, 1);
    source.migrate(&dest.uri).unwrap();
    assert_eq!(
        source.wait(),
        MigrationStatus::Completed,
        "{:?}",
        source.query()
    );
    dest.check_completed(ram_digest(&GuestRam::new(guest.clone())));
}

/// With the KVM bitmap's deferred clear (QEMU's lazy clear), the sender re-arms each
/// chunk of pages just before it reads them. Without that, KVM would go on reporting
/// every page ever harvested (all of RAM, with INITIALLY_SET): every pass would resend
/// the whole guest and the migration would never converge.
#[test]
fn deferred_clear_re_arms_pages_as_they_are_sent() {
    let _g = guest_lock();
    if !common::kvm_or_skip() {
        return; // the deferred clear is the KVM bitmap's
    }
    // Fresh RAM: the bulk stage skips the pages never touched, which setup re-arms.
    // Preallocated: every page is touched and sent, and re-armed as it is read.
    for prealloc in [false, true] {
        let mut cfg = config(1 << 30, 2, Workload::WorkingSet { pages: 4096 });
        cfg.prealloc = prealloc;
        let tracking = DirtyTracking::Bitmap(ferry::dirty_sync::kvm::KvmBitmapConfig {
            manual_protect: true,
            deferred_clear: true,
            ..Default::default()
        });
        let guest = Arc::new(GuestVm::boot(cfg.clone(), tracking).unwrap());
        wait_all(&guest.vm(), 2);
        let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
        // Capped, so passes take a while and later syncs find the working set.
        let source = whole_pages_source(&guest, 256 << 20, 1);
        source.migrate(&dest.uri).unwrap();
        let info = poll_until(&source, "the end", |i| i.status.is_finished());
        assert_eq!(info.status, MigrationStatus::Completed, "{info:?}");
        dest.check_completed(ram_digest(&GuestRam::new(guest.clone())));
        // At most all of RAM (262144 pages, zero pages included) once, then the
        // working set a few times; a page never re-armed is reported by every sync
        // and sent again by every pass.
        let ram = info.ram.as_ref().expect("ram stats");
        let sent_pages = ram.normal + ram.duplicate;
        assert!(
            sent_pages < (1 << 18) + (1 << 17),
            "prealloc {prealloc}: {sent_pages} pages sent for a 262144-page guest: \
             pages were resent: {info:?}"
        );
    }
}

/// With `x-ferry-lazy-clear` off the listener still defers nothing: every sync re-arms
/// what it found, and a guest that writes new pages all along arrives whole.
#[test]
fn eager_clear_migrates_a_sweeping_guest() {
    let _g = guest_lock();
    if !common::kvm_or_skip() {
        return; // the deferred clear is the KVM bitmap's
    }
    let cfg = config(
        1 << 30,
        2,
        Workload::Sweep {
            pages_per_sec: 20_000,
        },
    );
    let guest = boot(&cfg);
    assert!(guest.address_space().defers_clear(), "the default listener");
    // Some pages written before (sent by the bulk stage), more during the passes.
    for v in 0..2 {
        guest.vm().wait_rounds(v, 5_000, TIMEOUT).unwrap();
    }
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    // 256 MiB/s, three times what the sweep dirties: a few passes, each finding the
    // pages written meanwhile.
    let source = whole_pages_source(&guest, 256 << 20, 1);
    source
        .set_parameters(&ParametersUpdate {
            x_ferry_lazy_clear: Some(false),
            ..Default::default()
        })
        .unwrap();
    source.migrate(&dest.uri).unwrap();
    let status = source.wait();
    assert_eq!(status, MigrationStatus::Completed, "{:?}", source.query());
    dest.check_completed(ram_digest(&GuestRam::new(guest.clone())));
}

/// A calc-dirty-rate in the middle of a migration changes none of the migration's
/// figures: its `dirty-sync-count` counts the migration's own syncs only (the address
/// space also counts the measurement's two), and the period that spans the measurement
/// still reads the working set, by Ferry's rule and by QEMU's.
#[test]
fn a_measurement_beside_a_migration_leaves_its_figures_alone() {
    use ferry::migration_core::{DirtyRateArgs, DirtyRateJob, DirtyRateMode};
    let _g = guest_lock();
    let (guest, _dest, source) = non_converging_migration();
    let syncs = |i: &ferry::stats::MigrationInfo| i.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
    let before = poll_until(&source, "a few periods", |i| {
        i.ram.as_ref().is_some_and(|r| r.dirty_pages_rate > 0) && syncs(i) >= 5
    });
    let job = DirtyRateJob::new(guest.clone());
    let space_syncs = || guest.address_space().stats().snapshot().syncs;
    let start_syncs = syncs(&before);
    job.calc(&DirtyRateArgs::millis(500, DirtyRateMode::DirtyBitmap))
        .unwrap();
    // Every period the migration closes from here until three syncs after the
    // measurement ended: (syncs, Ferry's rate, QEMU's rate). Before the measurement
    // had its own syncs, QEMU's rule read 0 for the period that spanned it; the bounds
    // here leave room for a loaded host slowing the guest.
    let mut seen = Vec::new();
    let mut measured_at = None;
    let t0 = Instant::now();
    loop {
        let i = source.query();
        assert!(!i.status.is_finished(), "{i:?}");
        assert!(t0.elapsed() < TIMEOUT, "timed out: {i:?}");
        let point = (
            syncs(&i),
            i.ram.as_ref().map_or(0, |r| r.dirty_pages_rate),
            i.ferry.as_ref().map_or(0, |f| f.new_dirty_pages_rate),
        );
        if seen.last() != Some(&point) {
            seen.push(point);
        }
        if measured_at.is_none() && job.status() == ferry::stats::DirtyRateStatus::Measured {
            measured_at = Some(point.0);
        }
        if measured_at.is_some_and(|m| point.0 >= m + 3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let measured = job.wait(None);
    assert!(measured.dirty_rate.unwrap_or(0) > 0, "{measured:?}");
    source.cancel();
    assert_eq!(source.wait(), MigrationStatus::Cancelled);
    // query-migrate answers only the status after a cancel (QEMU's shape): the
    // counter itself.
    let fin_syncs = source
        .stats()
        .dirty_sync_count
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        fin_syncs + 2,
        space_syncs(),
        "the migration counts its own syncs, not the measurement's"
    );
    // The reference is the lower of the period before the measurement and the last
    // one after it: a host loaded enough to slow the guest for the whole stretch
    // lowers both, while a reading the measurement disturbed stays below both.
    let (_, last_rate, last_new_rate) = *seen.last().unwrap();
    let r0 = (before.ram.as_ref().unwrap().dirty_pages_rate as f64).min(last_rate as f64);
    let n0 = (before.ferry.as_ref().unwrap().new_dirty_pages_rate as f64).min(last_new_rate as f64);
    for &(sync, rate, new_rate) in seen.iter().filter(|p| p.0 > start_syncs) {
        assert!(
            rate as f64 >= 0.5 * r0,
            "sync {sync}: dirty-pages-rate {rate}, {r0} before the measurement: {seen:?}"
        );
        assert!(
            new_rate as f64 >= 0.25 * n0,
            "sync {sync}: QEMU's rule read {new_rate}, {n0} before: {seen:?}"
        );
    }
}

/// The working set of [`non_converging_migration`]'s guest, in pages.
const NON_CONVERGING_PAGES: u64 = 65536;

/// A migration that cannot converge: 256 MiB of working set rewritten all the time,
/// sent whole at 128 MiB/s within 300 ms of downtime, so it iterates until cancelled,
/// one dirty-rate period after another. Started; the destination is a child process.
/// A 1 GiB, 2-vCPU guest rewriting `NON_CONVERGING_PAGES`.
fn non_converging_config() -> VmConfig {
    config(
        1 << 30,
        2,
        Workload::WorkingSet {
            pages: NON_CONVERGING_PAGES,
        },
    )
}

fn non_converging_migration() -> (Arc<GuestVm>, Dest, MigrationSource) {
    let cfg = non_converging_config();
    let guest = boot(&cfg);
    let dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let source = whole_pages_source(&guest, 128 << 20, 1);
    source.migrate(&dest.uri).unwrap();
    (guest, dest, source)
}

/// Polls until `pred` holds on the source's snapshot.
fn poll_until(
    source: &MigrationSource,
    what: &str,
    pred: impl Fn(&ferry::stats::MigrationInfo) -> bool,
) -> ferry::stats::MigrationInfo {
    let t0 = Instant::now();
    loop {
        let info = source.query();
        if pred(&info) {
            return info;
        }
        assert!(
            !info.status.is_finished() || pred(&info),
            "ended before {what}: {info:?}"
        );
        assert!(
            t0.elapsed() < TIMEOUT,
            "timed out waiting for {what}: {info:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One read of the source's numbers with the guest's counters, between two clock
/// readings (µs since the test began).
struct Poll {
    before_us: u64,
    status: MigrationStatus,
    syncs: u64,
    rate: u64,
    iterations: u64,
    /// Pages each vCPU has written so far.
    page_writes: Vec<u64>,
    after_us: u64,
}

fn poll(source: &MigrationSource, guest: &GuestVm, t0: Instant) -> Poll {
    let before_us = t0.elapsed().as_micros() as u64;
    let info = source.query();
    let page_writes = guest.vcpu_page_writes();
    let after_us = t0.elapsed().as_micros() as u64;
    let ram = info.ram.as_ref();
    Poll {
        before_us,
        status: info.status,
        syncs: ram.map_or(0, |r| r.dirty_sync_count),
        rate: ram.map_or(0, |r| r.dirty_pages_rate),
        iterations: info.ferry.as_ref().map_or(0, |f| f.iterations),
        page_writes,
        after_us,
    }
}

/// [`rate_and_truth`]'s answer while the last sync is too recent to classify.
const TOO_RECENT: &str = "the last sync is too recent";

/// What one migration's polls say about its last closed dirty-rate period: `Ok((rate,
/// truth))`, or `Err(why)` when the truth cannot be known from this run (a period
/// boundary too close to call, or page writes too sparsely observed around it).
fn rate_and_truth(polls: &[Poll], w: u64, max_sync_ns: u64) -> Result<(f64, f64), String> {
    // When each state change happened: between the last poll before and the first after.
    let between = |i: usize| (polls[i - 1].after_us, polls[i].before_us);
    let active = (1..polls.len())
        .find(|&i| polls[i].status == MigrationStatus::Active)
        .ok_or("never active")?;
    let active_at = between(active);
    let syncs: Vec<(u64, u64)> = (active.max(1)..polls.len())
        .filter(|&i| polls[i].syncs > polls[i - 1].syncs)
        .map(between)
        .collect();
    // The engine's rule (QEMU's): a period starts when the migration turns active and
    // closes at the first sync at least 1000 ms after its start.
    // The sync that closes a period is the one the sender starts when the period is
    // due, so most closes fall within our polling error of 1000 ms. Such a sync is a
    // close unless another sync follows within 50 ms (an end-of-pass sync just before
    // the due one). When that cannot be told, both readings are followed: they meet
    // again at the next sync that surely closes a period in each, and the last period
    // counts only when every reading agrees on it.
    type Span = (u64, u64);
    // (start of the open period, the last closed period)
    let mut readings: Vec<(Span, Option<(Span, Span)>)> = vec![(active_at, None)];
    for (k, &(lo, hi)) in syncs.iter().enumerate() {
        let next_soon = match syncs.get(k + 1) {
            Some(n) => n.0 < hi + 50_000,
            // The last sync seen: whether another follows is known only 50 ms later.
            None if polls.last().unwrap().before_us < hi + 50_000 => return Err(TOO_RECENT.into()),
            None => false,
        };
        let mut next = Vec::new();
        for &(start, last) in &readings {
            let surely = lo.saturating_sub(start.1) >= 1_000_000;
            let maybe = hi.saturating_sub(start.0) >= 1_000_000;
            let closed = ((lo, hi), Some((start, (lo, hi))));
            if surely || (maybe && !next_soon) {
                next.push(closed);
            } else if maybe {
                next.push(closed);
                next.push((start, last));
            } else {
                next.push((start, last));
            }
        }
        next.sort_unstable();
        next.dedup();
        if next.len() > 8 {
            return Err("too many readings of the periods".into());
        }
        readings = next;
    }
    let lasts: Vec<_> = readings.iter().map(|r| r.1).collect();
    if lasts.windows(2).any(|p| p[0] != p[1]) {
        return Err("a sync too close to a period's end to call".into());
    }
    let periods: Vec<(Span, Span)> = lasts.into_iter().flatten().take(1).collect();
    let ((a_lo, a_hi), (b_lo, b_hi)) = *periods.last().ok_or("no closed period")?;
    // Every unique page the guest wrote in the period counts. Each vCPU writes its share
    // of the working set in order, round after round, so n consecutive page writes touch
    // min(n, share) distinct pages, plus its counter page. A page counts when a sync
    // harvests it (within the sync, hence the margins), so the page writes surely
    // inside the period and those between the polls surely around it bracket the truth.
    let half_sync_us = max_sync_ns.div_ceil(2000);
    let inner = (a_hi + half_sync_us, b_lo.saturating_sub(half_sync_us));
    let outer = (a_lo.saturating_sub(half_sync_us), b_hi + half_sync_us);
    let first_inside = polls.iter().find(|p| p.before_us >= inner.0);
    let last_inside = polls.iter().rev().find(|p| p.after_us <= inner.1);
    let last_before = polls.iter().rev().find(|p| p.after_us <= outer.0);
    let Some(first_after) = polls.iter().find(|p| p.before_us >= outer.1) else {
        return Err(TOO_RECENT.into());
    };
    let (Some(first_inside), Some(last_inside), Some(last_before)) =
        (first_inside, last_inside, last_before)
    else {
        return Err("no polls inside or before the period".into());
    };
    let vcpus = first_inside.page_writes.len() as u64;
    let unique = |from: &Poll, to: &Poll| -> u64 {
        (0..vcpus as usize)
            .map(|v| {
                let share = w / vcpus + u64::from((v as u64) < w % vcpus);
                let writes = to.page_writes[v].saturating_sub(from.page_writes[v]);
                writes.min(share) + u64::from(writes > 0)
            })
            .sum()
    };
    let (fewest, most) = (
        unique(first_inside, last_inside),
        unique(last_before, first_after),
    );
    // A bracket wider than the tolerance cannot judge the rate: a vCPU the host starved
    // into partial rounds, with polls too sparse around the period's ends.
    if (most - fewest) as f64 > 0.02 * most as f64 {
        return Err(format!(
            "the truth is known only within [{fewest}, {most}] pages"
        ));
    }
    let period_us = ((b_lo + b_hi) / 2 - (a_lo + a_hi) / 2) as f64;
    let truth = (fewest + most) as f64 / 2.0 * 1e6 / period_us;
    Ok((polls.last().unwrap().rate as f64, truth))
}

#[test]
fn dirty_pages_rate_matches_the_working_set_and_non_convergence_is_reported() {
    let _g = guest_lock();
    let w = NON_CONVERGING_PAGES;
    let t0 = Instant::now();
    let (guest, _dest, source) = non_converging_migration();
    // The truth is read from the guest's page-write counters over the very period the
    // rate was taken on (observed by polling). On a loaded host the polls around a
    // period's ends can be too sparse to tell its truth: such periods are skipped, up
    // to TIMEOUT.
    let mut polls = vec![poll(&source, &guest, t0)];
    let mut evaluated_syncs = 0;
    let mut why = Vec::new();
    let (rate, truth) = loop {
        std::thread::sleep(Duration::from_millis(3));
        let p = poll(&source, &guest, t0);
        assert!(!p.status.is_finished(), "ended: {:?}", source.query());
        assert!(
            t0.elapsed() < TIMEOUT,
            "no period whose truth could be told: {why:?}"
        );
        let prev = polls.last().unwrap();
        // Past the first pass (the bulk stage), a period has closed: read the rate
        // once two polls in a row saw the same syncs (the rate is stored with them).
        let due = p.iterations >= 2
            && p.rate > 0
            && prev.rate > 0
            && p.syncs == prev.syncs
            && p.syncs > evaluated_syncs;
        polls.push(p);
        if !due {
            continue;
        }
        let max_sync_ns = guest.address_space().stats().snapshot().max_sync_ns;
        match rate_and_truth(&polls, w, max_sync_ns) {
            Ok(found) => break found,
            Err(e) if e == TOO_RECENT => {}
            Err(e) => {
                evaluated_syncs = polls.last().unwrap().syncs;
                why.push(e);
            }
        }
    };
    eprintln!("dirty-pages-rate {rate} vs truth {truth:.1}; periods skipped: {why:?}");
    assert!(
        (rate - truth).abs() / truth <= 0.05,
        "dirty-pages-rate {rate} vs truth {truth:.1} over its own period"
    );
    // The guest dirties faster than the link carries, so the prediction must say so and
    // the migration keeps iterating. A host loaded enough to slow the guest below the
    // link (three suites at once on two cores) takes that premise away; the rate was
    // still checked.
    let link_bytes_per_sec = 128u64 << 20;
    let dirtied_bytes_per_sec = truth * ferry::dirty_sync::PAGE_SIZE as f64;
    if dirtied_bytes_per_sec > 1.1 * link_bytes_per_sec as f64 {
        // Each prediction reads the guest's latest windows: on a loaded host one of
        // them may catch the guest slowed below the link, so wait (bounded) for the
        // prediction to say what the measured rate says.
        let waited = Instant::now();
        let mut said = Vec::new();
        loop {
            match source.query().ferry.unwrap().convergence {
                Convergence::NotConverging {
                    needed_bandwidth_bytes_per_sec,
                } => {
                    assert!(needed_bandwidth_bytes_per_sec > link_bytes_per_sec);
                    break;
                }
                other => said.push(other),
            }
            assert!(
                waited.elapsed() < Duration::from_secs(10),
                "expected not-converging within 10 s, the predictions were {said:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            source.query().status,
            MigrationStatus::Active,
            "keeps iterating"
        );
    } else {
        eprintln!(
            "the host slowed the guest to {:.0} MiB/s, below the link: non-convergence not checked",
            dirtied_bytes_per_sec / f64::from(1 << 20)
        );
    }
    source.cancel();
    assert_eq!(source.wait(), MigrationStatus::Cancelled);
    assert_source_runs(&guest);
}

/// Postcopy with the non-converging guest: precopy runs until a pass is over, the
/// operator switches, the destination runs the guest while its missing pages arrive
/// (on request and in the background), and the migration completes.
fn postcopy_migration(channels: u8, workload: Workload, switch: Switch) {
    let _g = guest_lock();
    let cfg = config(1 << 30, 2, workload);
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let source = whole_pages_source(&guest, 128 << 20, channels);
    assert!(
        source.start_postcopy().is_err(),
        "the capability must be set first"
    );
    source
        .set_capability(Capability::PostcopyRam, true)
        .unwrap();
    if switch == Switch::Policy {
        source
            .set_parameters(&ParametersUpdate {
                x_ferry_postcopy_auto: Some(true),
                ..Default::default()
            })
            .unwrap();
    }
    source.migrate(&dest.uri).unwrap();
    if switch == Switch::Operator {
        // Past the bulk pass: the working set keeps the bitmap busy, precopy alone
        // would not end.
        poll_until(&source, "the second pass", |i| {
            i.ferry.as_ref().is_some_and(|f| f.iterations >= 1)
        });
        source.start_postcopy().unwrap();
    }
    // Bounded: precopy alone would never end.
    poll_until(&source, "the end of the migration", |i| {
        i.status.is_finished()
    });
    assert_eq!(
        source.wait(),
        MigrationStatus::Completed,
        "{:?}",
        source.query()
    );
    let info = source.query();
    let ram = info.ram.as_ref().unwrap();
    assert!(
        ram.postcopy_bytes > 0,
        "pages went after the switch: {ram:?}"
    );
    // The source stays paused for good: its RAM is the switch-over copy.
    assert_eq!(source.run_control().state().name(), "postmigrate");
    let frozen = guest.vcpu_page_writes();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        guest.vcpu_page_writes(),
        frozen,
        "the source guest never runs again"
    );
    let done = dest.next_event();
    assert_eq!(done["event"], "completed", "{done}");
    assert_eq!(
        done["ram-digest"].as_u64(),
        Some(ram_digest(&GuestRam::new(guest.clone()))),
        "every page the destination holds is the source's at the switch"
    );
    // The guest ran on the destination while pages arrived: every vCPU's page writes
    // at the end of postcopy are past those the source froze at the switch.
    let at_end: Vec<u64> = serde_json::from_value(done["page-writes"].clone()).unwrap();
    assert!(
        at_end.iter().zip(&frozen).all(|(d, s)| d > s),
        "the guest ran during postcopy: {at_end:?} after {frozen:?}"
    );
    // The destination's postcopy figures: nothing missing, every fault served and
    // timed, full residency reached.
    let pc = &done["postcopy"];
    assert_eq!(pc["missing-pages"], 0, "{pc}");
    assert!(pc["landed-pages"].as_u64().unwrap() > 0, "{pc}");
    let faults: u64 = pc["fault-latency-us-log2"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert!(
        faults > 0 && faults <= pc["faults"].as_u64().unwrap(),
        "{pc}"
    );
    assert!(pc["full-residency-ms"].is_u64(), "{pc}");
    let running = dest.next_event();
    assert_eq!(running["event"], "running", "{running}");
    eprintln!("postcopy on the destination: {pc}");
    eprintln!(
        "postcopy: downtime {:?} ms, total {:?} ms, requests {}, postcopy bytes {}",
        info.downtime, info.total_time, ram.postcopy_requests, ram.postcopy_bytes
    );
}

/// Who switches a migration to postcopy.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Switch {
    /// `migrate-start-postcopy` once the first pass is over.
    Operator,
    /// Ferry's policy (`x-ferry-postcopy-auto`) once the prediction says "not
    /// converging".
    Policy,
}

#[test]
fn postcopy_completes_the_working_set_precopy_cannot() {
    postcopy_migration(
        1,
        Workload::WorkingSet {
            pages: NON_CONVERGING_PAGES,
        },
        Switch::Operator,
    );
}

#[test]
fn the_postcopy_policy_switches_a_migration_that_does_not_converge() {
    postcopy_migration(
        1,
        Workload::WorkingSet {
            pages: NON_CONVERGING_PAGES,
        },
        Switch::Policy,
    );
}

#[test]
fn postcopy_completes_over_two_channels() {
    postcopy_migration(
        2,
        Workload::WorkingSet {
            pages: NON_CONVERGING_PAGES,
        },
        Switch::Operator,
    );
}

/// Dense pages (every byte rewritten each round, incompressible to sparse records)
/// over 256 MiB: the destination's pages are whole pages of data.
#[test]
fn postcopy_completes_a_dense_workload() {
    postcopy_migration(
        1,
        Workload::Dense {
            pages: NON_CONVERGING_PAGES,
            bytes_per_page: 4096,
        },
        Switch::Operator,
    );
}

/// A migration of `guest` to `uri` switched to postcopy after its first pass, with a
/// background stream slow enough (4 MiB/s) to break it in the middle; returns once the
/// destination runs the guest (its page requests come only after the commit).
fn slow_postcopy(guest: &Arc<GuestVm>, uri: &str) -> MigrationSource {
    let source = whole_pages_source(guest, 128 << 20, 1);
    source
        .set_capability(Capability::PostcopyRam, true)
        .unwrap();
    source
        .set_parameters(&ParametersUpdate {
            max_postcopy_bandwidth: Some(4 << 20),
            ..Default::default()
        })
        .unwrap();
    source.migrate(uri).unwrap();
    poll_until(&source, "the second pass", |i| {
        i.ferry.as_ref().is_some_and(|f| f.iterations >= 1)
    });
    source.start_postcopy().unwrap();
    poll_until(&source, "the destination's page requests", |i| {
        i.status == MigrationStatus::PostcopyActive
            && i.ram.as_ref().is_some_and(|r| r.postcopy_requests > 0)
    });
    source
}

/// A destination that dies during postcopy takes the guest with it (the pages it had
/// are gone, and the source's copy is older than what the guest wrote there). The
/// source cannot tell a dead destination from a cut link: it pauses, says both, keeps
/// its copy paused, and never runs a second one; a resume to a dead address fails
/// clearly and leaves it paused.
#[test]
fn a_destination_killed_during_postcopy_leaves_the_source_paused_and_saying_why() {
    let _g = guest_lock();
    let cfg = non_converging_config();
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let source = slow_postcopy(&guest, &dest.uri);
    source.cancel();
    assert_eq!(
        source.query().status,
        MigrationStatus::PostcopyActive,
        "a cancel cannot take the guest back"
    );
    assert!(
        source.resume("tcp:127.0.0.1:1").is_err(),
        "nothing to resume while postcopy runs"
    );
    dest.kill();
    poll_until(&source, "postcopy-paused", |i| {
        i.status == MigrationStatus::PostcopyPaused
    });
    let why = source.query().error_desc.unwrap_or_default();
    assert!(
        why.contains("postcopy paused") && why.contains("lost there") && why.contains("resume"),
        "{why}"
    );
    let state = source.run_control().state().name();
    assert_eq!(
        state, "finish-migrate",
        "paused for good while postcopy lasts"
    );
    let frozen = guest.vcpu_page_writes();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest.vcpu_page_writes(), frozen, "no second running copy");
    // Nobody listens there: the resume fails and the migration pauses again.
    source.resume("tcp:127.0.0.1:1").unwrap();
    poll_until(&source, "the failed resume", |i| {
        i.status == MigrationStatus::PostcopyPaused
            && i.error_desc
                .as_deref()
                .is_some_and(|e| e.contains("resuming on"))
    });
    assert_eq!(
        guest.vcpu_page_writes(),
        frozen,
        "still no second running copy"
    );
    // Dropping the source ends the paused migration; the guest stays paused.
    let run = source.run_control().clone();
    let stats = source.stats();
    drop(source);
    assert_eq!(stats.status(), MigrationStatus::Failed);
    assert!(
        stats
            .error()
            .is_some_and(|e| e.contains("shut down while postcopy was paused")),
        "{:?}",
        stats.error()
    );
    assert_eq!(run.state().name(), "postmigrate");
}

/// A source process that dies during postcopy takes the pages only it had: the
/// destination pauses (it cannot tell a dead source from a cut link), says how many
/// pages exist only on the source, and neither completes nor fails on its own: the
/// vCPUs that touch those pages wait for a source that may come back.
#[test]
fn a_source_killed_during_postcopy_leaves_the_destination_paused_and_saying_why() {
    let _g = guest_lock();
    let cfg = non_converging_config();
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let mut cmd = ferry(None, "send", &cfg);
    cmd.args(["--uri", &dest.uri, "--postcopy"])
        .args(["--max-bandwidth", "128M", "--max-postcopy-bandwidth", "1M"])
        // Whole pages, as `whole_pages_source`: the working set then cannot converge.
        .arg("--no-sparse-pages")
        .stdout(Stdio::null());
    let mut source = cmd.spawn().expect("spawn ferry send");
    // The policy switches once the migration is predicted not to converge.
    dest.expect_event("postcopy-active");
    let _ = source.kill();
    let _ = source.wait();
    let paused = dest.expect_event("postcopy-paused");
    let err = paused["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("postcopy paused after the switch")
            && err.contains("exist only on the source"),
        "{paused}"
    );
    assert!(
        paused["recover-uri"].is_null(),
        "no recovery address without --recover: {paused}"
    );
    assert!(
        dest.child.try_wait().unwrap().is_none(),
        "the destination waits for the source, it does not give the guest up"
    );
}

/// QEMU 8.1's dirty-limit instead of auto-converge: the migration that would not
/// converge (vCPU 0 rewriting 256 MiB at 128 MiB/s) completes with every vCPU held to
/// `vcpu-dirty-limit`, and the vCPU that dirties nothing is never slowed (auto-converge
/// would throttle it as hard as the other). The end of the migration lifts the limit.
#[test]
fn dirty_limit_completes_a_migration_that_would_not_and_spares_the_vcpu_that_does_not_dirty() {
    if !common::kvm_or_skip() {
        return;
    }
    let _g = guest_lock();
    let cfg = VmConfig {
        dirty_ring_entries: 4096,
        ..config(
            1 << 30,
            2,
            Workload::Lopsided {
                pages: NON_CONVERGING_PAGES,
            },
        )
    };
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let source = whole_pages_source(&guest, 128 << 20, 1);
    source.set_capability(Capability::DirtyLimit, true).unwrap();
    let conflict = source
        .set_capability(Capability::AutoConverge, true)
        .unwrap_err()
        .to_string();
    assert!(
        conflict.contains("conflicts with auto-converge"),
        "{conflict}"
    );
    source
        .set_parameters(&ParametersUpdate {
            x_vcpu_dirty_limit_period: Some(250),
            ..Default::default()
        })
        .unwrap();
    let counters_before = guest.vm().counter(1);
    let t0 = Instant::now();
    source.migrate(&dest.uri).unwrap();
    poll_until(&source, "the dirty limit", |i| {
        i.dirty_limit_throttle_time_per_round.is_some() || i.status.is_finished()
    });
    // Seen while the migration holds them (it may end at any moment and lift them):
    // every vCPU at vcpu-dirty-limit.
    let limits = source.dirty_limiter().query();
    assert!(
        limits.is_empty() || (limits.len() == 2 && limits.iter().all(|l| l.limit_rate == 1)),
        "every vCPU limited at 1 MiB/s: {limits:?}"
    );
    assert_eq!(
        source.wait(),
        MigrationStatus::Completed,
        "{:?}",
        source.query()
    );
    let secs = t0.elapsed().as_secs_f64();
    dest.check_completed(ram_digest(&GuestRam::new(guest.clone())));
    assert!(
        !source.dirty_limiter().in_service(),
        "the migration's end lifts the limit"
    );
    let slept = guest.vm().vcpu_throttled_us();
    assert_eq!(
        slept[1], 0,
        "vCPU 1 dirties nothing and never slept: {slept:?}"
    );
    if slept[0] == 0 {
        // On a loaded host a starved vCPU 0 may dirty so little that the migration
        // converges before the limit holds it (tests/dirty_limit.rs checks the hold).
        eprintln!("dirty-limit: the migration converged before the limit held vCPU 0");
    }
    eprintln!(
        "dirty-limit: completed in {secs:.1} s; vCPU 0 slept {} ms, vCPU 1 counted {} rounds",
        slept[0] / 1000,
        guest.vm().counter(1) - counters_before
    );
}

#[test]
fn auto_converge_completes_a_migration_that_would_not() {
    let _g = guest_lock();
    // Random writes over all of RAM: ~1 GiB/s of unique pages at full speed; throttling
    // the vCPUs cuts that, unlike a working set that is rewritten whole every round.
    let cfg = config(
        1 << 30,
        1,
        Workload::Random {
            seed: 7,
            hot_percent: 0,
        },
    );
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let source = whole_pages_source(&guest, 128 << 20, 1);
    source
        .set_capability(Capability::AutoConverge, true)
        .unwrap();
    source.migrate(&dest.uri).unwrap();
    let status = source.wait();
    let info = source.query();
    assert_eq!(status, MigrationStatus::Completed, "{info:?}");
    dest.check_completed(ram_digest(&GuestRam::new(guest.clone())));
}

/// Forwards one TCP connection at a time to `upstream`, at most `rate` bytes/s
/// (0 = unlimited), and cuts every connection once `cut` is set or `limit_bytes` passed.
struct Proxy {
    uri: String,
    cut: Arc<AtomicBool>,
    forwarded: Arc<AtomicU64>,
}

impl Proxy {
    fn start(upstream: &str, rate: u64, limit_bytes: u64) -> Proxy {
        let up = upstream.trim_start_matches("tcp:").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let uri = format!("tcp:{}", l.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let (c2, f2) = (cut.clone(), forwarded.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(down) = conn else { return };
                let Ok(upc) = TcpStream::connect(&up) else {
                    return;
                };
                let pipe = |mut from: TcpStream,
                            mut to: TcpStream,
                            count: bool,
                            cut: Arc<AtomicBool>,
                            fwd: Arc<AtomicU64>| {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        let t0 = Instant::now();
                        let mut sent = 0u64;
                        loop {
                            if cut.load(Ordering::Acquire) {
                                break;
                            }
                            let n = match from.read(&mut buf) {
                                // A clean end of one direction ends only that one (the
                                // other may still carry the answer).
                                Ok(0) => {
                                    let _ = to.shutdown(Shutdown::Write);
                                    return;
                                }
                                Err(_) => break,
                                Ok(n) => n,
                            };
                            if count {
                                let total = fwd.fetch_add(n as u64, Ordering::AcqRel) + n as u64;
                                if limit_bytes > 0 && total >= limit_bytes {
                                    cut.store(true, Ordering::Release);
                                    break;
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            sent += n as u64;
                            if rate > 0 {
                                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                                    std::thread::sleep(wait);
                                }
                            }
                        }
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                };
                pipe(
                    down.try_clone().unwrap(),
                    upc.try_clone().unwrap(),
                    true,
                    c2.clone(),
                    f2.clone(),
                );
                pipe(upc, down, false, c2.clone(), f2.clone());
            }
        });
        Proxy {
            uri,
            cut,
            forwarded,
        }
    }
}

/// A link cut during postcopy pauses both sides: the source keeps every page and its
/// guest paused, the destination's vCPUs wait on the pages it lacks, each side says
/// why. A stranger at the recovery address is refused; the source's resume over a new
/// link completes the migration with no page lost.
#[test]
fn a_link_cut_during_postcopy_pauses_both_sides_and_a_resume_completes_it() {
    let _g = guest_lock();
    let cfg = non_converging_config();
    let guest = boot(&cfg);
    let mut dest = Dest::spawn_with(&cfg, "tcp:127.0.0.1:0", &["--recover", "tcp:127.0.0.1:0"]);
    let proxy = Proxy::start(&dest.uri, 0, 0);
    let source = slow_postcopy(&guest, &proxy.uri);
    assert_eq!(dest.next_line()["event"], "postcopy-active");
    proxy.cut.store(true, Ordering::Release);
    poll_until(&source, "postcopy-paused", |i| {
        i.status == MigrationStatus::PostcopyPaused
    });
    let why = source.query().error_desc.unwrap_or_default();
    assert!(why.contains("postcopy paused after the switch"), "{why}");
    let frozen = guest.vcpu_page_writes();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(guest.vcpu_page_writes(), frozen, "the source stays paused");
    let paused = dest.expect_event("postcopy-paused");
    let err = paused["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("postcopy paused after the switch")
            && err.contains("exist only on the source"),
        "{paused}"
    );
    let recover_uri = paused["recover-uri"]
        .as_str()
        .expect("recovery address")
        .to_string();
    // A stranger (a new migration) at the recovery address is refused; the paused
    // migration waits on.
    let stranger = ferry::transport::Sender::connect(
        &recover_uri.parse().unwrap(),
        4096,
        vec![ferry::transport::BlockInfo {
            id: "pc.ram".into(),
            size_bytes: cfg.mem_bytes,
        }],
        ferry::transport::SendOptions::default(),
    )
    .unwrap();
    match stranger.finish() {
        Err(ferry::transport::Error::Refused(why)) => {
            assert!(why.contains("a postcopy migration is paused here"), "{why}")
        }
        other => panic!("a stranger must be refused: {other:?}"),
    }
    // A new link, and the source resumes over it.
    let proxy2 = Proxy::start(&recover_uri, 0, 0);
    source
        .set_parameters(&ParametersUpdate {
            max_postcopy_bandwidth: Some(0),
            ..Default::default()
        })
        .unwrap();
    source.resume(&proxy2.uri).unwrap();
    assert_eq!(
        dest.expect_event("postcopy-resumed")["event"],
        "postcopy-resumed"
    );
    poll_until(&source, "the end of the migration", |i| {
        i.status.is_finished()
    });
    assert_eq!(
        source.wait(),
        MigrationStatus::Completed,
        "{:?}",
        source.query()
    );
    assert_eq!(source.run_control().state().name(), "postmigrate");
    let done = dest.next_event();
    assert_eq!(done["event"], "completed", "{done}");
    assert_eq!(
        done["ram-digest"].as_u64(),
        Some(ram_digest(&GuestRam::new(guest.clone()))),
        "no page lost: every page the destination holds is the source's at the switch"
    );
    let running = dest.next_event();
    assert_eq!(running["event"], "running", "{running}");
}

/// A second migration to a fresh destination succeeds after a failure or cancel.
fn second_migration_succeeds(guest: &Arc<GuestVm>, cfg: &VmConfig) {
    let mut dest = Dest::spawn(cfg, "tcp:127.0.0.1:0");
    let source = source_for(guest, 0, 1);
    source.migrate(&dest.uri).unwrap();
    assert_eq!(
        source.wait(),
        MigrationStatus::Completed,
        "{:?}",
        source.query()
    );
    dest.check_completed(ram_digest(&GuestRam::new(guest.clone())));
}

#[test]
fn destination_killed_mid_stream() {
    let _g = guest_lock();
    let cfg = config(1 << 30, 2, Workload::WorkingSet { pages: 65536 });
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let source = whole_pages_source(&guest, 64 << 20, 1);
    source.migrate(&dest.uri).unwrap();
    poll_until(&source, "active", |i| {
        i.status == MigrationStatus::Active
            && i.ram.as_ref().is_some_and(|r| r.transferred > 8 << 20)
    });
    dest.kill();
    assert_eq!(source.wait(), MigrationStatus::Failed);
    assert!(source.query().error_desc.is_some());
    assert_source_runs(&guest);
    assert!(
        !guest.address_space().logging(),
        "the MIGRATION reason was dropped"
    );
    second_migration_succeeds(&guest, &cfg);
}

#[test]
fn truncated_stream_fails_both_sides_and_never_resumes() {
    let _g = guest_lock();
    let cfg = config(256 << 20, 1, Workload::WorkingSet { pages: 4096 });
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    // The stream is cut after 5 MiB, in the middle of a record.
    let proxy = Proxy::start(&dest.uri, 0, (5 << 20) + 1234);
    let source = whole_pages_source(&guest, 0, 1);
    source.migrate(&proxy.uri).unwrap();
    assert_eq!(
        source.wait(),
        MigrationStatus::Failed,
        "{:?}",
        source.query()
    );
    assert!(proxy.forwarded.load(Ordering::Acquire) >= 5 << 20);
    dest.check_failed();
    assert_source_runs(&guest);
    second_migration_succeeds(&guest, &cfg);
}

/// Starts a migration through a 32 MiB/s proxy with a long downtime limit, so its
/// stop-and-copy (64 MiB for a 16384-page working set) lasts about 2 s.
fn slow_migration(guest: &Arc<GuestVm>, dest: &Dest) -> (Proxy, MigrationSource) {
    let proxy = Proxy::start(&dest.uri, 32 << 20, 0);
    let source = whole_pages_source(guest, 0, 1);
    source
        .set_parameters(&ParametersUpdate {
            downtime_limit: Some(20_000),
            ..Default::default()
        })
        .unwrap();
    source.migrate(&proxy.uri).unwrap();
    (proxy, source)
}

#[test]
fn connection_cut_during_the_final_copy() {
    let _g = guest_lock();
    let cfg = config(1 << 30, 2, Workload::WorkingSet { pages: 16384 });
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let (proxy, source) = slow_migration(&guest, &dest);
    poll_until(&source, "stop-and-copy", |i| {
        i.status == MigrationStatus::Device
    });
    proxy.cut.store(true, Ordering::Release);
    assert_eq!(
        source.wait(),
        MigrationStatus::Failed,
        "{:?}",
        source.query()
    );
    dest.check_failed();
    assert_source_runs(&guest);
    second_migration_succeeds(&guest, &cfg);
}

#[test]
fn cancel_with_a_stalled_destination() {
    let _g = guest_lock();
    let cfg = config(256 << 20, 1, Workload::WorkingSet { pages: 16384 });
    let guest = boot(&cfg);
    // A destination that accepts and never reads: the sender blocks on a full socket.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    let hold = std::thread::spawn(move || {
        let mut conns = Vec::new();
        l.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok((c, _)) = l.accept() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let source = whole_pages_source(&guest, 0, 1);
    source.migrate(&uri).unwrap();
    poll_until(&source, "the sender to stall", |i| {
        i.status == MigrationStatus::Active
            && i.ram.as_ref().is_some_and(|r| r.transferred > 1 << 20)
    });
    std::thread::sleep(Duration::from_millis(200));
    source.cancel();
    assert_eq!(
        source.wait(),
        MigrationStatus::Cancelled,
        "{:?}",
        source.query()
    );
    assert_source_runs(&guest);
    drop(hold);
}

#[test]
fn cancel_in_every_state() {
    let _g = guest_lock();
    let cfg = config(1 << 30, 2, Workload::WorkingSet { pages: 16384 });
    let guest = boot(&cfg);
    for state in [
        MigrationStatus::Setup,
        MigrationStatus::Active,
        MigrationStatus::Device,
    ] {
        let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
        let (_proxy, source) = slow_migration(&guest, &dest);
        if state != MigrationStatus::Setup {
            poll_until(&source, "the state to cancel in", |i| i.status == state);
        }
        source.cancel();
        assert_eq!(
            source.wait(),
            MigrationStatus::Cancelled,
            "cancel in {state:?}: {:?}",
            source.query()
        );
        assert_source_runs(&guest);
        assert!(!guest.address_space().logging());
        if state == MigrationStatus::Setup {
            // Cancelled before or while connecting: the destination may never see a stream.
            dest.kill();
        } else {
            dest.check_failed();
        }
    }
    second_migration_succeeds(&guest, &cfg);
}

#[test]
fn without_autostart_the_destination_holds_the_guest_until_resumed() {
    let _g = guest_lock();
    let cfg = config(256 << 20, 2, Workload::WorkingSet { pages: 4096 });
    let guest = boot(&cfg);
    let dst = Arc::new(GuestVm::incoming(cfg.clone(), DirtyTracking::default()).unwrap());
    let run = RunControl::incoming(dst.clone(), false);
    let inc = incoming_with(
        dst.clone(),
        "tcp:127.0.0.1:0",
        IncomingOptions {
            verify: true,
            run: Some(run.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let source = source_for(&guest, 0, 1);
    source.migrate(&inc.uri().to_string()).unwrap();
    assert_eq!(
        source.wait(),
        MigrationStatus::Completed,
        "{:?}",
        source.query()
    );
    let report = inc.wait().unwrap();
    assert!(!report.resumed);
    assert_eq!(
        report.ram_digest,
        Some(ram_digest(&GuestRam::new(guest.clone())))
    );
    // Held: nothing runs on either side.
    let held = dst.counters();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        dst.counters(),
        held,
        "the destination guest ran without a start"
    );
    assert_eq!(run.state(), RunState::Paused);
    // The VMM starts it (QMP `cont`), and it goes on from where the source stopped.
    run.cont().unwrap();
    assert_eq!(run.state(), RunState::Running);
    wait_all(&dst.vm(), 2);
    assert!(dst
        .counters()
        .iter()
        .zip(&held)
        .all(|(now, then)| now > then));
}

#[test]
fn snapshot_to_a_file_and_restore_it() {
    let _g = guest_lock();
    let cfg = config(256 << 20, 2, Workload::WorkingSet { pages: 4096 });
    let guest = boot(&cfg);
    let path = std::env::temp_dir().join(format!("ferry-test-{}.snapshot", std::process::id()));
    let uri = format!("file:{}", path.display());
    let source = source_for(&guest, 0, 1);
    source.migrate(&uri).unwrap();
    assert_eq!(
        source.wait(),
        MigrationStatus::Completed,
        "{:?}",
        source.query()
    );
    // The source stays paused (postmigrate), so its RAM is the snapshot's.
    let digest = ram_digest(&GuestRam::new(guest.clone()));
    let mut restored = Dest::spawn(&cfg, &uri);
    restored.check_completed(digest);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_destination_of_another_size_refuses_and_the_source_says_why() {
    let _g = guest_lock();
    let cfg = config(1 << 30, 2, Workload::WorkingSet { pages: 16384 });
    let guest = boot(&cfg);
    let small = config(256 << 20, 2, Workload::WorkingSet { pages: 4096 });
    let mut dest = Dest::spawn(&small, "tcp:127.0.0.1:0");
    let source = whole_pages_source(&guest, 0, 1);
    source.migrate(&dest.uri).unwrap();
    assert_eq!(source.wait(), MigrationStatus::Failed);
    let why = source.query().error_desc.unwrap_or_default();
    assert!(why.contains("RAM blocks differ"), "{why}");
    dest.check_failed();
    assert_source_runs(&guest);
    second_migration_succeeds(&guest, &cfg);
}

/// Forwards one migration connection to `upstream` and loses the destination's
/// acknowledgement: it passes the back-channel's records (Applied, Ready) and closes
/// both connections when the Ack comes. Returns the URI to migrate to.
fn ack_losing_proxy(upstream: &str) -> String {
    use ferry::transport::format::{Kind, RecordHeader, RECORD_HEADER_BYTES};
    let up = upstream.trim_start_matches("tcp:").to_string();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut down, _) = l.accept().unwrap();
        let mut upc = TcpStream::connect(&up).unwrap();
        let (mut d2, mut u2) = (down.try_clone().unwrap(), upc.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut d2, &mut u2);
            let _ = u2.shutdown(Shutdown::Write);
        });
        let mut hb = [0u8; RECORD_HEADER_BYTES];
        while upc.read_exact(&mut hb).is_ok() {
            let h = RecordHeader::decode(&hb).unwrap();
            if h.kind == Kind::Ack {
                break;
            }
            let mut body = vec![0u8; h.body_len as usize];
            upc.read_exact(&mut body).unwrap();
            if down.write_all(&hb).is_err() || down.write_all(&body).is_err() {
                break;
            }
        }
        let _ = down.shutdown(Shutdown::Both);
    });
    uri
}

/// The switch-over's one ambiguous moment: the destination took the commit and runs
/// the guest, and its acknowledgement is lost. The source must not resume too.
#[test]
fn a_lost_acknowledgement_leaves_the_source_paused_not_running_twice() {
    let _g = guest_lock();
    let cfg = config(256 << 20, 2, Workload::WorkingSet { pages: 4096 });
    let guest = boot(&cfg);
    let mut dest = Dest::spawn(&cfg, "tcp:127.0.0.1:0");
    let source = source_for(&guest, 0, 1);
    source.migrate(&ack_losing_proxy(&dest.uri)).unwrap();
    assert_eq!(source.wait(), MigrationStatus::Failed);
    let why = source.query().error_desc.unwrap();
    assert!(
        why.contains("may be running the guest") && why.contains("stays paused"),
        "{why}"
    );
    // The destination runs the guest, from the source's last state ...
    dest.check_completed(ram_digest(&GuestRam::new(guest.clone())));
    // ... and the source does not.
    let held = guest.counters();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(guest.counters(), held, "the source resumed: two copies run");
    assert!(
        !guest.address_space().logging(),
        "the MIGRATION reason was dropped"
    );
    // The run state says so, and a new migration is refused until someone decides.
    let run = source.run_control();
    assert_eq!(run.state(), RunState::Postmigrate);
    assert!(run.in_doubt());
    let refused = source.migrate("tcp:127.0.0.1:1").unwrap_err().to_string();
    assert!(refused.contains("in doubt"), "{refused}");
    // Its VMM decides: here, that the source goes on (`cont`).
    run.cont().unwrap();
    assert_eq!(run.state(), RunState::Running);
    assert_source_runs(&guest);
}
