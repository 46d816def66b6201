//! The migration-core error type.

/// Everything that can stop a migration or a dirty-rate job.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter or argument out of range (QMP GenericError text).
    #[error("{0}")]
    InvalidParameter(String),
    /// A migration or measurement is already running.
    #[error("{0}")]
    Busy(String),
    /// The wire failed (connect, send, receive, a corrupt or cut stream).
    #[error("{0}")]
    Transport(#[from] transport::Error),
    /// The dirty-log plane failed.
    #[error("dirty log: {0}")]
    DirtyLog(#[from] dirty_sync::Error),
    /// The VMM's guest callbacks failed (pause, resume, device state).
    #[error("guest: {0}")]
    Guest(String),
    /// The two sides disagree on the guest (RAM blocks, page size).
    #[error("incompatible stream: {0}")]
    Incompatible(String),
    /// `cancel()` was called.
    #[error("migration cancelled")]
    Cancelled,
}

/// The migration-core result type.
pub type Result<T> = std::result::Result<T, Error>;
