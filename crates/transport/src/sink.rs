//! Where received pages go: the destination's guest memory, behind [`PageSink`].

use crate::format::StreamHeader;

/// The destination's guest memory, as the receiver writes it.
///
/// The receiver checks every block index and page index against the stream
/// header's block table before asking for a page, then reads page data from the
/// socket straight into the returned memory (`readv`, no intermediate copy).
///
/// # Safety
/// An implementation must return, for every `block_idx < blocks.len()` and
/// `page_index < block size / page size` of the header it receives, either null
/// (the receiver then fails with an out-of-bounds error) or a pointer valid for
/// reads and writes of `page_size` bytes for as long as the receive runs, with
/// distinct pages not overlapping, and nothing else reading or writing that
/// memory meanwhile (the guest is not running on the destination).
///
/// Pages of different channels are written from different threads. A peer that
/// sends the same page twice within one iteration on two channels makes two
/// threads write that page at once; its content is then undefined (and the
/// stream is not one Ferry's sender produces), but no other memory is touched.
pub unsafe trait PageSink: Sync {
    /// Host address of page `page_index` of block `block_idx`, or null to refuse.
    fn page_ptr(&self, block_idx: usize, page_index: u64) -> *mut u8;

    /// The receiver is about to write the pages `offsets` (increasing, in bounds) of
    /// block `block_idx`. A sink whose memory is mapped lazily may map them here in one
    /// go (cheaper than a page fault each); the default does nothing. Never changes
    /// what any page reads.
    fn prepare_pages(&self, block_idx: usize, offsets: &[u64], page_size: usize) {
        let _ = (block_idx, offsets, page_size);
    }

    /// Like [`PageSink::page_ptr`], for a page that arrived on connection `channel`
    /// (0 is the control connection). A sink that stages pages may keep one staging
    /// area per connection: after a switch to postcopy the priority connection may
    /// carry a page that a data connection carries at the same time. The default is
    /// `page_ptr`.
    fn channel_page_ptr(&self, channel: usize, block_idx: usize, page_index: u64) -> *mut u8 {
        let _ = channel;
        self.page_ptr(block_idx, page_index)
    }

    /// The receiver wrote the pages `offsets` of block `block_idx`, from one record on
    /// connection `channel` (through [`PageSink::channel_page_ptr`] or
    /// [`PageSink::zero_page`]), and checked them: a sink that stages pages (postcopy
    /// installs each page atomically where the guest sees it) takes them from here. An
    /// error fails the stream. The default does nothing.
    fn pages_done(
        &self,
        channel: usize,
        block_idx: usize,
        offsets: &[u64],
        page_size: usize,
    ) -> std::result::Result<(), String> {
        let _ = (channel, block_idx, offsets, page_size);
        Ok(())
    }

    /// Makes the page zero. The default skips pages that already read as zero
    /// (like QEMU), so untouched destination memory is never written.
    fn zero_page(&self, block_idx: usize, page_index: u64, page_size: usize) {
        let p = self.page_ptr(block_idx, page_index);
        if p.is_null() {
            return;
        }
        // SAFETY: per the trait contract `p` is valid for `page_size` bytes of reads
        // and writes and nobody else accesses it during the receive.
        let page = unsafe { std::slice::from_raw_parts_mut(p, page_size) };
        if !is_zero(page) {
            page.fill(0);
        }
    }
}

/// Whether a buffer is all zero bytes (word at a time).
pub fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any byte pattern is a valid u64; `align_to` only splits at
        // aligned boundaries.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0)
        && tail.iter().all(|&x| x == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

/// Guest memory held in plain vectors: a [`PageSink`] for tests, restores into
/// host buffers, and embedding without KVM.
pub struct VecSink {
    page_size: usize,
    blocks: Vec<Vec<u8>>,
    bases: Vec<*mut u8>,
}

// SAFETY: the raw base pointers point into `blocks`, which `VecSink` owns; the
// pointers are only handed out through `PageSink`, whose contract makes the
// receiver write distinct pages, and reading the vectors needs `&mut self`.
unsafe impl Send for VecSink {}
// SAFETY: see `Send` above; shared access only hands out raw pointers.
unsafe impl Sync for VecSink {}

impl VecSink {
    /// Zeroed memory for every block of `header`.
    pub fn for_header(header: &StreamHeader) -> Self {
        let mut blocks: Vec<Vec<u8>> = header
            .blocks
            .iter()
            .map(|b| vec![0u8; b.size_bytes as usize])
            .collect();
        let bases = blocks.iter_mut().map(|b| b.as_mut_ptr()).collect();
        VecSink {
            page_size: header.page_size as usize,
            blocks,
            bases,
        }
    }

    /// The bytes of block `idx`.
    pub fn block(&mut self, idx: usize) -> &[u8] {
        &self.blocks[idx]
    }

    /// All blocks, consuming the sink.
    pub fn into_blocks(self) -> Vec<Vec<u8>> {
        self.blocks
    }
}

// SAFETY: pointers are bounds-checked against the owned vectors (null otherwise),
// each page is `page_size` bytes inside its block, and distinct pages are disjoint.
unsafe impl PageSink for VecSink {
    fn page_ptr(&self, block_idx: usize, page_index: u64) -> *mut u8 {
        let Some(block) = self.blocks.get(block_idx) else {
            return std::ptr::null_mut();
        };
        let pages = (block.len() / self.page_size) as u64;
        if page_index >= pages {
            return std::ptr::null_mut();
        }
        // SAFETY: page_index < pages, so the offset is inside the block's allocation.
        unsafe { self.bases[block_idx].add(page_index as usize * self.page_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        page[4095] = 1;
        assert!(!is_zero(&page));
        page[4095] = 0;
        page[17] = 3;
        assert!(!is_zero(&page));
        assert!(is_zero(&page[18..]));
        assert!(is_zero(&[]));
    }
}
