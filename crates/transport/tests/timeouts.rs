//! Every wait of the wire is bounded, and a cancel ends it at once: connect to a
//! black hole, the rate limiter's sleep, the switch-over's waits, a destination
//! that stops reading, and an accept loop that bad connections cannot block.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use transport::format::{Preamble, StreamHeader};
use transport::{
    AcceptOptions, BlockInfo, Cancel, Compression, Error, Listener, SendOptions, Sender, Uri,
    VecSink,
};

const PAGE_SIZE: u32 = 4096;
/// Slack on top of a timeout for "decided within": generous, the machine is shared.
const SLACK: Duration = Duration::from_secs(5);

fn blocks() -> Vec<BlockInfo> {
    vec![BlockInfo {
        id: "ram0".into(),
        size_bytes: 64 << 20,
    }]
}

fn ops() -> Vec<Op> {
    vec![
        Op::Pages {
            block: 0,
            offsets: vec![1, 2, 3],
            fill: vec![7, 8, 9],
        },
        Op::IterationEnd(1),
        Op::Device {
            name: "cpu0".into(),
            data: vec![1, 2, 3],
        },
    ]
}

fn timeouts(d: Duration) -> SendOptions {
    SendOptions {
        connect_timeout: d,
        io_timeout: d,
        switchover_timeout: d,
        ..opts(1, Compression::None)
    }
}

/// A TCP address that takes no connection and answers no SYN: a listener with a
/// backlog of 0 whose queue is filled and never accepted (the kernel then drops
/// SYNs; measured here: a plain connect hangs). Keep the result alive.
struct BlackHole {
    addr: SocketAddr,
    _listener: OwnedFd,
    _queued: Vec<TcpStream>,
}

fn black_hole() -> BlackHole {
    // SAFETY: plain socket calls on a fresh descriptor that `OwnedFd` then owns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid sockaddr_in of `len` bytes.
    let r = unsafe { libc::bind(fd, (&sin as *const libc::sockaddr_in).cast(), len) };
    assert_eq!(r, 0);
    // SAFETY: a bound socket.
    let r = unsafe { libc::listen(fd, 0) };
    assert_eq!(r, 0);
    let mut out = sin;
    let mut out_len = len;
    // SAFETY: a sockaddr_in out-parameter of the right size.
    let r = unsafe {
        libc::getsockname(
            fd,
            (&mut out as *mut libc::sockaddr_in).cast(),
            &mut out_len,
        )
    };
    assert_eq!(r, 0);
    let addr = SocketAddr::from(([127, 0, 0, 1], u16::from_be(out.sin_port)));
    let mut queued = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(_) => {
                return BlackHole {
                    addr,
                    _listener: listener,
                    _queued: queued,
                }
            }
        }
    }
    panic!("the backlog never filled: no black hole on this machine");
}

/// Whether the peer closed `c` within `limit` (end of file or a reset; a read that
/// timed out is not a close).
fn closed_within(c: &mut TcpStream, limit: Duration) -> bool {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 64];
    let t0 = Instant::now();
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) if t0.elapsed() < limit => continue,
            Ok(_) => return false,
            Err(e) => {
                return matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            }
        }
    }
}

fn tcp_uri(addr: SocketAddr) -> Uri {
    Uri::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

#[test]
fn connect_to_a_black_hole_is_cancelled_at_once() {
    let hole = black_hole();
    let cancel = Cancel::new();
    let c = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c.cancel();
        Instant::now()
    });
    let opts = timeouts(Duration::from_secs(120));
    let r = Sender::connect_with(&tcp_uri(hole.addr), PAGE_SIZE, blocks(), opts, &cancel);
    let returned = Instant::now();
    let cancelled = canceller.join().unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert!(
        returned.saturating_duration_since(cancelled) < Duration::from_secs(1),
        "{:?} after the cancel",
        returned.saturating_duration_since(cancelled)
    );
}

#[test]
fn connect_to_a_black_hole_times_out() {
    let hole = black_hole();
    let t0 = Instant::now();
    let r = Sender::connect(
        &tcp_uri(hole.addr),
        PAGE_SIZE,
        blocks(),
        timeouts(Duration::from_secs(1)),
    );
    let took = t0.elapsed();
    let msg = match r {
        Err(Error::TimedOut(m)) => m,
        other => panic!("{:?}", other.err()),
    };
    assert!(msg.contains(&hole.addr.to_string()), "{msg}");
    assert!(msg.contains("1 s"), "{msg}");
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(1) + SLACK, "{took:?}");
}

/// A sender to a file at 1 byte/s: every write sleeps for a long time.
fn slow_file_sender(cancel: &Cancel) -> (Sender, std::path::PathBuf) {
    let path = temp_path("slow");
    let s = Sender::connect_with(
        &Uri::File(path.clone()),
        PAGE_SIZE,
        blocks(),
        opts(1, Compression::None),
        cancel,
    )
    .unwrap();
    s.set_max_bandwidth(1);
    (s, path)
}

#[test]
fn the_rate_limiter_sleep_ends_on_cancel() {
    let cancel = Cancel::new();
    let (s, path) = slow_file_sender(&cancel);
    let c = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c.cancel();
        Instant::now()
    });
    let page = vec![3u8; PAGE_SIZE as usize];
    let r = s.send_pages(0, &[0], &[&page]);
    let returned = Instant::now();
    let cancelled = canceller.join().unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(returned.saturating_duration_since(cancelled) < Duration::from_secs(1));
    // The limit applied while connecting too: the header write is cut short.
    let r = Sender::connect_with(
        &Uri::File(path.clone()),
        PAGE_SIZE,
        blocks(),
        SendOptions {
            max_bandwidth_bytes_per_sec: 1,
            ..opts(1, Compression::None)
        },
        &cancel,
    );
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    let _ = std::fs::remove_file(path);
}

#[test]
fn abort_ends_the_rate_limiter_sleep() {
    let (s, path) = slow_file_sender(&Cancel::new());
    let abort = s.abort_handle();
    let aborter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        abort.abort();
        Instant::now()
    });
    let page = vec![3u8; PAGE_SIZE as usize];
    let r = s.send_pages(0, &[0], &[&page]);
    let returned = Instant::now();
    let aborted = aborter.join().unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(returned.saturating_duration_since(aborted) < Duration::from_secs(1));
    let _ = std::fs::remove_file(path);
}

/// Sends the test stream to a real receiver that, once it received the stream, runs
/// `then` and holds the receiver until the sender returned. Returns what `finish`
/// said and how long it took.
fn finish_against(
    switchover: Duration,
    then: impl FnOnce(&mut transport::Receiver) + Send + 'static,
) -> (transport::Result<transport::Ack>, Duration) {
    let (uri, l) = endpoint(Kind::Tcp);
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(1);
    let h = std::thread::spawn(move || {
        let mut rx = l.accept().unwrap();
        let sink = VecSink::for_header(rx.header());
        rx.receive(&sink, |_| Ok(())).unwrap();
        then(&mut rx);
        let _ = done_rx.recv_timeout(Duration::from_secs(60));
    });
    let s = Sender::connect(&uri, PAGE_SIZE, blocks(), timeouts(switchover)).unwrap();
    // Everything but the finish, then time the finish alone.
    send_ops_unfinished(&s, &ops()).unwrap();
    let t0 = Instant::now();
    let r = s.finish();
    let took = t0.elapsed();
    let _ = done_tx.send(());
    h.join().unwrap();
    (r, took)
}

#[test]
fn finish_gives_up_on_a_receiver_that_never_offers_the_switch_over() {
    let d = Duration::from_secs(1);
    // It received the whole stream but never says Ready (stopped, or hung).
    let (r, took) = finish_against(d, |_| {});
    match &r {
        Err(Error::TimedOut(m)) => assert!(m.contains("switch-over"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(!matches!(r, Err(Error::InDoubt(_))));
    assert!(took >= d && took < d + SLACK, "{took:?}");
}

#[test]
fn finish_is_in_doubt_when_the_ack_never_comes() {
    let d = Duration::from_secs(1);
    // Ready, then the commit arrives, then no acknowledgement.
    let (r, took) = finish_against(d, |rx| rx.await_commit().unwrap());
    match &r {
        Err(Error::InDoubt(m)) => assert!(m.contains("no acknowledgement within 1 s"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(took < d + SLACK, "{took:?}");
}

#[test]
fn a_destination_that_stops_reading_fails_a_write() {
    let path = temp_path("stall");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // Accepts and never reads.
    let h = std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        std::thread::sleep(Duration::from_secs(30));
        drop(c);
    });
    let d = Duration::from_secs(1);
    let s = Sender::connect(&Uri::Unix(path.clone()), PAGE_SIZE, blocks(), timeouts(d)).unwrap();
    let n = s.max_batch_pages();
    let data = vec![5u8; n * PAGE_SIZE as usize];
    let pages: Vec<&[u8]> = data.chunks(PAGE_SIZE as usize).collect();
    let offsets: Vec<u64> = (0..n as u64).collect();
    let t0 = Instant::now();
    let err = loop {
        // 64 MiB of RAM is 4 batches; the socket buffers hold at most a few.
        if let Err(e) = s.send_pages(0, &offsets, &pages) {
            break e;
        }
        assert!(t0.elapsed() < d + SLACK, "the writes never stalled");
    };
    let took = t0.elapsed();
    match &err {
        Error::TimedOut(m) => assert!(m.contains("did not read for 1 s"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(took < d + SLACK, "{took:?}");
    drop(s);
    let _ = std::fs::remove_file(&path);
    drop(h);
}

/// A valid preamble of a stream that does not exist.
fn preamble(channel_index: u16, channel_count: u16, session_id: u64) -> Vec<u8> {
    Preamble {
        channel_index,
        channel_count,
        session_id,
    }
    .encode()
    .to_vec()
}

/// A valid stream header record claiming `channels`.
fn header_record(channels: u16) -> Vec<u8> {
    let h = StreamHeader {
        page_size: PAGE_SIZE,
        blocks: blocks(),
        features: transport::Features {
            compression: Compression::None,
            channels,
            sparse_pages: true,
            page_checksum: transport::PageChecksum::Xxh3,
            postcopy: false,
            resume: false,
            aead_pages: false,
        },
    };
    let body = h.encode_body();
    let rh = transport::format::RecordHeader {
        kind: transport::format::Kind::Header,
        flags: 0,
        body_len: body.len() as u32,
        body_crc: transport::checksum::crc32c(&body),
    }
    .encode();
    [&rh[..], &body].concat()
}

#[test]
fn bad_connections_never_block_a_real_stream() {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = l.local_uri().unwrap();
    let Uri::Tcp { port, .. } = uri.clone() else {
        unreachable!()
    };
    // Far longer than the test: only concurrency lets the real stream in.
    let preamble_timeout = Duration::from_secs(60);
    let accept = std::thread::spawn(move || {
        let o = AcceptOptions {
            preamble_timeout,
            ..AcceptOptions::default()
        };
        let mut rx = l.accept_with(&o)?;
        let sink = VecSink::for_header(rx.header());
        rx.receive(&sink, |_| Ok(()))?;
        rx.await_commit()?;
        rx.send_ack(true)?;
        Ok::<_, Error>((rx.header().features.channels, sink.into_blocks()))
    });
    let connect = || TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut bad = Vec::new();
    // Silent.
    bad.push(connect());
    // A control connection whose header claims 64 channels; none of the others come.
    let mut liar = connect();
    liar.write_all(&preamble(0, 64, 0xdead)).unwrap();
    liar.write_all(&header_record(64)).unwrap();
    bad.push(liar);
    // A data connection of a 64-channel stream that never completes.
    let mut liar = connect();
    liar.write_all(&preamble(5, 64, 0xbeef)).unwrap();
    bad.push(liar);
    // A preamble and half a header, then silence.
    let mut cut = connect();
    cut.write_all(&preamble(0, 1, 0xf00d)).unwrap();
    cut.write_all(&header_record(1)[..5]).unwrap();
    bad.push(cut);
    // Garbage.
    let mut junk = connect();
    junk.write_all(b"GET / HTTP/1.0\r\n\r\n and then some more bytes")
        .unwrap();
    bad.push(junk);

    let t0 = Instant::now();
    let s = Sender::connect(&uri, PAGE_SIZE, blocks(), opts(2, Compression::None)).unwrap();
    let ack = send_ops(s, &ops()).unwrap();
    assert!(ack.resumed);
    let (channels, memory) = accept.join().unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(channels, 2);
    assert_eq!(memory, model(PAGE_SIZE as usize, &blocks(), &ops()));
    // Once the real stream won, the bad connections were closed.
    for mut c in bad {
        assert!(closed_within(&mut c, Duration::from_secs(10)));
    }
}

#[test]
fn a_silent_connection_is_dropped_after_the_preamble_timeout() {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = l.local_uri().unwrap();
    let Uri::Tcp { port, .. } = uri.clone() else {
        unreachable!()
    };
    let d = Duration::from_secs(1);
    let accept = std::thread::spawn(move || {
        let o = AcceptOptions {
            preamble_timeout: d,
            ..AcceptOptions::default()
        };
        let mut rx = l.accept_with(&o)?;
        let sink = VecSink::for_header(rx.header());
        rx.receive(&sink, |_| Ok(()))?;
        rx.await_commit()?;
        rx.send_ack(true)
    });
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let t0 = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(30)));
    let took = t0.elapsed();
    assert!(took >= d && took < d + SLACK, "{took:?}");
    // The listener still takes a real stream.
    let s = Sender::connect(&uri, PAGE_SIZE, blocks(), opts(1, Compression::None)).unwrap();
    send_ops(s, &ops()).unwrap();
    accept.join().unwrap().unwrap();
}

#[test]
fn past_max_pending_the_oldest_is_dropped() {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = l.local_uri().unwrap();
    let Uri::Tcp { port, .. } = uri.clone() else {
        unreachable!()
    };
    let accept = std::thread::spawn(move || {
        let o = AcceptOptions {
            preamble_timeout: Duration::from_secs(120),
            max_pending: 2,
            ..AcceptOptions::default()
        };
        let mut rx = l.accept_with(&o)?;
        let sink = VecSink::for_header(rx.header());
        rx.receive(&sink, |_| Ok(()))?;
        rx.await_commit()?;
        rx.send_ack(true)
    });
    let mut silent: Vec<TcpStream> = (0..4)
        .map(|_| {
            let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            // Apart in time, so "oldest" is well defined.
            std::thread::sleep(Duration::from_millis(300));
            c
        })
        .collect();
    // The two oldest are closed long before the preamble timeout.
    for c in &mut silent[..2] {
        assert!(closed_within(c, SLACK));
    }
    let s = Sender::connect(&uri, PAGE_SIZE, blocks(), opts(2, Compression::None)).unwrap();
    send_ops(s, &ops()).unwrap();
    accept.join().unwrap().unwrap();
}
