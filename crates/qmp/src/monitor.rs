//! The monitor: state shared by every client (the machine, the migration source, the
//! incoming migration, the dirty-rate job, the event hub) and command dispatch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Sender, TrySendError};
use migration_core::{
    incoming_with, ram_digest, Capabilities, Capability, DirtyRateArgs, DirtyRateJob, GuestRam,
    IncomingControl, IncomingOptions, MigratableVm, MigrationEvent, MigrationSource,
    ParametersUpdate, RunControl, RunState, TlsObject,
};
use serde_json::{json, Map, Value};
use stats::{DirtyRateMode, MigStats, MigrationInfo, MigrationStatus, TimeUnit};

use crate::args::{object, Args};
use crate::error::QmpError;
use crate::hmp::{self, DumpDefaults};
use crate::machine::Machine;
use crate::schema::{
    self, opt, req, Members, Signature, Ty, ANY, BOOL, CAPABILITY_STATUS, EMPTY, INT,
    MIGRATION_INFO, MIGRATION_STATUS, MIGRATION_THREAD_INFO, PARAMETERS, RUN_STATE, SET_PARAMETERS,
    STR,
};

/// The QEMU version the greeting and `query-version` report: the QMP surface Ferry
/// follows (calc-dirty-rate's `calc-time-unit` is 8.2's).
pub const QEMU_VERSION: (u32, u32, u32) = (8, 2, 0);

/// `package` of the greeting and `query-version`: Ferry's own version (the
/// workspace's).
pub const PACKAGE: &str = concat!("ferry-", env!("CARGO_PKG_VERSION"));

/// `VersionInfo`: the QEMU version whose migration interface Ferry implements
/// ([`QEMU_VERSION`]) and Ferry's own ([`PACKAGE`]).
pub fn version_info() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE})
}

/// Events queued for one client before it counts as stuck and is disconnected.
pub const EVENT_QUEUE: usize = 4096;

/// The longest the incoming-migration watcher waits for a status change before it
/// checks that its monitor still exists.
const INCOMING_WATCH: Duration = Duration::from_secs(1);

/// The commands Ferry answers, in the order `query-commands` lists them: the names
/// of the dispatcher's own table, so the list cannot drift from what is answered.
pub fn commands() -> impl Iterator<Item = &'static str> {
    COMMAND_TABLE.iter().map(|(name, _, _)| *name)
}

/// A command's handler: the monitor, the client's session and the arguments (each
/// handler takes the members it knows and calls `Args::finish`, which refuses the
/// rest, as QEMU does).
type Handler = fn(&Arc<Monitor>, &mut Session, Args) -> Result<(Ret, After), QmpError>;

/// An answer with a value, the session going on.
fn value(v: Value) -> Result<(Ret, After), QmpError> {
    Ok((Ret::Value(v), After::Continue))
}

/// `{}`, the answer of a command that returns nothing.
fn empty() -> Value {
    json!({})
}

/// Every command and what it does: the table the dispatcher looks commands up in,
/// and [`commands`] lists.
/// Build a struct type from its members (in the table's signatures).
macro_rules! obj {
    ($name:expr, [$($m:expr),* $(,)?]) => {
        Ty::Object($name, Members::Fixed(&[$($m),*]))
    };
}

/// A command's signature.
const fn sig(args: Ty, ret: Ty) -> Signature {
    Signature { args, ret }
}

/// `VersionInfo`.
const VERSION_INFO: Ty = obj!(
    "VersionInfo",
    [
        req(
            "qemu",
            obj!(
                "VersionTriple",
                [req("major", INT), req("minor", INT), req("micro", INT)]
            )
        ),
        req("package", STR),
    ]
);

/// `TimeUnit`.
const TIME_UNIT: Ty = Ty::Enum("TimeUnit", &["second", "millisecond"]);

/// `DirtyRateMeasureMode`.
const DIRTY_RATE_MODE: Ty = Ty::Enum(
    "DirtyRateMeasureMode",
    &["page-sampling", "dirty-ring", "dirty-bitmap"],
);

/// `QAuthZListPolicy`.
const AUTHZ_POLICY: Ty = Ty::Enum("QAuthZListPolicy", &["deny", "allow"]);

/// `QAuthZListRule`.
const AUTHZ_RULE: Ty = obj!(
    "QAuthZListRule",
    [
        req("match", STR),
        req("policy", AUTHZ_POLICY),
        opt("format", Ty::Enum("QAuthZListFormat", &["exact", "glob"]))
    ]
);

/// `object-add`'s arguments, for the object types Ferry has (QEMU's `ObjectOptions`
/// flat union, its `tls-creds-x509` and `authz-list` branches merged).
const OBJECT_ADD_ARGS: Ty = obj!(
    "ObjectOptions",
    [
        req(
            "qom-type",
            Ty::Enum("ObjectType", &["authz-list", "tls-creds-x509"])
        ),
        req("id", STR),
        opt("dir", STR),
        opt(
            "endpoint",
            Ty::Enum("QCryptoTLSCredsEndpoint", &["client", "server"])
        ),
        opt("verify-peer", BOOL),
        opt("policy", AUTHZ_POLICY),
        opt("rules", Ty::Array(&AUTHZ_RULE))
    ]
);

/// The QMP introspection document of this table ([`schema::document`]).
pub fn qmp_schema() -> Value {
    schema::document(COMMAND_TABLE.iter().map(|(n, s, _)| (*n, *s)))
}

/// Every command, its signature (arguments and return type, which `query-qmp-schema`
/// publishes and the dispatcher checks argument names against) and what it does:
/// the table the dispatcher looks commands up in, and [`commands`] lists.
const COMMAND_TABLE: &[(&str, Signature, Handler)] = &[
    (
        "qmp_capabilities",
        sig(
            obj!(
                "qmp_capabilities_arg",
                [opt(
                    "enable",
                    Ty::Array(&Ty::Enum("QMPCapability", &["oob"]))
                )]
            ),
            EMPTY,
        ),
        |_m, session, mut a| {
            value({
                if session.negotiated {
                    return Err(QmpError::not_found(
                        "Capabilities negotiation is already complete, command ignored",
                    ));
                }
                // Ferry offers no capability (no out-of-band execution), so any
                // entry of `enable` is refused.
                if let Some(c) = a.opt_array("enable")?.and_then(|l| l.into_iter().next()) {
                    return Err(match c {
                        Value::String(s) if s == "oob" => {
                            QmpError::generic("Capability 'oob' not available")
                        }
                        Value::String(s) => QmpError::generic(format!(
                            "Parameter 'enable' does not accept value '{s}'"
                        )),
                        _ => QmpError::generic(
                            "Invalid parameter type for 'enable', expected: string",
                        ),
                    });
                }
                a.finish()?;
                session.negotiated = true;
                empty()
            })
        },
    ),
    (
        "query-version",
        sig(EMPTY, VERSION_INFO),
        |_m, _session, a| {
            value({
                a.finish()?;
                version_info()
            })
        },
    ),
    (
        "query-commands",
        sig(EMPTY, Ty::Array(&obj!("CommandInfo", [req("name", STR)]))),
        |_m, _session, a| {
            value({
                a.finish()?;
                Value::Array(commands().map(|c| json!({"name": c})).collect())
            })
        },
    ),
    (
        "query-events",
        sig(EMPTY, Ty::Array(&obj!("EventInfo", [req("name", STR)]))),
        |_m, _session, a| {
            value({
                a.finish()?;
                Value::Array(
                    schema::EVENTS
                        .iter()
                        .map(|(e, _)| json!({"name": e}))
                        .collect(),
                )
            })
        },
    ),
    (
        "query-qmp-schema",
        sig(EMPTY, Ty::Array(&ANY)),
        |_m, _session, a| {
            value({
                a.finish()?;
                qmp_schema()
            })
        },
    ),
    (
        "query-status",
        sig(
            EMPTY,
            obj!(
                "StatusInfo",
                [
                    req("running", BOOL),
                    req("singlestep", BOOL),
                    req("status", RUN_STATE)
                ]
            ),
        ),
        |m, _session, a| {
            value({
                a.finish()?;
                let s = m.run_state();
                // QEMU 8.2 still reports `singlestep` (deprecated); Ferry never steps.
                json!({"running": s.is_running(), "singlestep": false, "status": s})
            })
        },
    ),
    ("stop", sig(EMPTY, EMPTY), |m, _session, a| {
        value({
            a.finish()?;
            m.run.stop()?;
            empty()
        })
    }),
    ("cont", sig(EMPTY, EMPTY), |m, _session, a| {
        value({
            a.finish()?;
            m.run.cont()?;
            empty()
        })
    }),
    ("quit", sig(EMPTY, EMPTY), |m, _session, a| {
        a.finish()?;
        m.run.shutdown();
        Ok((Ret::Value(empty()), After::Quit))
    }),
    (
        "migrate",
        sig(
            obj!(
                "migrate_arg",
                [
                    req("uri", STR),
                    opt("blk", BOOL),
                    opt("inc", BOOL),
                    opt("detach", BOOL),
                    opt("resume", BOOL)
                ]
            ),
            EMPTY,
        ),
        |m, _session, mut a| {
            value({
                let uri = a.str("uri")?;
                for flag in ["blk", "inc"] {
                    if a.opt_bool(flag)? == Some(true) {
                        return Err(QmpError::generic(format!(
                            "Parameter '{flag}': Ferry has no block migration"
                        )));
                    }
                }
                let resume = a.opt_bool("resume")? == Some(true);
                a.opt_bool("detach")?;
                a.finish()?;
                if resume {
                    // Continues a postcopy-paused migration at the destination's
                    // `migrate-recover` address; QEMU's "Cannot resume if there is no
                    // paused migration" (from the engine) in any other status.
                    m.source.resume(&uri)?;
                    return value(empty());
                }
                // Refused in inmigrate, finish-migrate and postmigrate (the engine
                // checks the run state, with QEMU's texts).
                m.source.migrate(&uri)?;
                empty()
            })
        },
    ),
    (
        "migrate-incoming",
        sig(
            obj!(
                "migrate-incoming_arg",
                [req("uri", STR), opt("exit-on-error", BOOL)]
            ),
            EMPTY,
        ),
        |m, _session, mut a| {
            value({
                let uri = a.str("uri")?;
                let exit_on_error = a.opt_bool("exit-on-error")?.unwrap_or(true);
                a.finish()?;
                m.start_incoming(&uri, exit_on_error)?;
                empty()
            })
        },
    ),
    ("migrate_cancel", sig(EMPTY, EMPTY), |m, _session, a| {
        value({
            a.finish()?;
            m.cancel_migration()?;
            empty()
        })
    }),
    (
        "migrate-start-postcopy",
        sig(EMPTY, EMPTY),
        |m, _session, a| {
            value({
                a.finish()?;
                // QEMU's errors: the capability off, or no migration started. A
                // migration that already ended is not an error (it would race with
                // the command); the switch happens only from `active`.
                m.source.start_postcopy()?;
                empty()
            })
        },
    ),
    (
        "migrate-continue",
        sig(
            obj!("migrate-continue_arg", [req("state", MIGRATION_STATUS)]),
            EMPTY,
        ),
        |m, _session, mut a| {
            value({
                let name = a.str("state")?;
                a.finish()?;
                let state = MigrationStatus::from_name(&name).ok_or_else(|| {
                    QmpError::generic(format!("Parameter 'state' does not accept value '{name}'"))
                })?;
                m.source.continue_migration(state)?;
                empty()
            })
        },
    ),
    (
        "query-migrationthreads",
        sig(EMPTY, Ty::Array(&MIGRATION_THREAD_INFO)),
        |m, _session, a| {
            value({
                a.finish()?;
                // The outgoing migration's threads alive now (QEMU lists the same:
                // its migration thread and multifd senders), each with its kernel id.
                to_json(m.source.stats().threads())?
            })
        },
    ),
    (
        "migrate-recover",
        sig(obj!("migrate-recover_arg", [req("uri", STR)]), EMPTY),
        |m, _session, mut a| {
            value({
                let uri = a.str("uri")?;
                a.finish()?;
                m.recover_incoming(&uri)?;
                empty()
            })
        },
    ),
    ("migrate-pause", sig(EMPTY, EMPTY), |m, _session, a| {
        value({
            a.finish()?;
            m.pause_postcopy()?;
            empty()
        })
    }),
    (
        "object-add",
        sig(OBJECT_ADD_ARGS, EMPTY),
        |m, _session, a| {
            value({
                m.object_add(a)?;
                empty()
            })
        },
    ),
    (
        "object-del",
        sig(obj!("object-del_arg", [req("id", STR)]), EMPTY),
        |m, _session, mut a| {
            value({
                let id = a.str("id")?;
                a.finish()?;
                if !m.source.tls_objects().remove(&id) {
                    return Err(QmpError::generic(format!("object '{id}' not found")));
                }
                empty()
            })
        },
    ),
    (
        "migrate-set-parameters",
        sig(SET_PARAMETERS, EMPTY),
        |m, _session, a| {
            value({
                let update = parameters_update(a.into_members())?;
                m.source.set_parameters(&update)?;
                empty()
            })
        },
    ),
    (
        "query-migrate-parameters",
        sig(EMPTY, PARAMETERS),
        |m, _session, a| {
            value({
                a.finish()?;
                to_json(m.source.parameters())?
            })
        },
    ),
    (
        "migrate-set-capabilities",
        sig(
            obj!(
                "migrate-set-capabilities_arg",
                [req("capabilities", Ty::Array(&CAPABILITY_STATUS))]
            ),
            EMPTY,
        ),
        |m, _session, mut a| {
            value({
                let list = a.array("capabilities")?;
                a.finish()?;
                let mut caps = Vec::with_capacity(list.len());
                for (i, item) in list.into_iter().enumerate() {
                    let mut c = object(&format!("capabilities[{i}]"), item)?;
                    let name = c.str("capability")?;
                    let cap: Capability = serde_json::from_value(Value::String(name.clone()))
                        .map_err(|_| {
                            QmpError::generic(format!(
                                "Parameter 'capability' does not accept value '{name}'"
                            ))
                        })?;
                    let state = c
                        .opt_bool("state")?
                        .ok_or_else(|| QmpError::generic("Parameter 'state' is missing"))?;
                    c.finish()?;
                    caps.push((cap, state));
                }
                if m.source.is_active() {
                    return Err(QmpError::generic("There's a migration process in progress"));
                }
                // QEMU checks the whole list before it changes anything.
                for (cap, state) in &caps {
                    Capabilities::check(*cap, *state)?;
                }
                for (cap, state) in caps {
                    m.source.set_capability(cap, state)?;
                }
                empty()
            })
        },
    ),
    (
        "query-migrate-capabilities",
        sig(EMPTY, Ty::Array(&CAPABILITY_STATUS)),
        |m, _session, a| {
            value({
                a.finish()?;
                Value::Array(
                    m.source
                        .capabilities()
                        .list()
                        .iter()
                        .map(|(c, on)| json!({"capability": c, "state": on}))
                        .collect(),
                )
            })
        },
    ),
    (
        "query-migrate",
        sig(EMPTY, MIGRATION_INFO),
        |m, _session, a| {
            a.finish()?;
            let info = m.migration_info();
            let ret = info.map_or_else(|| Ret::Value(empty()), |i| Ret::Migration(Box::new(i)));
            Ok((ret, After::Continue))
        },
    ),
    (
        "calc-dirty-rate",
        sig(
            obj!(
                "calc-dirty-rate_arg",
                [
                    req("calc-time", INT),
                    opt("calc-time-unit", TIME_UNIT),
                    opt("sample-pages", INT),
                    opt("mode", DIRTY_RATE_MODE)
                ]
            ),
            EMPTY,
        ),
        |m, _session, mut a| {
            value({
                let calc_time = a.i64("calc-time")?;
                let unit = a.opt_enum("calc-time-unit", &["second", "millisecond"])?;
                let sample_pages = a.opt_i64("sample-pages")?;
                let mode = a.opt_enum("mode", &["page-sampling", "dirty-ring", "dirty-bitmap"])?;
                a.finish()?;
                let args = DirtyRateArgs {
                    calc_time,
                    calc_time_unit: unit.map(time_unit),
                    sample_pages,
                    mode: match mode {
                        Some(m) => Some(m.parse::<DirtyRateMode>().map_err(QmpError::generic)?),
                        None => None,
                    },
                };
                m.dirty_rate.calc(&args)?;
                empty()
            })
        },
    ),
    (
        "query-dirty-rate",
        sig(
            obj!("query-dirty-rate_arg", [opt("calc-time-unit", TIME_UNIT)]),
            obj!(
                "DirtyRateInfo",
                [
                    opt("dirty-rate", INT),
                    req(
                        "status",
                        Ty::Enum("DirtyRateStatus", &["unstarted", "measuring", "measured"])
                    ),
                    req("start-time", INT),
                    req("calc-time", INT),
                    req("calc-time-unit", TIME_UNIT),
                    req("sample-pages", INT),
                    req("mode", DIRTY_RATE_MODE),
                    opt("vcpu-dirty-rate", Ty::Array(&ANY)),
                    opt("x-ferry", ANY)
                ]
            ),
        ),
        |m, _session, mut a| {
            value({
                let unit = a.opt_enum("calc-time-unit", &["second", "millisecond"])?;
                a.finish()?;
                to_json(m.dirty_rate.query(unit.map(time_unit)))?
            })
        },
    ),
    (
        "set-vcpu-dirty-limit",
        sig(
            obj!(
                "set-vcpu-dirty-limit_arg",
                [opt("cpu-index", INT), req("dirty-rate", INT)]
            ),
            EMPTY,
        ),
        |m, _session, mut a| {
            value({
                let cpu = a.opt_i64("cpu-index")?;
                let rate = a.i64("dirty-rate")?;
                a.finish()?;
                let rate = u64::try_from(rate)
                    .map_err(|_| QmpError::generic("Parameter 'dirty-rate' expects uint64"))?;
                m.change_dirty_limit(cpu, Some(rate))?
            })
        },
    ),
    (
        "cancel-vcpu-dirty-limit",
        sig(
            obj!("cancel-vcpu-dirty-limit_arg", [opt("cpu-index", INT)]),
            EMPTY,
        ),
        |m, _session, mut a| {
            value({
                let cpu = a.opt_i64("cpu-index")?;
                a.finish()?;
                m.change_dirty_limit(cpu, None)?
            })
        },
    ),
    (
        "query-vcpu-dirty-limit",
        sig(
            EMPTY,
            Ty::Array(&obj!(
                "DirtyLimitInfo",
                [
                    req("cpu-index", INT),
                    req("limit-rate", INT),
                    req("current-rate", INT)
                ]
            )),
        ),
        |m, _session, a| {
            value({
                a.finish()?;
                to_json(m.source.dirty_limiter().query())?
            })
        },
    ),
    (
        "human-monitor-command",
        sig(
            obj!(
                "human-monitor-command_arg",
                [req("command-line", STR), opt("cpu-index", INT)]
            ),
            STR,
        ),
        |m, _session, mut a| {
            value({
                let line = a.str("command-line")?;
                let cpu_index = a.opt_i64("cpu-index")?;
                a.finish()?;
                if let Some(i) = cpu_index {
                    m.check_cpu_index(i)?;
                }
                Value::String(hmp::execute(m.as_ref(), &line))
            })
        },
    ),
    (
        "x-ferry-cancel-dirty-rate",
        sig(EMPTY, EMPTY),
        |m, _session, a| {
            value({
                a.finish()?;
                // Idempotent, as `migrate_cancel`: with nothing measuring (never started,
                // already measured, or cancelled) it answers `{}` too, so a tool racing
                // the measurement's end gets no spurious error.
                m.dirty_rate.cancel();
                empty()
            })
        },
    ),
    (
        "x-ferry-query-guest-progress",
        sig(
            EMPTY,
            obj!(
                "x-ferry-guest-progress",
                [req("vcpu-rounds", Ty::Array(&INT))]
            ),
        ),
        |m, _session, a| {
            value({
                a.finish()?;
                let rounds = m.machine.guest_progress().ok_or_else(|| {
                    QmpError::generic("this VMM does not report its guest's progress")
                })?;
                json!({"vcpu-rounds": rounds})
            })
        },
    ),
    (
        "x-ferry-query-ram-digest",
        sig(
            EMPTY,
            obj!(
                "x-ferry-ram-digest",
                [req("digest", INT), req("pages", INT)]
            ),
        ),
        |m, _session, a| {
            value({
                a.finish()?;
                let (digest, pages) = m.ram_digest()?;
                json!({"digest": digest, "pages": pages})
            })
        },
    ),
];

/// How the destination side starts (QEMU's `-incoming`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncomingStart {
    /// Not a destination: the guest runs.
    None,
    /// `-incoming URI`: listen at once.
    Now(String),
    /// `-incoming defer`: wait for `migrate-incoming`.
    Defer,
}

/// Where the incoming side is.
enum IncomingState {
    /// Not a destination.
    None,
    /// `-incoming defer`, no `migrate-incoming` yet.
    Deferred,
    /// Listening or receiving (or done): the destination's counters, and its pause
    /// and recovery (`migrate-pause`, `migrate-recover`).
    Started(Arc<MigStats>, IncomingControl),
}

/// What the connection should do after a reply was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Go on reading.
    Continue,
    /// `quit`: end the process.
    Quit,
}

/// One client's protocol state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// True once `qmp_capabilities` succeeded.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }
}

/// Fan-out of events to negotiated clients; never blocks on a client.
#[derive(Default)]
struct EventHub {
    clients: Mutex<Vec<(u64, Sender<Arc<str>>)>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The event JSON with QEMU's timestamp (wall clock, seconds and microseconds).
pub fn event_json(name: &str, data: Option<Value>) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut ev = json!({
        "event": name,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    });
    if let (Some(d), Some(m)) = (data, ev.as_object_mut()) {
        m.insert("data".into(), d);
    }
    ev
}

impl EventHub {
    fn subscribe(&self, tx: Sender<Arc<str>>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.clients).push((id, tx));
        id
    }

    fn unsubscribe(&self, id: u64) {
        lock(&self.clients).retain(|(i, _)| *i != id);
    }

    /// Queues `ev` for every client; a client whose queue is full is dropped (its
    /// event thread ends and closes the connection).
    fn broadcast(&self, ev: &Value) {
        let mut line = ev.to_string();
        line.push_str("\r\n");
        let line: Arc<str> = line.into();
        lock(&self.clients).retain(|(_, tx)| match tx.try_send(line.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        });
    }
}

/// A QMP `cpu-index`: QEMU refuses a negative one as out of range.
fn cpu_index(cpu: Option<i64>) -> Result<Option<usize>, QmpError> {
    cpu.map(|c| usize::try_from(c).map_err(|_| QmpError::generic("incorrect cpu index specified")))
        .transpose()
}

/// The state every client shares.
pub struct Monitor {
    machine: Arc<dyn Machine>,
    vm: Arc<dyn MigratableVm>,
    source: MigrationSource,
    dirty_rate: DirtyRateJob,
    incoming: Mutex<IncomingState>,
    /// The run state: `stop`, `cont`, the switch-over and the destination's start all
    /// go through it, and `STOP` / `RESUME` come from it.
    run: Arc<RunControl>,
    events: EventHub,
    /// `xp`'s format and size when a command gives none (the last ones given).
    dump_defaults: Mutex<DumpDefaults>,
}

impl Monitor {
    /// `set-vcpu-dirty-limit` (with a rate) or `cancel-vcpu-dirty-limit` (without) on
    /// vCPU `cpu` (every vCPU when None). QEMU refuses both while a migration with the
    /// `dirty-limit` capability runs and holds the limits.
    fn change_dirty_limit(&self, cpu: Option<i64>, rate: Option<u64>) -> Result<Value, QmpError> {
        let cpu = cpu_index(cpu)?;
        let limiter = self.source.dirty_limiter();
        if self.source.is_active() && self.source.capabilities().dirty_limit && limiter.in_service()
        {
            let what = if rate.is_some() { "set" } else { "cancel" };
            return Err(QmpError::generic(format!(
                "can't {what} dirty page rate limit while migration is running"
            )));
        }
        match rate {
            Some(r) => limiter.set(cpu, r),
            None => limiter.cancel(cpu),
        }
        .map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(empty())
    }

    /// A monitor for `machine` (whose guest is `vm`), as a destination if `start` says
    /// so; with `autostart` false (QEMU's `-S`) an incoming guest stays paused after
    /// its migration until `cont`. Starts the thread that turns migration progress
    /// into events.
    pub fn new(
        machine: Arc<dyn Machine>,
        vm: Arc<dyn MigratableVm>,
        start: IncomingStart,
        autostart: bool,
    ) -> crate::Result<Arc<Monitor>> {
        let run = match start {
            IncomingStart::None => RunControl::running(vm.clone()),
            _ => RunControl::incoming(vm.clone(), autostart),
        };
        let mon = Arc::new(Monitor {
            source: MigrationSource::with_run_control(run.clone()),
            dirty_rate: DirtyRateJob::new(vm.clone()),
            machine,
            vm,
            incoming: Mutex::new(match start {
                IncomingStart::Defer => IncomingState::Deferred,
                _ => IncomingState::None,
            }),
            run,
            events: EventHub::default(),
            dump_defaults: Mutex::default(),
        });
        // Events are queued for the clients on the thread that caused them, in order:
        // STOP before the `stop` reply and before MIGRATION `device`, as in QEMU.
        let weak = Arc::downgrade(&mon);
        mon.run.on_event(move |ev| match weak.upgrade() {
            Some(mon) => {
                mon.migration_event(ev);
                true
            }
            None => false,
        });
        if let IncomingStart::Now(uri) = start {
            *lock(&mon.incoming) = IncomingState::Deferred;
            mon.start_incoming(&uri, true)
                .map_err(|e| crate::Error::Incoming(e.desc))?;
        }
        Ok(mon)
    }

    /// `object-add` of a `tls-creds-x509` (loaded at once, as QEMU does) or an
    /// `authz-list`.
    fn object_add(&self, mut a: Args) -> Result<(), QmpError> {
        let ty = a.opt_enum("qom-type", &["tls-creds-x509", "authz-list"])?;
        let id = a.str("id")?;
        let obj = match ty {
            Some("tls-creds-x509") => {
                let dir = a.str("dir")?;
                let endpoint = a
                    .opt_enum("endpoint", &["client", "server"])?
                    .unwrap_or("client");
                let verify_peer = a.opt_bool("verify-peer")?.unwrap_or(true);
                a.finish()?;
                let endpoint = if endpoint == "server" {
                    transport::TlsEndpoint::Server
                } else {
                    transport::TlsEndpoint::Client
                };
                let creds = transport::TlsCreds::load(
                    &id,
                    std::path::Path::new(&dir),
                    endpoint,
                    verify_peer,
                )
                .map_err(|e| QmpError::generic(e.to_string()))?;
                TlsObject::Creds(creds)
            }
            Some("authz-list") => {
                let policy = a.opt_enum("policy", &["deny", "allow"])?;
                let rules = a.opt_array("rules")?.unwrap_or_default();
                a.finish()?;
                let mut list = Vec::with_capacity(rules.len());
                for (i, r) in rules.into_iter().enumerate() {
                    let mut r = object(&format!("rules[{i}]"), r)?;
                    let pattern = r.str("match")?;
                    let allow = r
                        .opt_enum("policy", &["deny", "allow"])?
                        .ok_or_else(|| QmpError::generic("Parameter 'policy' is missing"))?
                        == "allow";
                    let glob = r.opt_enum("format", &["exact", "glob"])? == Some("glob");
                    r.finish()?;
                    list.push(transport::AuthzRule {
                        pattern,
                        format: if glob {
                            transport::AuthzFormat::Glob
                        } else {
                            transport::AuthzFormat::Exact
                        },
                        allow,
                    });
                }
                TlsObject::Authz(transport::TlsAuthz {
                    id: id.clone(),
                    rules: list,
                    default_allow: policy == Some("allow"),
                })
            }
            _ => return Err(QmpError::generic("Parameter 'qom-type' is missing")),
        };
        self.source.tls_objects().add(&id, obj)?;
        Ok(())
    }

    /// QEMU's `migrate-incoming` from the VMM itself (e.g. `-incoming URI` after the
    /// TLS objects and parameters were set): listens at once.
    pub fn migrate_incoming(self: &Arc<Self>, uri: &str) -> crate::Result<()> {
        self.start_incoming(uri, true)
            .map_err(|e| crate::Error::Incoming(e.desc))
    }

    /// The migration source (for the VMM's own use, e.g. tests).
    pub fn source(&self) -> &MigrationSource {
        &self.source
    }

    fn events_on(&self) -> bool {
        self.source.capabilities().events
    }

    fn migration_event(&self, ev: MigrationEvent) {
        let ev = match ev {
            MigrationEvent::Stop => event_json("STOP", None),
            MigrationEvent::Resume => event_json("RESUME", None),
            _ if !self.events_on() => return,
            MigrationEvent::Status(s) => event_json("MIGRATION", Some(json!({"status": s}))),
            MigrationEvent::Pass(n) => event_json("MIGRATION_PASS", Some(json!({"pass": n}))),
        };
        self.events.broadcast(&ev);
    }

    /// Emits an event to every negotiated client.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        self.events.broadcast(&event_json(name, data));
    }

    /// Registers a negotiated client's event queue; returns its id.
    pub fn subscribe(&self, tx: Sender<Arc<str>>) -> u64 {
        self.events.subscribe(tx)
    }

    /// Removes a client's event queue.
    pub fn unsubscribe(&self, id: u64) {
        self.events.unsubscribe(id);
    }

    /// The run state `query-status` reports: the vCPUs' real one.
    pub fn run_state(&self) -> RunState {
        self.run.state()
    }

    /// The guest's run state machine.
    pub fn run_control(&self) -> &Arc<RunControl> {
        &self.run
    }

    /// What `query-migrate` reports: the outgoing migration if there was one, else
    /// the incoming one, `None` before any; takes no lock the migration thread holds.
    pub fn migration_info(&self) -> Option<MigrationInfo> {
        let src = self.source.stats();
        let info = if src.status() != MigrationStatus::None {
            src.snapshot()
        } else {
            match &*lock(&self.incoming) {
                IncomingState::Started(st, _) => st.snapshot(),
                _ => MigrationInfo::default(),
            }
        };
        (info.status != MigrationStatus::None).then_some(info)
    }

    /// Starts listening for the incoming migration and a thread that watches it.
    fn start_incoming(self: &Arc<Self>, uri: &str, exit_on_error: bool) -> Result<(), QmpError> {
        let mut state = lock(&self.incoming);
        match &*state {
            IncomingState::None => {
                return Err(QmpError::generic(
                    "'-incoming' was not specified on the command line",
                ))
            }
            IncomingState::Started(..) => {
                return Err(QmpError::generic(
                    "The incoming migration has already been started",
                ))
            }
            IncomingState::Deferred => {}
        }
        let inc = incoming_with(
            self.vm.clone(),
            uri,
            IncomingOptions {
                verify: false,
                run: Some(self.run.clone()),
                accept: transport::AcceptOptions {
                    tls: self.source.incoming_tls()?,
                    ..Default::default()
                },
            },
        )?;
        let stats = inc.stats().clone();
        *state = IncomingState::Started(stats.clone(), inc.control());
        drop(state);
        // QEMU announces the incoming setup whatever the events capability says; the
        // later changes only with it on.
        self.emit("MIGRATION", Some(json!({"status": MigrationStatus::Setup})));
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("qmp/incoming".into())
            .spawn(move || {
                let mut last = MigrationStatus::Setup;
                let mut seen = 0;
                while !last.is_finished() {
                    // Woken by each status change of the incoming migration, given
                    // every status set since the last wake (postcopy-recover lasts an
                    // instant, and each still gets its event, in order); the timeout
                    // only bounds how long a dropped monitor keeps the thread.
                    let (count, changes) = stats.wait_status_changes(seen, INCOMING_WATCH);
                    seen = count;
                    let Some(mon) = weak.upgrade() else { return };
                    for s in changes {
                        // The first change is the `setup` emitted above.
                        if s == last {
                            continue;
                        }
                        last = s;
                        if mon.events_on() {
                            mon.emit("MIGRATION", Some(json!({"status": s})));
                        }
                    }
                }
                let result = inc.wait();
                let Some(mon) = weak.upgrade() else { return };
                // Started or held paused by the run state at the commit; a failed
                // destination ends the process as QEMU's (unless told otherwise).
                if let Err(e) = result {
                    if exit_on_error {
                        mon.machine.incoming_failed(&e.to_string());
                    }
                }
            })
            .map_err(|e| QmpError::generic(format!("cannot start a thread: {e}")))?;
        Ok(())
    }

    /// Handles one parsed request; returns the reply line (JSON, without CRLF) and
    /// what to do next.
    pub fn handle(self: &Arc<Self>, session: &mut Session, req: Value) -> (String, After) {
        let Value::Object(req) = req else {
            return (
                error_reply(QmpError::generic("QMP input must be a JSON object"), None).to_string(),
                After::Continue,
            );
        };
        let id = req.get("id").cloned();
        match self.dispatch(session, req) {
            Ok((ret, after)) => {
                let id = id.as_ref();
                // Serialized straight from the structs: `query-migrate` is what
                // pollers ask most, and a `Value` tree of it costs more than the rest.
                let line = match &ret {
                    Ret::Value(v) => serde_json::to_string(&Return { ret: v, id }),
                    Ret::Migration(info) => serde_json::to_string(&Return { ret: &**info, id }),
                };
                match line {
                    Ok(line) => (line, after),
                    Err(e) => (
                        error_reply(QmpError::generic(e.to_string()), id.cloned()).to_string(),
                        After::Continue,
                    ),
                }
            }
            Err(e) => (error_reply(e, id).to_string(), After::Continue),
        }
    }

    fn dispatch(
        self: &Arc<Self>,
        session: &mut Session,
        req: Map<String, Value>,
    ) -> Result<(Ret, After), QmpError> {
        let mut execute = None;
        let mut arguments = Map::new();
        for (k, v) in req {
            match k.as_str() {
                "execute" => match v {
                    Value::String(s) => execute = Some(s),
                    _ => {
                        return Err(QmpError::generic(
                            "QMP input member 'execute' must be a string",
                        ))
                    }
                },
                "arguments" => match v {
                    Value::Object(m) => arguments = m,
                    _ => {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ))
                    }
                },
                "id" => {}
                other => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{other}' is unexpected"
                    )))
                }
            }
        }
        let cmd = execute.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
        let a = Args::new(arguments);
        if !session.negotiated && cmd != "qmp_capabilities" {
            return Err(QmpError::not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        let (signature, handler) = COMMAND_TABLE
            .iter()
            .find(|(name, _, _)| *name == cmd)
            .map(|(_, s, h)| (*s, *h))
            .ok_or_else(|| QmpError::not_found(format!("The command {cmd} has not been found")))?;
        // A member the signature lacks is refused here, so a command cannot take an
        // argument `query-qmp-schema` does not show.
        if let Some(names) = schema::member_names(&signature.args) {
            if let Some(k) = a.names().find(|k| !names.iter().any(|n| n == k)) {
                return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
            }
        }
        handler(self, session, a)
    }

    /// `migrate_cancel`: stops a migration that has not handed the guest over; refused
    /// in postcopy, where the guest runs on the destination and needs the pages only
    /// this source holds (QEMU from 10.0 refuses it with the same words; 8.2 cancelled
    /// and lost the guest). Idempotent otherwise, as QEMU's: with nothing running it
    /// answers `{}`.
    fn cancel_migration(&self) -> Result<(), QmpError> {
        let refused = || {
            QmpError::generic(
                "Postcopy migration in progress, cannot cancel: the guest runs on the \
                 destination, which needs the pages only this source holds",
            )
        };
        let stats = self.source.stats();
        // postcopy-active, and as much postcopy-paused and postcopy-recover: the
        // destination holds the guest whether or not the stream is up.
        if stats.status().is_postcopy() {
            return Err(refused());
        }
        self.source.cancel();
        // The switch can win the race with the cancel (active -> postcopy-active
        // before the cancel's active -> cancelling): the engine then ignores it.
        if stats.status().is_postcopy() {
            return Err(refused());
        }
        Ok(())
    }

    /// The incoming migration's status and its pause and recovery, once
    /// `migrate-incoming` started it.
    fn incoming_control(&self) -> Option<(MigrationStatus, IncomingControl)> {
        match &*lock(&self.incoming) {
            IncomingState::Started(stats, control) => Some((stats.status(), control.clone())),
            _ => None,
        }
    }

    /// `migrate-recover` (destination): listens on `uri` for the source's `migrate`
    /// with `resume`; only while the incoming migration is postcopy-paused (the
    /// engine's checks, QEMU's texts; QEMU's text too with no incoming migration).
    /// Answers `{}` as QEMU does, so the caller names the port (`tcp:HOST:0` binds,
    /// but the port is only in the log).
    fn recover_incoming(&self, uri: &str) -> Result<(), QmpError> {
        let (_, control) = self.incoming_control().ok_or_else(|| {
            QmpError::generic("Migrate recover can only be run when postcopy is paused.")
        })?;
        let bound = control.recover(uri)?;
        tracing::info!(uri = %bound, "migrate-recover: listening for the source");
        Ok(())
    }

    /// `migrate-pause`: breaks the postcopy stream on purpose, so both sides pause
    /// (postcopy-paused) until `migrate-recover` and `migrate` with `resume`. On the
    /// source when its migration is in postcopy-active or postcopy-recover, else on
    /// the destination when the incoming one is; QEMU's text otherwise.
    fn pause_postcopy(&self) -> Result<(), QmpError> {
        let pausable = |s: MigrationStatus| {
            matches!(
                s,
                MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover
            )
        };
        if pausable(self.source.stats().status()) {
            return Ok(self.source.pause()?);
        }
        if let Some((status, control)) = self.incoming_control() {
            if pausable(status) {
                return Ok(control.pause()?);
            }
        }
        Err(QmpError::generic(
            "migrate-pause is currently only supported during postcopy-active or \
             postcopy-recover state",
        ))
    }

    /// `x-ferry-query-ram-digest`: the digest the demo compares
    /// ([`migration_core::ram_digest`]) of the guest's RAM, and the number of pages it
    /// covers. Refused while the vCPUs run (the pages would change under it), and when
    /// they started while it was taken.
    fn ram_digest(&self) -> Result<(u64, u64), QmpError> {
        let paused = || {
            if self.run_state().is_running() {
                Err(QmpError::generic("the guest must be paused"))
            } else {
                Ok(())
            }
        };
        paused()?;
        let digest = ram_digest(&GuestRam::new(self.vm.clone()));
        paused()?;
        Ok((digest, self.vm.address_space().total_pages()))
    }

    /// `human-monitor-command`'s `cpu-index`: QEMU's error for a CPU that does not
    /// exist. The vCPU count is known when the machine reports its guest's progress;
    /// otherwise any index from 0 is accepted (HMP's subset here does not use it).
    fn check_cpu_index(&self, i: i64) -> Result<(), QmpError> {
        let vcpus = self.machine.guest_progress().map(|p| p.len());
        let ok = u64::try_from(i).is_ok_and(|i| vcpus.is_none_or(|n| i < n as u64));
        if ok {
            Ok(())
        } else {
            Err(QmpError::generic(
                "Parameter 'cpu-index' expects a CPU number",
            ))
        }
    }

    /// Ends the process through the machine (after `quit` was answered).
    pub fn quit(&self) {
        self.machine.quit();
    }
}

impl hmp::Target for Monitor {
    fn run_state(&self) -> RunState {
        Monitor::run_state(self)
    }
    fn guest_ram(&self) -> GuestRam {
        GuestRam::new(self.vm.clone())
    }
    fn migration_info(&self) -> Option<MigrationInfo> {
        Monitor::migration_info(self)
    }
    fn dump_defaults(&self) -> &Mutex<DumpDefaults> {
        &self.dump_defaults
    }
}

fn time_unit(s: &str) -> TimeUnit {
    if s == "millisecond" {
        TimeUnit::Millisecond
    } else {
        TimeUnit::Second
    }
}

/// `migrate-set-parameters`' arguments, checked member by member against the
/// parameters Ferry has, with QAPI's error texts.
fn parameters_update(members: Map<String, Value>) -> Result<ParametersUpdate, QmpError> {
    let known = to_json(migration_core::MigrationParameters::default())?;
    let known = known.as_object().cloned().unwrap_or_default();
    for (k, v) in &members {
        if k == "block-bitmap-mapping" {
            // Absent by default, so not in `known`; a typed list of structs.
            schema::check_value(k, &schema::BITMAP_MAPPING, v)?;
            continue;
        }
        let Some(default) = known.get(k) else {
            return Err(QmpError::generic(format!("Parameter '{k}' is unexpected")));
        };
        let ok = match default {
            Value::Number(_) => v.is_u64(),
            // QEMU's StrOrNull: null leaves the (empty) value as it is.
            Value::String(_) => v.is_string() || v.is_null(),
            Value::Bool(_) => v.is_boolean(),
            _ => true,
        };
        if !ok {
            let expected = match default {
                Value::Number(_) if v.is_number() => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{k}' expects an unsigned integer"
                    )))
                }
                Value::Number(_) => "integer",
                Value::String(_) => "string",
                _ => "boolean",
            };
            return Err(QmpError::generic(format!(
                "Invalid parameter type for '{k}', expected: {expected}"
            )));
        }
    }
    // Types match; what serde still refuses is a value out of the field's range
    // (e.g. multifd-channels 300) or an enum value Ferry lacks.
    let members_copy = members.clone();
    serde_json::from_value::<ParametersUpdate>(Value::Object(members)).map_err(|e| {
        let culprit = members_copy
            .iter()
            .find(|(k, v)| {
                let mut one = Map::new();
                one.insert((*k).clone(), (*v).clone());
                serde_json::from_value::<ParametersUpdate>(Value::Object(one)).is_err()
            })
            .map(|(k, v)| (k.clone(), v.clone()));
        match culprit {
            Some((k, Value::String(s))) => {
                QmpError::generic(format!("Parameter '{k}' does not accept value '{s}'"))
            }
            Some((k, _)) => QmpError::generic(format!("Parameter '{k}' is out of range")),
            None => QmpError::generic(e.to_string()),
        }
    })
}

/// A reply's JSON; serializing Ferry's own types cannot fail, but if it ever did the
/// client gets a GenericError, not a dropped connection.
fn to_json(v: impl serde::Serialize) -> Result<Value, QmpError> {
    serde_json::to_value(v).map_err(|e| QmpError::generic(e.to_string()))
}

/// What a command returns.
enum Ret {
    /// Any reply, as a JSON value.
    Value(Value),
    /// `query-migrate` during or after a migration, serialized without a `Value`.
    Migration(Box<MigrationInfo>),
}

/// A successful reply: `{"return": ..., "id": ...}` (`id` echoed when given).
#[derive(serde::Serialize)]
struct Return<'a, T: serde::Serialize> {
    #[serde(rename = "return")]
    ret: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

/// `{"error": {"class": ..., "desc": ...}, "id": id}`.
pub fn error_reply(e: QmpError, id: Option<Value>) -> Value {
    let mut r = Map::new();
    r.insert("error".into(), json!({"class": e.class, "desc": e.desc}));
    if let Some(id) = id {
        r.insert("id".into(), id);
    }
    Value::Object(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::Frame;
    use crate::server::answer;
    use migration_core::testing::TestVm;

    struct FakeMachine;

    impl Machine for FakeMachine {
        fn quit(&self) {}
    }

    fn monitor(start: IncomingStart) -> Arc<Monitor> {
        Monitor::new(Arc::new(FakeMachine), TestVm::new(4 << 20), start, true).expect("monitor")
    }

    /// A machine with `vcpus` vCPUs (its progress vector's length).
    struct VcpuMachine(usize);

    impl Machine for VcpuMachine {
        fn guest_progress(&self) -> Option<Vec<u64>> {
            Some(vec![0; self.0])
        }
        fn quit(&self) {}
    }

    /// `human-monitor-command`'s reply to `line`.
    fn hmp(mon: &Arc<Monitor>, s: &mut Session, line: &str) -> Value {
        let req = json!({"execute": "human-monitor-command",
                         "arguments": {"command-line": line}});
        one(mon, s, &req.to_string())
    }

    /// Sends `input` (raw bytes) and returns the replies.
    fn talk(mon: &Arc<Monitor>, s: &mut Session, input: &str) -> Vec<Value> {
        let mut framer = crate::framing::Framer::new();
        let mut frames = Vec::new();
        framer.push(input.as_bytes(), &mut frames);
        frames
            .into_iter()
            .map(|f| serde_json::from_str(&answer(mon, s, f).0).expect("a reply is JSON"))
            .collect()
    }

    fn one(mon: &Arc<Monitor>, s: &mut Session, input: &str) -> Value {
        let mut r = talk(mon, s, input);
        assert_eq!(r.len(), 1, "{input}");
        r.remove(0)
    }

    fn err(v: &Value) -> (&str, &str) {
        (
            v["error"]["class"].as_str().unwrap_or_default(),
            v["error"]["desc"].as_str().unwrap_or_default(),
        )
    }

    fn negotiated(mon: &Arc<Monitor>) -> Session {
        let mut s = Session::default();
        assert_eq!(
            one(mon, &mut s, r#"{"execute":"qmp_capabilities"}"#),
            json!({"return": {}})
        );
        s
    }

    #[test]
    fn negotiation_and_ids() {
        let mon = monitor(IncomingStart::None);
        let mut s = Session::default();
        let r = one(&mon, &mut s, r#"{"execute":"query-status","id":1}"#);
        assert_eq!(
            err(&r),
            (
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        );
        assert_eq!(r["id"], 1);
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"qmp_capabilities","id":[1,"x"]}"#,
        );
        assert_eq!(r, json!({"return": {}, "id": [1, "x"]}));
        let r = one(&mon, &mut s, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(err(&r).0, "CommandNotFound");
        let r = one(&mon, &mut s, r#"{"id":"a","execute":"query-status"}"#);
        assert_eq!(
            r,
            json!({"return": {"running": true, "singlestep": false, "status": "running"}, "id": "a"})
        );
    }

    #[test]
    fn malformed_requests() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        let cases = [
            ("{\"execute\":}", "GenericError", "JSON parse error"),
            ("[]", "GenericError", "QMP input must be a JSON object"),
            ("1 ", "GenericError", "QMP input must be a JSON object"),
            ("{}", "GenericError", "QMP input lacks member 'execute'"),
            (
                r#"{"execute":true}"#,
                "GenericError",
                "QMP input member 'execute' must be a string",
            ),
            (
                r#"{"execute":"stop","arguments":1}"#,
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
            (
                r#"{"execute":"stop","exec-oob":"x"}"#,
                "GenericError",
                "QMP input member 'exec-oob' is unexpected",
            ),
            (
                r#"{"execute":"frobnicate"}"#,
                "CommandNotFound",
                "The command frobnicate has not been found",
            ),
            (
                r#"{"execute":"migrate"}"#,
                "GenericError",
                "Parameter 'uri' is missing",
            ),
            (
                r#"{"execute":"migrate","arguments":{"uri":[]}}"#,
                "GenericError",
                "Invalid parameter type for 'uri', expected: string",
            ),
            (
                r#"{"execute":"cont","arguments":{"now":1}}"#,
                "GenericError",
                "Parameter 'now' is unexpected",
            ),
        ];
        for (input, class, desc) in cases {
            let r = one(&mon, &mut s, input);
            let (c, d) = err(&r);
            assert_eq!(c, class, "{input}: {r}");
            assert!(d.starts_with(desc), "{input}: {r}");
            assert!(r.get("id").is_none());
        }
        let r: Value = serde_json::from_str(
            &answer(
                &mon,
                &mut s,
                Frame::Error("JSON token size limit exceeded".into()),
            )
            .0,
        )
        .unwrap();
        assert_eq!(err(&r), ("GenericError", "JSON token size limit exceeded"));
    }

    #[test]
    fn parameters_and_capabilities() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        assert_eq!(
            one(&mon, &mut s, r#"{"execute":"query-migrate"}"#),
            json!({"return": {}})
        );
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":50,"max-bandwidth":0}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#);
        assert_eq!(r["return"]["downtime-limit"], 50);
        assert_eq!(r["return"]["max-bandwidth"], 0);
        for (args, desc) in [
            (
                r#"{"downtime-limit":-1}"#,
                "Parameter 'downtime-limit' expects",
            ),
            (r#"{"downtime-limit":true}"#, "Invalid parameter type"),
            (
                r#"{"multifd-channels":256}"#,
                "Parameter 'multifd-channels' is out of range",
            ),
            (
                r#"{"max-cpu-throttle":100}"#,
                "Parameter 'max-cpu-throttle' expects",
            ),
            (r#"{"nope":1}"#, "Parameter 'nope' is unexpected"),
        ] {
            let r = one(
                &mon,
                &mut s,
                &format!(r#"{{"execute":"migrate-set-parameters","arguments":{args}}}"#),
            );
            assert!(err(&r).1.starts_with(desc), "{args}: {r}");
        }
        // A bad entry anywhere in the list changes nothing.
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[
                {"capability":"events","state":true},{"capability":"xbzrle","state":true}]}}"#,
        );
        assert_eq!(err(&r).0, "GenericError");
        assert!(!mon.source().capabilities().events);
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[
                {"capability":"events","state":true}]}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-capabilities"}"#);
        assert!(r["return"]
            .as_array()
            .is_some_and(|l| l.contains(&json!({"capability": "events", "state": true}))));
    }

    #[test]
    fn qemu_capabilities_and_parameters_at_their_default() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        // libvirt's style: every capability it knows, most of them false.
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[
                {"capability":"xbzrle","state":false},{"capability":"postcopy-ram","state":false},
                {"capability":"compress","state":false},{"capability":"auto-converge","state":true}]}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-capabilities"}"#);
        let list = r["return"].as_array().cloned().unwrap_or_default();
        assert_eq!(list.len(), 23, "{r}");
        assert_eq!(list[0], json!({"capability": "xbzrle", "state": false}));
        assert!(list.contains(&json!({"capability": "auto-converge", "state": true})));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[
                {"capability":"xbzrle","state":true}]}}"#,
        );
        assert_eq!(
            err(&r),
            (
                "GenericError",
                "Migration capability 'xbzrle' is not supported"
            )
        );
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[
                {"capability":"warp-drive","state":false}]}}"#,
        );
        assert_eq!(
            err(&r).1,
            "Parameter 'capability' does not accept value 'warp-drive'"
        );
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-parameters","arguments":{"xbzrle-cache-size":67108864,
                "tls-creds":"","tls-hostname":null,"max-postcopy-bandwidth":0,"mode":"normal"}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-parameters","arguments":{"xbzrle-cache-size":1048576}}"#,
        );
        assert!(
            err(&r)
                .1
                .starts_with("Parameter 'xbzrle-cache-size' expects 67108864"),
            "{r}"
        );
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#);
        for (k, v) in [
            ("xbzrle-cache-size", json!(67108864)),
            ("announce-initial", json!(50)),
            ("compress-threads", json!(8)),
            ("tls-authz", json!("")),
            ("vcpu-dirty-limit", json!(1)),
            ("mode", json!("normal")),
        ] {
            assert_eq!(r["return"][k], v, "{k}");
        }
    }

    #[test]
    fn block_bitmap_mapping_is_checked_as_qemu_and_kept() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        let set = |s: &mut _, mapping: &str| {
            one(
                &mon,
                s,
                &format!(
                    r#"{{"execute":"migrate-set-parameters","arguments":{{"block-bitmap-mapping":{mapping}}}}}"#
                ),
            )
        };
        // Absent until set, as in QEMU.
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#);
        assert!(r["return"].get("block-bitmap-mapping").is_none(), "{r}");
        let good = json!([{"node-name": "drive0", "alias": "d0", "bitmaps": [
            {"name": "b0", "alias": "a0", "transform": {"persistent": true}},
            {"name": "b1", "alias": "a1"}]}]);
        assert_eq!(set(&mut s, &good.to_string()), json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#);
        assert_eq!(r["return"]["block-bitmap-mapping"], good);
        // Shapes: QEMU's visitor texts, with the member's path.
        for (mapping, text) in [
            (
                r#"{}"#,
                "Invalid parameter type for 'block-bitmap-mapping', expected: array",
            ),
            (
                r#"[{"alias":"a","bitmaps":[]}]"#,
                "Parameter 'block-bitmap-mapping[0].node-name' is missing",
            ),
            (
                r#"[{"node-name":"n","alias":7,"bitmaps":[]}]"#,
                "Invalid parameter type for 'block-bitmap-mapping[0].alias', expected: string",
            ),
            (
                r#"[{"node-name":"n","alias":"a","bitmaps":[{"name":"b","alias":"c","x":1}]}]"#,
                "Parameter 'block-bitmap-mapping[0].bitmaps[0].x' is unexpected",
            ),
            // QEMU's rules, in its order.
            (
                r#"[{"node-name":"n","alias":"9a","bitmaps":[]}]"#,
                "The node alias '9a' is not well-formed",
            ),
            (
                r#"[{"node-name":"n","alias":"a","bitmaps":[]},{"node-name":"n","alias":"b","bitmaps":[]}]"#,
                "The node name 'n' is mapped twice",
            ),
            (
                r#"[{"node-name":"n","alias":"a","bitmaps":[]},{"node-name":"m","alias":"a","bitmaps":[]}]"#,
                "The node alias 'a' is used twice",
            ),
            (
                r#"[{"node-name":"n","alias":"a","bitmaps":[{"name":"b","alias":"x"},{"name":"b","alias":"y"}]}]"#,
                "The bitmap 'n'/'b' is mapped twice",
            ),
            (
                r#"[{"node-name":"n","alias":"a","bitmaps":[{"name":"b","alias":"x"},{"name":"c","alias":"x"}]}]"#,
                "The bitmap alias 'a'/'x' is used twice",
            ),
            (
                r#"[{"node-name":"a-node-name-of-thirty-two-bytes!","alias":"a","bitmaps":[]}]"#,
                "The node name 'a-node-name-of-thirty-two-bytes!' is longer than 31 bytes",
            ),
        ] {
            let r = set(&mut s, mapping);
            assert_eq!(err(&r), ("GenericError", text), "{mapping}");
        }
        // A refused mapping changed nothing; an empty one is kept as empty.
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#);
        assert_eq!(r["return"]["block-bitmap-mapping"], good);
        assert_eq!(set(&mut s, "[]"), json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#);
        assert_eq!(r["return"]["block-bitmap-mapping"], json!([]));
    }

    #[test]
    fn schema_describes_the_table() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        let schema = one(&mon, &mut s, r#"{"execute":"query-qmp-schema"}"#)["return"].clone();
        let list = schema.as_array().cloned().unwrap_or_default();
        let of = |meta: &str| -> Vec<String> {
            list.iter()
                .filter(|e| e["meta-type"] == meta)
                .filter_map(|e| e["name"].as_str().map(str::to_owned))
                .collect()
        };
        let cmds = one(&mon, &mut s, r#"{"execute":"query-commands"}"#)["return"].clone();
        let cmds: Vec<String> = cmds
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(of("command"), cmds);
        assert!(cmds.iter().any(|c| c == "query-qmp-schema"));
        let events = one(&mon, &mut s, r#"{"execute":"query-events"}"#)["return"].clone();
        assert_eq!(events.as_array().map(Vec::len), Some(of("event").len()));
        // Every migrate-set-parameters member is accepted by name (the dispatcher
        // checks names against the same signature).
        let args = list
            .iter()
            .find(|e| e["name"] == "MigrateSetParameters")
            .cloned()
            .unwrap_or_default();
        let params =
            one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#)["return"].clone();
        // The schema lists every parameter; the reply has each but
        // `block-bitmap-mapping`, absent until set (as in QEMU).
        let n = args["members"].as_array().map(Vec::len);
        assert_eq!(n, params.as_object().map(|o| o.len() + 1));
        assert!(args["members"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["name"] == "block-bitmap-mapping"));
        let r = one(
            &mon,
            &mut s,
            &json!({"execute": "migrate-set-parameters", "arguments": params}).to_string(),
        );
        assert_eq!(r, json!({"return": {}}));
    }

    #[test]
    fn start_postcopy_and_cancel_in_postcopy() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        let start = r#"{"execute":"migrate-start-postcopy"}"#;
        assert!(commands().any(|c| c == "migrate-start-postcopy"));
        let r = one(&mon, &mut s, start);
        assert_eq!(
            err(&r),
            (
                "GenericError",
                "Enable postcopy with migrate_set_capability before the start of migration"
            )
        );
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[
                {"capability":"postcopy-ram","state":true},
                {"capability":"postcopy-preempt","state":true}]}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-capabilities"}"#);
        let list = r["return"].as_array().cloned().unwrap_or_default();
        for c in ["postcopy-ram", "postcopy-preempt"] {
            assert!(
                list.contains(&json!({"capability": c, "state": true})),
                "{c}: {r}"
            );
        }
        let r = one(&mon, &mut s, start);
        assert_eq!(
            err(&r),
            (
                "GenericError",
                "Postcopy must be started after migration has been started"
            )
        );
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-start-postcopy","arguments":{"now":true}}"#,
        );
        assert_eq!(err(&r), ("GenericError", "Parameter 'now' is unexpected"));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-parameters","arguments":{"max-postcopy-bandwidth":1048576}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#);
        assert_eq!(r["return"]["max-postcopy-bandwidth"], 1048576, "{r}");

        // In postcopy the guest runs on the destination: migrate_cancel is refused
        // and the status stays.
        let stats = mon.source().stats();
        stats.set_status(MigrationStatus::PostcopyActive);
        let r = one(&mon, &mut s, r#"{"execute":"migrate_cancel"}"#);
        let (class, desc) = err(&r);
        assert_eq!(class, "GenericError", "{r}");
        assert!(
            desc.starts_with("Postcopy migration in progress, cannot cancel"),
            "{r}"
        );
        assert_eq!(stats.status(), MigrationStatus::PostcopyActive);
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate"}"#);
        assert_eq!(r["return"]["status"], "postcopy-active", "{r}");
        // Finished: nothing to cancel, `{}` as QEMU answers.
        stats.set_status(MigrationStatus::Completed);
        let r = one(&mon, &mut s, r#"{"execute":"migrate_cancel"}"#);
        assert_eq!(r, json!({"return": {}}));

        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","resume":true}}"#,
        );
        assert_eq!(
            err(&r),
            (
                "GenericError",
                "Cannot resume if there is no paused migration"
            )
        );
    }

    /// QEMU's texts of the recovery commands in the wrong state.
    const NOT_PAUSED: &str = "Migrate recover can only be run when postcopy is paused.";
    const PAUSE_REFUSED: &str =
        "migrate-pause is currently only supported during postcopy-active or postcopy-recover state";
    const NO_PAUSED: &str = "Cannot resume if there is no paused migration";

    /// The MIGRATION statuses queued on `rx` until `n` arrived (60 s at most).
    fn migration_events(rx: &crossbeam_channel::Receiver<Arc<str>>, n: usize) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.len() < n {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) else {
                break;
            };
            let ev: Value = serde_json::from_str(&line).expect("an event is JSON");
            if ev["event"] == "MIGRATION" {
                seen.push(ev["data"]["status"].as_str().unwrap_or_default().to_owned());
            }
        }
        seen
    }

    fn events_on(mon: &Arc<Monitor>, s: &mut Session) {
        let r = one(
            mon,
            s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[
                {"capability":"events","state":true}]}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
    }

    #[test]
    fn migrate_continue_answers_as_qemu_outside_pre_switchover() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        assert!(commands().any(|n| n == "migrate-continue"));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-continue","arguments":{"state":"pre-switchover"}}"#,
        );
        assert_eq!(
            err(&r),
            ("GenericError", "Migration not in expected state: none")
        );
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-continue","arguments":{"state":"bogus"}}"#,
        );
        assert_eq!(
            err(&r),
            (
                "GenericError",
                "Parameter 'state' does not accept value 'bogus'"
            )
        );
        let r = one(&mon, &mut s, r#"{"execute":"migrate-continue"}"#);
        assert_eq!(err(&r).0, "GenericError", "{r}");
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"pause-before-switchover","state":true}]}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
    }

    #[test]
    fn dirty_limit_commands_answer_as_qemu_without_a_ring() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        for c in [
            "set-vcpu-dirty-limit",
            "cancel-vcpu-dirty-limit",
            "query-vcpu-dirty-limit",
        ] {
            assert!(commands().any(|n| n == c), "{c} is listed");
        }
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"set-vcpu-dirty-limit","arguments":{"dirty-rate":10}}"#,
        );
        assert_eq!(
            err(&r).1,
            "dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set'"
        );
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"set-vcpu-dirty-limit","arguments":{"cpu-index":-1,"dirty-rate":10}}"#,
        );
        assert_eq!(err(&r).1, "incorrect cpu index specified");
        let r = one(&mon, &mut s, r#"{"execute":"cancel-vcpu-dirty-limit"}"#);
        assert_eq!(r, json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-vcpu-dirty-limit"}"#);
        assert_eq!(r, json!({"return": []}));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"dirty-limit","state":true}]}}"#,
        );
        assert_eq!(
            err(&r).1,
            "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set"
        );
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-parameters","arguments":{"x-vcpu-dirty-limit-period":0}}"#,
        );
        assert!(err(&r).1.contains("x-vcpu-dirty-limit-period"), "{r}");
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-set-parameters","arguments":{"x-vcpu-dirty-limit-period":500,"vcpu-dirty-limit":50}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate-parameters"}"#);
        assert_eq!(r["return"]["x-vcpu-dirty-limit-period"], 500);
        assert_eq!(r["return"]["vcpu-dirty-limit"], 50);
    }

    #[test]
    fn recovery_commands_on_the_source() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        events_on(&mon, &mut s);
        for c in ["migrate-recover", "migrate-pause"] {
            assert!(commands().any(|n| n == c), "{c}");
        }
        // query-qmp-schema: QEMU's signatures (migrate-recover takes `uri`,
        // migrate-pause nothing; both return nothing).
        let schema = qmp_schema();
        let entry = |name: &str| {
            schema
                .as_array()
                .and_then(|l| l.iter().find(|e| e["name"] == name))
                .cloned()
                .unwrap_or_default()
        };
        let recover = entry("migrate-recover");
        assert_eq!(recover["meta-type"], "command", "{recover}");
        assert_eq!(recover["ret-type"], "0", "{recover}");
        let arg = entry(recover["arg-type"].as_str().unwrap_or_default());
        assert_eq!(
            arg["members"],
            json!([{"name": "uri", "type": "str"}]),
            "{arg}"
        );
        let pause = entry("migrate-pause");
        assert_eq!(
            (&pause["arg-type"], &pause["ret-type"]),
            (&json!("0"), &json!("0")),
            "{pause}"
        );
        let pause = r#"{"execute":"migrate-pause"}"#;
        let recover = r#"{"execute":"migrate-recover","arguments":{"uri":"tcp:127.0.0.1:0"}}"#;
        let resume = r#"{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","resume":true}}"#;
        // No migration at all.
        assert_eq!(
            err(&one(&mon, &mut s, pause)),
            ("GenericError", PAUSE_REFUSED)
        );
        assert_eq!(
            err(&one(&mon, &mut s, recover)),
            ("GenericError", NOT_PAUSED)
        );
        assert_eq!(err(&one(&mon, &mut s, resume)), ("GenericError", NO_PAUSED));
        // Arguments as QAPI checks them.
        let r = one(&mon, &mut s, r#"{"execute":"migrate-recover"}"#);
        assert_eq!(err(&r), ("GenericError", "Parameter 'uri' is missing"));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-pause","arguments":{"now":true}}"#,
        );
        assert_eq!(err(&r), ("GenericError", "Parameter 'now' is unexpected"));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","resume":true,"blk":true}}"#,
        );
        assert_eq!(
            err(&r),
            (
                "GenericError",
                "Parameter 'blk': Ferry has no block migration"
            )
        );

        let stats = mon.source().stats();
        // postcopy-active without a stream (the engine's check, the same text).
        stats.set_status(MigrationStatus::PostcopyActive);
        assert_eq!(
            err(&one(&mon, &mut s, pause)),
            ("GenericError", PAUSE_REFUSED)
        );
        assert_eq!(err(&one(&mon, &mut s, resume)), ("GenericError", NO_PAUSED));
        // Paused: neither a second pause nor a cancel; the status stays.
        stats.set_status(MigrationStatus::PostcopyPaused);
        assert_eq!(
            err(&one(&mon, &mut s, pause)),
            ("GenericError", PAUSE_REFUSED)
        );
        let r = one(&mon, &mut s, r#"{"execute":"migrate_cancel"}"#);
        assert!(
            err(&r)
                .1
                .starts_with("Postcopy migration in progress, cannot cancel"),
            "{r}"
        );
        assert_eq!(stats.status(), MigrationStatus::PostcopyPaused);
        // The source is no destination: nothing to recover here.
        assert_eq!(
            err(&one(&mon, &mut s, recover)),
            ("GenericError", NOT_PAUSED)
        );
        // A resume reaches the engine: a bad address is refused, the status stays.
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate","arguments":{"uri":"nowhere","resume":true}}"#,
        );
        assert_eq!(err(&r).0, "GenericError", "{r}");
        assert_eq!(stats.status(), MigrationStatus::PostcopyPaused);
        let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        mon.subscribe(tx);
        assert_eq!(one(&mon, &mut s, resume), json!({"return": {}}));
        assert_eq!(migration_events(&rx, 1), ["postcopy-recover"]);
        let r = one(&mon, &mut s, r#"{"execute":"query-migrate"}"#);
        assert_eq!(r["return"]["status"], "postcopy-recover", "{r}");
        // Resuming already: no second resume, no cancel.
        assert_eq!(err(&one(&mon, &mut s, resume)), ("GenericError", NO_PAUSED));
        let r = one(&mon, &mut s, r#"{"execute":"migrate_cancel"}"#);
        assert!(
            err(&r)
                .1
                .starts_with("Postcopy migration in progress, cannot cancel"),
            "{r}"
        );
        assert_eq!(stats.status(), MigrationStatus::PostcopyRecover);
    }

    #[test]
    fn recovery_commands_on_the_destination() {
        let dst = monitor(IncomingStart::Defer);
        let mut s = negotiated(&dst);
        events_on(&dst, &mut s);
        let pause = r#"{"execute":"migrate-pause"}"#;
        let recover = r#"{"execute":"migrate-recover","arguments":{"uri":"tcp:127.0.0.1:0"}}"#;
        // Before migrate-incoming.
        assert_eq!(
            err(&one(&dst, &mut s, recover)),
            ("GenericError", NOT_PAUSED)
        );
        assert_eq!(
            err(&one(&dst, &mut s, pause)),
            ("GenericError", PAUSE_REFUSED)
        );
        let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        dst.subscribe(tx);
        let r = one(
            &dst,
            &mut s,
            r#"{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        // Listening (setup): the engine's checks, QEMU's texts.
        assert_eq!(
            err(&one(&dst, &mut s, recover)),
            ("GenericError", NOT_PAUSED)
        );
        assert_eq!(
            err(&one(&dst, &mut s, pause)),
            ("GenericError", PAUSE_REFUSED)
        );
        let stats = match &*lock(&dst.incoming) {
            IncomingState::Started(stats, _) => stats.clone(),
            _ => panic!("migrate-incoming did not start"),
        };
        // postcopy-active with no stream received yet (just after the commit): the
        // engine pauses the stream as soon as it is.
        stats.set_status(MigrationStatus::PostcopyActive);
        assert_eq!(one(&dst, &mut s, pause), json!({"return": {}}));
        // Paused: a recovery address, then no second one while it is pending.
        stats.set_status(MigrationStatus::PostcopyPaused);
        assert_eq!(
            err(&one(&dst, &mut s, pause)),
            ("GenericError", PAUSE_REFUSED)
        );
        let r = one(
            &dst,
            &mut s,
            r#"{"execute":"migrate-recover","arguments":{"uri":"bogus:x"}}"#,
        );
        assert_eq!(err(&r).0, "GenericError", "{r}");
        assert_eq!(one(&dst, &mut s, recover), json!({"return": {}}));
        assert_eq!(
            err(&one(&dst, &mut s, recover)),
            ("GenericError", "Migrate recovery is triggered already")
        );
        // Every status gets its event, in order, even one that lasts an instant.
        stats.set_status(MigrationStatus::PostcopyRecover);
        stats.set_status(MigrationStatus::PostcopyActive);
        stats.set_status(MigrationStatus::Completed);
        assert_eq!(
            migration_events(&rx, 5),
            [
                "setup",
                "postcopy-active",
                "postcopy-paused",
                "postcopy-recover",
                "postcopy-active"
            ]
        );
        assert_eq!(migration_events(&rx, 1), ["completed"]);
    }

    #[test]
    fn run_states() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        assert_eq!(
            one(&mon, &mut s, r#"{"execute":"stop"}"#),
            json!({"return": {}})
        );
        let r = one(&mon, &mut s, r#"{"execute":"query-status"}"#);
        assert_eq!(
            r["return"],
            json!({"running": false, "singlestep": false, "status": "paused"})
        );
        one(&mon, &mut s, r#"{"execute":"cont"}"#);
        assert_eq!(mon.run_state(), RunState::Running);
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}"#,
        );
        assert_eq!(
            err(&r).1,
            "'-incoming' was not specified on the command line"
        );

        let dst = monitor(IncomingStart::Defer);
        let mut s = negotiated(&dst);
        assert_eq!(dst.run_state(), RunState::Inmigrate);
        let r = one(
            &dst,
            &mut s,
            r#"{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1"}}"#,
        );
        assert_eq!(err(&r).1, "Guest is waiting for an incoming migration");
        let r = one(
            &dst,
            &mut s,
            r#"{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(&dst, &mut s, r#"{"execute":"query-migrate"}"#);
        assert_eq!(r["return"]["status"], "setup");
        let r = one(
            &dst,
            &mut s,
            r#"{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}"#,
        );
        assert_eq!(err(&r).1, "The incoming migration has already been started");
        assert_eq!(dst.run_state(), RunState::Inmigrate);
    }

    #[test]
    fn ram_digest_only_while_paused() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        let q = r#"{"execute":"x-ferry-query-ram-digest"}"#;
        let r = one(&mon, &mut s, q);
        assert_eq!(err(&r), ("GenericError", "the guest must be paused"));
        one(&mon, &mut s, r#"{"execute":"stop"}"#);
        let r = one(&mon, &mut s, q);
        // 4 MiB of zeros: every page is skipped, the digest is the empty one.
        assert_eq!(r, json!({"return": {"digest": 0, "pages": 1024}}));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"x-ferry-query-ram-digest","arguments":{"x":1}}"#,
        );
        assert_eq!(err(&r), ("GenericError", "Parameter 'x' is unexpected"));
        one(&mon, &mut s, r#"{"execute":"cont"}"#);
        let r = one(&mon, &mut s, q);
        assert_eq!(err(&r).1, "the guest must be paused");
        // A destination that has not started its guest is not running either.
        let dst = monitor(IncomingStart::Defer);
        let mut s = negotiated(&dst);
        let r = one(&dst, &mut s, q);
        assert_eq!(r["return"]["pages"], 1024, "{r}");
    }

    #[test]
    fn calc_dirty_rate_reply_comes_after_measuring() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        let r = one(&mon, &mut s, r#"{"execute":"query-dirty-rate"}"#);
        assert_eq!(r["return"]["status"], "unstarted");
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":100,"calc-time-unit":"millisecond","sample-pages":128}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-dirty-rate"}"#);
        assert_eq!(r["return"]["status"], "measuring");
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1}}"#,
        );
        assert!(err(&r).1.contains("already being measured"), "{r}");
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":1,"mode":"sideways"}}"#,
        );
        assert_eq!(
            err(&r).1,
            "Parameter 'mode' does not accept value 'sideways'"
        );
    }

    #[test]
    fn human_monitor_command() {
        let vm = TestVm::new(4 << 20);
        assert!(vm.mem.write_volatile(0x1000, &5u64.to_le_bytes()));
        let mon = Monitor::new(
            Arc::new(VcpuMachine(2)),
            vm.clone(),
            IncomingStart::None,
            true,
        )
        .expect("monitor");
        let mut s = negotiated(&mon);
        assert!(commands().any(|c| c == "human-monitor-command"));
        assert_eq!(
            hmp(&mon, &mut s, "xp /2gx 0x1000"),
            json!({"return": "0000000000001000: 0x0000000000000005 0x0000000000000000\r\n"})
        );
        // The guest's writes show at once (no copy in between).
        assert!(vm.mem.write_volatile(0x1008, &(-2i64).to_le_bytes()));
        assert_eq!(
            hmp(&mon, &mut s, "xp /2gd 0x1000"),
            json!({"return": "0000000000001000:                    5                   -2\r\n"})
        );
        // The last byte of RAM, then past it.
        assert_eq!(
            hmp(&mon, &mut s, "xp /2bx 0x3fffff"),
            json!({"return": "00000000003fffff: Cannot access memory\r\n"})
        );
        assert_eq!(
            hmp(&mon, &mut s, "xp /1bx 0x3fffff"),
            json!({"return": "00000000003fffff: 0x00\r\n"})
        );
        assert_eq!(
            hmp(&mon, &mut s, "xp /gx 0x400000"),
            json!({"return": "0000000000400000: Cannot access memory\r\n"})
        );

        assert_eq!(
            hmp(&mon, &mut s, "info status"),
            json!({"return": "VM status: running\r\n"})
        );
        one(&mon, &mut s, r#"{"execute":"stop"}"#);
        assert_eq!(
            hmp(&mon, &mut s, "info status"),
            json!({"return": "VM status: paused\r\n"})
        );
        one(&mon, &mut s, r#"{"execute":"cont"}"#);
        assert_eq!(
            hmp(&mon, &mut s, "info status"),
            json!({"return": "VM status: running\r\n"})
        );
        assert_eq!(
            hmp(&mon, &mut s, "frobnicate 1"),
            json!({"return": "unknown command: 'frobnicate'\r\n"})
        );
        assert_eq!(hmp(&mon, &mut s, "info migrate"), json!({"return": ""}));

        // Arguments as QAPI checks them; cpu-index must name a vCPU.
        for (args, desc) in [
            (json!({}), "Parameter 'command-line' is missing"),
            (
                json!({"command-line": 1}),
                "Invalid parameter type for 'command-line', expected: string",
            ),
            (
                json!({"command-line": "info status", "cpu-index": 2}),
                "Parameter 'cpu-index' expects a CPU number",
            ),
            (
                json!({"command-line": "info status", "cpu-index": -1}),
                "Parameter 'cpu-index' expects a CPU number",
            ),
            (
                json!({"command-line": "info status", "x": 1}),
                "Parameter 'x' is unexpected",
            ),
        ] {
            let req = json!({"execute": "human-monitor-command", "arguments": args});
            let r = one(&mon, &mut s, &req.to_string());
            assert_eq!(err(&r), ("GenericError", desc), "{args}");
        }
        let req = json!({"execute": "human-monitor-command",
                         "arguments": {"command-line": "info status", "cpu-index": 1}});
        assert_eq!(
            one(&mon, &mut s, &req.to_string()),
            json!({"return": "VM status: running\r\n"})
        );
    }

    #[test]
    fn info_status_of_a_destination() {
        let dst = monitor(IncomingStart::Defer);
        let mut s = negotiated(&dst);
        assert_eq!(
            hmp(&dst, &mut s, "info status"),
            json!({"return": "VM status: paused (inmigrate)\r\n"})
        );
        one(
            &dst,
            &mut s,
            r#"{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:0"}}"#,
        );
        let r = hmp(&dst, &mut s, "info migrate");
        assert!(
            r["return"]
                .as_str()
                .is_some_and(|t| t.starts_with("Migration status: setup\r\ntotal time: ")),
            "{r}"
        );
    }

    #[test]
    fn cancel_dirty_rate() {
        let mon = monitor(IncomingStart::None);
        let mut s = negotiated(&mon);
        let cancel = r#"{"execute":"x-ferry-cancel-dirty-rate"}"#;
        // Nothing measuring: accepted, nothing changes.
        assert_eq!(one(&mon, &mut s, cancel), json!({"return": {}}));
        let r = one(&mon, &mut s, r#"{"execute":"query-dirty-rate"}"#);
        assert_eq!(r["return"]["status"], "unstarted");
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"calc-dirty-rate","arguments":{"calc-time":60}}"#,
        );
        assert_eq!(r, json!({"return": {}}));
        let t0 = std::time::Instant::now();
        assert_eq!(one(&mon, &mut s, cancel), json!({"return": {}}));
        // A 60 s window ends at once (the bound is only slack for a loaded machine).
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        let r = one(&mon, &mut s, r#"{"execute":"query-dirty-rate"}"#);
        assert_eq!(r["return"]["status"], "measured", "{r}");
        assert_eq!(r["return"]["dirty-rate"], -1, "{r}");
        assert_eq!(r["return"]["x-ferry"]["cancelled"], true, "{r}");
        assert_eq!(one(&mon, &mut s, cancel), json!({"return": {}}));
        let r = one(
            &mon,
            &mut s,
            r#"{"execute":"x-ferry-cancel-dirty-rate","arguments":{"now":true}}"#,
        );
        assert_eq!(err(&r), ("GenericError", "Parameter 'now' is unexpected"));
    }
}
