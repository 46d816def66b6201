//! The crate's single error type.

/// Everything that can go wrong building, running or migrating a [`crate::MiniVm`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A workload string did not parse.
    #[error(
        "invalid workload {input:?}: accepted forms are `idle`, `working-set=PAGES` or \
         `working-set=SIZE` (SIZE with K/M/G suffix, e.g. 16M), `sweep=PAGES_PER_SEC`, \
         `random=SEED,HOT_PERCENT` (e.g. random=42,80), `dense=PAGES[,BYTES]` (BYTES a \
         multiple of 8 up to 4096, e.g. dense=65536,256), `zipf=PAGES[,WRITES_PER_SEC]` \
         (e.g. zipf=65536,200000)"
    )]
    BadWorkload {
        /// The rejected text.
        input: String,
    },
    /// The dirty-log plane refused the guest's memory or listeners.
    #[error("dirty log: {0}")]
    DirtyLog(#[source] dirty_sync::Error),
    /// A size string did not parse.
    #[error(
        "invalid size {input:?}: expected bytes with an optional K/M/G suffix, e.g. 4096, 512M, 1G"
    )]
    BadSize {
        /// The rejected text.
        input: String,
    },
    /// The configuration is invalid.
    #[error("invalid VM config: {0}")]
    Config(String),
    /// /dev/kvm could not be opened although the KVM backend was requested.
    #[error("KVM is not usable (/dev/kvm): {0}")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// Which operation failed.
        op: &'static str,
        /// The kernel's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The host could not map the guest RAM.
    #[error("cannot map {mem_bytes} bytes of guest RAM: {reason}")]
    MapMemory {
        /// Requested guest RAM.
        mem_bytes: u64,
        /// What vm-memory said.
        reason: String,
    },
    /// Guest memory access failed.
    #[error("guest memory access failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The dirty ring cannot be set up as asked.
    #[error("dirty ring: {0}")]
    DirtyRing(String),
    /// The operation needs the vCPUs paused (or not yet started).
    #[error("vCPUs must be paused or not started for this operation")]
    NotPaused,
    /// `start` was called twice.
    #[error("the VM is already started")]
    AlreadyStarted,
    /// A vCPU index out of range.
    #[error("no vCPU {vcpu} (the VM has {vcpus})")]
    NoSuchVcpu {
        /// Requested index.
        vcpu: u32,
        /// vCPUs in the VM.
        vcpus: u32,
    },
    /// A state blob does not start with the expected magic bytes.
    #[error("state blob has wrong magic bytes (not a ferry-minivm state blob)")]
    BadMagic,
    /// A state blob of an unknown format version.
    #[error("state blob format version {found} is not supported (expected {expected})")]
    UnsupportedVersion {
        /// Version in the blob.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// A state blob ended early or has a malformed record.
    #[error("state blob truncated or malformed: {0}")]
    Truncated(String),
    /// A state blob for a different number of vCPUs.
    #[error("state blob has {blob} vCPUs but the VM has {vm}")]
    VcpuCountMismatch {
        /// vCPUs in the blob.
        blob: u32,
        /// vCPUs in the VM.
        vm: u32,
    },
    /// A state blob from the other backend (KVM vs host threads).
    #[error("state blob is for backend {blob:?} but the VM runs {vm:?}")]
    BackendMismatch {
        /// Backend name recorded in the blob.
        blob: &'static str,
        /// This VM's backend name.
        vm: &'static str,
    },
    /// `wait_rounds` timed out.
    #[error("vCPU {vcpu} did only {done_rounds} of {wanted_rounds} rounds before the timeout")]
    Timeout {
        /// The vCPU waited on.
        vcpu: u32,
        /// Rounds seen.
        done_rounds: u64,
        /// Rounds wanted.
        wanted_rounds: u64,
    },
    /// A vCPU stopped on an unexpected exit.
    #[error("vCPU {vcpu} stopped: {reason}")]
    VcpuStopped {
        /// The vCPU.
        vcpu: u32,
        /// Why it stopped.
        reason: String,
    },
    /// An OS-level failure (thread spawn, signal registration).
    #[error("{what}: {source}")]
    Os {
        /// What was attempted.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for mapping a kvm-ioctls error with the operation's name.
pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
