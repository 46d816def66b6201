//! Sockets: the listener, and per client a reader thread (parse, dispatch, reply) and
//! an event thread (queued events). Replies are written by the thread that read the
//! request, so a `query-migrate` costs one wake-up.
//!
//! No client can lock the others out:
//! - the server is never full for a newcomer: at [`ServerOptions::max_clients`] the
//!   client idle longest (no request for the longest time; one that never
//!   negotiated counts as idle since it connected) is disconnected to make room;
//! - a connection that has not completed `qmp_capabilities` within
//!   [`ServerOptions::handshake_timeout`] is closed (a negotiated client may idle
//!   for ever, as libvirt's event listener does, until room is needed);
//! - every hold of a client's writer lock ends within
//!   [`ServerOptions::write_timeout`]: a client that does not read its replies or
//!   events is disconnected then. Only the client's own two threads take that lock;
//!   the monitor only queues events (never blocks), and eviction shuts the socket
//!   down through a separate handle, without the lock.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Select, TryRecvError};
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::error::{Error, QmpError, Result};
use crate::framing::{Frame, Framer};
use crate::monitor::{error_reply, version_info, After, Monitor, Session, EVENT_QUEUE};

/// Clients served at once by default; a newcomer beyond it replaces the client idle
/// longest.
pub const MAX_CLIENTS: usize = 64;
/// Default time a connection has to complete `qmp_capabilities`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on one hold of a client's writer lock (a reply with the events
/// queued before it, or a batch of events).
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `unix:PATH` (a stale socket file is replaced).
    Unix(PathBuf),
    /// `tcp:HOST:PORT` (port 0 picks one).
    Tcp(String),
}

impl std::str::FromStr for Address {
    type Err = Error;

    /// Parses `unix:PATH` or `tcp:HOST:PORT`; QEMU's `,server=on,wait=off` style
    /// options after a comma are accepted and ignored.
    fn from_str(s: &str) -> Result<Self> {
        let main = s.split(',').next().unwrap_or_default();
        if let Some(p) = main.strip_prefix("unix:") {
            if !p.is_empty() {
                return Ok(Address::Unix(PathBuf::from(p)));
            }
        } else if let Some(hp) = main.strip_prefix("tcp:") {
            if hp
                .rsplit_once(':')
                .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
            {
                return Ok(Address::Tcp(hp.to_string()));
            }
        }
        Err(Error::InvalidAddress(s.to_string()))
    }
}

/// The server's limits; [`Default`] gives [`MAX_CLIENTS`],
/// [`DEFAULT_HANDSHAKE_TIMEOUT`] and [`DEFAULT_WRITE_TIMEOUT`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Clients served at once (at least 1). A newcomer beyond it is served and the
    /// client idle longest is disconnected.
    pub max_clients: usize,
    /// Time from connect to a successful `qmp_capabilities`; a connection still not
    /// negotiated then is closed. Non-zero.
    pub handshake_timeout: Duration,
    /// Longest a client may take to accept one write (a reply with the events queued
    /// before it, or a batch of events); a client slower than that is disconnected.
    /// Non-zero.
    pub write_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_clients: MAX_CLIENTS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
        }
    }
}

impl ServerOptions {
    fn check(&self) -> Result<()> {
        if self.max_clients == 0 {
            return Err(Error::InvalidOption(
                "max_clients must be at least 1".into(),
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(Error::InvalidOption(
                "handshake_timeout must be non-zero".into(),
            ));
        }
        if self.write_timeout.is_zero() {
            return Err(Error::InvalidOption(
                "write_timeout must be non-zero".into(),
            ));
        }
        Ok(())
    }
}

/// One connection, unix or tcp.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        // A socket that cannot be shut down is closed already.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// SO_RCVTIMEO (socket-wide: every clone sees it).
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// SO_SNDTIMEO (socket-wide: every clone sees it).
    fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                // Best effort: without it replies may wait for Nagle, nothing worse.
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One client as the server tracks it.
struct Conn {
    /// Connection number, in accept order.
    id: u64,
    /// A clone of the socket used only to shut it down, so closing a client never
    /// waits for its writer lock.
    control: Stream,
    /// The write side; see [`Conn::hold`].
    writer: Mutex<Stream>,
    write_timeout: Duration,
    /// When the connection was accepted (the handshake timeout runs from here).
    accepted_at: Instant,
    /// When the last request arrived (at connect: the connect time), ns since the
    /// server's epoch.
    last_request_ns: AtomicU64,
    /// Set once the connection is being closed: writes fail at once.
    closed: AtomicBool,
}

impl Conn {
    /// Shuts the socket down: the reader sees EOF, writes fail, the client sees EOF.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.control.shutdown();
    }

    /// Takes the writer lock; every write through the hold ends within
    /// `write_timeout` of taking it.
    fn hold(&self) -> Held<'_> {
        Held {
            conn: self,
            stream: lock(&self.writer),
            start: Instant::now(),
        }
    }
}

/// A hold of one client's writer lock, with its deadline.
struct Held<'a> {
    conn: &'a Conn,
    stream: MutexGuard<'a, Stream>,
    start: Instant,
}

impl Held<'_> {
    /// Writes all of `buf` before the hold's deadline; on failure (a timeout, or the
    /// peer gone) the connection is closed.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let r = self.write_all_by_deadline(buf);
        if r.is_err() {
            self.conn.close();
        }
        r
    }

    fn write_all_by_deadline(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        if self.conn.closed.load(Ordering::Acquire) {
            return Err(ErrorKind::NotConnected.into());
        }
        // SO_SNDTIMEO is at most `write_timeout` (set at connect, lowered below), so
        // one blocking send never outlives the deadline; it is lowered to what is
        // left only when a send did not take everything, so a write into a
        // socket with room costs no extra system call.
        while !buf.is_empty() {
            match self.stream.write(buf) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
            if buf.is_empty() {
                break;
            }
            let left = self.conn.write_timeout.saturating_sub(self.start.elapsed());
            if left.is_zero() {
                return Err(ErrorKind::TimedOut.into());
            }
            self.stream.set_write_timeout(Some(left))?;
        }
        Ok(())
    }
}

/// What the accept thread and the client threads share.
struct Shared {
    monitor: Arc<Monitor>,
    opts: ServerOptions,
    /// Zero of [`Conn::last_request_ns`].
    epoch: Instant,
    /// The clients being served.
    clients: Mutex<Vec<Arc<Conn>>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Registers `conn`, first disconnecting the clients idle longest while the
    /// server is full.
    fn admit(&self, conn: Arc<Conn>) {
        let mut evicted = Vec::new();
        {
            let mut clients = lock(&self.clients);
            while clients.len() >= self.opts.max_clients {
                let Some(i) = (0..clients.len()).min_by_key(|&i| {
                    let c = &clients[i];
                    (c.last_request_ns.load(Ordering::Relaxed), c.id)
                }) else {
                    break;
                };
                let victim = clients.swap_remove(i);
                victim.close();
                evicted.push(victim);
            }
            clients.push(conn.clone());
        }
        // Logged outside the lock: a subscriber may write to a slow pipe.
        for victim in evicted {
            let idle_ms = self
                .now_ns()
                .saturating_sub(victim.last_request_ns.load(Ordering::Relaxed))
                / 1_000_000;
            warn!(
                max_clients = self.opts.max_clients,
                closed_client = victim.id,
                idle_ms,
                client = conn.id,
                "qmp: too many clients: closed the longest idle one"
            );
        }
    }

    fn forget(&self, id: u64) {
        lock(&self.clients).retain(|c| c.id != id);
    }
}

/// A listening QMP server; clients are served on their own threads.
pub struct Server {
    local: String,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `addr` (`unix:PATH` or `tcp:HOST:PORT`) and serves `monitor` there on an
    /// accept thread (`qmp/accept`), with the default [`ServerOptions`].
    pub fn bind(monitor: Arc<Monitor>, addr: &str) -> Result<Server> {
        Self::bind_with(monitor, addr, ServerOptions::default())
    }

    /// Binds `addr` (`unix:PATH` or `tcp:HOST:PORT`) and serves `monitor` there on an
    /// accept thread (`qmp/accept`), within the limits of `opts`.
    pub fn bind_with(monitor: Arc<Monitor>, addr: &str, opts: ServerOptions) -> Result<Server> {
        opts.check()?;
        let parsed: Address = addr.parse()?;
        let sock_err = |source| Error::Socket {
            addr: addr.to_string(),
            source,
        };
        let (listener, local) = match &parsed {
            Address::Unix(p) => {
                // A stale socket from an earlier run; if there is none, nothing to do,
                // and anything else makes the bind below fail with its own error.
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p).map_err(sock_err)?;
                (Listener::Unix(l), format!("unix:{}", p.display()))
            }
            Address::Tcp(hp) => {
                let l = TcpListener::bind(hp.as_str()).map_err(sock_err)?;
                let local = l.local_addr().map_err(sock_err)?;
                (Listener::Tcp(l), format!("tcp:{local}"))
            }
        };
        let shared = Arc::new(Shared {
            monitor,
            opts,
            epoch: Instant::now(),
            clients: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("qmp/accept".into())
            .spawn(move || accept_loop(&sh, &listener))
            .map_err(Error::Thread)?;
        Ok(Server { local, shared })
    }

    /// The address clients connect to (the real port for `tcp:HOST:0`).
    pub fn local_addr(&self) -> &str {
        &self.local
    }

    /// The clients being served now (connected and not yet disconnected).
    pub fn client_count(&self) -> usize {
        lock(&self.shared.clients).len()
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &Listener) {
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "qmp: accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        debug!(client = id, "qmp: client connected");
        let conn = match (stream.try_clone(), stream.try_clone()) {
            (Ok(control), Ok(writer)) => Arc::new(Conn {
                id,
                control,
                writer: Mutex::new(writer),
                write_timeout: shared.opts.write_timeout,
                accepted_at: Instant::now(),
                last_request_ns: AtomicU64::new(shared.now_ns()),
                closed: AtomicBool::new(false),
            }),
            _ => {
                stream.shutdown();
                continue;
            }
        };
        if stream
            .set_write_timeout(Some(shared.opts.write_timeout))
            .and_then(|()| stream.set_read_timeout(Some(shared.opts.handshake_timeout)))
            .is_err()
        {
            stream.shutdown();
            continue;
        }
        shared.admit(conn.clone());
        let sh = shared.clone();
        let c = conn.clone();
        let spawned = std::thread::Builder::new()
            .name("qmp/client".into())
            .spawn(move || {
                serve_client(&sh, &c, stream);
                c.close();
                sh.forget(c.id);
            });
        if spawned.is_err() {
            conn.close();
            shared.forget(id);
        }
    }
}

/// The greeting: version and (no) capabilities.
pub fn greeting() -> Value {
    json!({"QMP": {"version": version_info(), "capabilities": []}})
}

/// Writes `line` (without CRLF) in one hold of the writer lock, after any event
/// already queued for this client, so an event a command caused (STOP for `stop`)
/// comes before its reply, as in QEMU. Returns the hold: nothing else is written to
/// the client until the caller drops it.
fn write_reply<'a>(
    conn: &'a Conn,
    events: Option<&Receiver<Arc<str>>>,
    mut line: String,
) -> std::io::Result<Held<'a>> {
    line.push_str("\r\n");
    let mut held = conn.hold();
    if let Some(rx) = events {
        while let Ok(ev) = rx.try_recv() {
            held.write_all(ev.as_bytes())?;
        }
    }
    held.write_all(line.as_bytes())?;
    Ok(held)
}

/// Parses and answers one framed value: the reply line (without CRLF).
pub fn answer(mon: &Arc<Monitor>, session: &mut Session, frame: Frame) -> (String, After) {
    let error = |msg: String| {
        (
            error_reply(QmpError::generic(msg), None).to_string(),
            After::Continue,
        )
    };
    match frame {
        Frame::Value(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => mon.handle(session, v),
            Err(e) => error(format!("JSON parse error, {e}")),
        },
        Frame::Error(msg) => error(msg),
    }
}

fn serve_client(shared: &Shared, conn: &Arc<Conn>, mut reader: Stream) {
    let mon = &shared.monitor;
    if write_reply(conn, None, greeting().to_string()).is_err() {
        return;
    }
    let handshake_deadline = conn.accepted_at + shared.opts.handshake_timeout;
    let mut session = Session::default();
    let mut framer = Framer::new();
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut subscription: Option<(u64, Receiver<Arc<str>>)> = None;
    'conn: loop {
        if !session.negotiated() {
            // Until qmp_capabilities, every read waits at most until the deadline.
            let left = handshake_deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                warn!(
                    client = conn.id,
                    handshake_timeout_ms = shared.opts.handshake_timeout.as_millis() as u64,
                    "qmp: closing a client that sent no qmp_capabilities in time"
                );
                break;
            }
            if reader.set_read_timeout(Some(left)).is_err() {
                break;
            }
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => break,
        };
        framer.push(&buf[..n], &mut frames);
        if !frames.is_empty() {
            conn.last_request_ns
                .store(shared.now_ns(), Ordering::Relaxed);
        }
        for frame in frames.drain(..) {
            let was_negotiated = session.negotiated();
            let (reply, after) = answer(mon, &mut session, frame);
            let events = subscription.as_ref().map(|(_, rx)| rx);
            let held = match write_reply(conn, events, reply) {
                Ok(h) => h,
                Err(e) => {
                    if e.kind() == ErrorKind::TimedOut {
                        warn!(
                            client = conn.id,
                            write_timeout_ms = conn.write_timeout.as_millis() as u64,
                            "qmp: closing a client: a reply took too long to write"
                        );
                    }
                    break 'conn;
                }
            };
            if !was_negotiated && session.negotiated() {
                if reader.set_read_timeout(None).is_err() {
                    break 'conn;
                }
                // Subscribed while the reply's hold is kept: an event emitted once
                // the client has its reply is never missed, and never precedes it.
                subscription = subscribe(mon, conn);
            }
            drop(held);
            if after == After::Quit {
                mon.quit();
            }
        }
    }
    if let Some((id, _)) = subscription {
        mon.unsubscribe(id);
    }
    conn.close();
}

/// Starts the client's event thread; returns its hub id and a handle on its queue
/// (the reader drains it before each reply).
fn subscribe(mon: &Arc<Monitor>, conn: &Arc<Conn>) -> Option<(u64, Receiver<Arc<str>>)> {
    let (tx, rx) = crossbeam_channel::bounded::<Arc<str>>(EVENT_QUEUE);
    let c = conn.clone();
    let queue = rx.clone();
    std::thread::Builder::new()
        .name("qmp/client-ev".into())
        .spawn(move || {
            // Wait for an event without taking it, then take every queued one in one
            // hold of the writer lock (the reader does the same before a reply: no
            // reordering).
            let mut sel = Select::new();
            sel.recv(&queue);
            'events: loop {
                sel.ready();
                let mut held = c.hold();
                loop {
                    match queue.try_recv() {
                        Ok(ev) => {
                            if let Err(e) = held.write_all(ev.as_bytes()) {
                                if e.kind() == ErrorKind::TimedOut {
                                    warn!(
                                        client = c.id,
                                        write_timeout_ms = c.write_timeout.as_millis() as u64,
                                        "qmp: closing a client: events took too long to write"
                                    );
                                }
                                break 'events;
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => break 'events,
                    }
                }
            }
            // Unsubscribed (client gone, or too slow to keep up): close the connection.
            c.close();
        })
        .map_err(|e| warn!(client = conn.id, error = %e, "qmp: no event thread: the client gets no events"))
        .ok()?;
    Some((mon.subscribe(tx), rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "unix:/tmp/q.sock,server=on,wait=off"
                .parse::<Address>()
                .unwrap(),
            Address::Unix("/tmp/q.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Address>().unwrap(),
            Address::Tcp("127.0.0.1:4444".into())
        );
        assert!("tcp:nohost".parse::<Address>().is_err());
        assert!("file:/x".parse::<Address>().is_err());
        assert!("unix:".parse::<Address>().is_err());
    }

    #[test]
    fn greeting_shape() {
        let g = greeting();
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64());
        assert_eq!(g["QMP"]["capabilities"], json!([]));
    }
}
