//! The host-thread backend: the same workloads, run by host threads writing guest memory
//! through vm-memory (so its dirty bitmap records every write), for hosts without /dev/kvm.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::config::Workload;
use crate::control::Control;
use crate::error::{Error, Result};
use crate::guest::{
    page_words, xorshift_next, xorshift_seed, zipf_levels, zipf_page, Layout, PAGE_WRITES_OFFSET,
    ZIPF_SEED,
};
use crate::memory::GuestMemory;
use crate::state::ThreadProgress;
use crate::{SharedErrors, PAGE_SIZE};

/// Page writes between control checkpoints.
const CHUNK_PAGES: u64 = 1024;
/// Random writes per counter bump (as in the guest program).
const RANDOM_WRITES_PER_ROUND: u64 = 4096;
/// Idle: counter bumps this often.
const IDLE_NAP: Duration = Duration::from_millis(10);
/// Sweep: most missed writes caught up in a burst.
const SWEEP_MAX_LAG: Duration = Duration::from_millis(20);

/// One host thread standing in for a vCPU.
pub struct Worker {
    /// vCPU index.
    pub id: u32,
    /// Guest memory.
    pub memory: Arc<GuestMemory>,
    /// Where this vCPU's pages are.
    pub layout: Layout,
    /// What to write.
    pub workload: Workload,
    /// Shared control block.
    pub control: Arc<Control>,
    /// Progress, readable by save_state while parked.
    pub progress: Arc<Mutex<ThreadProgress>>,
    /// Where failures are recorded.
    pub errors: SharedErrors,
}

impl Worker {
    /// Spawns the worker thread.
    pub fn spawn(self) -> Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("minivm-thread{}", self.id))
            .spawn(move || self.run_loop())
            .map_err(|source| Error::Os {
                what: "spawning a workload thread",
                source,
            })
    }

    fn counter_addr(&self) -> GuestAddress {
        GuestAddress(self.layout.counter_gpa(self.id))
    }

    fn page_addr(&self, page: u64) -> GuestAddress {
        GuestAddress(self.layout.share_gpa(self.id) + page * PAGE_SIZE)
    }

    fn run_loop(self) {
        let id = self.id as usize;
        let mut slice_start = Instant::now();
        let mut sweep_start: Option<(Instant, u64)> = None;
        while self.control.checkpoint(id) {
            let _slice_left = self.control.throttle(id, &mut slice_start);
            let r = match self.workload {
                Workload::Idle => self.idle_step(),
                Workload::WorkingSet { .. } | Workload::Lopsided { .. } => self.working_set_step(),
                Workload::Sweep { pages_per_sec } => {
                    self.sweep_step(pages_per_sec, &mut sweep_start)
                }
                Workload::Random { .. } => self.random_step(),
                Workload::Dense { bytes_per_page, .. } => self.dense_step(bytes_per_page),
                Workload::Zipf { writes_per_sec, .. } => {
                    self.zipf_step(writes_per_sec, &mut sweep_start)
                }
            };
            if let Err(e) = r {
                self.errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((self.id, e.to_string()));
                break;
            }
        }
        self.control.mark_exited(id);
    }

    fn bump_counter(&self, to: u64) -> Result<()> {
        Ok(self
            .memory
            .store(to, self.counter_addr(), Ordering::Release)?)
    }

    fn counter(&self) -> Result<u64> {
        Ok(self.memory.load(self.counter_addr(), Ordering::Acquire)?)
    }

    /// Adds `n` to the vCPU's page-write count (the u64 after its counter), as the
    /// guest program does once per page it writes.
    fn add_page_writes(&self, n: u64) -> Result<()> {
        let addr = GuestAddress(self.counter_addr().0 + PAGE_WRITES_OFFSET);
        let before: u64 = self.memory.load(addr, Ordering::Acquire)?;
        Ok(self.memory.store(before + n, addr, Ordering::Release)?)
    }

    fn lock_progress(&self) -> std::sync::MutexGuard<'_, ThreadProgress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle_step(&self) -> Result<()> {
        let c = self.counter()?;
        self.bump_counter(c + 1)?;
        self.control.nap(self.id as usize, IDLE_NAP);
        Ok(())
    }

    fn working_set_step(&self) -> Result<()> {
        let pages = self.layout.touched_pages(&self.workload, self.id);
        if pages == 0 {
            return self.idle_step();
        }
        let round = self.counter()? + 1;
        let mut p = self.lock_progress();
        let end = (p.position + CHUNK_PAGES).min(pages);
        for page in p.position..end {
            self.memory.write_obj(round, self.page_addr(page))?;
        }
        self.add_page_writes(end - p.position)?;
        p.position = end;
        if end == pages {
            p.position = 0;
            self.bump_counter(round)?;
        }
        Ok(())
    }

    /// Writes due now for a vCPU paced at `rate` writes/s that has done `written`; naps
    /// and returns 0 when ahead of schedule. More than 20 ms behind (paused, throttled)
    /// restarts the schedule instead of catching up in a burst.
    fn due_writes(&self, rate: u64, written: u64, start: &mut Option<(Instant, u64)>) -> u64 {
        let (t0, base) = *start.get_or_insert((Instant::now(), written));
        let elapsed = t0.elapsed();
        let due_total = u64::try_from(elapsed.as_nanos() * u128::from(rate) / 1_000_000_000)
            .unwrap_or(u64::MAX);
        let due = due_total.saturating_sub(written.saturating_sub(base));
        let max_lag = (rate * SWEEP_MAX_LAG.as_millis() as u64 / 1000).max(1);
        if due > max_lag {
            *start = Some((Instant::now(), written));
            return 1;
        }
        if due == 0 {
            let wait_ns = 1_000_000_000 / rate;
            self.control.nap(
                self.id as usize,
                Duration::from_nanos(wait_ns.min(1_000_000)),
            );
        }
        due.min(CHUNK_PAGES)
    }

    fn sweep_step(&self, pages_per_sec: u64, start: &mut Option<(Instant, u64)>) -> Result<()> {
        let rate = (pages_per_sec / u64::from(self.layout.vcpus)).max(1);
        let written = self.counter()?;
        let due = self.due_writes(rate, written, start);
        if due == 0 {
            return Ok(());
        }
        let share = self.layout.share_pages;
        let mut p = self.lock_progress();
        let mut count = written;
        for _ in 0..due {
            count += 1;
            self.memory.write_obj(count, self.page_addr(p.position))?;
            p.position = (p.position + 1) % share;
        }
        self.add_page_writes(due)?;
        self.bump_counter(count)
    }

    /// Writes `words` of the dense stream for (`tag`, page) at the start of `page`.
    fn write_dense_page(&self, page: u64, tag: u64, words: u64) -> Result<()> {
        let addr = self.page_addr(page);
        let mut buf = [0u8; PAGE_SIZE as usize];
        let len = (words.min(PAGE_SIZE / 8) * 8) as usize;
        for (chunk, w) in buf[..len].chunks_exact_mut(8).zip(page_words(addr.0, tag)) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Ok(self.memory.write_slice(&buf[..len], addr)?)
    }

    fn dense_step(&self, bytes_per_page: u64) -> Result<()> {
        let pages = self.layout.touched_pages(&self.workload, self.id);
        if pages == 0 {
            return self.idle_step();
        }
        let round = self.counter()? + 1;
        // The first round fills whole pages, as the guest program does.
        let words = if round == 1 {
            PAGE_SIZE / 8
        } else {
            bytes_per_page / 8
        };
        let mut p = self.lock_progress();
        let end = (p.position + CHUNK_PAGES / 8).min(pages);
        for page in p.position..end {
            self.write_dense_page(page, round, words)?;
        }
        self.add_page_writes(end - p.position)?;
        p.position = end;
        if end == pages {
            p.position = 0;
            self.bump_counter(round)?;
        }
        Ok(())
    }

    fn zipf_step(&self, writes_per_sec: u64, start: &mut Option<(Instant, u64)>) -> Result<()> {
        let pages = self.layout.touched_pages(&self.workload, self.id);
        if pages == 0 {
            return self.idle_step();
        }
        let rate = (writes_per_sec / u64::from(self.layout.vcpus)).max(1);
        let written = self.counter()?;
        let due = self.due_writes(rate, written, start);
        let levels = zipf_levels(pages);
        let mut p = self.lock_progress();
        if p.rng == 0 {
            p.rng = xorshift_seed(ZIPF_SEED, self.id);
        }
        let mut count = written;
        for _ in 0..due {
            p.rng = xorshift_next(p.rng);
            count += 1;
            self.write_dense_page(zipf_page(p.rng, levels, pages), count, PAGE_SIZE / 8)?;
        }
        self.add_page_writes(due)?;
        self.bump_counter(count)
    }

    fn random_step(&self) -> Result<()> {
        let Workload::Random { seed, hot_percent } = self.workload else {
            return Ok(());
        };
        let share = self.layout.share_pages;
        let hot = self.layout.hot_pages();
        let threshold = u64::from(hot_percent.min(100)) * 256 / 100;
        let mut p = self.lock_progress();
        if p.rng == 0 {
            p.rng = xorshift_seed(seed, self.id);
        }
        for _ in 0..RANDOM_WRITES_PER_ROUND {
            let x = xorshift_next(p.rng);
            p.rng = x;
            let page = if (x & 0xff) < threshold {
                (x >> 8) % hot
            } else {
                (x >> 8) % share
            };
            p.seq += 1;
            self.memory.write_obj(p.seq, self.page_addr(page))?;
        }
        self.add_page_writes(RANDOM_WRITES_PER_ROUND)?;
        let c = self.counter()?;
        self.bump_counter(c + 1)
    }
}
