//! Helpers shared by the integration tests: endpoints of every kind and a
//! driver that sends a scripted stream and receives it into a `VecSink`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use transport::{
    Ack, BlockInfo, Compression, Event, Listener, Result, SendOptions, Sender, Uri, VecSink,
};

/// The channel kinds under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Unix,
    File,
    Mem,
}

pub const ALL_KINDS: [Kind; 4] = [Kind::Tcp, Kind::Unix, Kind::File, Kind::Mem];

pub fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "ferry-transport-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A bound listener and the URI a sender should use.
pub fn endpoint(kind: Kind) -> (Uri, Listener) {
    match kind {
        Kind::Tcp => {
            let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
            (l.local_uri().unwrap(), l)
        }
        Kind::Unix => {
            let u = Uri::Unix(temp_path("sock"));
            (u.clone(), Listener::bind(&u).unwrap())
        }
        Kind::File => {
            let u = Uri::File(temp_path("file"));
            (u.clone(), Listener::bind(&u).unwrap())
        }
        Kind::Mem => transport::mem_pair().unwrap(),
    }
}

/// One step of a scripted stream.
#[derive(Debug, Clone)]
pub enum Op {
    Pages {
        block: usize,
        offsets: Vec<u64>,
        fill: Vec<u8>,
    },
    Zero {
        block: usize,
        offsets: Vec<u64>,
    },
    /// Pages with a few non-zero words ([`sparse_page_bytes`]).
    Sparse {
        block: usize,
        offsets: Vec<u64>,
        fill: Vec<u8>,
    },
    Device {
        name: String,
        data: Vec<u8>,
    },
    IterationEnd(u64),
}

/// Page content: a deterministic pattern from a fill byte and the page index.
pub fn page_bytes(page_size: usize, fill: u8, index: u64) -> Vec<u8> {
    (0..page_size)
        .map(|i| fill.wrapping_add((i as u8).wrapping_mul(31)) ^ (index as u8))
        .collect()
}

/// Sparse page content: 1..=64 non-zero words, spread by the fill byte.
pub fn sparse_page_bytes(page_size: usize, fill: u8, index: u64) -> Vec<u8> {
    let mut p = vec![0u8; page_size];
    let words = page_size / 8;
    let n = (1 + usize::from(fill) % transport::MAX_SPARSE_WORDS).min(words);
    let step = (words / n).max(1);
    for j in 0..n {
        let v = (u64::from(fill) << 32 | index << 8 | j as u64) | 1;
        let at = (j * step + usize::from(fill) % step) * 8;
        p[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    p
}

/// What the destination's memory must hold after `ops`.
pub fn model(page_size: usize, blocks: &[BlockInfo], ops: &[Op]) -> Vec<Vec<u8>> {
    let mut mem: Vec<Vec<u8>> = blocks
        .iter()
        .map(|b| vec![0; b.size_bytes as usize])
        .collect();
    for op in ops {
        match op {
            Op::Pages {
                block,
                offsets,
                fill,
            }
            | Op::Sparse {
                block,
                offsets,
                fill,
            } => {
                let content = if matches!(op, Op::Sparse { .. }) {
                    sparse_page_bytes
                } else {
                    page_bytes
                };
                for (o, f) in offsets.iter().zip(fill) {
                    let at = *o as usize * page_size;
                    mem[*block][at..at + page_size].copy_from_slice(&content(page_size, *f, *o));
                }
            }
            Op::Zero { block, offsets } => {
                for o in offsets {
                    let at = *o as usize * page_size;
                    mem[*block][at..at + page_size].fill(0);
                }
            }
            _ => {}
        }
    }
    mem
}

/// Sends `ops` on `sender`, then finishes.
pub fn send_ops(sender: Sender, ops: &[Op]) -> Result<Ack> {
    send_ops_unfinished(&sender, ops)?;
    sender.finish()
}

/// Sends `ops` on `sender` and leaves the stream open (no `finish`).
#[allow(dead_code)]
pub fn send_ops_unfinished(sender: &Sender, ops: &[Op]) -> Result<()> {
    let ps = sender.header().page_size as usize;
    for op in ops {
        match op {
            Op::Pages {
                block,
                offsets,
                fill,
            } => {
                let data: Vec<Vec<u8>> = offsets
                    .iter()
                    .zip(fill)
                    .map(|(o, f)| page_bytes(ps, *f, *o))
                    .collect();
                let slices: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
                // Batches whose first fill is odd go as live (one checksum per page).
                if fill.first().is_some_and(|f| f % 2 == 1) {
                    sender.send_live_pages(*block, offsets, &slices)?;
                } else {
                    sender.send_pages(*block, offsets, &slices)?;
                }
            }
            Op::Zero { block, offsets } => sender.send_zero_pages(*block, offsets)?,
            Op::Sparse {
                block,
                offsets,
                fill,
            } => {
                let mut batch = transport::SparseBatch::default();
                for (o, f) in offsets.iter().zip(fill) {
                    let class = batch.classify(*o, &sparse_page_bytes(ps, *f, *o));
                    assert_eq!(class, transport::PageClass::Sparse);
                }
                sender.send_sparse_pages(*block, &batch)?;
            }
            Op::Device { name, data } => sender.send_device_state(name, data)?,
            Op::IterationEnd(i) => sender.iteration_end(*i)?,
        }
    }
    Ok(())
}

/// Result of a full round trip.
pub struct Outcome {
    pub memory: Vec<Vec<u8>>,
    pub events: Vec<Event>,
    pub ack: Ack,
    pub sent_total_bytes: u64,
    pub received_total_bytes: u64,
}

/// Sends `ops` over a fresh endpoint of `kind` and receives them.
pub fn round_trip(
    kind: Kind,
    page_size: u32,
    blocks: &[BlockInfo],
    opts: SendOptions,
    ops: &[Op],
) -> Result<Outcome> {
    let (uri, listener) = endpoint(kind);
    let recv = move || -> Result<(Vec<Vec<u8>>, Vec<Event>, u64)> {
        let mut rx = listener.accept()?;
        let sink = VecSink::for_header(rx.header());
        let mut events = Vec::new();
        rx.receive(&sink, |e| {
            events.push(e);
            Ok(())
        })?;
        rx.await_commit()?;
        rx.send_ack(true)?;
        let total = rx.counters().total_bytes();
        Ok((sink.into_blocks(), events, total))
    };
    let send = |uri: &Uri| -> Result<(Ack, u64)> {
        let s = Sender::connect(uri, page_size, blocks.to_vec(), opts)?;
        let counters = s.counters();
        let ack = send_ops(s, ops)?;
        Ok((ack, counters.total_bytes()))
    };
    let ((ack, sent), (memory, events, received)) = if kind == Kind::File {
        let s = send(&uri)?;
        let r = recv()?;
        if let Uri::File(p) = &uri {
            let _ = std::fs::remove_file(p);
        }
        (s, r)
    } else {
        let h = std::thread::spawn(recv);
        let s = send(&uri);
        let r = h.join().expect("receiver thread panicked");
        (s?, r?)
    };
    Ok(Outcome {
        memory,
        events,
        ack,
        sent_total_bytes: sent,
        received_total_bytes: received,
    })
}

/// Default options with `channels` and `compression`.
pub fn opts(channels: u16, compression: Compression) -> SendOptions {
    SendOptions {
        channels,
        compression,
        max_bandwidth_bytes_per_sec: 0,
        ..Default::default()
    }
}
