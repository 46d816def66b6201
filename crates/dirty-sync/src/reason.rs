//! Why the dirty log is on: independent users share it through a mask of reasons.

use std::fmt;

/// One user of the global dirty log (QEMU's `GLOBAL_DIRTY_*` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DirtyReason {
    /// A migration is tracking pages to resend.
    Migration,
    /// A `calc-dirty-rate` measurement is running.
    DirtyRate,
    /// Dirty-limit throttling is measuring per-vCPU rates.
    DirtyLimit,
}

impl DirtyReason {
    /// Every reason, in mask-bit order.
    pub const ALL: [DirtyReason; 3] = [
        DirtyReason::Migration,
        DirtyReason::DirtyRate,
        DirtyReason::DirtyLimit,
    ];

    /// The reason's bit in a [`ReasonMask`].
    pub const fn bit(self) -> u8 {
        1 << self.index()
    }

    /// Position of the reason in [`DirtyReason::ALL`].
    pub const fn index(self) -> usize {
        match self {
            DirtyReason::Migration => 0,
            DirtyReason::DirtyRate => 1,
            DirtyReason::DirtyLimit => 2,
        }
    }
}

impl fmt::Display for DirtyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyReason::Migration => "migration",
            DirtyReason::DirtyRate => "dirty-rate",
            DirtyReason::DirtyLimit => "dirty-limit",
        })
    }
}

/// A set of [`DirtyReason`]s; logging is on while the mask is non-empty.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonMask(u8);

impl ReasonMask {
    /// True when no reason holds the log.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True when `reason` is in the mask.
    pub fn contains(self, reason: DirtyReason) -> bool {
        self.0 & reason.bit() != 0
    }

    /// The mask with `reason` added.
    pub fn with(self, reason: DirtyReason) -> Self {
        ReasonMask(self.0 | reason.bit())
    }

    /// The mask with `reason` removed.
    pub fn without(self, reason: DirtyReason) -> Self {
        ReasonMask(self.0 & !reason.bit())
    }

    /// A mask from raw bits (unknown bits are dropped).
    pub fn from_bits(bits: u8) -> Self {
        ReasonMask(bits & 0b111)
    }

    /// The raw bits (QEMU's `global_dirty_tracking`).
    pub fn bits(self) -> u8 {
        self.0
    }
}
