//! `RateSample`: a fixed, pseudo-random subset of guest pages that a lazily clearing
//! listener keeps exact, so a dirty rate can be measured without re-protecting every page.
//!
//! With QEMU's lazy clear a harvested page stays writable until the sender reaches it, so
//! a sync cannot tell whether such a page was written again: the exact count of pages
//! written in a period would need every page re-protected at every sync, which makes the
//! guest fault on its whole working set each time (measured: a working set of 65536
//! pages ran below 10 % of its speed in 92 % of 100 ms intervals). A listener that
//! defers clears re-arms at a sync only the pages of the sample its caller names
//! ([`AddressSpace::global_dirty_log_sync_lazy`]): the migration names a *period* sample
//! at the end of each dirty-rate period, so the pages written in a period are counted
//! exactly on it, and a smaller *sync* sample at the other syncs, for the pages written
//! between two syncs. A count scaled by its fraction is an unbiased estimate whose
//! relative standard error is `sqrt((1 - f) / (f * D))` for `D` dirty pages and
//! fraction `f` (1.0 % for 8192 sampled pages); the guest faults on the sample's pages
//! only.
//!
//! Membership is a hash of the page number, the same for every user (the listener that
//! clears, the engine that counts), with no table to share; a sample of a higher shift
//! is inside one of a lower shift, so a sample can shrink from one period to the next
//! and stay exact.
//!
//! [`AddressSpace::global_dirty_log_sync_lazy`]: crate::AddressSpace::global_dirty_log_sync_lazy

use crate::BITS_PER_WORD;

/// A subset of pages of density `2^-shift`, fixed by the page numbers alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateSample {
    shift: u8,
}

/// A 64-bit mixer (splitmix64's finaliser).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl RateSample {
    /// The largest shift (a sample of 1/65536 of the pages).
    pub const MAX_SHIFT: u8 = 16;

    /// Every page (shift 0).
    pub const ALL: RateSample = RateSample { shift: 0 };

    /// The sample of about `target_pages` of `dirty_pages` pages: the power-of-two
    /// fraction nearest (in ratio) to `target_pages / dirty_pages`, every page when
    /// that is more than all.
    pub fn for_dirty_pages(dirty_pages: u64, target_pages: u64) -> Self {
        if dirty_pages <= target_pages || target_pages == 0 {
            return Self::ALL;
        }
        let ratio = dirty_pages as f64 / target_pages as f64;
        Self::new(ratio.log2().round().min(f64::from(Self::MAX_SHIFT)) as u8)
    }

    /// A sample of `2^-shift` of the pages (shift 0: every page); `shift` is capped at
    /// [`Self::MAX_SHIFT`].
    pub const fn new(shift: u8) -> Self {
        RateSample {
            shift: if shift > Self::MAX_SHIFT {
                Self::MAX_SHIFT
            } else {
                shift
            },
        }
    }

    /// log2 of the inverse fraction.
    pub fn shift(&self) -> u8 {
        self.shift
    }

    /// The fraction of pages in the sample.
    pub fn fraction(&self) -> f64 {
        1.0 / f64::from(1u32 << self.shift)
    }

    /// The pages of bitmap word `word` (global pages `64 * word ..`) in the sample, as
    /// a bit mask: the AND of `shift` independent hashes, so each bit is set with
    /// probability `2^-shift`.
    pub fn word_mask(&self, word: u64) -> u64 {
        (0..u64::from(self.shift)).fold(u64::MAX, |m, i| {
            m & mix(word.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ mix(i + 1))
        })
    }

    /// The sample's bits for the 64 global pages from `first_page` (any alignment):
    /// bit `i` is page `first_page + i`.
    pub fn mask_at(&self, first_page: u64) -> u64 {
        let word = first_page / BITS_PER_WORD;
        let bit = (first_page % BITS_PER_WORD) as u32;
        if bit == 0 {
            return self.word_mask(word);
        }
        (self.word_mask(word) >> bit) | (self.word_mask(word + 1) << (64 - bit))
    }

    /// True when global page `page` is in the sample.
    pub fn contains(&self, page: u64) -> bool {
        self.word_mask(page / BITS_PER_WORD) >> (page % BITS_PER_WORD) & 1 == 1
    }

    /// Scales a count of sampled pages to the estimate for all pages.
    pub fn scale(&self, sampled_pages: u64) -> u64 {
        sampled_pages << self.shift
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn density_is_two_to_the_minus_shift() {
        for shift in 0..=4u8 {
            let s = RateSample::new(shift);
            let words = 1u64 << 14;
            let set: u64 = (0..words)
                .map(|w| u64::from(s.word_mask(w).count_ones()))
                .sum();
            let want = (words * 64) >> shift;
            let err = (set as f64 - want as f64).abs() / want as f64;
            assert!(err < 0.02, "shift {shift}: {set} of {} pages", words * 64);
        }
        assert_eq!(RateSample::new(0).word_mask(7), u64::MAX);
    }

    #[test]
    fn samples_nest_and_agree_at_any_alignment() {
        let (a, b) = (RateSample::new(2), RateSample::new(3));
        for w in 0..1000u64 {
            // A smaller sample is inside a larger one (same hashes, one more AND).
            assert_eq!(b.word_mask(w) & !a.word_mask(w), 0);
        }
        for first in [0u64, 1, 63, 64, 100, 4097] {
            let m = a.mask_at(first);
            for i in 0..64 {
                assert_eq!(m >> i & 1 == 1, a.contains(first + i), "page {}", first + i);
            }
        }
    }

    /// The estimate of a contiguous working set is within a few standard errors.
    #[test]
    fn a_working_set_is_estimated_within_its_error() {
        let s = RateSample::new(2);
        for (start, pages) in [(0u64, 65536u64), (12345, 20000), (1 << 20, 4096)] {
            let sampled = (start..start + pages).filter(|p| s.contains(*p)).count() as u64;
            let est = s.scale(sampled) as f64;
            let sigma = ((1.0 - s.fraction()) / (s.fraction() * pages as f64)).sqrt();
            let err = (est - pages as f64).abs() / pages as f64;
            assert!(err < 4.0 * sigma, "{pages} pages from {start}: {est}");
        }
    }
}
