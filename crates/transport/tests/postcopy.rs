//! The postcopy part of the wire: discards and the switch at the end of precopy, the
//! switch-over handshake, page requests answered on the priority connection while
//! background pages flow, `End`, and the receiver's `Done`; and the refusals around it.

mod common;
#[path = "common/tls_creds.rs"]
mod tls_creds;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use transport::{BlockInfo, Compression, Error, Event, PageSink, SendOptions, Sender, VecSink};

const PAGE: usize = 4096;
const PAGES: u64 = 64;

fn blocks() -> Vec<BlockInfo> {
    vec![BlockInfo {
        id: "ram0".into(),
        size_bytes: PAGES * PAGE as u64,
    }]
}

/// A `VecSink` that also records every `pages_done` call.
struct Recording {
    inner: VecSink,
    done: Mutex<Vec<u64>>,
}

// SAFETY: delegates to `VecSink`, which keeps the trait's contract.
unsafe impl PageSink for Recording {
    fn page_ptr(&self, block_idx: usize, page_index: u64) -> *mut u8 {
        self.inner.page_ptr(block_idx, page_index)
    }

    fn pages_done(
        &self,
        _channel: usize,
        _block: usize,
        offsets: &[u64],
        _page_size: usize,
    ) -> Result<(), String> {
        self.done.lock().unwrap().extend_from_slice(offsets);
        Ok(())
    }
}

/// Every page holds fill 1 (precopy) but pages 8..16, which hold fill 2 (sent again
/// after the switch).
fn assert_written_after_switch(mut sink: VecSink) {
    for p in 0..PAGES {
        let fill = if (8..16).contains(&p) { 2 } else { 1 };
        assert_eq!(
            &sink.block(0)[p as usize * PAGE..][..PAGE],
            page_bytes(PAGE, fill, p).as_slice(),
            "page {p}"
        );
    }
}

fn postcopy_opts(channels: u16) -> SendOptions {
    SendOptions {
        postcopy: true,
        ..opts(channels, Compression::None)
    }
}

/// Precopy sends every page with fill 1; the guest then "writes" pages 8..16 (fill
/// 2), which are discarded and sent again after the switch: page 12 on request,
/// the rest in the background.
fn run(kind: Kind, channels: u16) {
    run_with(kind, channels, None);
}

/// [`run`], with TLS (client, server) when given.
fn run_with(kind: Kind, channels: u16, tls: Option<(transport::TlsConfig, transport::TlsConfig)>) {
    let (client, server) = tls.unzip();
    let (uri, listener) = endpoint(kind);
    let sender = std::thread::spawn(move || -> transport::Result<Vec<u64>> {
        let opts = SendOptions {
            tls: client,
            ..postcopy_opts(channels)
        };
        let s = Sender::connect(&uri, PAGE as u32, blocks(), opts)?;
        assert_eq!(
            s.header().features.channels,
            channels + 1,
            "priority connection"
        );
        let old: Vec<Vec<u8>> = (0..PAGES).map(|p| page_bytes(PAGE, 1, p)).collect();
        let offsets: Vec<u64> = (0..PAGES).collect();
        let refs: Vec<&[u8]> = old.iter().map(|p| p.as_slice()).collect();
        s.send_pages(0, &offsets, &refs)?;
        s.iteration_end(1)?;
        s.send_discard(0, &[(8, 8)])?;
        s.send_device_state("vcpus", b"cpu")?;
        let ack = s.switch_to_postcopy()?;
        assert!(ack.resumed);
        let new: Vec<Vec<u8>> = (0..PAGES).map(|p| page_bytes(PAGE, 2, p)).collect();
        let req = s
            .page_requests()
            .unwrap()
            .recv_timeout(Duration::from_secs(10))
            .expect("a page request");
        assert_eq!((req.block_idx, req.page_index), (0, 12));
        s.send_requested_pages(0, &[12], &[&new[12]])?;
        let rest: Vec<u64> = (8..16).filter(|&p| p != 12).collect();
        let refs: Vec<&[u8]> = rest.iter().map(|&p| new[p as usize].as_slice()).collect();
        s.send_pages(0, &rest, &refs)?;
        s.finish_postcopy()?;
        Ok(rest)
    });
    let mut rx = listener
        .accept_with(&transport::AcceptOptions {
            tls: server,
            ..Default::default()
        })
        .unwrap();
    assert!(rx.header().features.postcopy);
    let sink = Recording {
        inner: VecSink::for_header(rx.header()),
        done: Mutex::new(Vec::new()),
    };
    let mut discards = Vec::new();
    let mut device = None;
    rx.receive(&sink, |ev| {
        match ev {
            Event::Discard { block_idx, runs } => discards.push((block_idx, runs)),
            Event::DeviceState { data, .. } => device = Some(data),
            Event::IterationEnd { .. } => {}
        }
        Ok(())
    })
    .unwrap();
    assert!(rx.switched_to_postcopy());
    assert_eq!(discards, vec![(0, vec![(8, 8)])]);
    assert_eq!(device.as_deref(), Some(&b"cpu"[..]));
    assert_eq!(
        sink.done.lock().unwrap().len(),
        PAGES as usize,
        "precopy pages"
    );
    sink.done.lock().unwrap().clear();
    rx.await_commit().unwrap();
    rx.send_ack(true).unwrap();
    rx.page_requester().unwrap().request(0, 12).unwrap();
    rx.receive_postcopy(&sink).unwrap();
    rx.send_done().unwrap();
    let rest = sender.join().unwrap().expect("sender");
    let done: BTreeSet<u64> = sink.done.lock().unwrap().iter().copied().collect();
    let want: BTreeSet<u64> = rest.iter().copied().chain([12]).collect();
    assert_eq!(done, want, "each page after the switch, once");
    assert_written_after_switch(sink.inner);
}

#[test]
fn postcopy_over_tcp_with_one_and_two_channels() {
    run(Kind::Tcp, 1);
    run(Kind::Tcp, 2);
}

#[test]
fn postcopy_over_tls_with_one_and_two_channels() {
    let dir = temp_path("tls");
    tls_creds::Ca::new("ca").write_dir(&dir, &tls_creds::Spec::default());
    let load =
        |e| transport::TlsConfig::new(transport::TlsCreds::load("tls0", &dir, e, true).unwrap());
    for channels in [1, 2] {
        let pair = (
            load(transport::TlsEndpoint::Client),
            load(transport::TlsEndpoint::Server),
        );
        run_with(Kind::Tcp, channels, Some(pair));
    }
}

#[test]
fn postcopy_over_unix_and_mem() {
    run(Kind::Unix, 1);
    run(Kind::Mem, 2);
}

#[test]
fn postcopy_calls_are_refused_on_a_stream_not_opened_for_it() {
    let (uri, listener) = endpoint(Kind::Tcp);
    let t = std::thread::spawn(move || {
        let rx = listener.accept().unwrap();
        assert!(!rx.header().features.postcopy);
        rx
    });
    let s = Sender::connect(&uri, PAGE as u32, blocks(), opts(1, Compression::None)).unwrap();
    let _rx = t.join().unwrap();
    assert!(matches!(
        s.send_discard(0, &[(0, 1)]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.switch_to_postcopy(),
        Err(Error::InvalidArgument(_))
    ));
    let page = vec![1u8; PAGE];
    assert!(matches!(
        s.send_requested_pages(0, &[0], &[&page]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(s.page_requests().is_none());
}

#[test]
fn discard_runs_outside_the_block_are_refused_by_the_sender() {
    let (uri, listener) = endpoint(Kind::Tcp);
    let t = std::thread::spawn(move || listener.accept().unwrap());
    let s = Sender::connect(&uri, PAGE as u32, blocks(), postcopy_opts(1)).unwrap();
    let _rx = t.join().unwrap();
    for runs in [&[(60, 8)][..], &[(0, 0)][..], &[(u64::MAX, 2)][..]] {
        assert!(
            matches!(s.send_discard(0, runs), Err(Error::InvalidArgument(_))),
            "{runs:?}"
        );
    }
    assert!(matches!(
        s.send_discard(1, &[(0, 1)]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn a_postcopy_stream_needs_a_second_connection_and_no_file() {
    let u = transport::Uri::File(temp_path("pc"));
    let _l = transport::Listener::bind(&u).unwrap();
    assert!(matches!(
        Sender::connect(&u, PAGE as u32, blocks(), postcopy_opts(1)),
        Err(Error::InvalidArgument(_))
    ));
}

/// A postcopy stream whose connections break after the switch continues over a new
/// one: the resumed stream names the first by its session id, the receiver answers
/// with the pages it still lacks, and those (one on request, the rest in the
/// background) complete it.
fn resume(kind: Kind, channels: u16) {
    let (uri, listener) = endpoint(kind);
    let (uri2, listener2) = endpoint(kind);
    let (broken_tx, broken_rx) = crossbeam_channel::bounded::<()>(1);
    let sender = std::thread::spawn(move || -> transport::Result<()> {
        let s = Sender::connect(&uri, PAGE as u32, blocks(), postcopy_opts(channels))?;
        let old: Vec<Vec<u8>> = (0..PAGES).map(|p| page_bytes(PAGE, 1, p)).collect();
        let offsets: Vec<u64> = (0..PAGES).collect();
        let refs: Vec<&[u8]> = old.iter().map(|p| p.as_slice()).collect();
        s.send_pages(0, &offsets, &refs)?;
        s.iteration_end(1)?;
        s.send_discard(0, &[(8, 8)])?;
        s.send_device_state("vcpus", b"cpu")?;
        s.switch_to_postcopy()?;
        let new: Vec<Vec<u8>> = (0..PAGES).map(|p| page_bytes(PAGE, 2, p)).collect();
        // Page 9 lands; then the link breaks.
        s.send_pages(0, &[9], &[&new[9]])?;
        let session = s.session_id();
        broken_rx.recv().unwrap();
        s.abort_handle().abort();
        drop(s);
        let (s, missing) = Sender::resume_postcopy(
            &uri2,
            PAGE as u32,
            blocks(),
            postcopy_opts(channels),
            &transport::Cancel::new(),
            session,
        )?;
        assert_eq!(missing, vec![(0, vec![(8, 1), (10, 6)])]);
        let req = s
            .page_requests()
            .unwrap()
            .recv_timeout(Duration::from_secs(10))
            .expect("the request made before the break, asked again");
        assert_eq!((req.block_idx, req.page_index), (0, 12));
        s.send_requested_pages(0, &[12], &[&new[12]])?;
        let rest: Vec<u64> = [8, 10, 11, 13, 14, 15].into();
        let refs: Vec<&[u8]> = rest.iter().map(|&p| new[p as usize].as_slice()).collect();
        s.send_pages(0, &rest, &refs)?;
        s.finish_postcopy()
    });
    let mut rx = listener.accept().unwrap();
    let sink = Recording {
        inner: VecSink::for_header(rx.header()),
        done: Mutex::new(Vec::new()),
    };
    rx.receive(&sink, |_| Ok(())).unwrap();
    rx.await_commit().unwrap();
    rx.send_ack(true).unwrap();
    let session = rx.session_id();
    sink.done.lock().unwrap().clear();
    let first = std::thread::scope(|s| {
        let h = s.spawn(|| rx.receive_postcopy(&sink));
        // Wait for page 9 before the break.
        while !sink.done.lock().unwrap().contains(&9) {
            std::thread::sleep(Duration::from_millis(1));
        }
        broken_tx.send(()).unwrap();
        h.join().unwrap()
    });
    assert!(first.is_err(), "the broken stream fails: {first:?}");
    let mut rx2 = listener2.accept().unwrap();
    assert!(rx2.is_resumed());
    assert_eq!(
        rx2.session_id(),
        session,
        "the resumed stream names the first"
    );
    let other = VecSink::for_header(rx2.header());
    assert!(
        rx2.receive(&other, |_| Ok(())).is_err(),
        "a resumed stream has no precopy part"
    );
    rx2.resume_postcopy(&[(0, vec![(8, 1), (10, 6)])]).unwrap();
    rx2.page_requester().unwrap().request(0, 12).unwrap();
    rx2.receive_postcopy(&sink).unwrap();
    rx2.send_done().unwrap();
    sender.join().unwrap().expect("sender");
    let done: BTreeSet<u64> = sink.done.lock().unwrap().iter().copied().collect();
    assert_eq!(done, (8..16).collect(), "each missing page once");
    assert_written_after_switch(sink.inner);
}

#[test]
fn a_broken_postcopy_stream_resumes_over_tcp_unix_and_mem() {
    resume(Kind::Tcp, 1);
    resume(Kind::Tcp, 2);
    resume(Kind::Unix, 1);
    resume(Kind::Mem, 2);
}

#[test]
fn only_a_postcopy_stream_resumes_and_a_missing_map_needs_a_resumed_stream() {
    let (uri, _listener) = endpoint(Kind::Tcp);
    let r = Sender::resume_postcopy(
        &uri,
        PAGE as u32,
        blocks(),
        opts(1, Compression::None),
        &transport::Cancel::new(),
        7,
    );
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{:?}", r.err());
    // A `Missing` record on the back-channel of a stream that was not resumed.
    let body = [
        0u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
    ];
    let rh = transport::format::RecordHeader {
        kind: transport::format::Kind::Missing,
        flags: 0,
        body_len: body.len() as u32,
        body_crc: transport::checksum::crc32c(&body),
    }
    .encode();
    let a = transport::decode_answers(&[&rh[..], &body].concat());
    assert!(
        matches!(&a.answer, Err(Error::Protocol(m)) if m.contains("not resumed")),
        "{:?}",
        a.answer
    );
}
