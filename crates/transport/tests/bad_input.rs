//! Bad input: truncation at every byte, every bit flipped, wrong magic and
//! version, oversized lengths, unknown record types, out-of-bounds pages, and
//! connections closed mid-record. Each must give a typed error and no panic.

mod common;

use std::io::Write;

use common::*;
use transport::format::{
    Kind as RecordKind, Preamble, RecordHeader, MAX_BODY_BYTES, PREAMBLE_BYTES, RECORD_HEADER_BYTES,
};
use transport::{
    decode_bytes, BlockInfo, Compression, Error, Listener, PageChecksum, SendOptions, Sender, Uri,
    VecSink,
};

const PAGE_SIZE: u32 = 512;
const MAX_RAM: u64 = 1 << 20;

fn blocks() -> Vec<BlockInfo> {
    vec![
        BlockInfo {
            id: "ram".into(),
            size_bytes: 8 * u64::from(PAGE_SIZE),
        },
        BlockInfo {
            id: "rom".into(),
            size_bytes: 2 * u64::from(PAGE_SIZE),
        },
    ]
}

fn ops() -> Vec<Op> {
    vec![
        Op::Pages {
            block: 0,
            offsets: vec![1, 3],
            fill: vec![9, 10],
        },
        Op::Zero {
            block: 0,
            offsets: vec![2],
        },
        Op::Sparse {
            block: 0,
            offsets: vec![4, 6],
            fill: vec![2, 70],
        },
        Op::IterationEnd(1),
        Op::Pages {
            block: 1,
            offsets: vec![1],
            fill: vec![11],
        },
        Op::Device {
            name: "cpu".into(),
            data: vec![5; 20],
        },
    ]
}

/// A small valid one-channel stream, as written to a file.
pub fn small_stream(compression: Compression) -> Vec<u8> {
    small_stream_with(compression, PageChecksum::default())
}

/// Every compression with every page checksum.
const VARIANTS: [(Compression, PageChecksum); 4] = [
    (Compression::None, PageChecksum::Xxh3),
    (Compression::Zstd, PageChecksum::Xxh3),
    (Compression::None, PageChecksum::Crc32c),
    (Compression::Zstd, PageChecksum::Crc32c),
];

/// [`small_stream`] with page checksum `sum`.
pub fn small_stream_with(compression: Compression, sum: PageChecksum) -> Vec<u8> {
    let path = temp_path("small");
    let s = Sender::connect(
        &Uri::File(path.clone()),
        PAGE_SIZE,
        blocks(),
        SendOptions {
            page_checksum: sum,
            ..opts(1, compression)
        },
    )
    .unwrap();
    send_ops(s, &ops()).unwrap();
    let b = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    b
}

/// Preamble + header record of a valid stream, followed by `records`.
fn stream_with(records: &[u8]) -> Vec<u8> {
    let good = small_stream(Compression::None);
    // Preamble, then the header record: its length is in the record header.
    let h = RecordHeader::decode(
        good[PREAMBLE_BYTES..PREAMBLE_BYTES + RECORD_HEADER_BYTES]
            .try_into()
            .unwrap(),
    )
    .unwrap();
    let end = PREAMBLE_BYTES + RECORD_HEADER_BYTES + h.body_len as usize;
    let mut v = good[..end].to_vec();
    v.extend_from_slice(records);
    v
}

fn record(kind: RecordKind, body: &[u8]) -> Vec<u8> {
    let mut v = RecordHeader {
        kind,
        flags: 0,
        body_len: body.len() as u32,
        body_crc: crc32c::crc32c(body),
    }
    .encode()
    .to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn small_streams_decode() {
    // With FERRY_FUZZ_SEEDS=DIR, also leave them there as seeds for the fuzzer.
    let seeds = std::env::var("FERRY_FUZZ_SEEDS").ok();
    for (i, (c, sum)) in VARIANTS.into_iter().enumerate() {
        if let Some(dir) = &seeds {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(format!("{dir}/small-{i}"), small_stream_with(c, sum)).unwrap();
        }
        let d = decode_bytes(&small_stream_with(c, sum), MAX_RAM).unwrap();
        assert_eq!(d.header.features.page_checksum, sum);
        assert_eq!(d.memory, model(PAGE_SIZE as usize, &blocks(), &ops()));
        assert_eq!(d.events.len(), 2);
    }
}

#[test]
fn truncated_at_every_byte_is_truncated() {
    for (c, sum) in VARIANTS {
        let s = small_stream_with(c, sum);
        for len in 0..s.len() {
            match decode_bytes(&s[..len], MAX_RAM) {
                Err(Error::Truncated { .. }) => {}
                other => panic!("{c:?} {sum:?} cut at {len}/{}: {other:?}", s.len()),
            }
        }
    }
}

#[test]
fn every_flipped_bit_is_an_error() {
    for (c, sum) in VARIANTS {
        let s = small_stream_with(c, sum);
        for bit in 0..s.len() * 8 {
            let mut m = s.clone();
            m[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_bytes(&m, MAX_RAM).is_err(),
                "{c:?} {sum:?}: flip of bit {bit} went unnoticed"
            );
        }
    }
}

#[test]
fn wrong_magic_and_version() {
    let mut s = small_stream(Compression::None);
    s[0] = b'X';
    assert!(matches!(
        decode_bytes(&s, MAX_RAM),
        Err(Error::BadMagic { .. })
    ));
    let mut s = small_stream(Compression::None);
    let mut pre = Preamble {
        channel_index: 0,
        channel_count: 1,
        session_id: 7,
    }
    .encode();
    pre[4] = 1; // version 1, a reader of an older format
    let crc = crc32c::crc32c(&pre[..20]);
    pre[20..24].copy_from_slice(&crc.to_le_bytes());
    s[..PREAMBLE_BYTES].copy_from_slice(&pre);
    assert!(matches!(
        decode_bytes(&s, MAX_RAM),
        Err(Error::BadVersion { found: 1, .. })
    ));
}

#[test]
fn oversized_lengths_are_refused_before_allocating() {
    // A record header announcing a body just over the cap.
    let mut hdr = RecordHeader {
        kind: RecordKind::DeviceState,
        flags: 0,
        body_len: 0,
        body_crc: 0,
    }
    .encode();
    hdr[4..8].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
    let crc = crc32c::crc32c(&hdr[..12]);
    hdr[12..16].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode_bytes(&stream_with(&hdr), MAX_RAM),
        Err(Error::TooLong { .. })
    ));
    // A page batch claiming more pages than a batch may hold.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_bytes(&stream_with(&record(RecordKind::Pages, &body)), MAX_RAM),
        Err(Error::Malformed(_))
    ));
    // A header whose block table is huge.
    let mut h = 4096u32.to_le_bytes().to_vec();
    h.extend_from_slice(&[0, 0, 1, 0]);
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut s = small_stream(Compression::None)[..PREAMBLE_BYTES].to_vec();
    s.extend_from_slice(&record(RecordKind::Header, &h));
    assert!(matches!(
        decode_bytes(&s, MAX_RAM),
        Err(Error::TooLong { .. })
    ));
    // A header whose RAM is larger than the caller allows.
    let mut h = 4096u32.to_le_bytes().to_vec();
    h.extend_from_slice(&[0, 0, 1, 0]);
    h.extend_from_slice(&1u32.to_le_bytes());
    h.push(1);
    h.push(b'r');
    h.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let mut s = small_stream(Compression::None)[..PREAMBLE_BYTES].to_vec();
    s.extend_from_slice(&record(RecordKind::Header, &h));
    assert!(matches!(
        decode_bytes(&s, MAX_RAM),
        Err(Error::TooLong {
            what: "guest RAM",
            ..
        })
    ));
}

#[test]
fn unknown_record_type() {
    let mut hdr = RecordHeader {
        kind: RecordKind::End,
        flags: 0,
        body_len: 0,
        body_crc: 0,
    }
    .encode();
    hdr[0] = 99;
    let crc = crc32c::crc32c(&hdr[..12]);
    hdr[12..16].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(
        decode_bytes(&stream_with(&hdr), MAX_RAM),
        Err(Error::UnknownRecord(99))
    ));
}

#[test]
fn out_of_bounds_pages_are_refused_before_any_write() {
    let page = vec![0xAAu8; PAGE_SIZE as usize];
    // Page 8 of an 8-page block.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&8u64.to_le_bytes());
    body.extend_from_slice(&page);
    assert!(matches!(
        decode_bytes(&stream_with(&record(RecordKind::Pages, &body)), MAX_RAM),
        Err(Error::OutOfBounds {
            block_idx: 0,
            page_index: 8
        })
    ));
    // Block 2 of a two-block table.
    let mut body = 2u32.to_le_bytes().to_vec();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    assert!(matches!(
        decode_bytes(&stream_with(&record(RecordKind::ZeroPages, &body)), MAX_RAM),
        Err(Error::OutOfBounds { block_idx: 2, .. })
    ));
    // Duplicate offsets in one batch.
    let mut body = 0u32.to_le_bytes().to_vec();
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&1u64.to_le_bytes());
    body.extend_from_slice(&page);
    body.extend_from_slice(&page);
    assert!(matches!(
        decode_bytes(&stream_with(&record(RecordKind::Pages, &body)), MAX_RAM),
        Err(Error::Malformed(_))
    ));
}

#[test]
fn records_in_the_wrong_place_are_protocol_errors() {
    // A second header, an Ack from the sender, an End with the wrong count.
    let h = small_stream(Compression::None);
    for rec in [
        record(RecordKind::Ack, &[1]),
        record(RecordKind::End, &7u64.to_le_bytes()),
    ] {
        assert!(
            matches!(
                decode_bytes(&stream_with(&rec), MAX_RAM),
                Err(Error::Protocol(_))
            ),
            "{h:?}"
        );
    }
    let mut two = record(RecordKind::Sync, &2u64.to_le_bytes());
    two.extend_from_slice(&record(RecordKind::Sync, &1u64.to_le_bytes()));
    assert!(matches!(
        decode_bytes(&stream_with(&two), MAX_RAM),
        Err(Error::Protocol(_))
    ));
}

#[test]
fn connection_closed_mid_record_over_tcp() {
    let s = small_stream(Compression::None);
    // (A stream cut before its header ends is never accepted: tests/timeouts.rs.)
    for cut in [s.len() / 2, s.len() - 3] {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let Uri::Tcp { port, .. } = l.local_uri().unwrap() else {
            unreachable!()
        };
        let bytes = s[..cut].to_vec();
        let w = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.write_all(&bytes).unwrap();
        });
        let r = l.accept().and_then(|mut rx| {
            let sink = VecSink::for_header(rx.header());
            rx.receive(&sink, |_| Ok(()))
        });
        w.join().unwrap();
        assert!(
            matches!(r, Err(Error::Truncated { .. })),
            "cut {cut}: {r:?}"
        );
    }
}

#[test]
fn sender_dropped_mid_stream_on_four_channels() {
    for kind in [Kind::Tcp, Kind::Unix, Kind::Mem] {
        let (uri, l) = endpoint(kind);
        let h = std::thread::spawn(move || {
            let mut rx = l.accept()?;
            let sink = VecSink::for_header(rx.header());
            rx.receive(&sink, |_| Ok(()))
        });
        let s = Sender::connect(&uri, PAGE_SIZE, blocks(), opts(4, Compression::None)).unwrap();
        let page = vec![1u8; PAGE_SIZE as usize];
        for i in 0..6u64 {
            s.send_pages(0, &[i], &[&page]).unwrap();
        }
        s.iteration_end(1).unwrap();
        drop(s);
        let r = h.join().unwrap();
        assert!(matches!(r, Err(Error::Truncated { .. })), "{kind:?}: {r:?}");
    }
}

#[test]
fn refusal_reaches_the_sender() {
    let (uri, l) = endpoint(Kind::Tcp);
    let h = std::thread::spawn(move || {
        let mut rx = l.accept().unwrap();
        let sink = VecSink::for_header(rx.header());
        let r = rx.receive(&sink, |e| match e {
            transport::Event::DeviceState { .. } => Err(Error::Protocol("no such device".into())),
            _ => Ok(()),
        });
        assert!(r.is_err());
        rx.send_refusal("no such device").unwrap();
        rx
    });
    let s = Sender::connect(&uri, PAGE_SIZE, blocks(), opts(2, Compression::None)).unwrap();
    let r = send_ops(s, &ops());
    drop(h.join().unwrap()); // the receiver closes only after the sender read the answer
    assert!(
        matches!(&r, Err(Error::Refused(m)) if m == "no such device"),
        "{r:?}"
    );
}

#[test]
fn sparse_pages_need_the_header_feature_and_valid_words() {
    // A stream that did not declare sparse pages refuses them.
    let path = temp_path("nosparse");
    let o = transport::SendOptions {
        sparse_pages: false,
        ..opts(1, Compression::None)
    };
    let s = Sender::connect(&Uri::File(path.clone()), PAGE_SIZE, blocks(), o).unwrap();
    let mut batch = transport::SparseBatch::default();
    batch.classify(1, &sparse_page_bytes(PAGE_SIZE as usize, 3, 1));
    assert!(matches!(
        s.send_sparse_pages(0, &batch),
        Err(Error::InvalidArgument(_))
    ));
    drop(s);
    let _ = std::fs::remove_file(&path);

    // Hand-made records after a header that declared them (the default).
    let sparse = |block: u32, offsets: &[u64], counts: &[u16], entries: &[(u16, u64)]| {
        let mut b = block.to_le_bytes().to_vec();
        b.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
        offsets
            .iter()
            .for_each(|o| b.extend_from_slice(&o.to_le_bytes()));
        counts
            .iter()
            .for_each(|c| b.extend_from_slice(&c.to_le_bytes()));
        for (i, v) in entries {
            b.extend_from_slice(&i.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        record(RecordKind::SparsePages, &b)
    };
    let good = sparse(0, &[1], &[1], &[(3, 7)]);
    let bad = [
        ("offset past the block", sparse(0, &[8], &[1], &[(3, 7)])),
        ("unknown block", sparse(5, &[1], &[1], &[(3, 7)])),
        ("word past the page", sparse(0, &[1], &[1], &[(512, 7)])),
        (
            "words out of order",
            sparse(0, &[1], &[2], &[(4, 1), (3, 1)]),
        ),
        ("no words", sparse(0, &[1], &[0], &[])),
        ("count beyond entries", sparse(0, &[1], &[2], &[(3, 7)])),
        (
            "offsets not increasing",
            sparse(0, &[2, 1], &[1, 1], &[(0, 1), (0, 1)]),
        ),
        ("no pages", sparse(0, &[], &[], &[])),
    ];
    // The good record alone still needs an End; it must get past the sparse record.
    assert!(matches!(
        decode_bytes(&stream_with(&good), MAX_RAM),
        Err(Error::Truncated { .. })
    ));
    for (what, rec) in bad {
        match decode_bytes(&stream_with(&rec), MAX_RAM) {
            Err(Error::Malformed(_)) | Err(Error::OutOfBounds { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // A length no sparse record can have is refused before anything is buffered
    // (malformed, not a cut stream, though no body follows).
    let huge = RecordHeader {
        kind: RecordKind::SparsePages,
        flags: 0,
        body_len: 1 << 20,
        body_crc: 0,
    }
    .encode();
    assert!(matches!(
        decode_bytes(&stream_with(&huge), MAX_RAM),
        Err(Error::Malformed(_))
    ));
}

/// Replays a whole valid stream over TCP as a sender that stops at the switch-over:
/// it reads the receiver's `Ready`, then does what `then` says. Returns what
/// `await_commit` answered.
fn switch_over_with(
    then: impl FnOnce(&mut std::net::TcpStream) + Send + 'static,
) -> transport::Result<()> {
    use std::io::Read;
    let s = small_stream(Compression::None);
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let Uri::Tcp { port, .. } = l.local_uri().unwrap() else {
        unreachable!()
    };
    let w = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(&s).unwrap();
        // The back-channel: Applied for the stream's iteration, then Ready.
        loop {
            let mut hb = [0u8; RECORD_HEADER_BYTES];
            c.read_exact(&mut hb).unwrap();
            let h = RecordHeader::decode(&hb).unwrap();
            let mut body = vec![0u8; h.body_len as usize];
            c.read_exact(&mut body).unwrap();
            if h.kind == RecordKind::Ready {
                assert_eq!(h.body_len, 0);
                break;
            }
            assert_eq!(h.kind, RecordKind::Applied);
        }
        then(&mut c);
    });
    let mut rx = l.accept().unwrap();
    // Nothing may be acknowledged before the stream was received and committed.
    assert!(matches!(rx.send_ack(true), Err(Error::Protocol(_))));
    assert!(matches!(rx.await_commit(), Err(Error::Protocol(_))));
    let sink = VecSink::for_header(rx.header());
    rx.receive(&sink, |_| Ok(())).unwrap();
    let r = rx.await_commit();
    if r.is_err() {
        assert!(matches!(rx.send_ack(true), Err(Error::Protocol(_))));
    }
    w.join().unwrap();
    r
}

#[test]
fn no_commit_means_the_receiver_never_starts_the_guest() {
    // The sender goes away after Ready (cancelled, or died).
    let r = switch_over_with(|c| c.shutdown(std::net::Shutdown::Both).unwrap());
    assert!(
        matches!(&r, Err(Error::Aborted(m)) if m.contains("without handing the guest over")),
        "{r:?}"
    );
    // A record that is not Commit, a Commit with a body, a cut Commit.
    let sync = record(RecordKind::Sync, &7u64.to_le_bytes());
    let r = switch_over_with(move |c| c.write_all(&sync).unwrap());
    assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
    let fat = record(RecordKind::Commit, &[1]);
    let r = switch_over_with(move |c| c.write_all(&fat).unwrap());
    assert!(matches!(r, Err(Error::Malformed(_))), "{r:?}");
    let cut = record(RecordKind::Commit, &[]);
    let r = switch_over_with(move |c| c.write_all(&cut[..9]).unwrap());
    assert!(matches!(r, Err(Error::Aborted(_))), "{r:?}");
    // The real thing.
    let commit = record(RecordKind::Commit, &[]);
    switch_over_with(move |c| c.write_all(&commit).unwrap()).unwrap();
}

/// Sends the test stream to a receiver that, once it received it, runs `then`,
/// which keeps the receiver open until the sender has its answer (returns it) or
/// closes it at once (drops it). Returns what `finish` said.
fn finish_against(
    then: impl FnOnce(transport::Receiver) -> Option<transport::Receiver> + Send + 'static,
) -> transport::Result<transport::Ack> {
    let (uri, l) = endpoint(Kind::Tcp);
    let h = std::thread::spawn(move || {
        let mut rx = l.accept().unwrap();
        let sink = VecSink::for_header(rx.header());
        rx.receive(&sink, |_| Ok(())).unwrap();
        then(rx)
    });
    let s = Sender::connect(&uri, PAGE_SIZE, blocks(), opts(2, Compression::None)).unwrap();
    let r = send_ops(s, &ops());
    drop(h.join().unwrap());
    r
}

#[test]
fn a_lost_ack_after_the_commit_is_in_doubt_and_nothing_else_is() {
    // Committed, then gone without an answer: the receiver may run the guest.
    let r = finish_against(|mut rx| {
        rx.await_commit().unwrap();
        None
    });
    assert!(matches!(r, Err(Error::InDoubt(_))), "{r:?}");
    // Gone before Ready: no commit went out, the sender keeps the guest.
    let r = finish_against(|_| None);
    assert!(
        matches!(r, Err(Error::Truncated { .. } | Error::Io(_))),
        "{r:?}"
    );
    // Refused before Ready, or after the commit (it could not start the guest):
    // either way it does not run it.
    let r = finish_against(|mut rx| {
        rx.send_refusal("cannot load").unwrap();
        Some(rx)
    });
    assert!(
        matches!(&r, Err(Error::Refused(m)) if m == "cannot load"),
        "{r:?}"
    );
    let r = finish_against(|mut rx| {
        rx.await_commit().unwrap();
        rx.send_refusal("cannot start").unwrap();
        Some(rx)
    });
    assert!(
        matches!(&r, Err(Error::Refused(m)) if m == "cannot start"),
        "{r:?}"
    );
    // The whole handshake.
    let r = finish_against(|mut rx| {
        rx.await_commit().unwrap();
        rx.send_ack(true).unwrap();
        Some(rx)
    });
    assert!(r.unwrap().resumed);
}

/// The sender's back-channel parser, on hand-made answers: the order Applied*,
/// Ready, Ack (or Refuse at any time) and nothing else.
#[test]
fn back_channel_answers() {
    use transport::decode_answers;
    let applied = |n: u64| record(RecordKind::Applied, &n.to_le_bytes());
    let ready = record(RecordKind::Ready, &[]);
    let ack = record(RecordKind::Ack, &[1]);
    let cat = |parts: &[&[u8]]| parts.concat();

    let a = decode_answers(&cat(&[&applied(1), &applied(3), &ready, &ack]));
    assert_eq!((a.applied, a.ready), (Some(3), true));
    assert!(a.answer.unwrap().resumed);
    let a = decode_answers(&cat(&[&applied(2), &record(RecordKind::Refuse, b"full")]));
    assert_eq!(a.applied, Some(2));
    assert!(matches!(&a.answer, Err(Error::Refused(m)) if m == "full"));
    // Out of order.
    for bad in [
        cat(&[&ack]),
        cat(&[&ready, &ready]),
        cat(&[&ready, &applied(1)]),
        cat(&[&record(RecordKind::Sync, &1u64.to_le_bytes())]),
        cat(&[&ready, &record(RecordKind::Ack, &[2])]),
        cat(&[&record(RecordKind::Ready, &[0])]),
    ] {
        let a = decode_answers(&bad);
        assert!(
            matches!(
                a.answer,
                Err(Error::Protocol(_) | Error::Malformed(_) | Error::TooLong { .. })
            ),
            "{a:?}"
        );
    }
    // Cut anywhere, or damaged: an error, never an answer.
    let whole = cat(&[&applied(1), &ready, &ack]);
    for cut in 0..whole.len() {
        assert!(matches!(
            decode_answers(&whole[..cut]).answer,
            Err(Error::Truncated { .. })
        ));
    }
    let mut bent = whole.clone();
    *bent.last_mut().unwrap() ^= 1;
    assert!(matches!(
        decode_answers(&bent).answer,
        Err(Error::Checksum { .. })
    ));
}
