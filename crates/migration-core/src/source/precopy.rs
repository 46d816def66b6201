//! The precopy loop and stop-and-copy: passes over the dirty bitmap on worker
//! threads, dirty-log syncs between them, and the switch-over. The policy that
//! decides when to switch lives in [`super::policy`].

use super::*;

impl Run {
    /// The stream's RAM blocks and how it is sent, from the parameters the migration
    /// started with (a resumed postcopy stream must have the first one's).
    pub(super) fn stream_shape(&self) -> (Vec<BlockInfo>, SendOptions) {
        let blocks: Vec<BlockInfo> = self
            .space
            .blocks()
            .iter()
            .map(|b| BlockInfo {
                id: b.id.clone(),
                size_bytes: b.size_bytes,
            })
            .collect();
        let channels = if self.caps.multifd {
            usize::from(self.params.multifd_channels)
        } else {
            1
        };
        let opts = SendOptions {
            channels: channels as u16,
            compression: match self.params.multifd_compression {
                CompressionParam::None => Compression::None,
                CompressionParam::Zstd => Compression::Zstd,
            },
            max_bandwidth_bytes_per_sec: self.live.max_bandwidth.load(Ordering::Relaxed),
            sparse_pages: self.params.x_ferry_sparse_pages,
            page_checksum: transport::PageChecksum::default(),
            connect_timeout: Duration::from_millis(self.params.x_ferry_connect_timeout_ms),
            io_timeout: Duration::from_millis(self.params.x_ferry_io_timeout_ms),
            switchover_timeout: Duration::from_millis(self.params.x_ferry_switchover_timeout_ms),
            postcopy: self.caps.postcopy_ram,
            tls: self.tls.clone(),
        };
        (blocks, opts)
    }

    /// Puts `vcpu-dirty-limit` on every vCPU, measured every `x-vcpu-dirty-limit-period`
    /// (the `dirty-limit` capability, when the migration does not converge).
    fn start_dirty_limit(&self) -> Result<()> {
        let p = &self.params;
        let limiter = &self.shared.limiter;
        limiter.set_period_ms(p.x_vcpu_dirty_limit_period)?;
        limiter.set(None, p.vcpu_dirty_limit)?;
        self.dirty_limited.store(true, Ordering::Release);
        info!(
            vcpu_dirty_limit_mib_s = p.vcpu_dirty_limit,
            period_ms = p.x_vcpu_dirty_limit_period,
            "dirty-limit: every vCPU limited (the migration does not converge)"
        );
        Ok(())
    }

    pub(super) fn migrate(&self, uri: &Uri) -> Result<()> {
        let (blocks, opts) = self.stream_shape();
        let channels = usize::from(opts.channels);
        let max_bandwidth_bytes_per_sec = opts.max_bandwidth_bytes_per_sec;
        let tls = opts.tls.is_some();
        // A fresh token for this run, published before the flag is looked at: a
        // cancel either set the flag already or fires this token.
        let token = transport::Cancel::new();
        *lock(&self.shared.cancel_token) = token.clone();
        if self.cancel.load(Ordering::Acquire) {
            token.cancel();
        }
        self.check_cancel()?;
        let sender = Sender::connect_with(uri, PAGE_SIZE as u32, blocks, opts.clone(), &token)?;
        info!(
            channels,
            tls,
            max_bandwidth_bytes_per_sec,
            downtime_limit_ms = self.live.downtime_limit_ms.load(Ordering::Relaxed),
            "setup: connected to the destination"
        );
        *lock(&self.shared.abort) = Some(sender.abort_handle());
        self.check_cancel()?;
        let stats = &self.stats;
        stats
            .total_bytes
            .store(self.space.total_pages() * PAGE_SIZE, Ordering::Relaxed);
        stats.page_size_bytes.store(PAGE_SIZE, Ordering::Relaxed);

        // Setup: the log on for MIGRATION, then everything the guest ever touched dirty.
        let bitmap = self.space.global_dirty_log_start(DirtyReason::Migration)?;
        let window = self.space.observe(DirtyReason::Migration)?;
        // With the lazy clear, the first sync re-arms only the first period's sample;
        // the sender re-arms the rest as it reads it (and `rearm_unstaged` what the
        // bulk stage skips).
        let lazy = self
            .lazy_clear()
            .then(|| LazySamples::new(self.space.total_pages()));
        // The first sync absorbs KVM's INITIALLY_SET (all ones) and anything from before.
        match lazy {
            Some(l) => self
                .space
                .global_dirty_log_sync_lazy(l.period(), l.sync())?,
            None => self.space.global_dirty_log_sync(None)?,
        };
        let pass = stats.dirty_sync_count.fetch_add(1, Ordering::Relaxed) + 1;
        // QEMU's MIGRATION_PASS 1 comes from this first sync, during setup.
        self.emit(MigrationEvent::Pass(pass));
        bitmap.clear_all();
        self.bulk_stage(&bitmap)?;
        if self.rearm_unstaged(&bitmap)? {
            // A page first touched after the scan and before its re-arm was written
            // with its dirty bit still set from the start, and the re-arm dropped that
            // bit: the second scan finds it touched and stages it. Anything touched
            // after the re-arm is logged as well.
            self.bulk_stage(&bitmap)?;
        }
        window.clear_all();
        stats
            .remaining_bytes
            .store(bitmap.count() * PAGE_SIZE, Ordering::Relaxed);
        stats
            .setup_time_ms
            .store(stats.elapsed_ms(), Ordering::Relaxed);
        if !stats.transition(MigrationStatus::Setup, MigrationStatus::Active) {
            return Err(Error::Cancelled);
        }
        info!(
            setup_ms = stats.setup_time_ms.load(Ordering::Relaxed),
            ram_bytes = self.space.total_pages() * PAGE_SIZE,
            dirty_pages = bitmap.count(),
            "setup done: dirty log on, precopy starts"
        );
        self.emit(MigrationEvent::Status(MigrationStatus::Active));

        let counters = sender.counters();
        let mut lp = Loop {
            bitmap,
            window,
            bw: BandwidthEstimator::default(),
            cost: PassCost::default(),
            period: DirtyRatePeriod::default(),
            lazy,
            growth: DirtyGrowth::new(self.space.total_pages()),
            // The log started during setup: the first sync's window runs from here.
            last_sync_ms: Some(stats.elapsed_ms()),
            auto: AutoConverge::default(),
            last_sync_dirty_pages: 0,
            period_start_bytes: 0,
            tick: Tick {
                at: Instant::now(),
                bytes: counters.total_bytes(),
                delivered: counters.total_bytes().saturating_sub(sender.queued_bytes()),
                pages: 0,
                busy_ns: 0,
            },
            sending_since: Instant::now(),
            delivered_since: counters.total_bytes().saturating_sub(sender.queued_bytes()),
            sender_counters: counters,
            channels,
            applied_max_bandwidth: opts.max_bandwidth_bytes_per_sec,
            session_id: sender.session_id(),
        };
        // The first dirty-rate period starts with the setup sync (the window was
        // cleared then), so a rate is known a second in, even during a long bulk pass.
        lp.period.add(0, stats.elapsed_ms());
        let mut iteration = 0u64;
        loop {
            self.check_cancel()?;
            iteration += 1;
            let pass_start = (
                Instant::now(),
                self.pages_sent(),
                self.stats.precopy_bytes.load(Ordering::Relaxed),
            );
            info!(
                pass = iteration,
                dirty_pages = lp.bitmap.count(),
                "pass start"
            );
            self.send_pass(&sender, &mut lp)?;
            self.measure_link(&sender, &mut lp);
            lp.cost.add_pass(
                self.pages_sent() - pass_start.1,
                self.stats.precopy_bytes.load(Ordering::Relaxed) - pass_start.2,
                pass_start.0.elapsed().as_nanos() as u64,
            );
            sender.iteration_end(iteration)?;
            stats.iterations.store(iteration, Ordering::Relaxed);
            if self.postcopy_requested() {
                // The switch syncs once more itself.
                return self.complete_postcopy(sender, &mut lp, iteration + 1);
            }
            self.sync(&mut lp)?;
            info!(
                pass = iteration,
                sent_pages = self.pages_sent() - pass_start.1,
                sent_bytes = self.stats.precopy_bytes.load(Ordering::Relaxed) - pass_start.2,
                duration_ms = pass_start.0.elapsed().as_millis() as u64,
                dirty_pages = lp.bitmap.count(),
                "pass end"
            );
            // The first decision's prediction is kept to set beside what happens
            // (`first-pass-convergence`): made once the first pass is sent, or, when
            // the engine waited for the destination to apply it, once it has.
            if !self.ready_to_switch(&lp) {
                self.log_decision(&lp, false);
                stats.record_first_pass_convergence();
                if self.postcopy_by_policy(iteration) {
                    info!(
                        pass = iteration,
                        "not converging: switching to postcopy (x-ferry-postcopy-auto)"
                    );
                    return self.complete_postcopy(sender, &mut lp, iteration + 1);
                }
                continue;
            }
            if self.wait_for_destination(&sender, iteration)? {
                // That took a while: switch only if what the guest dirtied meanwhile
                // still fits the downtime.
                self.sync(&mut lp)?;
                if !self.ready_to_switch(&lp) {
                    self.log_decision(&lp, false);
                    stats.record_first_pass_convergence();
                    continue;
                }
            }
            self.log_decision(&lp, true);
            stats.record_first_pass_convergence();
            break;
        }
        self.complete(sender, &mut lp, iteration + 1)
    }

    /// Marks the pages to send first. With private anonymous guest RAM only pages the
    /// host ever mapped are sent: never-touched pages read as zero on both sides, and
    /// reading them here would fault each one in (225 ms per GiB on this machine kind).
    pub(super) fn bulk_stage(&self, bitmap: &DirtyBitmap) -> Result<()> {
        if self.vm.untouched_ram_is_zero() {
            let mut touched = 0;
            for b in self.space.blocks() {
                touched += mark_touched_pages(b, bitmap)
                    .map_err(|e| Error::Guest(format!("reading /proc/self/pagemap: {e}")))?;
            }
            let untouched = self.space.total_pages() - touched;
            self.unsent_zero_pages.store(untouched, Ordering::Relaxed);
            // Setup: nothing was sent yet, and a second scan finds fewer.
            self.stats.zero_pages.store(untouched, Ordering::Relaxed);
        } else {
            bitmap.set_all();
        }
        Ok(())
    }

    /// True when this migration clears the dirty log lazily: asked for
    /// (`x-ferry-lazy-clear`, the default) and offered by a listener.
    pub(super) fn lazy_clear(&self) -> bool {
        self.params.x_ferry_lazy_clear && self.space.defers_clear()
    }

    /// With a listener that defers re-protecting what it harvested, the first sync
    /// left every page armed-for-clear; the sender re-arms a chunk as it reads it, so
    /// the pages the bulk stage skipped (never touched, never read) are re-armed here,
    /// or KVM would report them again at every sync. In runs of 64-page words that
    /// are not all staged (a listener clears only what it harvested, so the staged
    /// pages of such a word are merely re-armed early). Nothing to do without such a
    /// listener (returns false).
    pub(super) fn rearm_unstaged(&self, bitmap: &DirtyBitmap) -> Result<bool> {
        if !self.lazy_clear() {
            return Ok(false);
        }
        let words = bitmap.words();
        let total = self.space.total_pages();
        let mut run: Option<usize> = None;
        for w in 0..=words.len() {
            let staged = words
                .get(w)
                .is_none_or(|x| x.load(Ordering::Relaxed) == u64::MAX);
            match (run, staged) {
                (None, false) => run = Some(w),
                (Some(start), true) => {
                    let first = start as u64 * BITS_PER_WORD;
                    let end = (w as u64 * BITS_PER_WORD).min(total);
                    self.space.clear_dirty_log(first, end - first)?;
                    run = None;
                }
                _ => {}
            }
        }
        Ok(true)
    }

    /// One global dirty-log sync and the accounting QEMU does around it.
    pub(super) fn sync(&self, lp: &mut Loop) -> Result<()> {
        let stats = &self.stats;
        // A sync that closes the dirty-rate period re-arms the period sample of a lazily
        // clearing listener; the others only its sync sample. The period closes on the
        // time read before the sync, so the two always agree.
        let sync_start_ms = stats.elapsed_ms();
        let period_end = lp.period.is_due(sync_start_ms);
        let report = match &lp.lazy {
            Some(l) => self
                .space
                .global_dirty_log_sync_lazy(l.rearm(period_end), l.sync())?,
            None => self.space.global_dirty_log_sync(None)?,
        };
        let syncs = stats.dirty_sync_count.fetch_add(1, Ordering::Relaxed) + 1;
        let new_pages = report.new_pages(DirtyReason::Migration);
        debug!(
            sync = syncs,
            found_pages = report.reported_pages,
            new_pages,
            duration_us = report.sync_ns / 1000,
            "dirty-log sync"
        );
        // With the lazy clear, pages waiting to be sent are not reported again: the
        // pages written are estimated from the listener's exact sample.
        let written = report.estimated_written_pages();
        lp.last_sync_dirty_pages = written;
        let now_ms = stats.elapsed_ms();
        if let Some(prev) = lp.last_sync_ms.replace(now_ms) {
            lp.growth.observe_sync(now_ms.saturating_sub(prev), written);
        }
        let bytes = lp.sender_counters.total_bytes();
        stats.transferred_bytes.store(bytes, Ordering::Relaxed);
        if let Some((new_rate, period_ms)) = lp.period.add(new_pages, sync_start_ms) {
            // QEMU's rule counts a page once per sync; Ferry's dirty-pages-rate counts it
            // once per period (unique pages), which is the guest's write rate.
            let unique = match &mut lp.lazy {
                Some(l) => {
                    let sampled = lp.window.count_in(&l.period());
                    l.end_period(sampled)
                }
                None => lp.window.count(),
            };
            lp.window.clear_all();
            lp.growth.observe_period(period_ms, unique);
            stats
                .dirty_pages_rate
                .store(unique * 1000 / period_ms.max(1), Ordering::Relaxed);
            stats
                .true_dirty_pages_rate
                .store(unique * 1000 / period_ms.max(1), Ordering::Relaxed);
            stats
                .new_dirty_pages_rate
                .store(new_rate, Ordering::Relaxed);
            let sent = bytes - lp.period_start_bytes;
            lp.period_start_bytes = bytes;
            // Auto-converge's trigger, which QEMU's dirty-limit shares: the guest
            // dirtied more than the threshold's share of what was sent, twice.
            let dirtied = new_rate * period_ms / 1000 * PAGE_SIZE;
            let watching = self.caps.auto_converge
                || (self.caps.dirty_limit && !self.dirty_limited.load(Ordering::Acquire));
            let p = &self.params;
            let triggered = if watching {
                lp.auto.on_period(
                    dirtied,
                    sent,
                    p.throttle_trigger_threshold,
                    p.cpu_throttle_initial,
                    p.cpu_throttle_increment,
                    p.max_cpu_throttle,
                )
            } else {
                None
            };
            match triggered {
                Some(pct) if self.caps.auto_converge => {
                    info!(
                        throttle_percent = pct,
                        dirtied_bytes = dirtied,
                        sent_bytes = sent,
                        "auto-converge: vCPU throttle changed"
                    );
                    self.vm.set_throttle_percent(pct);
                    stats
                        .cpu_throttle_percentage
                        .store(u64::from(pct), Ordering::Relaxed);
                }
                Some(_) => self.start_dirty_limit()?,
                None => {}
            }
            if self.dirty_limited.load(Ordering::Acquire) {
                stats.set_dirty_limit(Some(self.shared.limiter.round_times_us()));
            }
        }
        let remaining = lp.bitmap.count() * PAGE_SIZE;
        stats.remaining_bytes.store(remaining, Ordering::Relaxed);
        // In bytes on the wire: what the link has to carry.
        let conv = predict_convergence(
            lp.cost.wire_bytes(lp.bitmap.count()),
            &lp.growth,
            lp.cost.bytes_per_page(),
            self.bandwidth(lp),
            self.live.downtime_limit_ms.load(Ordering::Relaxed),
        );
        stats.set_convergence(conv);
        self.emit(MigrationEvent::Pass(syncs));
        Ok(())
    }

    /// Sends every page dirty in the bitmap once, on `lp.channels` worker threads; the
    /// calling thread refreshes the numbers and, while the guest runs, syncs the dirty
    /// log whenever a dirty-rate period is due (at least once a second), so the rate
    /// is measured over 1 s windows however long a pass takes.
    pub(super) fn send_pass(&self, sender: &Sender, lp: &mut Loop) -> Result<()> {
        // With the guest paused its vCPUs leave the host's cores free: the final pass
        // reads (and sorts out zero and sparse) pages on all of them, whatever the
        // number of channels (workers share a channel's connection under its lock).
        let workers = if self.paused.load(Ordering::Acquire) {
            lp.channels.max(
                std::thread::available_parallelism()
                    .map_or(1, |n| n.get())
                    .min(MAX_FINAL_PASS_WORKERS),
            )
        } else {
            lp.channels
        };
        let bitmap = lp.bitmap.clone();
        let abort = AtomicBool::new(false);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(workers);
        std::thread::scope(|s| {
            for k in 0..workers {
                let done_tx = done_tx.clone();
                let (bitmap, abort, first_error) = (&bitmap, &abort, &first_error);
                let work = move || {
                    let me = std::thread::current();
                    let _listed = self.stats.list_thread(me.name().unwrap_or("mig/send"));
                    // A worker that panics stops the others and fails the pass.
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        self.send_share(sender, bitmap, k, workers, abort)
                    }))
                    .unwrap_or_else(|p| Err(Error::panicked("a migration sender thread", &*p)));
                    if let Err(e) = r {
                        abort.store(true, Ordering::Release);
                        lock(first_error).get_or_insert(e);
                    }
                    // The receiver lives until every worker is done (this scope).
                    let _ = done_tx.send(());
                };
                // Named, so `top -H` and query-migrationthreads show who sends.
                if let Err(e) = std::thread::Builder::new()
                    .name(format!("mig/send{k}"))
                    .spawn_scoped(s, work)
                {
                    // Its share of the pages would stay unsent: fail the pass.
                    abort.store(true, Ordering::Release);
                    lock(first_error).get_or_insert(Error::Guest(format!(
                        "cannot start a migration sender thread: {e}"
                    )));
                }
            }
            drop(done_tx);
            let mut finished = 0;
            // A panic here (a dirty-log sync's) unwinds through the scope, which joins
            // the workers: stop them first.
            let _stop_workers = AbortOnUnwind(&abort);
            while finished < workers {
                match done_rx.recv_timeout(Duration::from_millis(POLL_MS)) {
                    Ok(()) => finished += 1,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                }
                self.tick(sender, lp);
                let paused = self.paused.load(Ordering::Acquire);
                if !paused && lp.period.is_due(self.stats.elapsed_ms()) {
                    if let Err(e) = self.sync(lp) {
                        abort.store(true, Ordering::Release);
                        lock(&first_error).get_or_insert(e);
                    }
                }
                // A cancel, or a switch to postcopy, ends a precopy pass early: the
                // pages not taken yet stay in the bitmap.
                if self.cancel.load(Ordering::Acquire) || (!paused && self.postcopy_requested()) {
                    abort.store(true, Ordering::Release);
                }
            }
        });
        self.tick(sender, lp);
        match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => self.check_cancel(),
        }
    }

    /// Worker `k` of `n`: claims every `n`th chunk of bitmap words and sends its pages.
    fn send_share(
        &self,
        sender: &Sender,
        bitmap: &DirtyBitmap,
        k: usize,
        n: usize,
        abort: &AtomicBool,
    ) -> Result<()> {
        let max_batch = sender.max_batch_pages().max(1);
        let mut batch = Batch::with_capacity(max_batch);
        let sparse = sender.header().features.sparse_pages;
        let words = bitmap.words().len();
        let paused = || self.paused.load(Ordering::Relaxed);
        let defers_clear = self.lazy_clear();
        let mut chunk = k * CHUNK_WORDS;
        while chunk < words {
            if abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            let chunk_end = (chunk + CHUNK_WORDS).min(words);
            let mut taken = [0u64; CHUNK_WORDS];
            for (t, w) in taken.iter_mut().zip(chunk..chunk_end) {
                *t = bitmap.take_word(w);
            }
            if defers_clear && !paused() && taken.iter().any(|&b| b != 0) {
                // QEMU's lazy clear: a listener that deferred re-protecting what it
                // harvested (KvmBitmapConfig::deferred_clear) re-arms these pages now,
                // just before they are read, so a write from here on is logged again.
                let first = chunk as u64 * BITS_PER_WORD;
                let pages = ((chunk_end - chunk) as u64 * BITS_PER_WORD)
                    .min(self.space.total_pages().saturating_sub(first));
                self.space.clear_dirty_log(first, pages)?;
            }
            for (mut bits, w) in taken.into_iter().zip(chunk..chunk_end) {
                while bits != 0 {
                    let page = w as u64 * BITS_PER_WORD + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let Some((block_idx, offset)) = self.space.locate_page(page) else {
                        continue;
                    };
                    if batch.block != Some(block_idx)
                        || batch.len() >= max_batch
                        || batch.offsets.len() >= SEND_BATCH_PAGES
                    {
                        self.flush(sender, &mut batch, paused())?;
                        batch.block = Some(block_idx);
                    }
                    let Some(page) = self.ram.page(block_idx, offset) else {
                        continue;
                    };
                    // SAFETY: the sender's reads race the guest's writes by design: the
                    // bytes are classified, hashed and written to the socket as they
                    // are, never assumed to stay the same, and a page torn by a write is
                    // resent because that write dirtied it again (FORMAT.md, torn
                    // pages). While the guest is paused nothing writes it. Nothing in
                    // this process writes a source guest's RAM through Rust code.
                    let data = unsafe { page.as_bytes() };
                    let class = if sparse {
                        batch.sparse.classify(offset, data)
                    } else if is_zero(data) {
                        PageClass::Zero
                    } else {
                        PageClass::Dense
                    };
                    match class {
                        PageClass::Zero => batch.zero.push(offset),
                        // Its words are in the batch already.
                        PageClass::Sparse => {}
                        // Sent in place, no copy. While the guest runs the batch goes
                        // out live: a page torn by a write in flight is resent, because
                        // that write dirtied it again (transport FORMAT.md, torn pages).
                        PageClass::Dense => {
                            batch.offsets.push(offset);
                            batch.pages.push(data);
                        }
                    }
                }
            }
            self.flush(sender, &mut batch, paused())?;
            chunk += n * CHUNK_WORDS;
        }
        Ok(())
    }

    /// `normal` and `duplicate` of query-migrate: the transport's count of pages and
    /// zero pages put on the wire (one set of counters), plus the zero pages the bulk
    /// stage never sent. Several workers publish at once, so the maximum wins.
    pub(super) fn publish_pages(&self, sender: &Sender) {
        let c = sender.counters();
        self.stats
            .normal_pages
            .fetch_max(c.pages(), Ordering::Relaxed);
        self.stats.zero_pages.fetch_max(
            c.zero_pages() + self.unsent_zero_pages.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    fn flush<'a>(&self, sender: &Sender, batch: &mut Batch<'a>, paused: bool) -> Result<()> {
        let Some(block) = batch.block else {
            return Ok(());
        };
        let start = Instant::now();
        if !batch.offsets.is_empty() {
            if paused {
                sender.send_pages(block, &batch.offsets, &batch.pages)?;
            } else {
                sender.send_live_pages(block, &batch.offsets, &batch.pages)?;
            }
        }
        if !batch.sparse.is_empty() {
            sender.send_sparse_pages(block, &batch.sparse)?;
            let n = batch.sparse.len() as u64;
            self.stats.sparse_pages.fetch_add(n, Ordering::Relaxed);
        }
        if !batch.zero.is_empty() {
            sender.send_zero_pages(block, &batch.zero)?;
        }
        self.publish_pages(sender);
        self.busy_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        // Everything on the wire so far was sent in precopy until the switch-over,
        // which takes its own count (`complete`). Several workers send at once, so a
        // difference of totals around one batch would count the others' bytes too.
        if !paused {
            self.stats
                .precopy_bytes
                .fetch_max(sender.counters().total_bytes(), Ordering::Relaxed);
        }
        batch.clear();
        Ok(())
    }

    /// Stop and copy: pause, final sync, the rest of the pages, device state, end of
    /// stream, and the destination's word that the guest runs there.
    pub(super) fn complete(&self, sender: Sender, lp: &mut Loop, iteration: u64) -> Result<()> {
        let paused_at = Instant::now();
        // Through the run state: STOP if the guest ran (before the `device` status, as
        // QEMU orders them), and a failure from here on returns the guest to the state
        // it had, or that a `stop` since asked for.
        let was_running = self.pause_for_switch(MigrationStatus::Device)?;
        info!(was_running, "switch-over: guest paused (finish-migrate)");
        let phases = &self.stats.downtime_phases;
        let mut clock = PhaseClock(paused_at);
        clock.lap(&phases.pause_us);
        // The precopy workers are done: every byte from here on is the downtime's.
        let counters = sender.counters();
        let at_pause = counters.total_bytes();
        self.stats.precopy_bytes.store(at_pause, Ordering::Relaxed);
        sender.set_max_bandwidth(0);
        self.sync(lp)?;
        clock.lap(&phases.sync_us);
        let final_start = (Instant::now(), self.pages_sent());
        self.send_pass(&sender, lp)?;
        sender.iteration_end(iteration)?;
        clock.lap(&phases.pages_us);
        info!(
            pass = iteration,
            sent_pages = self.pages_sent() - final_start.1,
            sent_bytes = counters.total_bytes() - at_pause,
            duration_ms = final_start.0.elapsed().as_millis() as u64,
            "final pass sent (guest paused)"
        );
        self.send_device_state(&sender, was_running)?;
        clock.lap(&phases.device_us);
        self.check_cancel()?;
        // The switch-over: the destination says it loaded everything, the source
        // commits, the destination starts the guest and acknowledges. Until the
        // commit any failure resumes the source; after it a missing answer is
        // `InDoubt` and the source stays paused (see `run`). `resumed: false` is a
        // destination that holds the guest paused for its VMM to start (autostart
        // off, QEMU's `-S`), or a `file:` snapshot: the migration succeeded either
        // way. A destination that failed refuses instead, an error.
        self.committing.store(true, Ordering::Release);
        sender.finish()?;
        clock.lap(&phases.ack_us);
        let after = counters.total_bytes();
        self.stats
            .downtime_bytes
            .store(after.saturating_sub(at_pause), Ordering::Relaxed);
        let downtime_ms = paused_at.elapsed().as_millis() as u64;
        self.stats.downtime_ms.store(downtime_ms, Ordering::Relaxed);
        self.publish_final_totals(after);
        // The guest now runs on the destination; the source stays paused (postmigrate,
        // set by `run`).
        self.vm.set_throttle_percent(0);
        // The guest runs on the destination now: nothing may fail this migration any
        // more (failing would resume the source, and two copies would run). A listener
        // that cannot stop logging leaves the slots logging, which only costs speed.
        if let Err(e) = self.space.global_dirty_log_stop(DirtyReason::Migration) {
            warn!(error = %e, "stopping the migration's dirty log failed (slots keep logging)");
        }
        Ok(())
    }
}

impl Run {
    /// Pauses the guest for a switch-over (finish-migrate) and moves the status from
    /// active to `to` (`device`, or `postcopy-active`); returns whether the guest ran.
    /// A cancel that came first wins ([`Error::Cancelled`]); the end of the run then
    /// resumes the guest.
    pub(super) fn pause_for_switch(&self, to: MigrationStatus) -> Result<bool> {
        // Set first: a pause that panics has entered finish-migrate already.
        self.switching.store(true, Ordering::Release);
        let was_running = self.run.begin_switchover()?;
        self.paused.store(true, Ordering::Release);
        let from = if self.caps.pause_before_switchover {
            self.wait_before_switchover()?;
            MigrationStatus::PreSwitchover
        } else {
            MigrationStatus::Active
        };
        if !self.stats.transition(from, to) {
            return Err(Error::Cancelled);
        }
        self.emit(MigrationEvent::Status(to));
        Ok(was_running)
    }

    /// Capability `pause-before-switchover`: with the guest paused, waits in
    /// `pre-switchover` for `migrate-continue` (or a cancel, which wins).
    fn wait_before_switchover(&self) -> Result<()> {
        // A continue sent before this pause is not for it (QEMU drops those too).
        while self.shared.proceed.1.try_recv().is_ok() {}
        if !self
            .stats
            .transition(MigrationStatus::Active, MigrationStatus::PreSwitchover)
        {
            return Err(Error::Cancelled);
        }
        self.emit(MigrationEvent::Status(MigrationStatus::PreSwitchover));
        info!("pre-switchover: the guest is paused; waiting for migrate-continue");
        // Woken by migrate-continue or by a cancel (which sets its flag first, so a
        // cancel before this wait is seen too).
        self.shared.proceed.1.recv().map_err(|_| Error::Cancelled)?;
        self.check_cancel()
    }

    /// The totals of a finished migration: `after` bytes transferred, nothing left,
    /// and QEMU's final mbps (all bytes over the time after setup).
    pub(super) fn publish_final_totals(&self, after: u64) {
        let stats = &self.stats;
        stats.transferred_bytes.store(after, Ordering::Relaxed);
        stats.remaining_bytes.store(0, Ordering::Relaxed);
        let busy_ms = stats
            .elapsed_ms()
            .saturating_sub(stats.setup_time_ms.load(Ordering::Relaxed))
            .max(1);
        stats.mbps.store(
            after as f64 * 8.0 / busy_ms as f64 / 1000.0,
            Ordering::Relaxed,
        );
    }

    /// Saves the device state and sends it with the run state (QEMU's global state: a
    /// guest that was paused stays paused on the destination); returns its size.
    pub(super) fn send_device_state(&self, sender: &Sender, was_running: bool) -> Result<u64> {
        let state = self
            .vm
            .save_device_state()
            .map_err(|e| Error::Guest(format!("saving device state: {e}")))?;
        info!(
            device_state_bytes = state.len() as u64,
            "device state saved"
        );
        sender.send_device_state(
            RUN_STATE_DEVICE,
            if was_running {
                RunState::Running.name().as_bytes()
            } else {
                RunState::Paused.name().as_bytes()
            },
        )?;
        sender.send_device_state("vcpus", &state)?;
        Ok(state.len() as u64)
    }
}

/// Times the downtime's phases: each lap stores the time since the previous one.
pub(super) struct PhaseClock(pub(super) Instant);

impl PhaseClock {
    /// Stores the time since the last lap in `phase`, µs.
    pub(super) fn lap(&mut self, phase: &AtomicU64) {
        let now = Instant::now();
        phase.store((now - self.0).as_micros() as u64, Ordering::Relaxed);
        self.0 = now;
    }
}

/// Sets its flag when dropped by a panic's unwinding.
struct AbortOnUnwind<'a>(&'a AtomicBool);

impl Drop for AbortOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// Pages of one block waiting to go out, borrowed from guest memory.
struct Batch<'a> {
    block: Option<usize>,
    offsets: Vec<u64>,
    pages: Vec<&'a [u8]>,
    sparse: SparseBatch,
    zero: Vec<u64>,
}

impl<'a> Batch<'a> {
    pub(super) fn with_capacity(n: usize) -> Self {
        Batch {
            block: None,
            offsets: Vec::with_capacity(n),
            pages: Vec::with_capacity(n),
            sparse: SparseBatch::with_capacity(n),
            zero: Vec::with_capacity(n),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.offsets.len() + self.sparse.len() + self.zero.len()
    }

    pub(super) fn clear(&mut self) {
        self.block = None;
        self.offsets.clear();
        self.pages.clear();
        self.sparse.clear();
        self.zero.clear();
    }
}
