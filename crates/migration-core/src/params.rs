//! Migration parameters and capabilities, with QEMU's names, units and defaults.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Page compression on the wire (QEMU's `multifd-compression`, the values Ferry has).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompressionParam {
    /// Pages travel raw.
    #[default]
    None,
    /// Page batches are zstd-compressed.
    Zstd,
}

/// QEMU's migration mode (`mode`, 8.2); Ferry has only the normal one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigMode {
    /// The ordinary migration.
    #[default]
    Normal,
}

/// The tunables of a migration (`query-migrate-parameters`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Initial delay before the first self-announce, ms (QEMU only: accepted at 50).
    pub announce_initial: u64,
    /// Longest delay between announce packets, ms (QEMU only: accepted at 550).
    pub announce_max: u64,
    /// Self-announce packets after migration (QEMU only: accepted at 5).
    pub announce_rounds: u64,
    /// Delay increase between announce packets, ms (QEMU only: accepted at 100).
    pub announce_step: u64,
    /// Legacy compression level (QEMU only, deprecated: accepted at 1).
    pub compress_level: u8,
    /// Legacy compression threads (QEMU only, deprecated: accepted at 8).
    pub compress_threads: u8,
    /// Legacy compression waits for a free thread (QEMU only, deprecated: accepted at true).
    pub compress_wait_thread: bool,
    /// Legacy decompression threads (QEMU only, deprecated: accepted at 2).
    pub decompress_threads: u8,
    /// Send-rate cap, bytes/s; 0 = unlimited. QEMU's default is 128 MiB/s.
    pub max_bandwidth: u64,
    /// Bandwidth to assume at switch-over, bytes/s; 0 = use the measured one.
    pub avail_switchover_bandwidth: u64,
    /// Longest acceptable pause of the guest, ms.
    pub downtime_limit: u64,
    /// Parallel page channels when the `multifd` capability is on.
    pub multifd_channels: u8,
    /// Page compression.
    pub multifd_compression: CompressionParam,
    /// Auto-converge triggers when dirtied bytes exceed this percentage of sent bytes.
    pub throttle_trigger_threshold: u8,
    /// First throttle step, percent.
    pub cpu_throttle_initial: u8,
    /// Later throttle steps, percent.
    pub cpu_throttle_increment: u8,
    /// Throttle ceiling, percent.
    pub max_cpu_throttle: u8,
    /// Smaller throttle steps at the tail (QEMU only: accepted at false).
    pub cpu_throttle_tailslow: bool,
    /// Id of the `tls-creds-x509` object whose credentials secure every `tcp:`
    /// connection with TLS 1.3 (endpoint client on the source, server on the
    /// destination); empty (default): plaintext.
    pub tls_creds: String,
    /// The name the destination's certificate must be valid for; empty (default):
    /// the host of the migration URI.
    pub tls_hostname: String,
    /// Destination: id of the `authz-list` object of client certificate names
    /// allowed to migrate here; empty (default): any certificate the CA signed.
    pub tls_authz: String,
    /// COLO checkpoint period, ms (QEMU only: accepted at 20000).
    pub x_checkpoint_delay: u32,
    /// Old-style incremental block migration (QEMU only, deprecated: accepted at false).
    pub block_incremental: bool,
    /// XBZRLE cache, bytes (QEMU only: accepted at 64 MiB).
    pub xbzrle_cache_size: u64,
    /// Postcopy: the background stream's bandwidth cap after the switch, bytes/s
    /// (0: unlimited, QEMU's default). Requested pages are never limited.
    pub max_postcopy_bandwidth: u64,
    /// zlib level for multifd (QEMU only: accepted at 1).
    pub multifd_zlib_level: u8,
    /// zstd level for multifd (QEMU's; Ferry's zstd uses its own level, so accepted at 1).
    pub multifd_zstd_level: u8,
    /// Dirty-limit period, ms (1..=1000; QEMU's default 1000): how often the limiter
    /// measures each vCPU's dirty rate and adjusts its throttle.
    pub x_vcpu_dirty_limit_period: u64,
    /// The limit, MiB/s (at least 1, QEMU's default), that a migration with the
    /// `dirty-limit` capability puts on every vCPU when it does not converge.
    pub vcpu_dirty_limit: u64,
    /// Migration mode (QEMU's `mode`: only `normal`).
    pub mode: MigMode,
    /// Ferry's own: send pages with at most 64 non-zero 8-byte words as those words
    /// (transport FORMAT.md, sparse pages). On by default.
    pub x_ferry_sparse_pages: bool,
    /// Ferry's own: QEMU's lazy clear, when the dirty log offers it
    /// ([`dirty_sync::AddressSpace::defers_clear`]): a page is re-protected just
    /// before the sender reads it, not at the sync that found it, and the dirty rate is
    /// counted on a sample of pages ([`dirty_sync::RateSample`]). On by default; off,
    /// every sync re-protects every page it harvested (the guest faults on its whole
    /// working set after each sync).
    pub x_ferry_lazy_clear: bool,
    /// Ferry's own: with the `postcopy-ram` capability, switch to postcopy without
    /// waiting for `migrate-start-postcopy` once the convergence prediction says the
    /// migration will not converge (after a whole dirty-rate period past the first
    /// pass). Off by default, as in QEMU, where only the operator switches.
    pub x_ferry_postcopy_auto: bool,
    /// Ferry's own: most time one connect to the destination may take, ms (at
    /// least 100).
    pub x_ferry_connect_timeout_ms: u64,
    /// Ferry's own: a destination that stops acknowledging or reading is given up
    /// after this long, ms (at least 100): TCP keepalive and `TCP_USER_TIMEOUT`, and
    /// the longest a write may make no progress.
    pub x_ferry_io_timeout_ms: u64,
    /// Ferry's own: most time the switch-over waits for the destination's `Ready`
    /// (the guest then resumes here), and again for its acknowledgement after the
    /// commit (the outcome is then in doubt), ms (at least 100).
    pub x_ferry_switchover_timeout_ms: u64,
    /// QEMU's `block-bitmap-mapping`: how block dirty bitmaps are named on the wire.
    /// Absent until set, as in QEMU. Checked with QEMU's rules and kept; Ferry moves
    /// no block devices, so it maps nothing (QEMU with no bitmaps does the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_bitmap_mapping: Option<Vec<BitmapNodeAlias>>,
}

/// One block node of `block-bitmap-mapping` (QEMU's `BitmapMigrationNodeAlias`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BitmapNodeAlias {
    /// The node's name on this side.
    pub node_name: String,
    /// Its name in the stream (an identifier: a letter, then letters, digits, `-._`).
    pub alias: String,
    /// Its bitmaps to migrate, each under an alias.
    pub bitmaps: Vec<BitmapAlias>,
}

/// One bitmap of a [`BitmapNodeAlias`] (QEMU's `BitmapMigrationBitmapAlias`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BitmapAlias {
    /// The bitmap's name on this side.
    pub name: String,
    /// Its name in the stream.
    pub alias: String,
    /// What changes on the way (QEMU's `BitmapMigrationBitmapAliasTransform`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<BitmapAliasTransform>,
}

/// A bitmap's change in migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BitmapAliasTransform {
    /// The bitmap's persistence on the destination (unset: as on the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
}

/// Longest node alias and bitmap alias, bytes (one length byte on the wire).
const MAX_ALIAS_BYTES: usize = 255;
/// Longest block node name, bytes (QEMU's node-name buffer).
const MAX_NODE_NAME_BYTES: usize = 31;
/// Longest bitmap name, bytes.
const MAX_BITMAP_NAME_BYTES: usize = 1023;

/// QEMU's identifier rule for a node alias: a letter, then letters, digits, `-`, `.`
/// or `_`.
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// QEMU's refusal of a name longer than `max_bytes`.
fn at_most(what: &str, name: &str, max_bytes: usize) -> Result<()> {
    if name.len() > max_bytes {
        return Err(Error::InvalidParameter(format!(
            "The {what} '{name}' is longer than {max_bytes} bytes"
        )));
    }
    Ok(())
}

/// Checks a `block-bitmap-mapping` as QEMU does, with its texts and in its order:
/// every entry's own rules and names mapped twice first, then aliases used twice
/// (the mapping must be one-to-one both ways).
fn check_bitmap_mapping(map: &[BitmapNodeAlias]) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidParameter(m));
    let mut nodes = std::collections::HashSet::new();
    for n in map {
        if !is_identifier(&n.alias) {
            return bad(format!("The node alias '{}' is not well-formed", n.alias));
        }
        at_most("node alias", &n.alias, MAX_ALIAS_BYTES)?;
        at_most("node name", &n.node_name, MAX_NODE_NAME_BYTES)?;
        if !nodes.insert(n.node_name.as_str()) {
            return bad(format!("The node name '{}' is mapped twice", n.node_name));
        }
        let mut names = std::collections::HashSet::new();
        for b in &n.bitmaps {
            at_most("bitmap alias", &b.alias, MAX_ALIAS_BYTES)?;
            at_most("bitmap name", &b.name, MAX_BITMAP_NAME_BYTES)?;
            if !names.insert(b.name.as_str()) {
                return bad(format!(
                    "The bitmap '{}'/'{}' is mapped twice",
                    n.node_name, b.name
                ));
            }
        }
    }
    let mut aliases = std::collections::HashSet::new();
    for n in map {
        if !aliases.insert(n.alias.as_str()) {
            return bad(format!("The node alias '{}' is used twice", n.alias));
        }
        let mut seen = std::collections::HashSet::new();
        for b in &n.bitmaps {
            if !seen.insert(b.alias.as_str()) {
                return bad(format!(
                    "The bitmap alias '{}'/'{}' is used twice",
                    n.alias, b.alias
                ));
            }
        }
    }
    Ok(())
}

/// Default of the `x-ferry-*-timeout-ms` parameters.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Smallest value of the `x-ferry-*-timeout-ms` parameters.
pub const MIN_TIMEOUT_MS: u64 = 100;

impl Default for MigrationParameters {
    fn default() -> Self {
        MigrationParameters {
            announce_initial: 50,
            announce_max: 550,
            announce_rounds: 5,
            announce_step: 100,
            compress_level: 1,
            compress_threads: 8,
            compress_wait_thread: true,
            decompress_threads: 2,
            max_bandwidth: 128 << 20,
            avail_switchover_bandwidth: 0,
            downtime_limit: 300,
            multifd_channels: 2,
            multifd_compression: CompressionParam::None,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            cpu_throttle_tailslow: false,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
            x_checkpoint_delay: 20_000,
            block_incremental: false,
            xbzrle_cache_size: 64 << 20,
            max_postcopy_bandwidth: 0,
            multifd_zlib_level: 1,
            multifd_zstd_level: 1,
            x_vcpu_dirty_limit_period: 1000,
            vcpu_dirty_limit: 1,
            mode: MigMode::Normal,
            x_ferry_sparse_pages: true,
            x_ferry_lazy_clear: true,
            x_ferry_postcopy_auto: false,
            x_ferry_connect_timeout_ms: DEFAULT_TIMEOUT_MS,
            x_ferry_io_timeout_ms: DEFAULT_TIMEOUT_MS,
            x_ferry_switchover_timeout_ms: DEFAULT_TIMEOUT_MS,
            block_bitmap_mapping: None,
        }
    }
}

/// A partial update (`migrate-set-parameters`): only the fields given change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ParametersUpdate {
    /// See [`MigrationParameters::announce_initial`].
    pub announce_initial: Option<u64>,
    /// See [`MigrationParameters::announce_max`].
    pub announce_max: Option<u64>,
    /// See [`MigrationParameters::announce_rounds`].
    pub announce_rounds: Option<u64>,
    /// See [`MigrationParameters::announce_step`].
    pub announce_step: Option<u64>,
    /// See [`MigrationParameters::compress_level`].
    pub compress_level: Option<u8>,
    /// See [`MigrationParameters::compress_threads`].
    pub compress_threads: Option<u8>,
    /// See [`MigrationParameters::compress_wait_thread`].
    pub compress_wait_thread: Option<bool>,
    /// See [`MigrationParameters::decompress_threads`].
    pub decompress_threads: Option<u8>,
    /// See [`MigrationParameters::max_bandwidth`].
    pub max_bandwidth: Option<u64>,
    /// See [`MigrationParameters::avail_switchover_bandwidth`].
    pub avail_switchover_bandwidth: Option<u64>,
    /// See [`MigrationParameters::downtime_limit`].
    pub downtime_limit: Option<u64>,
    /// See [`MigrationParameters::multifd_channels`].
    pub multifd_channels: Option<u8>,
    /// See [`MigrationParameters::multifd_compression`].
    pub multifd_compression: Option<CompressionParam>,
    /// See [`MigrationParameters::throttle_trigger_threshold`].
    pub throttle_trigger_threshold: Option<u8>,
    /// See [`MigrationParameters::cpu_throttle_initial`].
    pub cpu_throttle_initial: Option<u8>,
    /// See [`MigrationParameters::cpu_throttle_increment`].
    pub cpu_throttle_increment: Option<u8>,
    /// See [`MigrationParameters::max_cpu_throttle`].
    pub max_cpu_throttle: Option<u8>,
    /// See [`MigrationParameters::cpu_throttle_tailslow`].
    pub cpu_throttle_tailslow: Option<bool>,
    /// See [`MigrationParameters::tls_creds`].
    pub tls_creds: Option<String>,
    /// See [`MigrationParameters::tls_hostname`].
    pub tls_hostname: Option<String>,
    /// See [`MigrationParameters::tls_authz`].
    pub tls_authz: Option<String>,
    /// See [`MigrationParameters::x_checkpoint_delay`].
    pub x_checkpoint_delay: Option<u32>,
    /// See [`MigrationParameters::block_incremental`].
    pub block_incremental: Option<bool>,
    /// See [`MigrationParameters::xbzrle_cache_size`].
    pub xbzrle_cache_size: Option<u64>,
    /// See [`MigrationParameters::max_postcopy_bandwidth`].
    pub max_postcopy_bandwidth: Option<u64>,
    /// See [`MigrationParameters::multifd_zlib_level`].
    pub multifd_zlib_level: Option<u8>,
    /// See [`MigrationParameters::multifd_zstd_level`].
    pub multifd_zstd_level: Option<u8>,
    /// See [`MigrationParameters::x_vcpu_dirty_limit_period`].
    pub x_vcpu_dirty_limit_period: Option<u64>,
    /// See [`MigrationParameters::vcpu_dirty_limit`].
    pub vcpu_dirty_limit: Option<u64>,
    /// See [`MigrationParameters::mode`].
    pub mode: Option<MigMode>,
    /// See [`MigrationParameters::x_ferry_sparse_pages`].
    pub x_ferry_sparse_pages: Option<bool>,
    /// See [`MigrationParameters::x_ferry_lazy_clear`].
    pub x_ferry_lazy_clear: Option<bool>,
    /// See [`MigrationParameters::x_ferry_postcopy_auto`].
    pub x_ferry_postcopy_auto: Option<bool>,
    /// See [`MigrationParameters::x_ferry_connect_timeout_ms`].
    pub x_ferry_connect_timeout_ms: Option<u64>,
    /// See [`MigrationParameters::x_ferry_io_timeout_ms`].
    pub x_ferry_io_timeout_ms: Option<u64>,
    /// See [`MigrationParameters::x_ferry_switchover_timeout_ms`].
    pub x_ferry_switchover_timeout_ms: Option<u64>,
    /// See [`MigrationParameters::block_bitmap_mapping`].
    pub block_bitmap_mapping: Option<Vec<BitmapNodeAlias>>,
}

/// Longest downtime limit QEMU accepts, ms (2000 s).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// The refusal of a value other than QEMU's default for a parameter Ferry does not
/// implement: QEMU's "Parameter '%s' expects %s" (QERR_INVALID_PARAMETER_VALUE).
fn unimplemented_parameter(name: &str, default: &str) -> Error {
    Error::InvalidParameter(format!(
        "Parameter '{name}' expects {default} (QEMU's default; Ferry does not implement it)"
    ))
}

fn check(ok: bool, name: &str, range: &str) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidParameter(format!(
            "Parameter '{name}' expects {range}"
        )))
    }
}

impl MigrationParameters {
    /// Applies `update` if every value is in range; otherwise changes nothing.
    pub fn apply(&mut self, update: &ParametersUpdate) -> Result<()> {
        let mut next = self.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = update.$f { next.$f = v; } )* };
        }
        macro_rules! set_cloned {
            ($($f:ident),*) => { $( if let Some(v) = &update.$f { next.$f.clone_from(v); } )* };
        }
        set_cloned!(tls_creds, tls_hostname, tls_authz);
        if let Some(m) = &update.block_bitmap_mapping {
            next.block_bitmap_mapping = Some(m.clone());
        }
        set!(
            announce_initial,
            announce_max,
            announce_rounds,
            announce_step,
            compress_level,
            compress_threads,
            compress_wait_thread,
            decompress_threads,
            cpu_throttle_tailslow,
            x_checkpoint_delay,
            block_incremental,
            xbzrle_cache_size,
            max_postcopy_bandwidth,
            multifd_zlib_level,
            multifd_zstd_level,
            x_vcpu_dirty_limit_period,
            vcpu_dirty_limit,
            mode,
            max_bandwidth,
            avail_switchover_bandwidth,
            downtime_limit,
            multifd_channels,
            multifd_compression,
            throttle_trigger_threshold,
            cpu_throttle_initial,
            cpu_throttle_increment,
            max_cpu_throttle,
            x_ferry_sparse_pages,
            x_ferry_lazy_clear,
            x_ferry_postcopy_auto,
            x_ferry_connect_timeout_ms,
            x_ferry_io_timeout_ms,
            x_ferry_switchover_timeout_ms
        );
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Checks every value against QEMU's ranges; the parameters Ferry does not
    /// implement must keep QEMU's default.
    pub fn validate(&self) -> Result<()> {
        let d = MigrationParameters::default();
        macro_rules! at_default {
            ($($f:ident),*) => { $(
                if self.$f != d.$f {
                    let name = stringify!($f).replace('_', "-");
                    return Err(unimplemented_parameter(&name, &format!("{:?}", d.$f)));
                }
            )* };
        }
        at_default!(
            announce_initial,
            announce_max,
            announce_rounds,
            announce_step,
            compress_level,
            compress_threads,
            compress_wait_thread,
            decompress_threads,
            cpu_throttle_tailslow,
            x_checkpoint_delay,
            block_incremental,
            xbzrle_cache_size,
            multifd_zlib_level,
            multifd_zstd_level
        );
        if let Some(map) = &self.block_bitmap_mapping {
            check_bitmap_mapping(map)?;
        }
        if !(1..=1000).contains(&self.x_vcpu_dirty_limit_period) {
            return Err(Error::InvalidParameter(
                "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000".into(),
            ));
        }
        if self.vcpu_dirty_limit < 1 {
            return Err(Error::InvalidParameter(
                "Parameter 'vcpu_dirty_limit' is invalid, it must greater then 1 MB/s".into(),
            ));
        }
        for (v, name) in [
            (
                self.x_ferry_connect_timeout_ms,
                "x-ferry-connect-timeout-ms",
            ),
            (self.x_ferry_io_timeout_ms, "x-ferry-io-timeout-ms"),
            (
                self.x_ferry_switchover_timeout_ms,
                "x-ferry-switchover-timeout-ms",
            ),
        ] {
            check(
                v >= MIN_TIMEOUT_MS,
                name,
                "an integer of at least 100 milliseconds",
            )?;
        }
        check(
            self.downtime_limit <= MAX_DOWNTIME_LIMIT_MS,
            "downtime-limit",
            "an integer in the range of 0 to 2000000 milliseconds",
        )?;
        check(
            (1..=255).contains(&self.multifd_channels),
            "multifd-channels",
            "a value between 1 and 255",
        )?;
        check(
            (1..=100).contains(&self.throttle_trigger_threshold),
            "throttle-trigger-threshold",
            "an integer in the range of 1 to 100",
        )?;
        check(
            (1..=99).contains(&self.cpu_throttle_initial),
            "cpu-throttle-initial",
            "an integer in the range of 1 to 99",
        )?;
        check(
            (1..=99).contains(&self.cpu_throttle_increment),
            "cpu-throttle-increment",
            "an integer in the range of 1 to 99",
        )?;
        check(
            (1..=99).contains(&self.max_cpu_throttle),
            "max-cpu-throttle",
            "an integer in the range of 1 to 99",
        )
    }
}

/// Migration capabilities (`migrate-set-capabilities`), the ones Ferry has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Capabilities {
    /// Throttle the vCPUs when the guest dirties memory faster than it can be sent.
    pub auto_converge: bool,
    /// Send pages over `multifd-channels` parallel connections.
    pub multifd: bool,
    /// Emit MIGRATION / MIGRATION_PASS events (QMP).
    pub events: bool,
    /// QEMU's `return-path`: Ferry's destination always answers on the migration
    /// connection (its `Ready` and commit acknowledgements), so the state is only
    /// recorded.
    pub return_path: bool,
    /// QEMU's `late-block-activate`: a Ferry guest has no block devices to activate,
    /// so the state is only recorded.
    pub late_block_activate: bool,
    /// Allow the switch to postcopy (`migrate-start-postcopy`): the guest moves first,
    /// the destination fetches the pages it lacks.
    pub postcopy_ram: bool,
    /// QEMU's `postcopy-preempt`: Ferry's postcopy streams always carry requested
    /// pages on a connection of their own, so the state is only recorded.
    pub postcopy_preempt: bool,
    /// Instead of auto-converge's throttle of every vCPU, hold each vCPU to
    /// `vcpu-dirty-limit` MiB/s of dirtied memory when the migration does not
    /// converge (needs the dirty ring): vCPUs that dirty less are not slowed.
    pub dirty_limit: bool,
    /// Stop at the switch-over with the guest paused, in `pre-switchover`, until
    /// `migrate-continue` (a management tool finishes its own work there first, e.g.
    /// libvirt's block jobs).
    pub pause_before_switchover: bool,
}

/// One capability by QMP name: every member of QEMU 8.2's `MigrationCapability`, in
/// its order. Ferry implements `auto-converge`, `multifd`, `events`, `postcopy-ram`,
/// `dirty-limit` and `pause-before-switchover`,
/// and accepts `return-path`, `late-block-activate` and `postcopy-preempt` (true of it
/// already); the others are known so that a list setting them to `false` is accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// `xbzrle`.
    Xbzrle,
    /// `rdma-pin-all`.
    RdmaPinAll,
    /// `auto-converge` (Ferry implements it).
    AutoConverge,
    /// `zero-blocks`.
    ZeroBlocks,
    /// `compress`.
    Compress,
    /// `events` (Ferry implements it).
    Events,
    /// `postcopy-ram` (Ferry implements it).
    PostcopyRam,
    /// `x-colo`.
    XColo,
    /// `release-ram`.
    ReleaseRam,
    /// `block`.
    Block,
    /// `return-path` (accepted: Ferry always has one).
    ReturnPath,
    /// `pause-before-switchover` (Ferry implements it).
    PauseBeforeSwitchover,
    /// `multifd` (Ferry implements it).
    Multifd,
    /// `dirty-bitmaps`.
    DirtyBitmaps,
    /// `postcopy-blocktime`.
    PostcopyBlocktime,
    /// `late-block-activate` (accepted: no block devices).
    LateBlockActivate,
    /// `x-ignore-shared`.
    XIgnoreShared,
    /// `validate-uuid`.
    ValidateUuid,
    /// `background-snapshot`.
    BackgroundSnapshot,
    /// `zero-copy-send`.
    ZeroCopySend,
    /// `postcopy-preempt` (accepted: Ferry's postcopy always has a priority
    /// connection).
    PostcopyPreempt,
    /// `switchover-ack`.
    SwitchoverAck,
    /// `dirty-limit` (Ferry implements it, with the dirty ring).
    DirtyLimit,
}

impl Capability {
    /// Every capability, in QEMU's order (`query-migrate-capabilities`).
    pub const ALL: [Capability; 23] = [
        Capability::Xbzrle,
        Capability::RdmaPinAll,
        Capability::AutoConverge,
        Capability::ZeroBlocks,
        Capability::Compress,
        Capability::Events,
        Capability::PostcopyRam,
        Capability::XColo,
        Capability::ReleaseRam,
        Capability::Block,
        Capability::ReturnPath,
        Capability::PauseBeforeSwitchover,
        Capability::Multifd,
        Capability::DirtyBitmaps,
        Capability::PostcopyBlocktime,
        Capability::LateBlockActivate,
        Capability::XIgnoreShared,
        Capability::ValidateUuid,
        Capability::BackgroundSnapshot,
        Capability::ZeroCopySend,
        Capability::PostcopyPreempt,
        Capability::SwitchoverAck,
        Capability::DirtyLimit,
    ];

    /// True for the capabilities Ferry implements.
    pub fn implemented(self) -> bool {
        matches!(
            self,
            Capability::AutoConverge
                | Capability::Multifd
                | Capability::Events
                | Capability::ReturnPath
                | Capability::LateBlockActivate
                | Capability::PostcopyRam
                | Capability::PostcopyPreempt
                | Capability::DirtyLimit
                | Capability::PauseBeforeSwitchover
        )
    }

    /// The QMP name.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Capabilities {
    /// Sets one capability; an unimplemented one can only be `false` (see
    /// [`Capabilities::check`]), so setting it changes nothing.
    pub fn set(&mut self, cap: Capability, on: bool) {
        match cap {
            Capability::AutoConverge => self.auto_converge = on,
            Capability::Multifd => self.multifd = on,
            Capability::Events => self.events = on,
            Capability::ReturnPath => self.return_path = on,
            Capability::LateBlockActivate => self.late_block_activate = on,
            Capability::PostcopyRam => self.postcopy_ram = on,
            Capability::PostcopyPreempt => self.postcopy_preempt = on,
            Capability::DirtyLimit => self.dirty_limit = on,
            Capability::PauseBeforeSwitchover => self.pause_before_switchover = on,
            _ => {}
        }
    }

    /// One capability's state (`false` for the unimplemented ones).
    pub fn get(&self, cap: Capability) -> bool {
        match cap {
            Capability::AutoConverge => self.auto_converge,
            Capability::Multifd => self.multifd,
            Capability::Events => self.events,
            Capability::ReturnPath => self.return_path,
            Capability::LateBlockActivate => self.late_block_activate,
            Capability::PostcopyRam => self.postcopy_ram,
            Capability::PostcopyPreempt => self.postcopy_preempt,
            Capability::DirtyLimit => self.dirty_limit,
            Capability::PauseBeforeSwitchover => self.pause_before_switchover,
            _ => false,
        }
    }

    /// Refuses turning on a capability Ferry does not implement, with QEMU's text
    /// where QEMU has one for a capability its build or host lacks.
    pub fn check(cap: Capability, on: bool) -> Result<()> {
        if !on || cap.implemented() {
            return Ok(());
        }
        let desc = match cap {
            Capability::Block => {
                "QEMU compiled without old-style (blk/-b, inc/-i) block migration".to_owned()
            }
            Capability::XColo => {
                "QEMU compiled without replication module can't enable COLO".to_owned()
            }
            Capability::BackgroundSnapshot => {
                "Background-snapshot is not supported by host kernel".to_owned()
            }
            other => format!("Migration capability '{}' is not supported", other.name()),
        };
        Err(Error::InvalidParameter(desc))
    }

    /// Every capability with its state, in QEMU's order (`query-migrate-capabilities`).
    pub fn list(&self) -> Vec<(Capability, bool)> {
        Capability::ALL.iter().map(|&c| (c, self.get(c))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_qemus() {
        let p = MigrationParameters::default();
        assert_eq!(p.max_bandwidth, 134_217_728);
        assert_eq!(p.downtime_limit, 300);
        assert_eq!(p.multifd_channels, 2);
        assert_eq!(
            (p.throttle_trigger_threshold, p.cpu_throttle_initial),
            (50, 20)
        );
        assert_eq!((p.cpu_throttle_increment, p.max_cpu_throttle), (10, 99));
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["max-bandwidth"], 134_217_728);
        assert_eq!(v["multifd-compression"], "none");
        assert_eq!(v["x-ferry-sparse-pages"], true);
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let mut p = MigrationParameters::default();
        let bad: ParametersUpdate =
            serde_json::from_str(r#"{"downtime-limit": 100, "max-cpu-throttle": 100}"#).unwrap();
        assert!(p.apply(&bad).is_err());
        assert_eq!(p.downtime_limit, 300, "nothing changed");
        let good: ParametersUpdate = serde_json::from_str(r#"{"downtime-limit": 100}"#).unwrap();
        p.apply(&good).unwrap();
        assert_eq!(p.downtime_limit, 100);
    }

    #[test]
    fn ferry_timeouts_default_to_10_s_and_need_100_ms() {
        let mut p = MigrationParameters::default();
        let v = serde_json::to_value(&p).unwrap();
        for name in [
            "x-ferry-connect-timeout-ms",
            "x-ferry-io-timeout-ms",
            "x-ferry-switchover-timeout-ms",
        ] {
            assert_eq!(v[name], 10_000, "{name}");
            let low: ParametersUpdate =
                serde_json::from_str(&format!(r#"{{"{name}": 99}}"#)).unwrap();
            let e = p.apply(&low).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
            let ok: ParametersUpdate =
                serde_json::from_str(&format!(r#"{{"{name}": 100}}"#)).unwrap();
            p.apply(&ok).unwrap();
        }
        assert_eq!(
            (
                p.x_ferry_connect_timeout_ms,
                p.x_ferry_io_timeout_ms,
                p.x_ferry_switchover_timeout_ms
            ),
            (100, 100, 100)
        );
    }

    #[test]
    fn qemu_only_parameters_stay_at_their_default() {
        let mut p = MigrationParameters::default();
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["xbzrle-cache-size"], 64 << 20);
        assert_eq!(v["tls-creds"], "");
        assert_eq!(v["mode"], "normal");
        let same: ParametersUpdate =
            serde_json::from_str(r#"{"xbzrle-cache-size": 67108864, "tls-creds": ""}"#).unwrap();
        p.apply(&same).unwrap();
        let other: ParametersUpdate =
            serde_json::from_str(r#"{"xbzrle-cache-size": 1048576}"#).unwrap();
        let e = p.apply(&other).unwrap_err().to_string();
        assert!(
            e.starts_with("Parameter 'xbzrle-cache-size' expects 67108864"),
            "{e}"
        );
        // TLS is implemented: its parameters take any id.
        let tls: ParametersUpdate =
            serde_json::from_str(r#"{"tls-creds": "tls0", "tls-authz": "auth0"}"#).unwrap();
        p.apply(&tls).unwrap();
        assert_eq!(
            (p.tls_creds.as_str(), p.tls_authz.as_str()),
            ("tls0", "auth0")
        );
    }

    #[test]
    fn unknown_parameter_is_rejected() {
        assert!(serde_json::from_str::<ParametersUpdate>(r#"{"no-such": 1}"#).is_err());
        assert!(serde_json::from_str::<ParametersUpdate>(r#"{"downtime-limit": "x"}"#).is_err());
    }

    #[test]
    fn capabilities_set_and_list() {
        let mut c = Capabilities::default();
        c.set(Capability::AutoConverge, true);
        assert!(c.auto_converge);
        assert_eq!(c.list()[2], (Capability::AutoConverge, true));
        assert_eq!(c.list().len(), 23);
        assert!(Capabilities::check(Capability::Xbzrle, false).is_ok());
        assert!(Capabilities::check(Capability::Xbzrle, true).is_err());
        assert!(Capabilities::check(Capability::Multifd, true).is_ok());
        c.set(Capability::Xbzrle, true);
        assert!(!c.get(Capability::Xbzrle));
        let cap: Capability = serde_json::from_str(r#""auto-converge""#).unwrap();
        assert_eq!(cap, Capability::AutoConverge);
    }
}
