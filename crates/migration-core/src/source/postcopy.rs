//! The switch to postcopy and the source's postcopy phase (`docs/postcopy.md`): pause,
//! one last sync, tell the destination which of its pages are stale, hand the guest
//! over, then serve the destination's page requests on the priority connection while
//! the rest of the dirty bitmap goes out in the background.

use super::*;

/// How long the request server waits for a request before it looks at its stop flag.
const REQUEST_POLL: Duration = Duration::from_millis(20);

impl Run {
    /// True once `migrate-start-postcopy` asked for the switch and the capability is on.
    pub(super) fn postcopy_requested(&self) -> bool {
        self.caps.postcopy_ram && self.shared.start_postcopy.load(Ordering::Acquire)
    }

    /// Ferry's policy (`x-ferry-postcopy-auto`, with the capability): past the first
    /// pass and a whole dirty-rate period, the prediction says the guest dirties
    /// memory faster than it can be sent, so precopy alone would not end.
    pub(super) fn postcopy_by_policy(&self, iteration: u64) -> bool {
        self.caps.postcopy_ram
            && self.params.x_ferry_postcopy_auto
            && iteration >= 2
            && matches!(
                self.stats.convergence(),
                stats::Convergence::NotConverging { .. }
            )
    }

    /// The switch to postcopy and the postcopy phase, up to the destination's `Done`.
    ///
    /// Until the destination acknowledges the commit, a failure resumes the source as
    /// in precopy. From the acknowledgement on the guest runs on the destination and
    /// this source holds the only copy of the pages it still lacks: a failure then
    /// leaves the source paused, keeping them (see `run_to_end`).
    pub(super) fn complete_postcopy(
        &self,
        sender: Sender,
        lp: &mut Loop,
        iteration: u64,
    ) -> Result<()> {
        let paused_at = Instant::now();
        let was_running = self.pause_for_switch(MigrationStatus::PostcopyActive)?;
        info!(was_running, "postcopy: guest paused for the switch");
        let phases = &self.stats.downtime_phases;
        let mut clock = super::precopy::PhaseClock(paused_at);
        clock.lap(&phases.pause_us);
        let counters = sender.counters();
        let at_pause = counters.total_bytes();
        self.stats.precopy_bytes.store(at_pause, Ordering::Relaxed);
        // The last sync: what the guest wrote since its page was sent is stale on the
        // destination, and what was never sent is missing there; both are in the bitmap.
        self.sync(lp)?;
        clock.lap(&phases.sync_us);
        sender.iteration_end(iteration)?;
        let mut discarded_pages = 0;
        for (block_idx, b) in self.space.blocks().iter().enumerate() {
            let runs = set_runs(&lp.bitmap, b.first_page, b.pages());
            discarded_pages += runs.iter().map(|r| r.1).sum::<u64>();
            if !runs.is_empty() {
                sender.send_discard(block_idx, &runs)?;
            }
        }
        // The downtime's "pages": the discards, which stand in for the final pass.
        clock.lap(&phases.pages_us);
        let device_state_bytes = self.send_device_state(&sender, was_running)?;
        clock.lap(&phases.device_us);
        self.check_cancel()?;
        info!(
            missing_pages = discarded_pages,
            device_state_bytes, "postcopy: switching over"
        );
        self.committing.store(true, Ordering::Release);
        sender.switch_to_postcopy()?;
        // The guest is the destination's from here on.
        self.in_postcopy.store(true, Ordering::Release);
        clock.lap(&phases.ack_us);
        let downtime_ms = paused_at.elapsed().as_millis() as u64;
        self.stats.downtime_ms.store(downtime_ms, Ordering::Relaxed);
        let switched_bytes = counters.total_bytes();
        self.stats
            .downtime_bytes
            .store(switched_bytes - at_pause, Ordering::Relaxed);
        info!(
            downtime_ms,
            missing_pages = discarded_pages,
            "postcopy: the destination runs the guest"
        );
        let cap = self.live.max_postcopy_bandwidth.load(Ordering::Relaxed);
        sender.set_max_bandwidth(cap);
        lp.applied_max_bandwidth = cap;
        // Bytes of the streams that broke, and where the current one's postcopy part
        // starts (the first stream's at the switch; a resumed one's at 0).
        let (mut earlier_bytes, mut postcopy_before, mut stream_start) = (0, 0, switched_bytes);
        let mut sender = sender;
        loop {
            let counters = sender.counters();
            let sent = self
                .postcopy_send(&sender, lp, postcopy_before, stream_start)
                .and_then(|()| Ok(sender.finish_postcopy()?));
            let stream_bytes = counters.total_bytes();
            postcopy_before += stream_bytes - stream_start;
            self.stats
                .postcopy_bytes
                .store(postcopy_before, Ordering::Relaxed);
            earlier_bytes += stream_bytes;
            match sent {
                Ok(()) => break,
                Err(e) => {
                    sender = self.wait_for_resume(&e, lp)?;
                    stream_start = 0;
                }
            }
        }
        let after = earlier_bytes;
        self.publish_final_totals(after);
        let stats = &self.stats;
        self.vm.set_throttle_percent(0);
        if let Err(e) = self.space.global_dirty_log_stop(DirtyReason::Migration) {
            warn!(error = %e, "stopping the migration's dirty log failed (slots keep logging)");
        }
        info!(
            postcopy_requests = stats.postcopy_requests.load(Ordering::Relaxed),
            postcopy_bytes = after - switched_bytes,
            "postcopy: the destination has every page"
        );
        Ok(())
    }

    /// Sends every page still in the bitmap, on the data connections with the paused
    /// guest's final-pass workers, while a second thread answers the destination's
    /// requests on the priority connection. The background sends a page once (whoever
    /// clears its bit sends it); a requested page goes out on the priority connection
    /// even when a background batch has it on its way.
    ///
    /// `postcopy_bytes` counts `postcopy_before` (sent on streams that broke) plus what
    /// this sender wrote past `stream_start`.
    fn postcopy_send(
        &self,
        sender: &Sender,
        lp: &mut Loop,
        postcopy_before: u64,
        stream_start: u64,
    ) -> Result<()> {
        let requests = sender
            .page_requests()
            .ok_or_else(|| Error::Guest("the stream was not opened for postcopy".into()))?
            .clone();
        let stop = AtomicBool::new(false);
        let bitmap = lp.bitmap.clone();
        std::thread::scope(|s| {
            let server = std::thread::Builder::new()
                .name("mig/postcopy-req".into())
                .spawn_scoped(s, || {
                    let _listed = self.stats.list_thread("mig/postcopy-req");
                    self.serve_requests(sender, &bitmap, &requests, &stop)
                })
                .map_err(|e| Error::Guest(format!("cannot start the request server: {e}")))?;
            let background = self.send_pass(sender, lp);
            self.stats.remaining_bytes.store(0, Ordering::Relaxed);
            self.stats.postcopy_bytes.store(
                postcopy_before + sender.counters().total_bytes() - stream_start,
                Ordering::Relaxed,
            );
            stop.store(true, Ordering::Release);
            let served = server
                .join()
                .unwrap_or_else(|p| Err(Error::panicked("the postcopy request server", &*p)));
            background.and(served)
        })
    }

    /// Pauses a postcopy migration whose stream broke (`why`): `postcopy-paused`, every
    /// page kept, until `migrate` with `resume` names the destination's recovery
    /// address. Then opens the resumed stream there and returns it, the bitmap set to
    /// exactly the pages the destination still lacks (`postcopy-active`). A resume
    /// that fails pauses again, saying why. Waits for as long as it takes: the
    /// destination runs the guest and needs pages only this side holds. Ends with an
    /// error only when the source itself goes away.
    fn wait_for_resume(&self, why: &Error, lp: &mut Loop) -> Result<Sender> {
        let by_user = self.shared.pause_requested.swap(false, Ordering::AcqRel);
        let reason = if by_user {
            "Postcopy migration is paused by the user".to_string()
        } else {
            self.explain(why)
        };
        let paused = |note: &str| {
            self.stats.set_pause_reason(Some(format!(
                "postcopy paused after the switch: {note}; the guest runs on the destination, \
                 which lacks pages only this source holds ({} not sent yet; every page kept, \
                 the guest paused here); if the destination process is gone the guest is \
                 lost there, else migrate-recover there and migrate with resume here \
                 continue it",
                lp.bitmap.count()
            )));
            self.set_status(MigrationStatus::PostcopyPaused);
        };
        lock(&self.shared.abort).take();
        warn!(reason = %reason, "postcopy paused: the stream to the destination broke");
        paused(&reason);
        let (blocks, opts) = self.stream_shape();
        loop {
            let uri = match self.shared.resume.1.recv() {
                Ok(ResumeCmd::Resume(uri)) => uri,
                Ok(ResumeCmd::Shutdown) | Err(_) => {
                    return Err(Error::Guest(format!(
                        "the source shut down while postcopy was paused ({reason})"
                    )))
                }
            };
            // `resume` moved the status to postcopy-recover already.
            info!(uri = %uri, "postcopy: resuming over a new connection");
            let token = transport::Cancel::new();
            let session_id = lp.session_id;
            match Sender::resume_postcopy(
                &uri,
                PAGE_SIZE as u32,
                blocks.clone(),
                opts.clone(),
                &token,
                session_id,
            ) {
                Ok((sender, missing)) => {
                    // The destination's list is the truth: whatever was in flight when
                    // the stream broke and did not land is in it.
                    lp.bitmap.clear_all();
                    let space_blocks = self.space.blocks();
                    let mut pages = 0;
                    for (b, runs) in &missing {
                        // The transport checked every run against the header's blocks,
                        // which are these.
                        let Some(first_page) = space_blocks.get(*b).map(|b| b.first_page) else {
                            continue;
                        };
                        for &(first, n) in runs {
                            for p in first..first + n {
                                lp.bitmap.set(first_page + p);
                            }
                            pages += n;
                        }
                    }
                    self.stats
                        .remaining_bytes
                        .store(pages * PAGE_SIZE, Ordering::Relaxed);
                    let cap = self.live.max_postcopy_bandwidth.load(Ordering::Relaxed);
                    sender.set_max_bandwidth(cap);
                    lp.applied_max_bandwidth = cap;
                    *lock(&self.shared.abort) = Some(sender.abort_handle());
                    self.stats.set_pause_reason(None);
                    self.set_status(MigrationStatus::PostcopyActive);
                    info!(missing_pages = pages, "postcopy: resumed");
                    return Ok(sender);
                }
                Err(e) => {
                    warn!(error = %e, uri = %uri, "postcopy: resuming failed");
                    paused(&format!("resuming on {uri} failed: {e}"));
                }
            }
        }
    }

    /// Answers page requests until `stop`, or until the back-channel ends.
    fn serve_requests(
        &self,
        sender: &Sender,
        bitmap: &DirtyBitmap,
        requests: &crossbeam_channel::Receiver<transport::PageRequest>,
        stop: &AtomicBool,
    ) -> Result<()> {
        let blocks = self.space.blocks();
        while !stop.load(Ordering::Acquire) {
            let req = match requests.recv_timeout(REQUEST_POLL) {
                Ok(r) => r,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                // The back-channel ended: the background pass sees the same on its
                // next write, or `finish_postcopy` reads why.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            self.stats.postcopy_requests.fetch_add(1, Ordering::Relaxed);
            let Some(b) = blocks.get(req.block_idx) else {
                return Err(Error::Incompatible(format!(
                    "the destination requested a page of block {}, which does not exist",
                    req.block_idx
                )));
            };
            if req.page_index >= b.pages() {
                return Err(Error::Incompatible(format!(
                    "the destination requested page {} of block {} ({} pages)",
                    req.page_index,
                    b.id,
                    b.pages()
                )));
            }
            // Sent now whether or not a background batch took it already: that batch
            // may wait behind megabytes in its connection, and a vCPU waits on this
            // page. Clearing the bit keeps the background from sending it later; a
            // copy that lands second is dropped by the destination (a page lands once).
            bitmap.test_and_clear(b.first_page + req.page_index);
            let Some(page) = self.ram.page(req.block_idx, req.page_index) else {
                continue;
            };
            // SAFETY: the guest is paused on this side for good (postcopy): nothing
            // writes its RAM while the page is read.
            let data = unsafe { page.as_bytes() };
            sender.send_requested_pages(req.block_idx, &[req.page_index], &[data])?;
        }
        Ok(())
    }
}

/// The runs of set bits of `bitmap` over the global pages `[first, first + pages)`,
/// as `(page in the block, pages)`.
fn set_runs(bitmap: &DirtyBitmap, first: u64, pages: u64) -> Vec<(u64, u64)> {
    // Word by word (this runs in the downtime): clear words are skipped whole.
    crate::guest::page_runs(
        bitmap
            .iter_set_from(first)
            .take_while(|&p| p < first + pages)
            .map(|p| p - first),
    )
}

#[cfg(test)]
mod tests {
    use super::set_runs;
    use dirty_sync::DirtyBitmap;

    #[test]
    fn runs_of_a_block_are_block_relative() {
        let b = DirtyBitmap::new(200);
        for p in [3, 4, 5, 64, 65, 130, 199] {
            b.set(p);
        }
        assert_eq!(set_runs(&b, 0, 100), vec![(3, 3), (64, 2)]);
        assert_eq!(set_runs(&b, 100, 100), vec![(30, 1), (99, 1)]);
        assert!(set_runs(&DirtyBitmap::new(64), 0, 64).is_empty());
    }
}
