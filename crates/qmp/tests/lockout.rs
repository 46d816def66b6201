//! No client can lock the operator out of the QMP server: a full server makes room
//! for a newcomer, a connection that never negotiates is closed, and a client that
//! never reads is dropped without holding up anyone else.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use migration_core::testing::TestVm;
use qmp::{IncomingStart, Machine, Monitor, Server, ServerOptions, MAX_CLIENTS};
use serde_json::{json, Value};

/// Slack on top of a timeout before a test calls the decision late.
const SLACK: Duration = Duration::from_secs(5);

struct FakeMachine;

impl Machine for FakeMachine {
    fn quit(&self) {}
}

fn monitor() -> Arc<Monitor> {
    Monitor::new(
        Arc::new(FakeMachine),
        TestVm::new(1 << 20),
        IncomingStart::None,
        true,
    )
    .expect("monitor")
}

/// A fresh socket path under the temp dir.
fn sock_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "ferry-qmp-{}-{}-{name}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The tests run one at a time: each measures how a server treats slow clients, and
/// seven servers flooding sockets at once on two cores starve the clients they test.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A server on a fresh unix socket, with its monitor and path.
fn serve(opts: Option<ServerOptions>) -> (Server, Arc<Monitor>, PathBuf) {
    let mon = monitor();
    let path = sock_path("lockout");
    let addr = format!("unix:{}", path.display());
    let server = match opts {
        Some(o) => Server::bind_with(mon.clone(), &addr, o),
        None => Server::bind(mon.clone(), &addr),
    }
    .expect("bind");
    (server, mon, path)
}

/// A plain socket client.
struct Raw {
    sock: UnixStream,
    lines: BufReader<UnixStream>,
}

impl Raw {
    /// Connects; reads the greeting.
    fn connect(path: &PathBuf) -> Raw {
        let sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let lines = BufReader::new(sock.try_clone().expect("clone"));
        let mut c = Raw { sock, lines };
        let g = c.recv().expect("a greeting, not EOF");
        assert!(g["QMP"]["version"].is_object(), "{g}");
        c
    }

    /// The next line, or None at EOF (or a reset connection).
    fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.lines.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("a JSON line")),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Sends `req` and returns its reply (events skipped); None at EOF.
    fn cmd(&mut self, req: &Value) -> Option<Value> {
        self.sock
            .write_all(req.to_string().as_bytes())
            .expect("send");
        loop {
            let msg = self.recv()?;
            if msg.get("event").is_none() {
                return Some(msg);
            }
        }
    }

    fn negotiate(mut self) -> Raw {
        assert_eq!(
            self.cmd(&json!({"execute": "qmp_capabilities"})),
            Some(json!({"return": {}}))
        );
        self
    }

    /// Reads until EOF (the server closed the connection); panics if the read
    /// timeout (30 s) comes first. Returns the lines read before EOF.
    fn until_eof(&mut self) -> usize {
        let mut n = 0;
        while self.recv().is_some() {
            n += 1;
        }
        n
    }
}

/// Polls `cond` until it holds; panics after `bound`. Returns the time it took.
fn wait_until(bound: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn status_is_running(c: &mut Raw) -> bool {
    c.cmd(&json!({"execute": "query-status", "id": 1}))
        == Some(
            json!({"return": {"running": true, "singlestep": false, "status": "running"}, "id": 1}),
        )
}

/// `max` idle negotiated clients fill the server; a newcomer is greeted, negotiates
/// and is answered; the client idle longest (the first) reads EOF, the rest stay.
fn full_server_serves_a_newcomer(server: &Server, path: &PathBuf, max: usize) {
    let mut idle: Vec<Raw> = (0..max).map(|_| Raw::connect(path).negotiate()).collect();
    wait_until(SLACK, "all registered", || server.client_count() == max);
    let mut newcomer = Raw::connect(path).negotiate();
    assert!(status_is_running(&mut newcomer));
    let ver = newcomer
        .cmd(&json!({"execute": "query-version"}))
        .expect("a reply");
    assert!(ver["return"]["qemu"]["major"].is_u64(), "{ver}");
    assert_eq!(idle[0].until_eof(), 0, "the idle-longest client is closed");
    assert_eq!(server.client_count(), max);
    for c in &mut idle[1..] {
        assert!(
            status_is_running(c),
            "the other idle clients are still served"
        );
    }
}

#[test]
fn full_server_closes_the_client_idle_longest_for_a_newcomer() {
    let _one = one_at_a_time();
    let (server, _mon, path) = serve(Some(ServerOptions {
        max_clients: 4,
        ..ServerOptions::default()
    }));
    full_server_serves_a_newcomer(&server, &path, 4);
}

#[test]
fn full_server_at_the_default_64_clients_serves_a_newcomer() {
    let _one = one_at_a_time();
    let (server, _mon, path) = serve(None);
    full_server_serves_a_newcomer(&server, &path, MAX_CLIENTS);
}

#[test]
fn eviction_picks_the_client_idle_longest_not_the_oldest() {
    let _one = one_at_a_time();
    let (server, _mon, path) = serve(Some(ServerOptions {
        max_clients: 3,
        ..ServerOptions::default()
    }));
    // A client that never negotiated counts as idle since it connected.
    let mut silent = Raw::connect(&path);
    let mut old_busy = Raw::connect(&path).negotiate();
    let mut idle = Raw::connect(&path).negotiate();
    // The oldest negotiated client asks something after the others went quiet.
    assert!(status_is_running(&mut old_busy));
    let mut n1 = Raw::connect(&path).negotiate();
    assert_eq!(silent.until_eof(), 0, "the never-negotiated one goes first");
    let mut n2 = Raw::connect(&path).negotiate();
    assert_eq!(idle.until_eof(), 0, "then the one idle longest");
    assert!(status_is_running(&mut old_busy));
    assert!(status_is_running(&mut n1));
    assert!(status_is_running(&mut n2));
    assert_eq!(server.client_count(), 3);
}

#[test]
fn a_connection_that_never_negotiates_is_closed_after_the_handshake_timeout() {
    let _one = one_at_a_time();
    let handshake = Duration::from_millis(300);
    let (server, _mon, path) = serve(Some(ServerOptions {
        handshake_timeout: handshake,
        ..ServerOptions::default()
    }));
    let mut listener = Raw::connect(&path).negotiate();
    let start = Instant::now();
    let mut silent = Raw::connect(&path);
    // One that talks but never negotiates is closed too.
    let mut chatty = Raw::connect(&path);
    let refused = chatty
        .cmd(&json!({"execute": "query-status"}))
        .expect("a reply");
    assert_eq!(refused["error"]["class"], "CommandNotFound", "{refused}");
    assert_eq!(silent.until_eof(), 0);
    assert!(
        start.elapsed() < handshake + SLACK,
        "closed after {:?}",
        start.elapsed()
    );
    assert_eq!(chatty.until_eof(), 0);
    // The negotiated client, idle as long, is not cut: the server is not full.
    wait_until(SLACK, "the two closed", || server.client_count() == 1);
    assert!(status_is_running(&mut listener));
}

#[test]
fn a_client_that_never_reads_its_replies_is_dropped_and_blocks_no_one() {
    let _one = one_at_a_time();
    let write_timeout = Duration::from_secs(1);
    let (server, _mon, path) = serve(Some(ServerOptions {
        write_timeout,
        ..ServerOptions::default()
    }));
    let mut good = Raw::connect(&path).negotiate();
    let stuck = Raw::connect(&path).negotiate();
    wait_until(SLACK, "both registered", || server.client_count() == 2);
    // Thousands of pipelined requests whose replies (~1 KiB each) are never read:
    // far more than the socket buffers hold.
    let requests = r#"{"execute":"query-commands"}{"execute":"query-migrate"}"#.repeat(10_000);
    let mut w = stuck.sock.try_clone().expect("clone");
    let start = Instant::now();
    let sender = std::thread::spawn(move || {
        // Blocks once the server stops reading; fails once it closes the socket.
        let _ = w.write_all(requests.as_bytes());
    });
    let mut answered = 0u32;
    let mut slowest = Duration::ZERO;
    while server.client_count() == 2 {
        assert!(
            start.elapsed() < write_timeout + SLACK,
            "the stuck client was not dropped within {:?}",
            write_timeout + SLACK
        );
        let t = Instant::now();
        assert!(status_is_running(&mut good));
        slowest = slowest.max(t.elapsed());
        answered += 1;
    }
    let dropped_after = start.elapsed();
    assert!(answered > 0);
    assert!(
        slowest < write_timeout,
        "a bystander waited {slowest:?} for a reply"
    );
    sender.join().expect("sender");
    // The stuck client sees the end of its (partial) replies, then EOF.
    let mut stuck = stuck;
    let replies = stuck.until_eof();
    assert!(replies < 20_000, "{replies} replies");
    assert!(status_is_running(&mut good));
    eprintln!(
        "dropped after {dropped_after:?}; bystander answered {answered} times, slowest {slowest:?}"
    );
}

#[test]
fn a_client_that_never_reads_its_events_is_dropped_and_emit_never_blocks() {
    let _one = one_at_a_time();
    // Long enough that a bystander starved of CPU on a loaded host keeps up.
    let write_timeout = Duration::from_secs(3);
    let (server, mon, path) = serve(Some(ServerOptions {
        write_timeout,
        ..ServerOptions::default()
    }));
    const EVENTS: usize = 2000;
    let mut good = Raw::connect(&path).negotiate();
    let mut stuck = Raw::connect(&path).negotiate();
    wait_until(SLACK, "both registered", || server.client_count() == 2);
    // A bystander reads its events as they come.
    let bystander = std::thread::spawn(move || {
        let mut seen = 0;
        while seen < EVENTS {
            let ev = good.recv().expect("the bystander is not dropped");
            assert_eq!(ev["event"], "TEST_EVENT", "{ev}");
            seen += 1;
        }
        good
    });
    // Fewer events than EVENT_QUEUE (the queue never overflows) but far more bytes
    // than the socket buffers hold: the stuck client's event writes block.
    let data = json!({"pad": "x".repeat(2000)});
    for _ in 0..EVENTS {
        mon.emit("TEST_EVENT", Some(data.clone()));
    }
    wait_until(write_timeout + SLACK, "the stuck client dropped", || {
        server.client_count() == 1
    });
    let mut good = bystander.join().expect("bystander got every event");
    assert!(status_is_running(&mut good));
    let events = stuck.until_eof();
    assert!(events < EVENTS, "{events} events");
}

#[test]
fn bad_options_are_refused() {
    let _one = one_at_a_time();
    let mon = monitor();
    for opts in [
        ServerOptions {
            max_clients: 0,
            ..ServerOptions::default()
        },
        ServerOptions {
            handshake_timeout: Duration::ZERO,
            ..ServerOptions::default()
        },
        ServerOptions {
            write_timeout: Duration::ZERO,
            ..ServerOptions::default()
        },
    ] {
        let path = sock_path("bad");
        let addr = format!("unix:{}", path.display());
        assert!(Server::bind_with(mon.clone(), &addr, opts).is_err());
    }
}
