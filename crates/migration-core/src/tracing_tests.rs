//! The engine's tracing spans and events, seen by a subscriber that records them:
//! a whole migration over loopback TCP between two in-process guests, and a
//! migration to a closed port.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use stats::MigrationStatus;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::testing::TestVm;
use crate::{incoming, MigrationSource};

/// A span's or an event's fields, as text (strings without quotes).
#[derive(Clone, Debug, Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
}

/// One recorded event and the spans it happened in, outermost first.
#[derive(Clone, Debug)]
struct Captured {
    level: Level,
    fields: Fields,
    spans: Vec<(String, Fields)>,
}

impl Captured {
    fn message(&self) -> &str {
        self.fields.0.get("message").map_or("", String::as_str)
    }

    fn field(&self, name: &str) -> Option<&str> {
        self.fields.0.get(name).map(String::as_str)
    }

    /// The fields of the enclosing span `name`, if the event is inside one.
    fn span(&self, name: &str) -> Option<&Fields> {
        self.spans.iter().find(|(n, _)| n == name).map(|(_, f)| f)
    }
}

/// Every event of the process (tests run in parallel: each picks its own by the URI
/// of its span).
static EVENTS: Mutex<Vec<Captured>> = Mutex::new(Vec::new());

/// A layer that records into [`EVENTS`].
struct Capture;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(f);
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(f) = span.extensions_mut().get_mut::<Fields>() {
                values.record(f);
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let spans = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .map(|s| {
                        let f = s.extensions().get::<Fields>().cloned().unwrap_or_default();
                        (s.name().to_string(), f)
                    })
                    .collect()
            })
            .unwrap_or_default();
        EVENTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Captured {
                level: *event.metadata().level(),
                fields,
                spans,
            });
    }
}

/// Installs the recording subscriber for the whole process (the migration runs on
/// threads of its own, which a thread-local subscriber would not see).
fn capture() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        tracing_subscriber::registry()
            .with(Capture)
            .try_init()
            .expect("no other global subscriber in this test binary");
    });
}

/// The recorded events inside a span `span` whose `uri` is `uri`.
fn events_in(span: &str, uri: &str) -> Vec<Captured> {
    EVENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|e| {
            e.span(span)
                .is_some_and(|f| f.0.get("uri").map(String::as_str) == Some(uri))
        })
        .cloned()
        .collect()
}

/// The first event with `message`, and its position.
fn find<'a>(events: &'a [Captured], message: &str) -> (usize, &'a Captured) {
    events
        .iter()
        .enumerate()
        .find(|(_, e)| e.message() == message)
        .unwrap_or_else(|| {
            let seen: Vec<&str> = events.iter().map(Captured::message).collect();
            panic!("no event {message:?} among {seen:?}")
        })
}

/// A number field of `e`.
fn num(e: &Captured, name: &str) -> u64 {
    let v = e
        .field(name)
        .unwrap_or_else(|| panic!("{:?} has no field {name}: {e:?}", e.message()));
    v.parse()
        .unwrap_or_else(|_| panic!("{name} = {v:?} is not a number"))
}

/// 1 MiB of RAM, every byte `fill`, in one block "ram0".
fn guest(fill: u8) -> Arc<TestVm> {
    TestVm::filled(1 << 20, fill)
}

/// Waits (at most a generous minute) until the source's migration is finished.
fn finished(source: &MigrationSource) -> MigrationStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = source.stats().status();
        if s.is_finished() {
            return source.wait();
        }
        assert!(Instant::now() < deadline, "still {s:?} after 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_migration_logs_its_span_passes_switchover_and_completion() {
    capture();
    let dst = incoming(guest(0), "tcp:127.0.0.1:0", false).expect("listen");
    let uri = dst.uri().to_string();
    let source = MigrationSource::new(guest(0x5a));
    source.migrate(&uri).expect("migrate");
    assert_eq!(finished(&source), MigrationStatus::Completed);
    let report = dst.wait().expect("destination");
    assert!(report.resumed);

    let src = events_in("migration", &uri);
    let span = src[0].span("migration").expect("span");
    assert_eq!(span.0.get("channels").map(String::as_str), Some("1"));
    let (setup, _) = find(&src, "setup done: dirty log on, precopy starts");
    let (start, first) = find(&src, "pass start");
    assert_eq!(first.level, Level::INFO);
    assert_eq!(num(first, "pass"), 1);
    assert_eq!(
        num(first, "dirty_pages"),
        256,
        "every page of the 1 MiB guest"
    );
    let (end, pass) = find(&src, "pass end");
    assert_eq!(num(pass, "pass"), 1);
    assert_eq!(num(pass, "sent_pages"), 256);
    assert!(num(pass, "sent_bytes") > 0);
    let _ = num(pass, "duration_ms");
    let _ = num(pass, "dirty_pages");
    let (switch, decision) = find(&src, "converged: switching over");
    assert_eq!(decision.level, Level::INFO);
    assert_eq!(num(decision, "downtime_limit_ms"), 300);
    assert!(num(decision, "bandwidth_bytes_per_sec") > 0);
    let _ = num(decision, "remaining_bytes");
    // Known (an Option recorded only when Some) and within the limit.
    assert!(num(decision, "expected_downtime_ms") <= 300);
    let (pause, _) = find(&src, "switch-over: guest paused (finish-migrate)");
    let (final_pass, last) = find(&src, "final pass sent (guest paused)");
    let passes = src.iter().filter(|e| e.message() == "pass end").count() as u64;
    assert_eq!(num(last, "pass"), passes + 1, "{last:?}");
    let (saved, device) = find(&src, "device state saved");
    assert_eq!(num(device, "device_state_bytes"), 0);
    let (commit, _) = find(&src, "switch-over: Commit sent");
    let (ack, _) = find(&src, "switch-over: Ack received");
    let (done, completed) = find(&src, "migration completed");
    assert_eq!(completed.level, Level::INFO);
    let _ = num(completed, "total_ms");
    let _ = num(completed, "downtime_ms");
    assert_eq!(
        num(completed, "transferred_bytes"),
        source
            .stats()
            .transferred_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let order = [
        setup, start, end, switch, pause, final_pass, saved, commit, ack, done,
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "order {order:?}");

    let dst_events = events_in("incoming", &uri);
    let (accepted, a) = find(&dst_events, "incoming stream accepted");
    assert_eq!(num(a, "channels"), 1);
    let (loaded, _) = find(&dst_events, "device state loaded");
    let (committed, _) = find(&dst_events, "switch-over: Commit received");
    let (acked, _) = find(&dst_events, "switch-over: Ack sent");
    let (dst_done, d) = find(&dst_events, "incoming migration completed");
    assert_eq!(num(d, "received_bytes"), report.received_bytes);
    let order = [accepted, loaded, committed, acked, dst_done];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "order {order:?}");
    // The span learnt the stream's channel count once it was accepted.
    assert_eq!(
        d.span("incoming")
            .and_then(|f| f.0.get("channels"))
            .map(String::as_str),
        Some("1")
    );
}

#[test]
fn a_migration_to_a_closed_port_logs_the_error() {
    capture();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let uri = format!("tcp:127.0.0.1:{port}");
    let source = MigrationSource::new(guest(1));
    source.migrate(&uri).expect("migrate starts");
    assert_eq!(finished(&source), MigrationStatus::Failed);
    let desc = source.stats().error().expect("error-desc").to_string();
    let src = events_in("migration", &uri);
    let (_, failed) = find(&src, "migration failed");
    assert_eq!(failed.level, Level::ERROR);
    assert_eq!(failed.field("error"), Some(desc.as_str()));
    assert!(desc.to_lowercase().contains("refused"), "{desc}");
    assert!(src.iter().all(|e| e.message() != "migration completed"));
}
