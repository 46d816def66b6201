//! The real deployment: a migration as a user runs it. Source and destination are
//! separate `ferry vm` processes (the destination fresh and held by `-S` unless the
//! row says `prealloc`), driven over QMP the way a management tool drives QEMU, over
//! loopback and over two network namespaces joined by a veth pair rate-limited to
//! 10 and 1 Gbit/s (`scripts/netns`). The RAM of both sides is compared by digest
//! once the migration completed, outside the timed downtime.
//!
//! `cargo bench --bench migration`. Environment:
//! - `FERRY_BENCH_REPS=N` repetitions per row (default 1; medians when more);
//! - `FERRY_BENCH_ONLY=TEXT` only the rows whose name contains TEXT (`A|B`: A or B);
//! - `FERRY_BENCH_LINKS=loopback,10gbit,1gbit` the links (default these three; a
//!   veth link takes any rate `tc` writes, e.g. `2500mbit`);
//! - `FERRY_BENCH_TIMEOUT_S=S` per-row limit, then `migrate_cancel` (default 15).
//!
//! Prints a markdown table and writes it, with one JSON file per row (the replies
//! and a timeline of `query-migrate` every 100 ms, drawn as `<row>.svg`), to
//! `target/bench/migration/`; the
//! processes' stderr goes to `target/bench/migration/<row>.log`. Needs root for the network
//! namespaces (the loopback rows run without) and /dev/kvm.
//!
//! The engine's own cost (in one process, no QMP) is `cargo bench --bench engine`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../crates/transport/tests/common/tls_creds.rs"]
mod tls_creds;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// How often `query-migrate` is asked during a migration (and a timeline point kept).
const POLL: Duration = Duration::from_millis(100);
/// Longest wait for one QMP reply (the digest of 4 GiB included).
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// The destination's incoming port inside its network namespace.
const NETNS_PORT: u16 = 47_000;

// ---------------------------------------------------------------------------------
// A QMP client, as small as a management tool's.

/// One negotiated QMP connection over a unix socket.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    fn connect(path: &Path) -> Result<Qmp, String> {
        let sock = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
        sock.set_read_timeout(Some(QMP_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let writer = sock.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(sock),
            writer,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("{e}: {line}")),
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Runs `cmd` with `args`; returns its `return` value, or the error's text.
    /// Events that arrive before the reply are skipped.
    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let mut req = json!({"execute": cmd});
        if args.as_object().is_some_and(|m| !m.is_empty()) {
            req["arguments"] = args;
        }
        let mut line = req.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let mut v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get_mut("return") {
                return Ok(r.take());
            }
            return Err(format!("{cmd}: {}", v["error"]["desc"]));
        }
    }
}

// ---------------------------------------------------------------------------------
// Links.

/// Where the two `ferry vm` processes run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Link {
    /// Both in this network namespace, over 127.0.0.1.
    Loopback,
    /// One in each of two namespaces joined by a veth pair limited to this many bit/s.
    Veth { bits_per_sec: u64 },
}

impl Link {
    /// `loopback`, or a veth rate as `tc` writes it: `10gbit`, `2500mbit`.
    fn parse(name: &str) -> Option<Link> {
        if name == "loopback" {
            return Some(Link::Loopback);
        }
        let (n, unit) = if let Some(n) = name.strip_suffix("gbit") {
            (n, 1_000_000_000)
        } else {
            (name.strip_suffix("mbit")?, 1_000_000)
        };
        let n: u64 = n.parse().ok().filter(|&n| n > 0)?;
        Some(Link::Veth {
            bits_per_sec: n * unit,
        })
    }

    fn name(self) -> String {
        match self {
            Link::Loopback => "loopback".into(),
            Link::Veth { bits_per_sec } if bits_per_sec % 1_000_000_000 == 0 => {
                format!("{}gbit", bits_per_sec / 1_000_000_000)
            }
            Link::Veth { bits_per_sec } => format!("{}mbit", bits_per_sec / 1_000_000),
        }
    }
}

/// Two network namespaces from `scripts/netns`, removed again on drop (also when a
/// row panics).
struct Netns {
    name: String,
    ns_a: String,
    ns_b: String,
    addr_b: String,
}

fn netns_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netns")
}

impl Netns {
    fn up(name: &str, rate: &str) -> Result<Netns, String> {
        // A namespace left by an interrupted run would make `up` refuse.
        let _ = Command::new(netns_script())
            .args(["down", name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new(netns_script())
            .args(["up", "--name", name, "--rate", rate])
            .output()
            .map_err(|e| format!("scripts/netns: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/netns up: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let key = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_owned)
                .ok_or_else(|| format!("scripts/netns up printed no {k}: {text}"))
        };
        let ns = Netns {
            name: name.to_owned(),
            ns_a: key("ns_a")?,
            ns_b: key("ns_b")?,
            addr_b: key("addr_b")?,
        };
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let ok = Command::new(netns_script())
            .args(["down", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("bench: scripts/netns down {} failed", self.name);
        }
    }
}

/// Where one row's processes run and how the source reaches the destination.
struct Place {
    src_wrap: Vec<String>,
    dst_wrap: Vec<String>,
    /// The destination's listening address, `HOST:PORT`.
    dst_addr: String,
}

impl Place {
    /// A directory of test TLS credentials (QEMU's `tls-creds-x509` layout, a fresh
    /// CA) whose server certificate names this place's destination host; made on
    /// first use.
    fn tls_creds(&self) -> PathBuf {
        let host = self
            .dst_addr
            .rsplit_once(':')
            .map_or(self.dst_addr.as_str(), |(h, _)| h);
        let dir =
            std::env::temp_dir().join(format!("ferry-bench-tls-{}-{host}", std::process::id()));
        if !dir.join("ca-cert.pem").exists() {
            let spec = tls_creds::Spec {
                server_names: vec![host.to_owned()],
                ..tls_creds::Spec::default()
            };
            tls_creds::Ca::new("Ferry bench CA").write_dir(&dir, &spec);
        }
        dir
    }

    fn new(netns: Option<&Netns>) -> Place {
        match netns {
            None => Place {
                src_wrap: Vec::new(),
                dst_wrap: Vec::new(),
                dst_addr: format!("127.0.0.1:{}", free_port()),
            },
            Some(n) => {
                let wrap = |ns: &str| ["ip", "netns", "exec", ns].map(String::from).to_vec();
                Place {
                    src_wrap: wrap(&n.ns_a),
                    dst_wrap: wrap(&n.ns_b),
                    dst_addr: format!("{}:{NETNS_PORT}", n.addr_b),
                }
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(47_001, |a| a.port())
}

// ---------------------------------------------------------------------------------
// The raw socket copy: the ceiling a migration's stream is compared with.

/// Entry point of the copy's two child processes (this same executable with
/// `FERRY_BENCH_RAW` set): `recv PORT BYTES fresh|faulted` listens on PORT, reads
/// BYTES into memory and prints the rate in bytes/s from the first byte to the last;
/// `send HOST:PORT BYTES` writes BYTES of noise from memory.
fn raw_child(spec: &str) -> ! {
    let w: Vec<&str> = spec.split_whitespace().collect();
    let bytes: usize = w.get(2).and_then(|b| b.parse().ok()).expect("BYTES");
    match w.first().copied() {
        Some("recv") => {
            let mut buf = if w.get(3) == Some(&"faulted") {
                vec![1u8; bytes]
            } else {
                vec![0u8; bytes]
            };
            let l = TcpListener::bind(format!("0.0.0.0:{}", w[1])).expect("bind");
            println!("ready");
            std::io::stdout().flush().expect("stdout");
            let (mut c, _) = l.accept().expect("accept");
            let mut n = c.read(&mut buf[..1]).expect("read");
            let t = Instant::now();
            while n < bytes {
                let end = (n + MIB as usize).min(bytes);
                match c.read(&mut buf[n..end]) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            let s = t.elapsed().as_secs_f64();
            std::hint::black_box(&buf);
            println!("{}", (n as f64 / s) as u64);
        }
        Some("send") => {
            let mut buf = vec![0u8; bytes];
            let mut x = 0x2545_f491_4f6c_dd1du64;
            for c in buf.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            let mut c = TcpStream::connect(w[1]).expect("connect");
            for chunk in buf.chunks(MIB as usize) {
                c.write_all(chunk).expect("write");
            }
        }
        _ => panic!("FERRY_BENCH_RAW={spec}"),
    }
    std::process::exit(0)
}

/// Copies `bytes` from one child process's memory to another's over the row's link
/// (into fresh or faulted memory); bytes/s.
fn raw_copy(place: &Place, bytes: u64, fresh: bool) -> Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let port = place.dst_addr.rsplit(':').next().unwrap_or("0").to_owned();
    let spawn = |wrap: &[String], spec: String| {
        let mut argv: Vec<String> = wrap.to_vec();
        argv.push(exe.display().to_string());
        Command::new(&argv[0])
            .args(&argv[1..])
            .env("FERRY_BENCH_RAW", spec)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("raw copy: {e}"))
    };
    let mut recv = Guard(spawn(
        &place.dst_wrap,
        format!(
            "recv {port} {bytes} {}",
            if fresh { "fresh" } else { "faulted" }
        ),
    )?);
    let mut out = BufReader::new(recv.0.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        return Err(format!("raw copy receiver: {line:?}"));
    }
    let mut send = Guard(spawn(
        &place.src_wrap,
        format!("send {} {bytes}", place.dst_addr),
    )?);
    line.clear();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    let _ = send.0.wait();
    line.trim()
        .parse()
        .map_err(|_| format!("raw copy receiver said {line:?}"))
}

/// A child process killed (if still running) and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------------
// Rows.

/// One row of the table.
#[derive(Clone, Copy, Debug)]
struct Row {
    link: Link,
    mem_bytes: u64,
    workload: &'static str,
    channels: u8,
    sparse_pages: bool,
    /// The destination faults its RAM in at start (`--prealloc`).
    prealloc: bool,
    /// The source guest is stopped (QMP `stop`) once its workload has run: the
    /// migration then measures the link and the engine alone, with the guest's RAM
    /// as the workload left it and no vCPU competing for the cores.
    stopped: bool,
    /// `x-ferry-lazy-clear` (the default); off (`eager`), every sync re-protects all
    /// it found, for the guest-speed comparison.
    lazy_clear: bool,
    /// `max-bandwidth` in MiB/s (0: unlimited, the default of these rows).
    max_bandwidth_mib: u64,
    /// Both sides run with `--tls-creds` (TLS 1.3, mutual x509): the row's twin
    /// without it is in the table too.
    tls: bool,
}

impl Row {
    fn name(&self) -> String {
        let mut n = format!(
            "{} {} {}ch",
            self.link.name(),
            if self.mem_bytes == GIB {
                self.workload.to_string()
            } else {
                format!("{} {} GiB", self.workload, self.mem_bytes / GIB)
            },
            self.channels
        );
        if !self.sparse_pages {
            n.push_str(" whole-pages");
        }
        if self.prealloc {
            n.push_str(" prealloc");
        }
        if self.stopped {
            n.push_str(" stopped");
        }
        if self.max_bandwidth_mib > 0 {
            n.push_str(&format!(" {}MiB/s", self.max_bandwidth_mib));
        }
        if !self.lazy_clear {
            n.push_str(" eager");
        }
        if self.tls {
            n.push_str(" tls");
        }
        n
    }

    fn file_stem(&self) -> String {
        self.name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    }
}

/// The rows of one link: the workloads, 1 and 2 channels, sparse pages on and
/// off where the guest writes pages sparsely enough for it to matter.
fn rows(link: Link) -> Vec<Row> {
    // (workload, RAM, sparse pages apply)
    let workloads: [(&str, u64, bool); 7] = [
        ("idle", 4 * GIB, false),
        ("working-set=4096", GIB, true),
        ("working-set=65536", GIB, true),
        ("dense=4096", GIB, false),
        ("dense=65536", GIB, false),
        ("dense=65536,256", GIB, true),
        ("zipf=65536,200000", GIB, true),
    ];
    // The defaults every row starts from: the dense guest, one channel, sparse pages,
    // lazy clear, no bandwidth cap, plaintext, into a fresh destination.
    let base = Row {
        link,
        mem_bytes: GIB,
        workload: "dense=65536",
        channels: 1,
        sparse_pages: true,
        prealloc: false,
        stopped: false,
        lazy_clear: true,
        max_bandwidth_mib: 0,
        tls: false,
    };
    let mut v = Vec::new();
    for (workload, mem_bytes, sparse_applies) in workloads {
        for channels in [1, 2] {
            for sparse_pages in [true, false] {
                if !sparse_pages && !sparse_applies {
                    continue;
                }
                v.push(Row {
                    mem_bytes,
                    workload,
                    channels,
                    sparse_pages,
                    ..base
                });
            }
        }
    }
    // The guest's speed with and without the lazy clear: a working set that does not
    // converge, and a skewed one; on loopback also the case, capped at 64 MiB/s
    // (working set 65536, whole pages).
    let mut speed_rows = vec![
        ("working-set=65536", false, 0),
        ("zipf=65536,200000", true, 0),
    ];
    if link == Link::Loopback {
        speed_rows.push(("working-set=65536", false, 64));
    }
    for (workload, sparse_pages, max_bandwidth_mib) in speed_rows {
        for lazy_clear in [true, false] {
            if lazy_clear && max_bandwidth_mib == 0 {
                continue; // the lazy row is in the table already
            }
            v.push(Row {
                workload,
                sparse_pages,
                lazy_clear,
                max_bandwidth_mib,
                ..base
            });
        }
    }
    // Into a preallocated destination; and throughput alone: 256 MiB of incompressible
    // pages, guest stopped, into a fresh and into a preallocated destination.
    for (prealloc, stopped) in [(true, false), (false, true), (true, true)] {
        v.push(Row {
            prealloc,
            stopped,
            ..base
        });
    }
    // TLS beside plaintext: the dense guest running and stopped, 1 and 2 channels.
    // Every plaintext twin but the stopped one of 2 channels is above already.
    for stopped in [false, true] {
        for channels in [1, 2] {
            if stopped && channels == 2 {
                v.push(Row {
                    channels,
                    stopped,
                    ..base
                });
            }
            v.push(Row {
                channels,
                stopped,
                tls: true,
                ..base
            });
        }
    }
    v
}

// ---------------------------------------------------------------------------------
// One migration.

/// One `ferry vm` process and its QMP connection; killed on drop.
struct Vm {
    child: Guard,
    qmp: Qmp,
}

/// Starts `ferry vm` with `args` under `wrap`; waits for its ready line.
fn start_vm(
    wrap: &[String],
    args: &[String],
    qmp_path: &Path,
    log: &File,
    what: &str,
) -> Result<Vm, String> {
    let mut argv: Vec<String> = wrap.to_vec();
    argv.push(env!("CARGO_BIN_EXE_ferry").to_owned());
    argv.push("vm".into());
    argv.extend(args.iter().cloned());
    argv.push("--qmp".into());
    argv.push(format!("unix:{}", qmp_path.display()));
    let _ = std::fs::remove_file(qmp_path);
    let mut log_w = log.try_clone().map_err(|e| e.to_string())?;
    let _ = writeln!(log_w, "== {what}: {}", argv.join(" "));
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_w))
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut child = Guard(child);
    let mut out = BufReader::new(child.0.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    let ready: Value = serde_json::from_str(&line)
        .map_err(|_| format!("{what} did not start (see its log): {line:?}"))?;
    if ready["event"] != "ready" {
        return Err(format!("{what}: unexpected first line {line:?}"));
    }
    let qmp = Qmp::connect(qmp_path)?;
    Ok(Vm { child, qmp })
}

/// This machine's CPU time from the first line of `/proc/stat`: (busy, total) in
/// clock ticks, busy being all but idle and iowait.
fn machine_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

/// What one migration measured.
#[derive(Clone, Debug, Default)]
struct Run {
    /// `completed`, `failed`, `timeout` (cancelled at the limit), or the error.
    status: String,
    total_ms: u64,
    downtime_ms: u64,
    /// pause / sync / pages / device / ack, µs.
    phases_us: [u64; 5],
    transferred_bytes: u64,
    downtime_bytes: u64,
    passes: u64,
    /// Bytes/s while sending: the median over the active phase of the 300 ms windows
    /// (three polls) in which `transferred` grew, or `transferred` over the time after
    /// setup when there were fewer than three such windows.
    send_rate: f64,
    first_pass: Value,
    first_pass_end_ms: Option<u64>,
    ram_match: Option<bool>,
    /// How busy this machine's cores were from `migrate` to the end (%): both sides
    /// and the guest share them.
    cpu_busy_percent: Option<f64>,
    /// The source guest's speed while migrating (see [`GuestSpeed`]).
    speed: Option<GuestSpeed>,
    /// The replies: timeline, final source and destination `query-migrate`, digests.
    json: Value,
}

impl Run {
    fn failed(why: String) -> Run {
        Run {
            status: format!("error: {why}"),
            ..Default::default()
        }
    }
}

fn migrate(row: &Row, place: &Place, log: &File, dir: &Path, limit: Duration) -> Run {
    match migrate_inner(row, place, log, dir, limit) {
        Ok(r) => r,
        Err(e) => Run::failed(e),
    }
}

fn migrate_inner(
    row: &Row,
    place: &Place,
    log: &File,
    dir: &Path,
    limit: Duration,
) -> Result<Run, String> {
    let guest = [
        "--mem".to_string(),
        row.mem_bytes.to_string(),
        "--vcpus".into(),
        "2".into(),
        "--workload".into(),
        row.workload.into(),
    ];
    let mut src_args = guest.to_vec();
    let mut dst_args = guest.to_vec();
    if row.tls {
        // Credentials for the destination's address, made once per link.
        let creds = place.tls_creds();
        for a in [&mut src_args, &mut dst_args] {
            a.extend(["--tls-creds".into(), creds.display().to_string()]);
        }
    }
    dst_args.extend([
        "--incoming".into(),
        format!("tcp:{}", place.dst_addr),
        "-S".into(),
    ]);
    if row.prealloc {
        dst_args.push("--prealloc".into());
    }
    let stem = row.file_stem();
    let mut dst = start_vm(
        &place.dst_wrap,
        &dst_args,
        &dir.join(format!("{stem}.dst.qmp")),
        log,
        "destination",
    )?;
    let mut src = start_vm(
        &place.src_wrap,
        &src_args,
        &dir.join(format!("{stem}.src.qmp")),
        log,
        "source",
    )?;
    // What a management tool sets, on both sides as libvirt does.
    for vm in [&mut src, &mut dst] {
        vm.qmp.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "multifd", "state": row.channels > 1}]}),
        )?;
        vm.qmp.execute(
            "migrate-set-parameters",
            json!({"multifd-channels": row.channels,
                   "max-bandwidth": row.max_bandwidth_mib * MIB,
                   "x-ferry-sparse-pages": row.sparse_pages,
                   "x-ferry-lazy-clear": row.lazy_clear}),
        )?;
    }
    // Steady state first: every vCPU past two rounds of its workload (dense guests
    // have filled their pages), and at least a second of it.
    let booted = Instant::now();
    loop {
        let p = src.qmp.execute("x-ferry-query-guest-progress", json!({}))?;
        let rounds: Vec<u64> = p["vcpu-rounds"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        if !rounds.is_empty()
            && rounds.iter().all(|&r| r >= 2)
            && booted.elapsed() >= Duration::from_secs(1)
        {
            break;
        }
        if booted.elapsed() > limit {
            return Err(format!(
                "the guest did not run two rounds in {limit:?}: {p}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if row.stopped {
        src.qmp.execute("stop", json!({}))?;
    }
    // The guest's own speed before: page writes per second over 10 polls.
    let mut baseline = Vec::new();
    if !row.stopped {
        let mut last = page_writes(&mut src.qmp)?;
        for _ in 0..10 {
            std::thread::sleep(POLL);
            let now = page_writes(&mut src.qmp)?;
            baseline.push((now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64());
            last = now;
        }
        baseline.sort_by(f64::total_cmp);
    }
    let mut speed_samples = Vec::new();
    let t0 = Instant::now();
    src.qmp
        .execute("migrate", json!({"uri": format!("tcp:{}", place.dst_addr)}))?;
    let mut timeline = Vec::new();
    let mut timed_out = false;
    let cpu_at_start = machine_cpu_ticks();
    let fin = loop {
        let t_ms = t0.elapsed().as_millis() as u64;
        let info = src.qmp.execute("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("").to_owned();
        if !row.stopped && matches!(status.as_str(), "setup" | "active") {
            speed_samples.push(page_writes(&mut src.qmp)?);
        }
        timeline.push(json!({"t_ms": t_ms, "reply": info}));
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break info;
        }
        if !timed_out && t0.elapsed() > limit {
            timed_out = true;
            src.qmp.execute("migrate_cancel", json!({}))?;
        }
        if t0.elapsed() > limit + Duration::from_secs(30) {
            return Err(format!("still {status} 30 s after migrate_cancel"));
        }
        let next = t0 + POLL * timeline.len() as u32;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    };
    let status = fin["status"].as_str().unwrap_or("").to_owned();
    let mut run = Run {
        status: if timed_out && status != "completed" {
            "timeout".into()
        } else {
            status.clone()
        },
        ..Default::default()
    };
    if status == "failed" {
        run.status = format!("failed: {}", fin["error-desc"]);
    }
    let ram = &fin["ram"];
    let x = &fin["x-ferry"];
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    run.total_ms = u(&fin["total-time"]);
    run.downtime_ms = u(&fin["downtime"]);
    run.transferred_bytes = u(&ram["transferred"]);
    run.downtime_bytes = u(&ram["downtime-bytes"]);
    run.passes = u(&x["iterations"]);
    run.first_pass = x["first-pass-convergence"].clone();
    run.first_pass_end_ms = x["first-pass-convergence"]["at-ms"].as_u64();
    let p = &x["downtime-phases-us"];
    run.phases_us = ["pause", "sync", "pages", "device", "ack"].map(|k| u(&p[k]));
    run.send_rate = send_rate(&timeline, &fin);
    run.speed = baseline
        .get(baseline.len() / 2)
        .and_then(|&base| GuestSpeed::from_samples(&speed_samples, base));
    run.cpu_busy_percent =
        cpu_at_start
            .zip(machine_cpu_ticks())
            .and_then(|((b0, t0), (b1, t1))| {
                (t1 > t0).then(|| (b1 - b0) as f64 * 100.0 / (t1 - t0) as f64)
            });
    // The check, outside the timed downtime: the destination is held paused by -S
    // once it has the guest, the source is in postmigrate.
    let mut digests = Value::Null;
    let mut dst_info = Value::Null;
    if status == "completed" {
        let waited = Instant::now();
        loop {
            let st = dst.qmp.execute("query-status", json!({}))?;
            if st["status"] == "paused" {
                break;
            }
            if waited.elapsed() > Duration::from_secs(30) {
                return Err(format!("the destination stays {}", st["status"]));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        dst_info = dst.qmp.execute("query-migrate", json!({}))?;
        let a = src.qmp.execute("x-ferry-query-ram-digest", json!({}))?;
        let b = dst.qmp.execute("x-ferry-query-ram-digest", json!({}))?;
        run.ram_match = Some(a == b);
        digests = json!({"source": a, "destination": b});
    }
    for vm in [&mut src, &mut dst] {
        let _ = vm.qmp.execute("quit", json!({}));
        let _ = vm.child.0.wait();
    }
    run.json = json!({
        "timeline": timeline,
        "source-final": fin,
        "destination-final": dst_info,
        "ram-digests": digests,
    });
    Ok(run)
}

/// GPA of vCPU 0's counter page in a minivm guest; vCPU n's is 4 KiB further. The u64
/// at offset 8 counts the pages the vCPU has written.
const COUNTER_GPA: u64 = 0x80000;

/// The guest's page writes so far (both vCPUs), read as a management tool would, with
/// HMP's `xp` through `human-monitor-command`, and when.
fn page_writes(qmp: &mut Qmp) -> Result<(Instant, u64), String> {
    let mut total = 0;
    for vcpu in 0..2u64 {
        let line = format!("xp /1gx {:#x}", COUNTER_GPA + vcpu * 4096 + 8);
        let out = qmp.execute("human-monitor-command", json!({"command-line": line}))?;
        let text = out.as_str().unwrap_or("");
        let hex = text
            .split_once(": 0x")
            .map(|(_, v)| v.trim())
            .ok_or_else(|| format!("xp answered {text:?}"))?;
        total += u64::from_str_radix(hex, 16).map_err(|e| format!("xp {text:?}: {e}"))?;
    }
    Ok((Instant::now(), total))
}

/// The source guest's speed while it migrated: its page writes per second over each
/// poll interval (about 100 ms) during setup and the active phase, as a share of its
/// speed before the migration (the median of 10 intervals).
#[derive(Clone, Copy, Debug, Default)]
struct GuestSpeed {
    /// Mean speed over the intervals, % of before.
    mean_percent: f64,
    /// Share of the intervals in which the guest ran below 10 % of its speed, %.
    slow_percent: f64,
    /// Intervals measured.
    intervals: usize,
}

impl GuestSpeed {
    fn from_samples(samples: &[(Instant, u64)], base_per_sec: f64) -> Option<GuestSpeed> {
        if base_per_sec <= 0.0 || samples.len() < 2 {
            return None;
        }
        let speeds: Vec<f64> = samples
            .windows(2)
            .filter_map(|w| {
                let dt = w[1].0.duration_since(w[0].0).as_secs_f64();
                (dt > 0.0).then(|| w[1].1.saturating_sub(w[0].1) as f64 / dt / base_per_sec)
            })
            .collect();
        let n = speeds.len().max(1) as f64;
        Some(GuestSpeed {
            mean_percent: speeds.iter().sum::<f64>() / n * 100.0,
            slow_percent: speeds.iter().filter(|s| **s < 0.1).count() as f64 / n * 100.0,
            intervals: speeds.len(),
        })
    }
}

/// Bytes/s while the source was sending (see [`Run::send_rate`]).
fn send_rate(timeline: &[Value], fin: &Value) -> f64 {
    // `transferred` is the sender's byte count, refreshed by the engine every 100 ms
    // tick while it sends: over windows of three polls the ticks' phase against
    // the polls matters little. (`precopy-bytes` over-counts with two channels.)
    let span = 3;
    let mut rates: Vec<f64> = timeline
        .windows(span + 1)
        .filter(|w| w.iter().all(|p| p["reply"]["status"] == "active"))
        .filter_map(|w| {
            let (a, b) = (&w[0], &w[span]);
            let dt = b["t_ms"].as_u64()?.checked_sub(a["t_ms"].as_u64()?)?;
            let db = b["reply"]["ram"]["transferred"]
                .as_u64()?
                .checked_sub(a["reply"]["ram"]["transferred"].as_u64()?)?;
            (dt > 0 && db > 0).then(|| db as f64 * 1000.0 / dt as f64)
        })
        .collect();
    if rates.len() >= 3 {
        rates.sort_by(f64::total_cmp);
        return rates[rates.len() / 2];
    }
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let busy_ms = u(&fin["total-time"]).saturating_sub(u(&fin["setup-time"]));
    u(&fin["ram"]["transferred"]) as f64 * 1000.0 / busy_ms.max(1) as f64
}

// ---------------------------------------------------------------------------------
// The table.

fn median_by<F: Fn(&Run) -> u64>(runs: &[Run], f: F) -> Run {
    let mut v = runs.to_vec();
    v.sort_by_key(|r| f(r));
    v[v.len() / 2].clone()
}

fn prediction(v: &Value) -> String {
    match v["state"].as_str() {
        Some("converging") => format!("conv {} ms", v["expected-completion-ms"]),
        Some("not-converging") => format!(
            "not conv (needs {:.0} MB/s)",
            v["needed-bandwidth-bytes-per-sec"].as_f64().unwrap_or(0.0) / 1e6
        ),
        Some(s) => s.to_owned(),
        None => "-".into(),
    }
}

/// What happened, to set beside the prediction: the time from the prediction to the
/// switch-over, or that it did not converge; and whether the prediction was right
/// (✓): a converging prediction's switch-over time (since the start) within 25 % +
/// 10 ms of the real one, a not-converging one for a row that did not converge.
fn outcome(r: &Run) -> String {
    let state = r.first_pass["state"].as_str().unwrap_or("");
    if r.status != "completed" {
        let right = state == "not-converging";
        return format!("did not converge {}", if right { "✓" } else { "✗" });
    }
    let Some(at) = r.first_pass_end_ms else {
        return "conv ✗".into();
    };
    let switch = r.total_ms.saturating_sub(r.downtime_ms);
    let right = state == "converging" && {
        let predicted = at + r.first_pass["expected-completion-ms"].as_u64().unwrap_or(0);
        predicted.abs_diff(switch) as f64 <= 0.25 * switch as f64 + 10.0
    };
    format!(
        "conv {} ms {}",
        switch.saturating_sub(at),
        if right { "✓" } else { "✗" }
    )
}

const HEADER: &str = "| row | status | total ms | downtime ms | pause / sync / pages / device / ack ms | transferred MiB | in downtime MiB | physics ms | passes | send rate MB/s | % of link | cores busy | guest speed | slow 100 ms | first-pass prediction | happened | RAM equal |";
const RULE: &str = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

fn table_line(name: &str, m: &Run, d: &Run, link_rate: Option<f64>) -> String {
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    let done = d.status == "completed";
    format!(
        "| {name} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
        m.status,
        m.total_ms,
        if done {
            d.downtime_ms.to_string()
        } else {
            "-".into()
        },
        if done {
            d.phases_us.map(ms).join(" / ")
        } else {
            "-".into()
        },
        m.transferred_bytes as f64 / MIB as f64,
        if done {
            format!("{:.2}", d.downtime_bytes as f64 / MIB as f64)
        } else {
            "-".into()
        },
        match link_rate {
            Some(l) if done => format!("{:.1}", d.downtime_bytes as f64 / l * 1000.0),
            _ => "-".into(),
        },
        m.passes,
        m.send_rate / 1e6,
        link_rate.map_or("-".into(), |l| format!("{:.0} %", m.send_rate / l * 100.0)),
        m.cpu_busy_percent
            .map_or("-".into(), |p| format!("{p:.0} %")),
        m.speed
            .map_or("-".into(), |s| format!("{:.0} %", s.mean_percent)),
        m.speed.map_or("-".into(), |s| format!(
            "{:.0} % of {}",
            s.slow_percent, s.intervals
        )),
        prediction(&m.first_pass),
        outcome(m),
        m.ram_match.map_or("-", |ok| if ok { "yes" } else { "NO" }),
    )
}

/// Draws one run's `query-migrate` timeline (every 100 ms) to `path`.
fn plot_run(run: &Run, title: &str, path: &Path) -> Result<(), String> {
    let mut t = ferry::plot::Timeline {
        downtime_limit_ms: Some(300),
        ..ferry::plot::Timeline::new()
    };
    let replies = run.json["timeline"].as_array().ok_or("no timeline")?;
    for r in replies {
        t.record_value(&r["reply"]).map_err(|e| e.to_string())?;
    }
    ferry::plot::render_svg(&t, title, path).map_err(|e| e.to_string())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn main() {
    if let Ok(spec) = std::env::var("FERRY_BENCH_RAW") {
        raw_child(&spec);
    }
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let reps: usize = env("FERRY_BENCH_REPS").parse().unwrap_or(1).max(1);
    let only = env("FERRY_BENCH_ONLY");
    let limit = Duration::from_secs(env("FERRY_BENCH_TIMEOUT_S").parse().unwrap_or(15));
    let links_env = env("FERRY_BENCH_LINKS");
    let wanted: Vec<&str> = if links_env.is_empty() {
        vec!["loopback", "10gbit", "1gbit"]
    } else {
        links_env.split(',').map(str::trim).collect()
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("bench migration: skipped: no usable /dev/kvm (the guests would be host threads, not a deployment)");
        return;
    }
    let root = is_root();
    let bench_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    // One JSON, one log (and the QMP sockets) per row, beside the table.
    let dir = bench_dir.join("migration");
    std::fs::create_dir_all(&dir).expect("target/bench/migration");
    let mut out = vec![
        format!(
            "**The real deployment** (`cargo bench --bench migration`, {} rep(s), {} s limit per row).",
            reps,
            limit.as_secs()
        ),
        String::new(),
        "Guests: 2 vCPUs, 1 GiB (idle: 4 GiB), migrated once every vCPU has run two rounds \
         of its workload and a second has passed (`stopped`: then paused by QMP `stop`, so the \
         row measures the link and the engine alone); destination `ferry vm --incoming tcp:... -S`, fresh \
         RAM unless `prealloc`; `max-bandwidth` 0, `downtime-limit` 300 ms (the default). \
         send rate: median of the 300 ms windows of the active phase in which \
         `transferred` grew (short rows: transferred over the time after setup); % of link: \
         of the nominal rate of a veth link, of a raw socket copy between two processes on \
         loopback. physics: the bytes sent while paused over the link's rate (the round trip, \
         < 0.1 ms here, not added), from `downtime-bytes`. happened: time from the \
         prediction to the switch-over, ✓ when the prediction was right (a converging one's \
         switch-over time since the start within 25 % + 10 ms; a not-converging one for a \
         row that did not converge in the limit). cores busy: the share of \
         this machine's CPU time (all cores, /proc/stat) not idle from `migrate` to the end; \
         the guest's 2 vCPUs, the source and the destination (which on two real hosts has \
         its own) share these cores. guest speed: the source guest's page writes per second \
         (HMP `xp` of its counter pages, as a tool reads them) over each ~100 ms poll of setup and the \
         active phase, as a share of its speed over the second before `migrate`: the mean, and \
         (slow 100 ms) the share of intervals below 10 %. `eager`: `x-ferry-lazy-clear` off (every \
         sync re-protects all it found); `tls`: both sides with `--tls-creds` (TLS 1.3, mutual \
         x509, a test CA made for the run), beside its plaintext twin; `N MiB/s`: `max-bandwidth`. First-pass prediction: the engine's \
         `x-ferry.first-pass-convergence`. RAM equal: x-ferry-query-ram-digest of source (postmigrate) and \
         destination (paused by -S), taken after the migration."
            .to_string(),
        String::new(),
    ];
    let mut notes = Vec::new();
    let mut lines = vec![HEADER.to_string(), RULE.to_string()];
    println!("{}", lines[0]);
    println!("{}", lines[1]);
    let started = Instant::now();
    for link_name in wanted {
        let Some(link) = Link::parse(link_name) else {
            notes.push(format!(
                "unknown link {link_name:?} skipped (loopback, or a rate: 10gbit, 2500mbit, ...)"
            ));
            continue;
        };
        let rows: Vec<Row> = rows(link)
            .into_iter()
            .filter(|r| only.split('|').any(|o| r.name().contains(o)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        let netns = match link {
            Link::Loopback => None,
            Link::Veth { .. } if !root => {
                notes.push(format!(
                    "{link_name}: skipped, network namespaces need root"
                ));
                continue;
            }
            Link::Veth { .. } => match Netns::up(&format!("fbench{link_name}"), link_name) {
                Ok(n) => Some(n),
                Err(e) => {
                    notes.push(format!("{link_name}: skipped: {e}"));
                    continue;
                }
            },
        };
        // The link's rate: nominal for a veth pair (also measured, to show what tbf
        // gives), a raw copy between two processes on loopback.
        let raw_bytes = match link {
            Link::Veth { bits_per_sec } if bits_per_sec <= 1_000_000_000 => 256 * MIB,
            _ => GIB,
        };
        let mut link_rate = |fresh: bool| -> Option<f64> {
            let place = Place::new(netns.as_ref());
            // The median of three: one copy's speed varies by ±30 % here.
            let raw = (0..3)
                .map(|_| raw_copy(&place, raw_bytes, fresh))
                .collect::<Result<Vec<u64>, String>>()
                .map(|mut v| {
                    v.sort_unstable();
                    v[1]
                });
            let into = if fresh { "fresh" } else { "faulted" };
            match (link, raw) {
                (_, Err(e)) => {
                    notes.push(format!("{link_name}: raw copy failed: {e}"));
                    match link {
                        Link::Loopback => None,
                        Link::Veth { bits_per_sec } => Some(bits_per_sec as f64 / 8.0),
                    }
                }
                (Link::Loopback, Ok(r)) => {
                    notes.push(format!(
                        "{link_name}: raw socket copy of {} MiB between two processes, into {into} memory, median of 3: {:.0} MB/s (the % of link of its rows)",
                        raw_bytes / MIB,
                        r as f64 / 1e6
                    ));
                    Some(r as f64)
                }
                (Link::Veth { bits_per_sec }, Ok(r)) => {
                    let nominal = bits_per_sec as f64 / 8.0;
                    notes.push(format!(
                        "{link_name}: raw socket copy of {} MiB between two processes, into {into} memory, median of 3: {:.0} MB/s ({:.0} % of the nominal {:.0} MB/s, which the % of link of its rows uses)",
                        raw_bytes / MIB,
                        r as f64 / 1e6,
                        r as f64 / nominal * 100.0,
                        nominal / 1e6
                    ));
                    Some(nominal)
                }
            }
        };
        let rate_fresh = link_rate(true);
        let rate_faulted = if link == Link::Loopback && rows.iter().any(|r| r.prealloc) {
            link_rate(false)
        } else {
            rate_fresh
        };
        let mut send_rates: Vec<(String, f64, String)> = Vec::new();
        for row in rows {
            let name = row.name();
            let stem = row.file_stem();
            let log = match OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(dir.join(format!("{stem}.log")))
            {
                Ok(f) => f,
                Err(e) => {
                    notes.push(format!("{name}: no log file: {e}"));
                    continue;
                }
            };
            let runs: Vec<Run> = (0..reps)
                .map(|_| migrate(&row, &Place::new(netns.as_ref()), &log, &dir, limit))
                .collect();
            let m = median_by(&runs, |r| r.total_ms);
            let d = median_by(&runs, |r| r.downtime_ms);
            let rate = if row.prealloc {
                rate_faulted
            } else {
                rate_fresh
            };
            send_rates.push((name.clone(), m.send_rate, m.status.clone()));
            let line = table_line(&name, &m, &d, rate);
            println!("{line}");
            lines.push(line);
            // The picture of the median run, as `ferry demo --plot` draws it.
            if let Err(e) = plot_run(&m, &name, &dir.join(format!("{stem}.svg"))) {
                notes.push(format!("{name}: no plot: {e}"));
            }
            let j = json!({
                "row": name,
                "link": link_name,
                "mem-bytes": row.mem_bytes,
                "vcpus": 2,
                "workload": row.workload,
                "channels": row.channels,
                "sparse-pages": row.sparse_pages,
                "prealloc": row.prealloc,
                "link-rate-bytes-per-sec": rate,
                "limit-s": limit.as_secs(),
                "runs": runs.iter().map(|r| json!({
                    "status": r.status,
                    "total-ms": r.total_ms,
                    "downtime-ms": r.downtime_ms,
                    "send-rate-bytes-per-sec": r.send_rate,
                    "guest-speed-mean-percent": r.speed.map(|s| s.mean_percent),
                    "guest-slow-intervals-percent": r.speed.map(|s| s.slow_percent),
                    "ram-match": r.ram_match,
                    "replies": r.json,
                })).collect::<Vec<_>>(),
            });
            if let Err(e) = std::fs::write(
                dir.join(format!("{stem}.json")),
                serde_json::to_string_pretty(&j).unwrap_or_default(),
            ) {
                notes.push(format!("{name}: {e}"));
            }
        }
        // Each TLS row against its plaintext twin: the cost of encryption here.
        let ratios: Vec<String> = send_rates
            .iter()
            .filter_map(|(name, tls_rate, tls_status)| {
                let twin = name.strip_suffix(" tls")?;
                let (_, plain_rate, plain_status) = send_rates.iter().find(|r| r.0 == twin)?;
                let done = tls_status == "completed" && plain_status == "completed";
                Some(format!(
                    "{} {:.0} %{}",
                    twin.strip_prefix(&format!("{} ", link.name()))
                        .unwrap_or(twin),
                    tls_rate / plain_rate * 100.0,
                    if done {
                        ""
                    } else {
                        " (not completed in the time limit)"
                    }
                ))
            })
            .collect();
        if !ratios.is_empty() {
            notes.push(format!(
                "{link_name}: TLS send rate as a share of plaintext's: {}",
                ratios.join(", ")
            ));
        }
    }
    let _ = std::fs::read_dir(std::env::temp_dir()).map(|entries| {
        let mine = format!("ferry-bench-tls-{}-", std::process::id());
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&mine) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    notes.push(format!(
        "wall time of the whole run: {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    out.extend(lines);
    out.push(String::new());
    for n in &notes {
        println!("- {n}");
        out.push(format!("- {n}"));
    }
    out.push(String::new());
    let path = bench_dir.join("migration.md");
    match std::fs::write(&path, out.join("\n")) {
        Ok(()) => println!("written: {} and one JSON per row", path.display()),
        Err(e) => println!("cannot write {}: {e}", path.display()),
    }
}
