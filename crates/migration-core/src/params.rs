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

/// The tunables of a migration (`query-migrate-parameters`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
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
}

/// Default of the `x-ferry-*-timeout-ms` parameters.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Smallest value of the `x-ferry-*-timeout-ms` parameters.
pub const MIN_TIMEOUT_MS: u64 = 100;

impl Default for MigrationParameters {
    fn default() -> Self {
        MigrationParameters {
            max_bandwidth: 128 << 20,
            avail_switchover_bandwidth: 0,
            downtime_limit: 300,
            multifd_channels: 2,
            multifd_compression: CompressionParam::None,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            x_ferry_sparse_pages: true,
            x_ferry_lazy_clear: true,
            x_ferry_connect_timeout_ms: DEFAULT_TIMEOUT_MS,
            x_ferry_io_timeout_ms: DEFAULT_TIMEOUT_MS,
            x_ferry_switchover_timeout_ms: DEFAULT_TIMEOUT_MS,
        }
    }
}

/// A partial update (`migrate-set-parameters`): only the fields given change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ParametersUpdate {
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
    /// See [`MigrationParameters::x_ferry_sparse_pages`].
    pub x_ferry_sparse_pages: Option<bool>,
    /// See [`MigrationParameters::x_ferry_lazy_clear`].
    pub x_ferry_lazy_clear: Option<bool>,
    /// See [`MigrationParameters::x_ferry_connect_timeout_ms`].
    pub x_ferry_connect_timeout_ms: Option<u64>,
    /// See [`MigrationParameters::x_ferry_io_timeout_ms`].
    pub x_ferry_io_timeout_ms: Option<u64>,
    /// See [`MigrationParameters::x_ferry_switchover_timeout_ms`].
    pub x_ferry_switchover_timeout_ms: Option<u64>,
}

/// Longest downtime limit QEMU accepts, ms (2000 s).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

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
        set!(
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
            x_ferry_connect_timeout_ms,
            x_ferry_io_timeout_ms,
            x_ferry_switchover_timeout_ms
        );
        next.validate()?;
        *self = next;
        Ok(())
    }

    /// Checks every value against QEMU's ranges.
    pub fn validate(&self) -> Result<()> {
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
}

/// One capability by QMP name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// `auto-converge`.
    AutoConverge,
    /// `multifd`.
    Multifd,
    /// `events`.
    Events,
}

impl Capabilities {
    /// Sets one capability.
    pub fn set(&mut self, cap: Capability, on: bool) {
        match cap {
            Capability::AutoConverge => self.auto_converge = on,
            Capability::Multifd => self.multifd = on,
            Capability::Events => self.events = on,
        }
    }

    /// Every capability with its state (`query-migrate-capabilities`).
    pub fn list(&self) -> [(Capability, bool); 3] {
        [
            (Capability::AutoConverge, self.auto_converge),
            (Capability::Multifd, self.multifd),
            (Capability::Events, self.events),
        ]
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
    fn unknown_parameter_is_rejected() {
        assert!(serde_json::from_str::<ParametersUpdate>(r#"{"no-such": 1}"#).is_err());
        assert!(serde_json::from_str::<ParametersUpdate>(r#"{"downtime-limit": "x"}"#).is_err());
    }

    #[test]
    fn capabilities_set_and_list() {
        let mut c = Capabilities::default();
        c.set(Capability::AutoConverge, true);
        assert!(c.auto_converge);
        assert_eq!(c.list()[0], (Capability::AutoConverge, true));
        let cap: Capability = serde_json::from_str(r#""auto-converge""#).unwrap();
        assert_eq!(cap, Capability::AutoConverge);
    }
}
