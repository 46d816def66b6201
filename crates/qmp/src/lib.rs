//! Ferry's QMP server: the QEMU Machine Protocol over a unix or tcp socket, so the
//! tools that drive QEMU migrations (libvirt, KubeVirt, `qemu.qmp` scripts) drive
//! Ferry's unchanged.
//!
//! A VMM implements [`Machine`] (quit, a failed incoming migration), builds a [`Monitor`]
//! over it and its [`migration_core::MigratableVm`], and [`Server::bind`]s it to an
//! address. The monitor owns the migration source, the incoming migration and the
//! dirty-rate job; `query-migrate` reads the engine's atomics and never waits for the
//! migration thread.

mod args;
mod error;
mod framing;
mod hmp;
mod machine;
mod monitor;
pub mod schema;
mod server;

pub use args::Args;
pub use error::{Error, ErrorClass, QmpError, Result};
pub use framing::{Frame, Framer, MAX_MESSAGE_BYTES, MAX_NESTING};
pub use hmp::MAX_DUMP_OUTPUT_BYTES;
pub use machine::Machine;
pub use migration_core::{RunControl, RunState};
pub use monitor::{
    commands, error_reply, event_json, qmp_schema, version_info, After, IncomingStart, Monitor,
    Session, EVENT_QUEUE, PACKAGE, QEMU_VERSION,
};
pub use server::{
    answer, greeting, Address, Server, ServerOptions, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT, MAX_CLIENTS,
};
