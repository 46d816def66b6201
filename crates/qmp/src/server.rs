//! Sockets: the listener, and per client a reader thread (parse, dispatch, reply) and
//! an event thread (queued events). Replies are written by the thread that read the
//! request, so a `query-migrate` costs one wake-up; a client that stops reading only
//! blocks its own threads.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Select, TryRecvError};
use serde_json::{json, Value};

use crate::error::{Error, QmpError, Result};
use crate::framing::{Frame, Framer};
use crate::monitor::{error_reply, After, Monitor, Session, EVENT_QUEUE, QEMU_VERSION};

/// Clients served at once; more are accepted and closed at once.
pub const MAX_CLIENTS: usize = 64;

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
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
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
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }
}

/// A listening QMP server; clients are served on their own threads.
pub struct Server {
    local: String,
}

impl Server {
    /// Binds `addr` (`unix:PATH` or `tcp:HOST:PORT`) and serves `monitor` there on an
    /// accept thread (`qmp/accept`).
    pub fn bind(monitor: Arc<Monitor>, addr: &str) -> Result<Server> {
        let parsed: Address = addr.parse()?;
        let sock_err = |source| Error::Socket {
            addr: addr.to_string(),
            source,
        };
        let (listener, local) = match &parsed {
            Address::Unix(p) => {
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
        let clients = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("qmp/accept".into())
            .spawn(move || loop {
                let stream = match listener.accept() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("qmp: accept: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                };
                if clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::AcqRel);
                    stream.shutdown();
                    continue;
                }
                let mon = monitor.clone();
                let count = clients.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("qmp/client".into())
                        .spawn(move || {
                            serve_client(&mon, stream);
                            count.fetch_sub(1, Ordering::AcqRel);
                        });
                if spawned.is_err() {
                    clients.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .map_err(Error::Thread)?;
        Ok(Server { local })
    }

    /// The address clients connect to (the real port for `tcp:HOST:0`).
    pub fn local_addr(&self) -> &str {
        &self.local
    }
}

/// The greeting: version and (no) capabilities.
pub fn greeting() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"QMP": {
        "version": {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": concat!("ferry-", env!("CARGO_PKG_VERSION")),
        },
        "capabilities": [],
    }})
}

fn write_line(w: &Mutex<Stream>, v: &Value) -> std::io::Result<()> {
    write_reply(w, None, v.to_string())
}

/// Writes `v` under the writer lock, after any event already queued for this client,
/// so an event a command caused (STOP for `stop`) comes before its reply, as in QEMU.
fn write_reply(
    w: &Mutex<Stream>,
    events: Option<&Receiver<Arc<str>>>,
    mut line: String,
) -> std::io::Result<()> {
    line.push_str("\r\n");
    let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rx) = events {
        while let Ok(ev) = rx.try_recv() {
            s.write_all(ev.as_bytes())?;
        }
    }
    s.write_all(line.as_bytes())
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

fn serve_client(mon: &Arc<Monitor>, stream: Stream) {
    let (mut reader, writer) = match stream.try_clone() {
        Ok(w) => (stream, Arc::new(Mutex::new(w))),
        Err(_) => return,
    };
    if write_line(&writer, &greeting()).is_err() {
        return;
    }
    let mut session = Session::default();
    let mut framer = Framer::new();
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut subscription: Option<(u64, Receiver<Arc<str>>)> = None;
    'conn: loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        framer.push(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            let was_negotiated = session.negotiated();
            let (reply, after) = answer(mon, &mut session, frame);
            let events = subscription.as_ref().map(|(_, rx)| rx);
            if write_reply(&writer, events, reply).is_err() {
                break 'conn;
            }
            if !was_negotiated && session.negotiated() {
                subscription = subscribe(mon, &writer);
            }
            if after == After::Quit {
                mon.quit();
            }
        }
    }
    if let Some((id, _)) = subscription {
        mon.unsubscribe(id);
    }
    reader.shutdown();
}

/// Starts the client's event thread; returns its hub id and a handle on its queue
/// (the reader drains it before each reply).
fn subscribe(mon: &Arc<Monitor>, writer: &Arc<Mutex<Stream>>) -> Option<(u64, Receiver<Arc<str>>)> {
    let (tx, rx) = crossbeam_channel::bounded::<Arc<str>>(EVENT_QUEUE);
    let w = writer.clone();
    let queue = rx.clone();
    std::thread::Builder::new()
        .name("qmp/client-ev".into())
        .spawn(move || {
            // Wait for an event without taking it, then take every queued one under
            // the writer lock (the reader does the same before a reply: no reordering).
            let mut sel = Select::new();
            sel.recv(&queue);
            'events: loop {
                sel.ready();
                let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match queue.try_recv() {
                        Ok(ev) => {
                            if s.write_all(ev.as_bytes()).is_err() {
                                break 'events;
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => break 'events,
                    }
                }
            }
            // Unsubscribed (client gone, or too slow to keep up): close the connection.
            w.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
        })
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
