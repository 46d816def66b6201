//! Shared bench helpers: a prefaulted destination, a ferry receiver thread,
//! a raw-socket baseline (sender and receiver) and timing.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use transport::{BlockInfo, Compression, Listener, PageSink, SendOptions, Sender, Uri};

pub const PAGE_SIZE: usize = 4096;
pub const REGION_BYTES: usize = 64 << 20;
pub const BATCH_PAGES: usize = 128;
pub const RAW_CHUNK_BYTES: usize = BATCH_PAGES * PAGE_SIZE;
pub const ZERO_REGION_BYTES: usize = 256 << 20;

/// Prefaulted destination memory behind a `PageSink`.
pub struct Dest {
    pub mem: Vec<u8>,
    pub base: *mut u8,
}
// SAFETY: `base` points into `mem`, owned here; writers only touch distinct pages.
unsafe impl Send for Dest {}
// SAFETY: as above; shared access hands out raw pointers only.
unsafe impl Sync for Dest {}

impl Dest {
    pub fn new(len: usize) -> Arc<Dest> {
        let mut mem = vec![0u8; len];
        for p in mem.chunks_mut(PAGE_SIZE) {
            p[0] = 1; // fault every page in
            p[0] = 0;
        }
        std::hint::black_box(&mut mem);
        let base = mem.as_mut_ptr();
        Arc::new(Dest { mem, base })
    }
}

// SAFETY: bounds-checked; every page is PAGE_SIZE bytes inside `mem`.
unsafe impl PageSink for Dest {
    fn page_ptr(&self, block_idx: usize, page_index: u64) -> *mut u8 {
        let at = page_index as usize * PAGE_SIZE;
        if block_idx != 0 || at + PAGE_SIZE > self.mem.len() {
            return std::ptr::null_mut();
        }
        // SAFETY: at + PAGE_SIZE <= len.
        unsafe { self.base.add(at) }
    }
}

pub fn source(len: usize, compressible: bool) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = vec![0u8; len];
    for (i, p) in v.chunks_mut(PAGE_SIZE).enumerate() {
        let noisy = if compressible { 512 } else { PAGE_SIZE };
        for b in &mut p[..noisy] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if compressible {
            for (j, b) in p[noisy..].iter_mut().enumerate() {
                *b = b"guest kernel text "[j % 18] ^ (i as u8 & 1);
            }
        }
    }
    v
}

pub fn blocks(len: usize) -> Vec<BlockInfo> {
    vec![BlockInfo {
        id: "ram".into(),
        size_bytes: len as u64,
    }]
}

/// A receiver thread that takes streams one after another into `dest`.
pub fn ferry_server(uri: &Uri, dest: Arc<Dest>) -> Uri {
    let listener = Listener::bind(uri).unwrap();
    let uri = listener.local_uri().unwrap();
    thread::spawn(move || loop {
        let Ok(mut rx) = listener.accept() else {
            return;
        };
        rx.receive(&*dest, |_| Ok(())).unwrap();
        rx.await_commit().unwrap();
        rx.send_ack(true).unwrap();
    });
    uri
}

/// Sends the whole region as page batches from `channels` threads.
pub fn ferry_send(uri: &Uri, src: &[u8], opts: SendOptions) {
    let s = Sender::connect(uri, PAGE_SIZE as u32, blocks(src.len()), opts.clone()).unwrap();
    let n = usize::from(opts.channels);
    let batches = src.len() / (BATCH_PAGES * PAGE_SIZE);
    thread::scope(|sc| {
        for t in 0..n {
            let s = &s;
            sc.spawn(move || {
                let mut offs = [0u64; BATCH_PAGES];
                let mut pages: [&[u8]; BATCH_PAGES] = [&[]; BATCH_PAGES];
                for b in (t..batches).step_by(n) {
                    for k in 0..BATCH_PAGES {
                        let page = b * BATCH_PAGES + k;
                        offs[k] = page as u64;
                        pages[k] = &src[page * PAGE_SIZE..(page + 1) * PAGE_SIZE];
                    }
                    s.send_pages(0, &offs, &pages).unwrap();
                }
            });
        }
    });
    assert!(s.finish().unwrap().resumed);
}

/// Raw baseline: `n` connections, each carrying a contiguous share of the
/// region in 512 KiB writes, read straight into the destination; one ack byte.
pub trait RawConn: Read + Write + Send + 'static {}
impl RawConn for TcpStream {}
impl RawConn for UnixStream {}

pub fn raw_server<S: RawConn>(accept: impl Fn() -> S + Send + 'static, dest: Arc<Dest>) {
    thread::spawn(move || loop {
        let mut c = accept();
        let dest = dest.clone();
        thread::spawn(move || {
            let mut hdr = [0u8; 16];
            c.read_exact(&mut hdr).unwrap();
            let at = u64::from_le_bytes(hdr[..8].try_into().unwrap()) as usize;
            let len = u64::from_le_bytes(hdr[8..].try_into().unwrap()) as usize;
            assert!(at + len <= dest.mem.len());
            // SAFETY: in range; each connection owns a disjoint share of the region.
            let dst = unsafe { std::slice::from_raw_parts_mut(dest.base.add(at), len) };
            c.read_exact(dst).unwrap();
            c.write_all(&[1]).unwrap();
        });
    });
}

pub fn raw_send<S: RawConn>(connect: &(dyn Fn() -> S + Sync), src: &[u8], n: usize) {
    let share = src.len() / n;
    thread::scope(|sc| {
        for t in 0..n {
            sc.spawn(move || {
                let mut c = connect();
                let mut hdr = [0u8; 16];
                hdr[..8].copy_from_slice(&((t * share) as u64).to_le_bytes());
                hdr[8..].copy_from_slice(&(share as u64).to_le_bytes());
                c.write_all(&hdr).unwrap();
                for chunk in src[t * share..(t + 1) * share].chunks(RAW_CHUNK_BYTES) {
                    c.write_all(chunk).unwrap();
                }
                let mut ack = [0u8; 1];
                c.read_exact(&mut ack).unwrap();
            });
        }
    });
}

pub fn timed(iters: u64, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed()
}

pub fn opts(channels: u16, compression: Compression) -> SendOptions {
    SendOptions {
        channels,
        compression,
        max_bandwidth_bytes_per_sec: 0,
        ..Default::default()
    }
}
