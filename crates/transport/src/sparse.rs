//! Sparse pages: a page with only a few non-zero 8-byte words travels as those
//! words (index and value), not as the whole page. Guest memory is full of such
//! pages (counters, flags, freshly zeroed buffers with a header), and one that is
//! rewritten every round costs 20 bytes on the wire (offset, count, one word)
//! instead of 4 KiB.
//!
//! The scan that finds them also finds zero pages, so the sender reads a page once
//! to decide between zero, sparse and dense; a dense page stops the scan as soon as
//! it has more than [`MAX_SPARSE_WORDS`] non-zero words (a few cache lines in).

/// Most non-zero words a page may hold to travel sparse (each costs 10 bytes).
pub const MAX_SPARSE_WORDS: usize = 64;
/// Bytes of one word entry on the wire: `u16` index, `u64` value.
pub const SPARSE_ENTRY_BYTES: usize = 10;
/// Largest body of a sparse-page record: `block, count`, then per page an offset, a
/// word count and at most [`MAX_SPARSE_WORDS`] entries (650 KiB); the receiver
/// refuses a longer length before buffering anything.
pub(crate) const MAX_SPARSE_BODY_BYTES: usize =
    8 + crate::format::MAX_BATCH_PAGES as usize * (8 + 2 + MAX_SPARSE_WORDS * SPARSE_ENTRY_BYTES);
/// Largest page size sparse pages serve: word indices are `u16`.
pub const MAX_SPARSE_PAGE_BYTES: usize = 8 << 16;

/// What a page holds, as far as the wire cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageClass {
    /// Every byte is zero: the page travels as its offset.
    Zero,
    /// A few non-zero words, now copied into the batch.
    Sparse,
    /// Anything else: the page travels whole.
    Dense,
}

/// Sparse pages of one block on their way out, their words already copied out of
/// guest memory (so, unlike page slices, they cannot tear while being written).
#[derive(Debug, Default, Clone)]
pub struct SparseBatch {
    offsets: Vec<u64>,
    /// `u16` word count per page, little-endian, as on the wire.
    counts: Vec<u8>,
    /// Word entries of all pages, as on the wire.
    entries: Vec<u8>,
}

impl SparseBatch {
    /// An empty batch with room for `pages` pages.
    pub fn with_capacity(pages: usize) -> Self {
        SparseBatch {
            offsets: Vec::with_capacity(pages),
            counts: Vec::with_capacity(2 * pages),
            entries: Vec::with_capacity(pages * 4 * SPARSE_ENTRY_BYTES),
        }
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Page offsets (page indices in the block), in the order added.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.offsets.clear();
        self.counts.clear();
        self.entries.clear();
    }

    /// Reads `page` once and says what it holds; a sparse page is added to the
    /// batch under `offset_pages` (offsets must be added in increasing order to be
    /// sent). Zero and dense pages leave the batch as it was.
    pub fn classify(&mut self, offset_pages: u64, page: &[u8]) -> PageClass {
        // SAFETY: every bit pattern is a valid u64; `align_to` splits only at
        // aligned boundaries.
        let (head, words, tail) = unsafe { page.align_to::<u64>() };
        if !head.is_empty() || !tail.is_empty() || page.len() > MAX_SPARSE_PAGE_BYTES {
            return if crate::sink::is_zero(page) {
                PageClass::Zero
            } else {
                PageClass::Dense
            };
        }
        // Count first, copy after: a dense page stops after its first ~9 lines
        // without copying anything, a sparse page is then read again from L1.
        let mut found = 0usize;
        for line in words.chunks(8) {
            // One OR per 64 bytes: the common all-zero line costs no branch per word.
            if line.iter().fold(0, |a, w| a | w) == 0 {
                continue;
            }
            found += line.iter().filter(|&&w| w != 0).count();
            if found > MAX_SPARSE_WORDS {
                return PageClass::Dense;
            }
        }
        if found == 0 {
            return PageClass::Zero;
        }
        let mark = self.entries.len();
        let mut copied = 0usize;
        for (c, line) in words.chunks(8).enumerate() {
            if line.iter().fold(0, |a, w| a | w) == 0 {
                continue;
            }
            for (i, &w) in line.iter().enumerate() {
                // A word the guest zeroed or set between the two reads is fine: the
                // write dirtied the page again, so it comes again. Only the count of
                // words copied must stay within the cap.
                if w == 0 || copied == MAX_SPARSE_WORDS {
                    continue;
                }
                copied += 1;
                self.entries
                    .extend_from_slice(&((c * 8 + i) as u16).to_le_bytes());
                self.entries.extend_from_slice(&w.to_le_bytes());
            }
        }
        debug_assert!(self.entries.len() - mark == copied * SPARSE_ENTRY_BYTES);
        if copied == 0 {
            return PageClass::Zero;
        }
        self.offsets.push(offset_pages);
        self.counts
            .extend_from_slice(&(copied as u16).to_le_bytes());
        PageClass::Sparse
    }

    /// The body parts after the `block, count` prefix: offsets are encoded into
    /// `offsets_buf`.
    pub(crate) fn body_parts<'a>(&'a self, offsets_buf: &'a mut Vec<u8>) -> [&'a [u8]; 3] {
        offsets_buf.clear();
        for o in &self.offsets {
            offsets_buf.extend_from_slice(&o.to_le_bytes());
        }
        [offsets_buf, &self.counts, &self.entries]
    }
}

/// Splits the part of a sparse record after its `block, count` prefix into each
/// page's word entries, checking counts, entry lengths and word indices (strictly
/// increasing, inside a page of `page_size` bytes). The caller checks the offsets
/// (the first `8 × count` bytes).
pub(crate) fn parse_pages<'a>(
    rest: &'a [u8],
    count: usize,
    page_size: usize,
    out: &mut Vec<&'a [u8]>,
) -> std::result::Result<(), String> {
    out.clear();
    let fixed = count * 10;
    if rest.len() < fixed {
        return Err(format!("{count} sparse pages in {} bytes", rest.len()));
    }
    let rest = &rest[count * 8..];
    let (counts, mut entries) = rest.split_at(count * 2);
    let words_per_page = page_size / 8;
    for i in 0..count {
        let n = usize::from(u16::from_le_bytes([counts[2 * i], counts[2 * i + 1]]));
        if n == 0 || n > MAX_SPARSE_WORDS {
            return Err(format!("sparse page with {n} words"));
        }
        let len = n * SPARSE_ENTRY_BYTES;
        if entries.len() < len {
            return Err("sparse entries cut short".into());
        }
        let (mine, next) = entries.split_at(len);
        let mut prev: Option<usize> = None;
        for e in mine.chunks_exact(SPARSE_ENTRY_BYTES) {
            let w = usize::from(u16::from_le_bytes([e[0], e[1]]));
            if w >= words_per_page || prev.is_some_and(|p| w <= p) {
                return Err(format!("sparse word index {w}"));
            }
            prev = Some(w);
        }
        out.push(mine);
        entries = next;
    }
    if !entries.is_empty() {
        return Err(format!("{} bytes after the sparse entries", entries.len()));
    }
    Ok(())
}

/// Writes a sparse page: zeroes `page`, then stores its words.
pub(crate) fn apply(page: &mut [u8], entries: &[u8]) {
    page.fill(0);
    for e in entries.chunks_exact(SPARSE_ENTRY_BYTES) {
        let w = usize::from(u16::from_le_bytes([e[0], e[1]]));
        page[8 * w..8 * w + 8].copy_from_slice(&e[2..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(words: &[(usize, u64)]) -> Vec<u64> {
        let mut p = vec![0u64; 512];
        for &(i, v) in words {
            p[i] = v;
        }
        p
    }

    fn bytes(p: &[u64]) -> &[u8] {
        // SAFETY: a u64 slice is valid as bytes of 8x its length.
        unsafe { std::slice::from_raw_parts(p.as_ptr().cast(), p.len() * 8) }
    }

    #[test]
    fn classifies_and_round_trips() {
        let mut b = SparseBatch::default();
        assert_eq!(b.classify(0, bytes(&page_with(&[]))), PageClass::Zero);
        let sparse = page_with(&[(0, 7), (9, u64::MAX), (511, 1)]);
        assert_eq!(b.classify(3, bytes(&sparse)), PageClass::Sparse);
        let dense: Vec<(usize, u64)> = (0..=MAX_SPARSE_WORDS).map(|i| (i * 3, 1)).collect();
        assert_eq!(b.classify(4, bytes(&page_with(&dense))), PageClass::Dense);
        let full: Vec<(usize, u64)> = (0..MAX_SPARSE_WORDS).map(|i| (i * 7, 5)).collect();
        assert_eq!(b.classify(5, bytes(&page_with(&full))), PageClass::Sparse);
        assert_eq!(b.len(), 2);

        let mut buf = Vec::new();
        let body = b.body_parts(&mut buf).concat();
        let mut pages = Vec::new();
        parse_pages(&body, 2, 4096, &mut pages).unwrap();
        assert_eq!(b.offsets(), [3, 5]);
        assert_eq!(
            &body[..16],
            [3u64.to_le_bytes(), 5u64.to_le_bytes()].concat()
        );
        let mut out = vec![0xffu8; 4096];
        apply(&mut out, pages[0]);
        assert_eq!(out, bytes(&sparse));
        apply(&mut out, pages[1]);
        assert_eq!(out, bytes(&page_with(&full)));
    }

    #[test]
    fn rejects_bad_entries() {
        let mut b = SparseBatch::default();
        b.classify(1, bytes(&page_with(&[(2, 1), (3, 1)])));
        let mut buf = Vec::new();
        let body = b.body_parts(&mut buf).concat();
        let mut pages = Vec::new();
        // A page too small for word 3, a count that is off, bytes left over.
        assert!(parse_pages(&body, 1, 16, &mut pages).is_err());
        assert!(parse_pages(&body, 2, 4096, &mut pages).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(parse_pages(&longer, 1, 4096, &mut pages).is_err());
        // Indices out of order.
        let mut swapped = body.clone();
        swapped[10..12].copy_from_slice(&3u16.to_le_bytes());
        swapped[20..22].copy_from_slice(&2u16.to_le_bytes());
        assert!(parse_pages(&swapped, 1, 4096, &mut pages).is_err());
        // Zero words.
        let mut zero = body.clone();
        zero[8..10].copy_from_slice(&0u16.to_le_bytes());
        assert!(parse_pages(&zero, 1, 4096, &mut pages).is_err());
    }
}
