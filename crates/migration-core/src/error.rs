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
    /// Postcopy's missing-page plane (userfaultfd) failed.
    #[error("postcopy: {0}")]
    Postcopy(#[from] uffd::Error),
    /// `cancel()` was called.
    #[error("migration cancelled")]
    Cancelled,
    /// Code on an engine thread panicked (a bug, often in a VMM callback): says
    /// which thread and the panic's message.
    #[error("{0}")]
    Panicked(String),
}

impl Error {
    /// The error for a panic caught on `thread` (e.g. "the migration thread"), with
    /// the message `payload` carries (a `&str` or `String`, as `panic!` makes).
    pub(crate) fn panicked(thread: &str, payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(a panic without a message)");
        Error::Panicked(format!("{thread} panicked: {message}"))
    }
}

/// The migration-core result type.
pub type Result<T> = std::result::Result<T, Error>;
