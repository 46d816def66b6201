//! When to switch over, and the numbers behind it: bandwidth, expected downtime,
//! the convergence prediction, the wait for the destination to catch up, and the
//! progress counters refreshed every tick. The loop that acts on them is in
//! [`super::precopy`].

use super::*;

impl Run {
    pub(super) fn bandwidth(&self, lp: &Loop) -> u64 {
        let avail = self.live.avail_switchover_bandwidth.load(Ordering::Relaxed);
        if avail > 0 {
            return avail;
        }
        // Never an assumed speed: until the link was measured (the estimate's lower
        // bound counts from the first byte received) the answer is 0, and nothing
        // switches over on it.
        let cap = self.live.max_bandwidth.load(Ordering::Relaxed);
        match (lp.bw.bytes_per_sec(), cap) {
            (est, 0) => est,
            (est, cap) => est.min(cap),
        }
    }

    /// Pages sent so far (whole, sparse and zero).
    pub(super) fn pages_sent(&self) -> u64 {
        self.stats.normal_pages.load(Ordering::Relaxed)
            + self.stats.zero_pages.load(Ordering::Relaxed)
    }

    /// How long the rest would take to send, ms, at what pages cost on the wire and
    /// the measured bandwidth; `None` until the bandwidth is known.
    pub(super) fn expected_downtime_ms(&self, lp: &Loop) -> Option<u64> {
        lp.cost.expected_ms(lp.bitmap.count(), self.bandwidth(lp))
    }

    /// The convergence decision after a pass: debug while another pass is needed,
    /// info for the switch-over.
    pub(super) fn log_decision(&self, lp: &Loop, switch: bool) {
        let remaining_bytes = lp.bitmap.count() * PAGE_SIZE;
        let expected_downtime_ms = self.expected_downtime_ms(lp);
        let downtime_limit_ms = self.live.downtime_limit_ms.load(Ordering::Relaxed);
        let bandwidth_bytes_per_sec = self.bandwidth(lp);
        if switch {
            info!(
                remaining_bytes,
                expected_downtime_ms,
                downtime_limit_ms,
                bandwidth_bytes_per_sec,
                "converged: switching over"
            );
        } else {
            debug!(
                remaining_bytes,
                expected_downtime_ms,
                downtime_limit_ms,
                bandwidth_bytes_per_sec,
                "the rest does not fit the downtime limit yet: another pass"
            );
        }
    }

    pub(super) fn ready_to_switch(&self, lp: &Loop) -> bool {
        let limit_ms = self.live.downtime_limit_ms.load(Ordering::Relaxed);
        self.expected_downtime_ms(lp)
            .is_some_and(|ms| ms <= limit_ms)
    }

    /// Waits (the guest still running) until the destination has every page of
    /// `iteration` in its memory. Its backlog must not land in the downtime: writing
    /// pages it never had costs it a page fault each (~2 µs here, 140 ms for 256 MiB),
    /// and small sparse records, or a slow link with deep buffers, let the sender run
    /// far ahead of it. True when the wait took longer than [`CATCH_UP_MS`].
    ///
    /// Bounded: a destination that receives nothing for the I/O timeout (its queue
    /// does not shrink) fails the migration, with the guest still running here.
    pub(super) fn wait_for_destination(&self, sender: &Sender, iteration: u64) -> Result<bool> {
        let start = Instant::now();
        let io_timeout = Duration::from_millis(self.params.x_ferry_io_timeout_ms);
        let mut queued = sender.queued_bytes();
        let mut progress_at = start;
        debug!(
            pass = iteration,
            "waiting for the destination to apply the pass"
        );
        while !sender.wait_applied(iteration, Duration::from_millis(POLL_MS))? {
            self.check_cancel()?;
            let now_queued = sender.queued_bytes();
            if now_queued < queued {
                progress_at = Instant::now();
            }
            queued = now_queued;
            if progress_at.elapsed() >= io_timeout {
                return Err(Error::Transport(transport::Error::TimedOut(format!(
                    "the destination did not confirm pass {iteration} and received \
                     nothing for {} ms",
                    io_timeout.as_millis()
                ))));
            }
        }
        debug!(
            pass = iteration,
            waited_ms = start.elapsed().as_millis() as u64,
            "the destination applied the pass"
        );
        Ok(start.elapsed() > Duration::from_millis(CATCH_UP_MS))
    }

    /// Refreshes the bandwidth's lower bound (what the receiver has, over the time
    /// since sending began) after a pass: short passes end before the first progress
    /// tick, and the switch-over must not wait for one to know the link carries them.
    pub(super) fn measure_link(&self, sender: &Sender, lp: &mut Loop) {
        let bytes = lp.sender_counters.total_bytes();
        let delivered = bytes - sender.queued_bytes().min(bytes);
        lp.bw.set_lower_bound(
            delivered.saturating_sub(lp.delivered_since),
            lp.sending_since.elapsed().as_nanos() as u64,
        );
    }

    /// Refreshes the progress numbers; called every [`TICK_MS`] while sending.
    pub(super) fn tick(&self, sender: &Sender, lp: &mut Loop) {
        let now = Instant::now();
        let dt_ns = now.duration_since(lp.tick.at).as_nanos() as u64;
        if dt_ns < TICK_MS * 1_000_000 {
            return;
        }
        // max-bandwidth (max-postcopy-bandwidth after the switch to postcopy) may be
        // changed while running; stop-and-copy runs unlimited.
        let cap = if self.in_postcopy.load(Ordering::Acquire) {
            Some(self.live.max_postcopy_bandwidth.load(Ordering::Relaxed))
        } else if !self.paused.load(Ordering::Acquire) {
            Some(self.live.max_bandwidth.load(Ordering::Relaxed))
        } else {
            None
        };
        if let Some(cap) = cap.filter(|&c| c != lp.applied_max_bandwidth) {
            info!(
                max_bandwidth_bytes_per_sec = cap,
                "bandwidth cap changed while running"
            );
            sender.set_max_bandwidth(cap);
            lp.applied_max_bandwidth = cap;
        }
        let stats = &self.stats;
        let bytes = lp.sender_counters.total_bytes();
        stats.transferred_bytes.store(bytes, Ordering::Relaxed);
        let c = &lp.sender_counters;
        // Data connections only: a postcopy stream's priority connection comes last.
        let multifd: u64 = (1..c.channels().min(lp.channels))
            .map(|i| c.channel_bytes(i))
            .sum();
        stats.multifd_bytes.store(multifd, Ordering::Relaxed);
        let pages =
            stats.normal_pages.load(Ordering::Relaxed) + stats.zero_pages.load(Ordering::Relaxed);
        let busy = self.busy_ns.load(Ordering::Relaxed);
        let d_bytes = bytes - lp.tick.bytes;
        let d_busy_wall = (busy - lp.tick.busy_ns) / lp.channels as u64;
        let queued = sender.queued_bytes().min(bytes);
        let delivered = (bytes - queued).max(lp.tick.delivered);
        lp.bw.add_window(&SendWindow {
            wall_ns: dt_ns,
            busy_ns: d_busy_wall.min(dt_ns),
            written_bytes: d_bytes,
            delivered_bytes: delivered - lp.tick.delivered,
            queued_bytes: queued,
        });
        self.measure_link(sender, lp);
        stats
            .bandwidth_bytes_per_sec
            .store(lp.bw.bytes_per_sec(), Ordering::Relaxed);
        stats.mbps.store(
            d_bytes as f64 * 8.0 / (dt_ns as f64 / 1e9) / 1e6,
            Ordering::Relaxed,
        );
        stats.pages_per_second.store(
            (pages - lp.tick.pages) * 1_000_000_000 / dt_ns,
            Ordering::Relaxed,
        );
        let remaining = lp.bitmap.count() * PAGE_SIZE;
        stats.remaining_bytes.store(remaining, Ordering::Relaxed);
        if let Some(ms) = self.expected_downtime_ms(lp) {
            stats.expected_downtime_ms.store(ms, Ordering::Relaxed);
        }
        lp.tick = Tick {
            at: now,
            bytes,
            delivered,
            pages,
            busy_ns: busy,
        };
    }
}
