//! The destination's side of a switch to postcopy (`docs/postcopy.md`): the stale
//! pages dropped and guest RAM registered for missing-page faults before the commit;
//! after it, the guest runs while faults become requests on the back-channel and every
//! page the source sends lands atomically, until the source's `End` and our `Done`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dirty_sync::{DirtyBitmap, HostMemory};
use transport::is_zero;
use uffd::Filled;

use super::*;
use crate::postcopy::{PageSource, PostcopyRam};

/// Page requests go to the source over the current stream's back-channel. While the
/// stream is broken there is none: a request then stays in the fault threads' set of
/// outstanding requests ([`PostcopyRam::outstanding`]), asked again on the stream
/// that resumes the migration, and the vCPUs that wait on it keep waiting.
#[derive(Default)]
struct Requests(std::sync::Mutex<Option<transport::PageRequester>>);

impl Requests {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<transport::PageRequester>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends requests on `requester` from now on, first every one outstanding. A
    /// fault that asks meanwhile is asked once more at worst (the page lands once).
    fn attach(&self, requester: transport::PageRequester, ram: &PostcopyRam) {
        *self.lock() = Some(requester);
        let again = ram.outstanding();
        debug!(
            requests = again.len(),
            "postcopy: asking again for the outstanding pages"
        );
        for (block, page) in again {
            let _ = self.request(block, page);
        }
    }

    fn detach(&self) {
        *self.lock() = None;
    }
}

impl PageSource for Requests {
    fn request(&self, block: usize, page: u64) -> std::result::Result<(), String> {
        let mut current = self.lock();
        if let Some(r) = current.as_ref() {
            if let Err(e) = r.request(block, page) {
                // The receive loop sees the same break and pauses.
                debug!(error = %e, "postcopy: a page request could not be sent; it is asked again after recovery");
                *current = None;
            }
        }
        Ok(())
    }
}

/// The receiver's sink after the switch: each record's pages are read into staging
/// memory (guest RAM cannot be written in place: its missing pages fault), then
/// installed with one atomic copy each, which wakes the vCPUs waiting on them.
struct LandingSink<'a> {
    ram: &'a PostcopyRam,
    /// Per block, a private mapping of the block's size; a page is there only between
    /// its arrival and its install. The data connections share one (they never carry
    /// one page at the same time); the priority connection has its own, since a page
    /// requested while a background batch has it on its way arrives on both at once.
    staging: Vec<HostMemory>,
    priority_staging: Vec<HostMemory>,
    /// The priority connection's index.
    priority_channel: usize,
    first_pages: Vec<u64>,
    /// With `verify`: the digest of every page installed (see [`page_digest`]).
    digest: Option<AtomicU64>,
}

impl LandingSink<'_> {
    fn staging_of(&self, channel: usize) -> &[HostMemory] {
        if channel == self.priority_channel {
            &self.priority_staging
        } else {
            &self.staging
        }
    }
}

// SAFETY: the page pointers point to one page of this sink's own staging memory for an
// in-bounds (block, page), null otherwise; pages do not overlap; nothing but the
// receiver touches staging memory; after the switch the background sends each page
// once, on one data connection, and the priority connection (its own staging) carries
// its pages one record at a time, so no two threads write one staging page at once.
unsafe impl PageSink for LandingSink<'_> {
    fn page_ptr(&self, block_idx: usize, page_index: u64) -> *mut u8 {
        self.channel_page_ptr(0, block_idx, page_index)
    }

    fn channel_page_ptr(&self, channel: usize, block_idx: usize, page_index: u64) -> *mut u8 {
        self.staging_of(channel)
            .get(block_idx)
            .and_then(|m| m.range_ptr(page_index.checked_mul(PAGE_SIZE)?, PAGE_SIZE))
            .unwrap_or(std::ptr::null_mut())
    }

    fn pages_done(
        &self,
        channel: usize,
        block_idx: usize,
        offsets: &[u64],
        page_size: usize,
    ) -> std::result::Result<(), String> {
        let mem = self
            .staging_of(channel)
            .get(block_idx)
            .ok_or_else(|| format!("no block {block_idx}"))?;
        if page_size as u64 != PAGE_SIZE {
            return Err(format!("pages of {page_size} bytes"));
        }
        for &o in offsets {
            let page = mem.page(o).ok_or_else(|| format!("no page {o}"))?;
            // SAFETY: staging memory is this sink's own and the receiver is done
            // writing this page (`pages_done`); nothing else writes it.
            let data = unsafe { page.as_bytes() };
            let filled = self
                .ram
                .land(block_idx, o, data)
                .map_err(|e| e.to_string())?;
            if let (Filled::Done, Some(d)) = (filled, &self.digest) {
                if !is_zero(data) {
                    d.fetch_add(
                        page_digest(data, self.first_pages[block_idx] + o),
                        Ordering::Relaxed,
                    );
                }
            }
        }
        // Their memory back: a staging page lives only until it is installed. One call
        // per run of pages (each one a TLB shootdown across the process's threads).
        for (first, n) in crate::guest::page_runs(offsets.iter().copied()) {
            mem.discard(first * PAGE_SIZE, n * PAGE_SIZE);
        }
        Ok(())
    }
}

/// The digest of the pages present at the switch that will never be installed (not
/// missing, and mapped): with the installed pages' digest, the digest of guest RAM as
/// the source left it. Never reads a missing page (it would fault with nobody to
/// serve it); `None` without /proc/self/pagemap.
fn digest_present(ram: &GuestRam, pc: &PostcopyRam) -> Option<u64> {
    let mut digest = 0u64;
    for (bi, b) in ram.blocks().iter().enumerate() {
        let touched = DirtyBitmap::new(b.first_page + b.pages());
        crate::guest::mark_touched_pages(b, &touched).ok()?;
        for p in 0..b.pages() {
            if !touched.is_set(b.first_page + p) || !pc.is_received(bi, p) {
                continue;
            }
            let page = ram.page(bi, p)?;
            // SAFETY: the guest is paused (before `finish_incoming`) and the page is
            // present and never installed again, so nothing writes it meanwhile.
            let bytes = unsafe { page.as_bytes() };
            if !is_zero(bytes) {
                digest = digest.wrapping_add(page_digest(bytes, b.first_page + p));
            }
        }
    }
    Some(digest)
}

/// The switch to postcopy and the postcopy phase, after `receive` returned with the
/// stream switched. A stream that breaks after the commit pauses the migration until
/// the source resumes it on an address `migrate-recover` gave ([`wait_for_resume`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn receive(
    vm: &Arc<dyn MigratableVm>,
    run: &RunControl,
    mut rx: transport::Receiver,
    stats: &MigStats,
    opts: &IncomingOptions,
    switch: Switch,
    mut report: IncomingReport,
    recovery: &Recovery,
) -> Result<IncomingReport> {
    let ram = GuestRam::new(vm.clone());
    let prepared = (|| -> Result<Arc<PostcopyRam>> {
        if !vm.untouched_ram_is_zero() {
            return Err(Error::Incompatible(
                "postcopy needs guest RAM that is private anonymous memory".into(),
            ));
        }
        let blocks = ram.blocks();
        let missing: Vec<DirtyBitmap> =
            blocks.iter().map(|b| DirtyBitmap::new(b.pages())).collect();
        for (block_idx, runs) in &switch.discards {
            let m = missing.get(*block_idx).ok_or_else(|| {
                Error::Incompatible(format!(
                    "a discard for block {block_idx}, which does not exist"
                ))
            })?;
            for &(first, n) in runs {
                for p in first..first + n {
                    m.set(p);
                }
            }
        }
        let pc = PostcopyRam::register(blocks, &missing, stats.postcopy.clone())?;
        info!(
            missing_pages = pc.missing_pages(),
            "postcopy: guest RAM registered for missing-page faults"
        );
        load_and_offer(
            vm,
            &mut rx,
            switch.device_state.clone(),
            switch.source_was_running,
            &mut report,
        )?;
        Ok(pc)
    })();
    let pc = match prepared {
        Ok(pc) => pc,
        Err(e) => {
            refuse(&mut rx, &e);
            return Err(e);
        }
    };
    // Committed: the guest is ours, and the pages it lacks are only on the source.
    stats.set_status(MigrationStatus::PostcopyActive);
    let switched_bytes = rx.counters().total_bytes();
    let will_run = run.autostart() && switch.source_was_running;
    ack(&mut rx, will_run);
    let present_digest = if opts.verify {
        let digest_start = Instant::now();
        let d = digest_present(&ram, &pc);
        report.ram_digest_us = Some(digest_start.elapsed().as_micros() as u64);
        if d.is_none() {
            warn!("no /proc/self/pagemap: the postcopy digest cannot be taken");
        }
        d
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(Requests::default());
    requests.attach(rx.page_requester()?, &pc);
    let faults = pc.serve_faults(requests.clone(), stop.clone())?;
    let staging = || {
        ram.blocks()
            .iter()
            .map(|b| HostMemory::anonymous(b.size_bytes))
            .collect::<std::result::Result<Vec<_>, _>>()
    };
    let sink = LandingSink {
        ram: &pc,
        staging: staging()?,
        priority_staging: staging()?,
        priority_channel: usize::from(rx.header().features.channels) - 1,
        first_pages: ram.blocks().iter().map(|b| b.first_page).collect(),
        digest: present_digest.map(|_| AtomicU64::new(0)),
    };
    report.resumed = run.finish_incoming(switch.source_was_running)?;
    info!(resumed = report.resumed, "postcopy: the guest runs here");
    pc.free_stale_pages();
    // Bytes of the streams that broke, before the one that completes.
    let mut earlier_bytes = 0;
    let first_header = rx.header().clone();
    let session_id = rx.session_id();
    loop {
        recovery.set_stream(Some(rx.abort_handle()));
        let r = rx.receive_postcopy(&sink);
        recovery.set_stream(None);
        let why = match r {
            Ok(()) if pc.missing_pages() == 0 => break,
            Ok(()) => "the source ended the stream".to_string(),
            Err(e) if pc.missing_pages() == 0 => {
                // Every page landed before the stream broke: the guest here needs the
                // source no more. Done cannot reach it; it stays paused with its copy.
                warn!(error = %e, "postcopy: the stream broke after the last page; complete");
                break;
            }
            Err(e) => e.to_string(),
        };
        // Once the guest runs here, a lost source is a lost guest: pause, say what is
        // missing, and wait for the source to come back.
        requests.detach();
        earlier_bytes += rx.counters().total_bytes();
        rx = wait_for_resume(
            recovery,
            stats,
            &pc,
            &requests,
            &first_header,
            session_id,
            &why,
            opts,
        );
    }
    stop.store(true, Ordering::Release);
    let mut fault_error = None;
    for h in faults {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fault_error = fault_error.or(Some(e)),
            Err(p) => fault_error = fault_error.or(Some(Error::panicked("a fault thread", &*p))),
        }
    }
    let c = pc.counters();
    stats
        .postcopy_requests
        .store(c.requests.load(Ordering::Relaxed), Ordering::Relaxed);
    if let Some(e) = fault_error {
        return Err(e);
    }
    if let Err(e) = rx.send_done() {
        // Every page is here: the source only keeps its copy longer.
        warn!(error = %e, "postcopy: Done could not be sent to the source");
    }
    info!(
        faults = c.faults.load(Ordering::Relaxed),
        requests = c.requests.load(Ordering::Relaxed),
        landed_pages = c.landed_pages.load(Ordering::Relaxed),
        already_present = c.already_present.load(Ordering::Relaxed),
        fault_latency_p50_us = c.fault_latency.quantile_us(0.5),
        fault_latency_p99_us = c.fault_latency.quantile_us(0.99),
        fault_latency_us_log2 = ?c.fault_latency.counts(),
        "postcopy: every page is here"
    );
    report.ram_digest = present_digest
        .zip(sink.digest.as_ref())
        .map(|(p, d)| p.wrapping_add(d.load(Ordering::Relaxed)));
    report.received_bytes = earlier_bytes + rx.counters().total_bytes();
    stats.postcopy_bytes.store(
        report.received_bytes.saturating_sub(switched_bytes),
        Ordering::Relaxed,
    );
    stats
        .transferred_bytes
        .store(report.received_bytes, Ordering::Relaxed);
    report.total_ms = switch.start.elapsed().as_millis() as u64;
    Ok(report)
}

/// Pauses a postcopy migration whose stream broke (`why`) until the source resumes it:
/// `postcopy-paused` (the vCPUs that touch a missing page wait in the kernel, the others
/// run), then for each address `migrate-recover` gives, accepts streams until one
/// resumes this migration (`postcopy-recover`), answers it with the pages still
/// missing, asks again for every outstanding request, and returns it
/// (`postcopy-active`). Waits for as long as it takes: the pages missing here exist
/// only on the source, and giving up would not bring them back.
#[allow(clippy::too_many_arguments)]
fn wait_for_resume(
    recovery: &Recovery,
    stats: &MigStats,
    pc: &PostcopyRam,
    requests: &Requests,
    first: &transport::StreamHeader,
    session_id: u64,
    why: &str,
    opts: &IncomingOptions,
) -> transport::Receiver {
    let paused = |note: &str| {
        stats.set_pause_reason(Some(format!(
            "postcopy paused after the switch ({note}): {} pages of the guest exist only \
             on the source, and vCPUs that touch them wait; migrate-recover here and \
             migrate with resume on the source continue it",
            pc.missing_pages()
        )));
        stats.set_status(MigrationStatus::PostcopyPaused);
    };
    warn!(
        reason = why,
        missing_pages = pc.missing_pages(),
        "postcopy paused: the stream from the source broke"
    );
    paused(why);
    loop {
        // The only sender is in `recovery` itself, so this never disconnects.
        let Ok(listener) = recovery.listeners.1.recv() else {
            continue;
        };
        let local = listener
            .local_uri()
            .map_or_else(|_| "?".to_string(), |u| u.to_string());
        loop {
            let mut rx = match listener.accept_with(&opts.accept) {
                Ok(rx) => rx,
                Err(e) => {
                    warn!(error = %e, uri = %local, "postcopy: the recovery listener failed");
                    paused(&format!("recovery on {local} failed: {e}"));
                    break;
                }
            };
            let h = rx.header();
            let refusal = if !rx.is_resumed() {
                Some("a new migration, but a postcopy migration is paused here".to_string())
            } else if rx.session_id() != session_id {
                Some(format!(
                    "the stream resumes migration {:016x}; the one paused here is {session_id:016x}",
                    rx.session_id()
                ))
            } else if h.page_size != first.page_size
                || h.blocks != first.blocks
                || h.features.channels != first.features.channels
            {
                Some("the resumed stream's RAM blocks or connections differ".to_string())
            } else {
                None
            };
            if let Some(why) = refusal {
                let e = Error::Incompatible(why);
                refuse(&mut rx, &e);
                continue;
            }
            stats.set_status(MigrationStatus::PostcopyRecover);
            info!(uri = %local, "postcopy: the source reconnected");
            let answered = rx
                .resume_postcopy(&pc.missing_runs())
                .and_then(|()| rx.page_requester());
            match answered {
                Ok(requester) => {
                    requests.attach(requester, pc);
                    recovery
                        .pending
                        .store(false, std::sync::atomic::Ordering::Release);
                    stats.set_pause_reason(None);
                    stats.set_status(MigrationStatus::PostcopyActive);
                    info!(
                        missing_pages = pc.missing_pages(),
                        "postcopy: resumed over a new connection"
                    );
                    return rx;
                }
                Err(e) => {
                    warn!(error = %e, "postcopy: the resumed stream broke at once");
                    paused(&format!("the resumed stream broke: {e}"));
                }
            }
        }
        recovery
            .pending
            .store(false, std::sync::atomic::Ordering::Release);
    }
}
