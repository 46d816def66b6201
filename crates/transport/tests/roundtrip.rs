//! Round-trip property tests: random page batches, zero pages, sparse pages, device state and
//! iteration markers, on every channel kind, with 1 and 4 parallel channels,
//! uncompressed and zstd, with both page checksums (XXH3 and CRC32C).

mod common;

use common::*;
use proptest::prelude::*;
use transport::{BlockInfo, Compression, Event, PageChecksum, SendOptions};

const PAGE_SIZE: u32 = 4096;

/// One iteration as generated: (block, page, Some((fill, sparse)) | None = zero page).
type RawIteration = Vec<(usize, u64, Option<(u8, bool)>)>;

fn blocks_strategy() -> impl Strategy<Value = Vec<BlockInfo>> {
    prop::collection::vec(1u64..48, 1..4).prop_map(|sizes| {
        sizes
            .into_iter()
            .enumerate()
            .map(|(i, pages)| BlockInfo {
                id: format!("block{i}"),
                size_bytes: pages * u64::from(PAGE_SIZE),
            })
            .collect()
    })
}

/// Turns raw iterations into a valid script: within an iteration each page is
/// sent once; batches are runs of increasing offsets split every `split` pages.
fn script(
    blocks: &[BlockInfo],
    iters: &[RawIteration],
    split: usize,
    devices: &[(String, Vec<u8>)],
) -> Vec<Op> {
    let mut ops = Vec::new();
    for (n, it) in iters.iter().enumerate() {
        let mut seen = std::collections::BTreeMap::new();
        for &(b, p, f) in it {
            let b = b % blocks.len();
            let pages = blocks[b].size_bytes / u64::from(PAGE_SIZE);
            seen.insert((b, p % pages), f);
        }
        for b in 0..blocks.len() {
            let (mut offs, mut fills, mut zeros) = (Vec::new(), Vec::new(), Vec::new());
            let (mut sparse_offs, mut sparse_fills) = (Vec::new(), Vec::new());
            for (&(bb, p), f) in &seen {
                if bb != b {
                    continue;
                }
                match f {
                    Some((f, false)) => {
                        offs.push(p);
                        fills.push(*f);
                    }
                    Some((f, true)) => {
                        sparse_offs.push(p);
                        sparse_fills.push(*f);
                    }
                    None => zeros.push(p),
                }
            }
            for (o, f) in offs.chunks(split).zip(fills.chunks(split)) {
                ops.push(Op::Pages {
                    block: b,
                    offsets: o.to_vec(),
                    fill: f.to_vec(),
                });
            }
            for (o, f) in sparse_offs.chunks(split).zip(sparse_fills.chunks(split)) {
                ops.push(Op::Sparse {
                    block: b,
                    offsets: o.to_vec(),
                    fill: f.to_vec(),
                });
            }
            if !zeros.is_empty() {
                ops.push(Op::Zero {
                    block: b,
                    offsets: zeros,
                });
            }
        }
        ops.push(Op::IterationEnd(n as u64 + 1));
    }
    for (name, data) in devices {
        ops.push(Op::Device {
            name: name.clone(),
            data: data.clone(),
        });
    }
    ops
}

fn check(
    kind: Kind,
    channels: u16,
    compression: Compression,
    blocks: Vec<BlockInfo>,
    ops: Vec<Op>,
) {
    for sum in [PageChecksum::Xxh3, PageChecksum::Crc32c] {
        check_with(kind, channels, compression, sum, &blocks, &ops);
    }
}

fn check_with(
    kind: Kind,
    channels: u16,
    compression: Compression,
    sum: PageChecksum,
    blocks: &[BlockInfo],
    ops: &[Op],
) {
    let o = SendOptions {
        page_checksum: sum,
        ..opts(channels, compression)
    };
    let out = round_trip(kind, PAGE_SIZE, blocks, o, ops)
        .unwrap_or_else(|e| panic!("{kind:?} x{channels} {compression:?} {sum:?}: {e}"));
    let want = model(PAGE_SIZE as usize, blocks, ops);
    assert!(
        out.memory == want,
        "{kind:?} x{channels} {sum:?}: memory differs"
    );
    let want_events: Vec<Event> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Device { name, data } => Some(Event::DeviceState {
                name: name.clone(),
                data: data.clone(),
            }),
            Op::IterationEnd(i) => Some(Event::IterationEnd { iteration: *i }),
            _ => None,
        })
        .collect();
    assert_eq!(out.events, want_events);
    assert_eq!(out.ack.resumed, kind != Kind::File);
    assert_eq!(out.sent_total_bytes, out.received_total_bytes);
}

/// A generated stream: blocks, raw iterations, batch split, device states.
type Stream = (
    Vec<BlockInfo>,
    Vec<RawIteration>,
    usize,
    Vec<(String, Vec<u8>)>,
);

fn stream_strategy() -> impl Strategy<Value = Stream> {
    (
        blocks_strategy(),
        prop::collection::vec(
            prop::collection::vec(
                (
                    0usize..4,
                    0u64..48,
                    prop::option::weighted(0.7, (any::<u8>(), any::<bool>())),
                ),
                0..40,
            ),
            0..4,
        ),
        1usize..20,
        prop::collection::vec(
            ("[a-z]{1,12}", prop::collection::vec(any::<u8>(), 0..300)),
            0..3,
        ),
    )
}

macro_rules! round_trip_test {
    ($name:ident, $kind:expr, $channels:expr, $compression:expr) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
            #[test]
            fn $name((blocks, iters, split, devices) in stream_strategy()) {
                let ops = script(&blocks, &iters, split, &devices);
                check($kind, $channels, $compression, blocks, ops);
            }
        }
    };
}

round_trip_test!(tcp_1_channel, Kind::Tcp, 1, Compression::None);
round_trip_test!(tcp_4_channels, Kind::Tcp, 4, Compression::None);
round_trip_test!(unix_1_channel, Kind::Unix, 1, Compression::None);
round_trip_test!(unix_4_channels, Kind::Unix, 4, Compression::None);
round_trip_test!(mem_1_channel, Kind::Mem, 1, Compression::None);
round_trip_test!(mem_4_channels, Kind::Mem, 4, Compression::None);
round_trip_test!(file_1_channel, Kind::File, 1, Compression::None);
round_trip_test!(tcp_4_channels_zstd, Kind::Tcp, 4, Compression::Zstd);
round_trip_test!(unix_1_channel_zstd, Kind::Unix, 1, Compression::Zstd);
round_trip_test!(file_1_channel_zstd, Kind::File, 1, Compression::Zstd);
round_trip_test!(mem_4_channels_zstd, Kind::Mem, 4, Compression::Zstd);

#[test]
fn file_refuses_parallel_channels() {
    let (uri, _l) = endpoint(Kind::File);
    let e = transport::Sender::connect(
        &uri,
        PAGE_SIZE,
        vec![BlockInfo {
            id: "r".into(),
            size_bytes: 4096,
        }],
        opts(4, Compression::None),
    );
    assert!(matches!(e, Err(transport::Error::InvalidArgument(_))));
}

#[test]
fn counters_split_payload_and_headers() {
    let blocks = vec![BlockInfo {
        id: "ram".into(),
        size_bytes: 64 * 4096,
    }];
    let ops = vec![
        Op::Pages {
            block: 0,
            offsets: vec![1, 2, 3],
            fill: vec![1, 2, 3],
        },
        Op::Zero {
            block: 0,
            offsets: vec![5, 6],
        },
        Op::Device {
            name: "cpu".into(),
            data: vec![7; 100],
        },
        Op::IterationEnd(1),
    ];
    let (uri, listener) = endpoint(Kind::Mem);
    let h = std::thread::spawn(move || {
        let mut rx = listener.accept().unwrap();
        let sink = transport::VecSink::for_header(rx.header());
        rx.receive(&sink, |_| Ok(())).unwrap();
        rx.await_commit().unwrap();
        rx.send_ack(false).unwrap();
        rx.counters()
    });
    let s =
        transport::Sender::connect(&uri, PAGE_SIZE, blocks, opts(2, Compression::None)).unwrap();
    let c = s.counters();
    let ack = send_ops(s, &ops).unwrap();
    assert!(!ack.resumed);
    let rc = h.join().unwrap();
    assert_eq!(c.payload_bytes(), 3 * 4096 + 100);
    assert_eq!(c.pages(), 3);
    assert_eq!(c.zero_pages(), 2);
    assert_eq!(c.total_bytes(), c.channel_bytes(0) + c.channel_bytes(1));
    assert_eq!(rc.payload_bytes(), c.payload_bytes());
    assert_eq!(rc.header_bytes(), c.header_bytes());
    assert_eq!(rc.zero_pages(), 2);
}

/// The receiver reports each iteration once all its pages are in memory, so the
/// sender can tell a receiver with a backlog from one that has caught up.
#[test]
fn receiver_reports_applied_iterations() {
    use std::time::Duration;
    for kind in [Kind::Tcp, Kind::Unix, Kind::Mem] {
        let blocks = vec![BlockInfo {
            id: "ram".into(),
            size_bytes: 16 * 4096,
        }];
        let (uri, listener) = endpoint(kind);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let rx = std::thread::spawn(move || {
            let mut rx = listener.accept().unwrap();
            go_rx.recv().unwrap();
            let sink = transport::VecSink::for_header(rx.header());
            rx.receive(&sink, |_| Ok(())).unwrap();
            rx.await_commit().unwrap();
            rx.send_ack(true).unwrap();
        });
        let s = transport::Sender::connect(&uri, PAGE_SIZE, blocks, opts(2, Compression::None))
            .unwrap();
        let page = page_bytes(4096, 1, 3);
        s.send_pages(0, &[3], &[&page]).unwrap();
        s.iteration_end(1).unwrap();
        // Nothing is read yet: iteration 1 is not applied.
        assert!(!s.wait_applied(1, Duration::from_millis(50)).unwrap());
        assert_eq!(s.applied_iteration(), None);
        go_tx.send(()).unwrap();
        assert!(
            s.wait_applied(1, Duration::from_secs(10)).unwrap(),
            "{kind:?}"
        );
        assert_eq!(s.applied_iteration(), Some(1));
        assert!(!s.wait_applied(2, Duration::from_millis(20)).unwrap());
        assert!(s.finish().unwrap().resumed);
        rx.join().unwrap();
    }
    // A file has no receiver to wait for.
    let (uri, _l) = endpoint(Kind::File);
    let blocks = vec![BlockInfo {
        id: "ram".into(),
        size_bytes: 4096,
    }];
    let s =
        transport::Sender::connect(&uri, PAGE_SIZE, blocks, opts(1, Compression::None)).unwrap();
    s.iteration_end(1).unwrap();
    assert!(s.wait_applied(1, Duration::ZERO).unwrap());
    assert!(!s.finish().unwrap().resumed);
    if let transport::Uri::File(p) = uri {
        let _ = std::fs::remove_file(p);
    }
}
