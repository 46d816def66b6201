//! The reordering test: the same page is sent in iteration 1 on one channel and
//! in iteration 2 on another, with the first channel held back by a proxy until
//! the second has delivered everything. The receiver must end with the newer
//! content (the iteration barrier stops channel B from applying iteration 2
//! before channel A delivered iteration 1).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;

use transport::format::{Preamble, RecordHeader, PREAMBLE_BYTES, RECORD_HEADER_BYTES};
use transport::{BlockInfo, Compression, Event, Listener, SendOptions, Sender, Uri, VecSink};

const PAGE_SIZE: usize = 4096;

/// A TCP proxy for `channels` connections. Connection `held` is buffered in full
/// and forwarded only after connection `first` reached end of file.
fn proxy(
    target_port: u16,
    channels: usize,
    held: u16,
    first: u16,
) -> (u16, thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = thread::spawn(move || {
        let first_done = Arc::new(Barrier::new(2));
        let mut workers = Vec::new();
        for _ in 0..channels {
            let (mut from, _) = l.accept().unwrap();
            let mut to = TcpStream::connect(("127.0.0.1", target_port)).unwrap();
            let mut pre = [0u8; PREAMBLE_BYTES];
            from.read_exact(&mut pre).unwrap();
            let idx = Preamble::decode(&pre).unwrap().channel_index;
            let first_done = first_done.clone();
            // Back-channel (receiver -> sender), unchanged.
            let (mut back_from, mut back_to) = (to.try_clone().unwrap(), from.try_clone().unwrap());
            workers.push(thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
            }));
            workers.push(thread::spawn(move || {
                let data = pre.to_vec();
                if idx == held {
                    // Keep reading (the sender must never block on us), forward later.
                    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
                    let reader = thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => tx.send(buf[..n].to_vec()).unwrap(),
                            }
                        }
                    });
                    // Let the stream start (preamble, and the header on the control
                    // connection) so the receiver is running when we hold back.
                    to.write_all(&data).unwrap();
                    if idx == 0 {
                        let mut pending = Vec::new();
                        while pending.len() < RECORD_HEADER_BYTES {
                            pending.extend(rx.recv().unwrap());
                        }
                        let h = RecordHeader::decode(
                            pending[..RECORD_HEADER_BYTES].try_into().unwrap(),
                        )
                        .unwrap();
                        let header_len = RECORD_HEADER_BYTES + h.body_len as usize;
                        while pending.len() < header_len {
                            pending.extend(rx.recv().unwrap());
                        }
                        to.write_all(&pending[..header_len]).unwrap();
                        first_done.wait();
                        to.write_all(&pending[header_len..]).unwrap();
                    } else {
                        first_done.wait();
                    }
                    for chunk in rx {
                        to.write_all(&chunk).unwrap();
                    }
                    reader.join().unwrap();
                } else {
                    to.write_all(&data).unwrap();
                    std::io::copy(&mut from, &mut to).unwrap();
                    if idx == first {
                        // Give the receiver time to apply what it has (a receiver without
                        // the barrier would now write the newer page), then release.
                        thread::sleep(std::time::Duration::from_millis(100));
                        first_done.wait();
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Write);
            }));
        }
        for w in workers {
            w.join().unwrap();
        }
    });
    (port, h)
}

fn page(fill: u8) -> Vec<u8> {
    vec![fill; PAGE_SIZE]
}

/// Sends page 5 with `old` in iteration 1 (batch number `old_batch` of that
/// iteration) and with `new` in iteration 2, on `channels` channels; channel
/// `held` is delayed until channel `first` is done.
fn run(channels: u16, held: u16, first: u16, old_batch: usize) {
    let blocks = vec![BlockInfo {
        id: "ram".into(),
        size_bytes: 64 * PAGE_SIZE as u64,
    }];
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let Uri::Tcp { port, .. } = listener.local_uri().unwrap() else {
        unreachable!()
    };
    let (pport, ph) = proxy(port, channels.into(), held, first);
    let rh = thread::spawn(move || {
        let mut rx = listener.accept().unwrap();
        let mut sink = VecSink::for_header(rx.header());
        let mut events = Vec::new();
        rx.receive(&sink, |e| {
            events.push(e);
            Ok(())
        })
        .unwrap();
        rx.await_commit().unwrap();
        rx.send_ack(true).unwrap();
        (sink.block(0)[5 * PAGE_SIZE..6 * PAGE_SIZE].to_vec(), events)
    });
    let uri: Uri = format!("tcp:127.0.0.1:{pport}").parse().unwrap();
    let opts = SendOptions {
        channels,
        compression: Compression::None,
        max_bandwidth_bytes_per_sec: 0,
        ..Default::default()
    };
    let s = Sender::connect(&uri, PAGE_SIZE as u32, blocks, opts).unwrap();
    // Single-threaded, batches go round-robin: batch k of the stream uses channel k % n.
    let filler = page(0x11);
    let mut batch = 0usize;
    for k in 0..old_batch {
        s.send_pages(0, &[10 + k as u64], &[&filler]).unwrap();
        batch += 1;
    }
    s.send_pages(0, &[5], &[&page(0xAA)]).unwrap(); // old content, channel old_batch % n
    batch += 1;
    s.iteration_end(1).unwrap();
    while batch % usize::from(channels) != usize::from(first) {
        s.send_pages(0, &[20 + batch as u64], &[&filler]).unwrap();
        batch += 1;
    }
    s.send_pages(0, &[5], &[&page(0xBB)]).unwrap(); // new content, channel `first`
    s.iteration_end(2).unwrap();
    assert!(s.finish().unwrap().resumed);
    let (got, events) = rh.join().unwrap();
    ph.join().unwrap();
    assert_eq!(got, page(0xBB), "the older copy of the page survived");
    assert_eq!(
        events,
        vec![
            Event::IterationEnd { iteration: 1 },
            Event::IterationEnd { iteration: 2 }
        ]
    );
}

#[test]
fn newer_copy_wins_with_control_channel_delayed() {
    // Old copy on channel 0 (held back), new copy on channel 1.
    run(2, 0, 1, 0);
}

#[test]
fn newer_copy_wins_with_data_channel_delayed() {
    // Four channels: old copy on channel 1 (held back), new copy on channel 3.
    run(4, 1, 3, 1);
}
