//! `DirtyBitmap`: one bit per 4 KiB page over atomic 64-bit words.
//!
//! Every operation is lock-free: the dirty-log sync ORs harvested words in while the
//! migration sender test-and-clears pages it is about to send.

use std::sync::atomic::{AtomicU64, Ordering};

/// Bits per bitmap word.
pub const BITS_PER_WORD: u64 = 64;

/// A fixed-size bitmap of pages, shared between threads through atomic words.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl DirtyBitmap {
    /// Creates an all-clear bitmap covering `pages` pages.
    pub fn new(pages: u64) -> Self {
        let nwords = pages.div_ceil(BITS_PER_WORD) as usize;
        let words = (0..nwords).map(|_| AtomicU64::new(0)).collect();
        DirtyBitmap { words, pages }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The underlying words (bit `i % 64` of word `i / 64` is page `i`).
    pub fn words(&self) -> &[AtomicU64] {
        &self.words
    }

    /// Mask of the valid bits in the last word (all ones when pages is a multiple of 64).
    fn tail_mask(&self) -> u64 {
        match self.pages % BITS_PER_WORD {
            0 => u64::MAX,
            n => (1u64 << n) - 1,
        }
    }

    /// Marks `page` dirty; returns true if it was clean before. Out-of-range pages are ignored.
    pub fn set(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % BITS_PER_WORD);
        self.words[(page / BITS_PER_WORD) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// True when `page` is marked dirty.
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages
            && self.words[(page / BITS_PER_WORD) as usize].load(Ordering::Acquire)
                & (1u64 << (page % BITS_PER_WORD))
                != 0
    }

    /// Clears `page` and returns whether it was set (the sender's "claim this page" step).
    pub fn test_and_clear(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let bit = 1u64 << (page % BITS_PER_WORD);
        self.words[(page / BITS_PER_WORD) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Atomically takes word `index` (returns its bits and leaves it zero).
    pub fn take_word(&self, index: usize) -> u64 {
        self.words[index].swap(0, Ordering::AcqRel)
    }

    /// Marks every page dirty (the bulk stage of a migration).
    pub fn set_all(&self) {
        let last = self.words.len().saturating_sub(1);
        for (i, w) in self.words.iter().enumerate() {
            let v = if i == last {
                self.tail_mask()
            } else {
                u64::MAX
            };
            w.store(v, Ordering::Release);
        }
    }

    /// Clears every page.
    pub fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Set bits that are in `sample` (the pages a deferring listener keeps exact).
    pub fn count_in(&self, sample: &crate::RateSample) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(w, x)| {
                u64::from((x.load(Ordering::Relaxed) & sample.word_mask(w as u64)).count_ones())
            })
            .sum()
    }

    /// ORs a little-endian bitmap (bit `i` = page `first_page + i`, `pages` bits long) into
    /// this one and returns how many of its bits were newly set here.
    ///
    /// This is QEMU's `set_dirty_lebitmap` merge fused with the "count the new bits" step of
    /// `sync_dirty_bitmap`. Aligned starts take a word-wise atomic OR; unaligned starts
    /// shift-combine two words. Bits beyond this bitmap's end are dropped.
    pub fn merge_le(&self, first_page: u64, src: &[u64], pages: u64) -> u64 {
        if first_page >= self.pages {
            return 0;
        }
        let pages = pages
            .min(src.len() as u64 * BITS_PER_WORD)
            .min(self.pages - first_page);
        let nwords = pages.div_ceil(BITS_PER_WORD) as usize;
        let src_tail = match pages % BITS_PER_WORD {
            0 => u64::MAX,
            n => (1u64 << n) - 1,
        };
        let shift = (first_page % BITS_PER_WORD) as u32;
        let base = (first_page / BITS_PER_WORD) as usize;
        let mut new_bits = 0u64;
        for (i, &raw) in src[..nwords].iter().enumerate() {
            let w = if i + 1 == nwords { raw & src_tail } else { raw };
            if w == 0 {
                continue;
            }
            if shift == 0 {
                new_bits += self.or_word(base + i, w);
            } else {
                new_bits += self.or_word(base + i, w << shift);
                let hi = w >> (64 - shift);
                if hi != 0 {
                    new_bits += self.or_word(base + i + 1, hi);
                }
            }
        }
        new_bits
    }

    /// ORs `bits` into word `index`, returning the count of bits that were clear before.
    #[inline]
    fn or_word(&self, index: usize, bits: u64) -> u64 {
        match self.words.get(index) {
            Some(word) => {
                let old = word.fetch_or(bits, Ordering::AcqRel);
                u64::from((bits & !old).count_ones())
            }
            None => 0,
        }
    }

    /// Iterates over the dirty pages (a snapshot per word; bits set behind the cursor are
    /// seen by the next iteration).
    pub fn iter_set(&self) -> SetBits<'_> {
        self.iter_set_from(0)
    }

    /// Iterates over the dirty pages at or after `start`.
    pub fn iter_set_from(&self, start: u64) -> SetBits<'_> {
        let index = (start / BITS_PER_WORD) as usize;
        let current = match self.words.get(index) {
            Some(w) => w.load(Ordering::Acquire) & (u64::MAX << (start % BITS_PER_WORD)),
            None => 0,
        };
        SetBits {
            bitmap: self,
            index,
            current,
        }
    }

    /// Copies the bitmap into plain words (for tests and snapshots).
    pub fn to_vec(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }
}

/// Iterator over the set bits of a [`DirtyBitmap`], by word with `trailing_zeros`.
pub struct SetBits<'a> {
    bitmap: &'a DirtyBitmap,
    index: usize,
    current: u64,
}

impl Iterator for SetBits<'_> {
    type Item = u64;

    #[inline]
    fn next(&mut self) -> Option<u64> {
        while self.current == 0 {
            self.index += 1;
            self.current = self.bitmap.words.get(self.index)?.load(Ordering::Acquire);
        }
        let bit = self.current.trailing_zeros();
        self.current &= self.current - 1;
        Some(self.index as u64 * BITS_PER_WORD + u64::from(bit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count() {
        let b = DirtyBitmap::new(130);
        assert!(b.set(0));
        assert!(!b.set(0));
        assert!(b.set(129));
        assert!(!b.set(130), "out of range is ignored");
        assert_eq!(b.count(), 2);
        assert!(b.test_and_clear(129));
        assert!(!b.test_and_clear(129));
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn set_all_respects_tail() {
        let b = DirtyBitmap::new(70);
        b.set_all();
        assert_eq!(b.count(), 70);
        assert_eq!(b.iter_set().last(), Some(69));
        b.clear_all();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn merge_counts_only_new_bits() {
        let b = DirtyBitmap::new(256);
        b.set(64);
        let new = b.merge_le(64, &[0b111], 3);
        assert_eq!(new, 2);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![64, 65, 66]);
    }

    #[test]
    fn merge_truncates_to_pages_and_bitmap_end() {
        let b = DirtyBitmap::new(100);
        // 5 valid bits of a full word; bits past `pages` are ignored.
        assert_eq!(b.merge_le(96, &[u64::MAX], 5), 4);
        assert_eq!(b.iter_set().collect::<Vec<_>>(), vec![96, 97, 98, 99]);
        assert_eq!(b.merge_le(1000, &[1], 1), 0);
    }

    proptest! {
        #[test]
        fn merge_equals_per_bit_reference(
            first in 0u64..200,
            src in proptest::collection::vec(any::<u64>(), 0..6),
            pages in 0u64..400,
            pre in proptest::collection::vec(0u64..512, 0..40),
        ) {
            let b = DirtyBitmap::new(512);
            let mut reference = std::collections::BTreeSet::new();
            for p in &pre { b.set(*p); reference.insert(*p); }
            let mut expect_new = 0;
            let limit = pages.min(src.len() as u64 * 64);
            for i in 0..limit {
                if src[(i / 64) as usize] >> (i % 64) & 1 == 1 && first + i < 512
                    && reference.insert(first + i) {
                    expect_new += 1;
                }
            }
            prop_assert_eq!(b.merge_le(first, &src, pages), expect_new);
            prop_assert_eq!(b.iter_set().collect::<Vec<_>>(), reference.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(b.count(), reference.len() as u64);
        }

        #[test]
        fn iter_from_matches_filter(pages in proptest::collection::vec(0u64..300, 0..50), start in 0u64..320) {
            let b = DirtyBitmap::new(300);
            for p in &pages { b.set(*p); }
            let all: Vec<u64> = b.iter_set().filter(|p| *p >= start).collect();
            prop_assert_eq!(b.iter_set_from(start).collect::<Vec<_>>(), all);
        }
    }
}
