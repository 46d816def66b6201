//! The qmp error types: the crate's own failures, and the error replies QMP sends.

use serde::Serialize;

/// What can go wrong setting up or running the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address is not `unix:PATH` or `tcp:HOST:PORT`.
    #[error("invalid QMP address {0:?} (expected unix:PATH or tcp:HOST:PORT)")]
    InvalidAddress(String),
    /// Binding or accepting on the socket failed.
    #[error("QMP socket {addr}: {source}")]
    Socket {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a QMP thread: {0}")]
    Thread(std::io::Error),
    /// A server option is out of range (zero clients, a zero timeout).
    #[error("invalid QMP server option: {0}")]
    InvalidOption(String),
    /// The `--incoming` URI could not be listened on.
    #[error("incoming migration: {0}")]
    Incoming(String),
}

/// The qmp result type.
pub type Result<T> = std::result::Result<T, Error>;

/// QEMU's error classes (QapiErrorClass), the ones Ferry answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Everything that is not one of the other classes.
    GenericError,
    /// No such command, or a command before/after capability negotiation.
    CommandNotFound,
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QmpError {
    /// The class.
    pub class: ErrorClass,
    /// Human-readable text (QEMU's wording where QEMU has the same error).
    pub desc: String,
}

impl QmpError {
    /// A GenericError with `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// A CommandNotFound with `desc`.
    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError {
            class: ErrorClass::CommandNotFound,
            desc: desc.into(),
        }
    }
}

impl From<migration_core::Error> for QmpError {
    fn from(e: migration_core::Error) -> Self {
        QmpError::generic(e.to_string())
    }
}
