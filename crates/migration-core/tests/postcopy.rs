//! Postcopy's destination memory with a fake source: vCPU-like threads touch missing
//! pages and see the source's bytes; a page is requested once however many threads
//! touch it, lands once however many times it is sent, and the received map ends full.
//! Needs userfaultfd; without it each test records itself skipped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use dirty_sync::{DirtyBitmap, HostMemory, RamBlock, PAGE_SIZE};
use migration_core::postcopy::{PageSource, PostcopyRam};
use migration_core::Error;
use uffd::Filled;

#[path = "../../minivm/tests/common/skip.rs"]
mod skip;

/// Bounds a hang, never a speed.
const TIMEOUT: Duration = Duration::from_secs(60);
const PAGES: u64 = 256;
/// Pages 0..PRESENT arrived during precopy.
const PRESENT: u64 = 32;
/// Requests served before the background stream starts.
const FAULTS_FIRST: u32 = 8;
/// A page that is all zeros on the source.
const ZERO_PAGE: u64 = 100;

/// What the source holds at the first word of a page.
fn source_word(block: usize, page: u64) -> u64 {
    (block as u64) << 32 | page | 0x5a00_0000_0000_0000
}

fn source_page(block: usize, page: u64) -> Vec<u8> {
    let mut p = vec![0u8; PAGE_SIZE as usize];
    if page != ZERO_PAGE {
        p[..8].copy_from_slice(&source_word(block, page).to_le_bytes());
    }
    p
}

/// Hands each request to the source thread; counts them.
struct FakeSource {
    tx: Mutex<mpsc::Sender<(usize, u64)>>,
    asked: Mutex<HashMap<(usize, u64), u32>>,
}

impl PageSource for FakeSource {
    fn request(&self, block: usize, page: u64) -> Result<(), String> {
        *self.asked.lock().unwrap().entry((block, page)).or_default() += 1;
        self.tx
            .lock()
            .unwrap()
            .send((block, page))
            .map_err(|e| e.to_string())
    }
}

/// Two blocks of PAGES pages, the first PRESENT of each received during precopy; or
/// None (skipped) without userfaultfd.
fn two_blocks() -> Option<(Vec<RamBlock>, Arc<PostcopyRam>)> {
    let blocks: Vec<RamBlock> = (0..2usize)
        .map(|i| {
            let mem = HostMemory::anonymous(PAGES * PAGE_SIZE).unwrap();
            for p in 0..PRESENT {
                assert!(mem.write_volatile(p * PAGE_SIZE, &source_word(i, p).to_le_bytes()));
            }
            let i64 = i as u64;
            RamBlock::new(
                format!("ram{i}"),
                i64 * PAGES * PAGE_SIZE,
                mem,
                i as u32,
                i64 * PAGES,
            )
        })
        .collect();
    let missing: Vec<DirtyBitmap> = blocks
        .iter()
        .map(|_| {
            let m = DirtyBitmap::new(PAGES);
            for p in PRESENT..PAGES {
                m.set(p);
            }
            m
        })
        .collect();
    match PostcopyRam::register(&blocks, &missing, Default::default()) {
        Ok(ram) => Some((blocks, ram)),
        Err(Error::Postcopy(uffd::Error::Unavailable(e))) => {
            skip::record_skip_because(&format!("no userfaultfd: {e}"));
            None
        }
        Err(e) => panic!("register: {e}"),
    }
}

#[test]
fn touched_pages_arrive_once_each_and_the_map_ends_full() {
    let Some((blocks, ram)) = two_blocks() else {
        return;
    };
    assert_eq!(ram.missing_pages(), 2 * (PAGES - PRESENT));
    let (tx, rx) = mpsc::channel();
    let source = Arc::new(FakeSource {
        tx: Mutex::new(tx),
        asked: Mutex::default(),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let faults = ram.serve_faults(source.clone(), stop.clone()).unwrap();
    // The source: answers requests first, and pushes every page in the background.
    let answers = {
        let ram = Arc::clone(&ram);
        std::thread::spawn(move || {
            let mut installs: HashMap<(usize, u64), Vec<Filled>> = HashMap::new();
            let mut land = |b: usize, p: u64| {
                let f = ram.land(b, p, &source_page(b, p)).unwrap();
                installs.entry((b, p)).or_default().push(f);
            };
            let mut next = Some((0usize, PRESENT));
            let t0 = Instant::now();
            let mut answered = 0;
            while ram.missing_pages() > 0 {
                assert!(t0.elapsed() < TIMEOUT, "the pages did not all land");
                while let Ok((b, p)) = rx.recv_timeout(Duration::from_micros(200)) {
                    land(b, p);
                    answered += 1;
                }
                // The background stream starts once the readers' faults have been
                // served a few times, so both paths run.
                if answered < FAULTS_FIRST && t0.elapsed() < Duration::from_secs(5) {
                    continue;
                }
                if let Some((b, p)) = next {
                    land(b, p);
                    next = match (b, p + 1) {
                        (1, PAGES) => None,
                        (0, PAGES) => Some((1, PRESENT)),
                        (b, p) => Some((b, p)),
                    };
                }
            }
            installs
        })
    };
    // Four "vCPUs" read every page of both blocks, each from its own start.
    let readers: Vec<_> = (0..4u64)
        .map(|k| {
            let mems: Vec<HostMemory> = blocks.iter().map(|b| b.memory.clone()).collect();
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for i in 0..2 * PAGES {
                    let n = (i + k * 97) % (2 * PAGES);
                    let (b, p) = ((n / PAGES) as usize, n % PAGES);
                    let mut w = [0u8; 8];
                    assert!(mems[b].read_volatile(p * PAGE_SIZE, &mut w));
                    seen.push(((b, p), u64::from_le_bytes(w)));
                }
                seen
            })
        })
        .collect();
    for r in readers {
        for ((b, p), v) in r.join().expect("a reader finished") {
            let want = if p == ZERO_PAGE { 0 } else { source_word(b, p) };
            assert_eq!(v, want, "block {b} page {p}");
        }
    }
    let installs = answers.join().expect("the source finished");
    stop.store(true, Ordering::Release);
    for f in faults {
        f.join().unwrap().expect("the fault thread ended cleanly");
    }
    assert_eq!(ram.missing_pages(), 0);
    for b in 0..2 {
        for p in 0..PAGES {
            assert!(ram.is_received(b, p), "block {b} page {p}");
            let done = installs
                .get(&(b, p))
                .map_or(0, |v| v.iter().filter(|f| **f == Filled::Done).count());
            let want = usize::from(p >= PRESENT);
            assert_eq!(done, want, "block {b} page {p} landed {done} times");
        }
    }
    // One request per page at most; none for a page that was present.
    let asked = source.asked.lock().unwrap();
    assert!(asked.values().all(|n| *n == 1), "{asked:?}");
    assert!(
        asked.len() >= FAULTS_FIRST as usize,
        "faults served: {}",
        asked.len()
    );
    assert!(asked.keys().all(|(_, p)| *p >= PRESENT));
    let c = ram.counters();
    assert_eq!(
        c.landed_pages.load(Ordering::Relaxed),
        2 * (PAGES - PRESENT)
    );
    assert_eq!(c.requests.load(Ordering::Relaxed), asked.len() as u64);
}

#[test]
fn pages_and_blocks_outside_the_ram_are_refused() {
    let Some((_blocks, ram)) = two_blocks() else {
        return;
    };
    let page = source_page(0, 40);
    assert!(ram.land(2, 0, &page).is_err());
    assert!(ram.land(0, PAGES, &page).is_err());
    assert!(ram.land(0, 40, &page[..100]).is_err());
    assert!(ram.land(0, 40, &[0u8; 100]).is_err());
    assert_eq!(ram.missing_pages(), 2 * (PAGES - PRESENT), "nothing landed");
    // A present page is left as it is.
    assert_eq!(ram.land(0, 3, &page).unwrap(), Filled::AlreadyPresent);
    let mut w = [0u8; 8];
    assert!(ram.is_received(0, 3));
    assert!(_blocks[0].memory.read_volatile(3 * PAGE_SIZE, &mut w));
    assert_eq!(u64::from_le_bytes(w), source_word(0, 3));
}
