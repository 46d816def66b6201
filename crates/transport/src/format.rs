//! The wire format: constants, the connection preamble, record headers and the
//! stream header. `FORMAT.md` beside `Cargo.toml` is the prose version.
//!
//! All integers are little-endian. Checksums are CRC32C (Castagnoli), except those
//! of page batches in a stream with [`FEATURE_XXH3_PAGES`] (see [`PageChecksum`]).

use crate::checksum::{self, PageChecksum};
use crate::error::{Error, Result};

/// First four bytes of every connection.
pub const MAGIC: [u8; 4] = *b"FRRY";
/// Format version this build writes and reads.
pub const VERSION: u16 = 3;
/// Size of the connection preamble.
pub const PREAMBLE_BYTES: usize = 24;
/// Size of every record header.
pub const RECORD_HEADER_BYTES: usize = 16;
/// Cap on any record body: a hostile length cannot make the receiver allocate more.
pub const MAX_BODY_BYTES: u32 = 16 << 20;
/// Cap on pages in one page batch (further limited by [`MAX_BODY_BYTES`]).
pub const MAX_BATCH_PAGES: u32 = 1024;
/// Cap on offsets in one zero-page record.
pub const MAX_ZERO_BATCH_PAGES: u32 = 65536;
/// Cap on RAM blocks in the stream header.
pub const MAX_BLOCKS: u32 = 1024;
/// Cap on a RAM block id or device-state name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 255;
/// Cap on parallel channels.
pub const MAX_CHANNELS: u16 = 64;
/// Smallest and largest page size accepted (both powers of two).
pub const PAGE_SIZE_RANGE_BYTES: (u32, u32) = (512, 1 << 20);
/// Cap on the message of a refusal record.
pub const MAX_MESSAGE_BYTES: u32 = 4096;
/// Page-batch flag: the page data is one zstd frame.
pub const FLAG_ZSTD: u8 = 1;
/// Page-batch flag: the pages were read while the guest ran, so they may change while
/// the record is written. The offsets are followed by one CRC32C per page, the header
/// CRC covers prefix, offsets and those CRCs, and a page whose CRC does not match is
/// *torn* (it must come again) instead of failing the stream. See FORMAT.md.
pub const FLAG_LIVE: u8 = 2;

/// Record types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Stream header (control connection, first record).
    Header = 1,
    /// A batch of pages of one block: offsets, then page data.
    Pages = 2,
    /// Zero pages of one block: offsets only.
    ZeroPages = 3,
    /// Device state: name and bytes (control connection).
    DeviceState = 4,
    /// Iteration barrier / marker, on every connection.
    Sync = 5,
    /// End of stream on this connection, with its record count.
    End = 6,
    /// Back-channel: the receiver took the stream (and whether it resumed).
    Ack = 7,
    /// Back-channel: the receiver refused the stream, with a message.
    Refuse = 8,
    /// Sparse pages of one block: offsets, then each page's non-zero words.
    SparsePages = 9,
    /// Back-channel: every page up to this iteration is in the receiver's memory.
    Applied = 10,
    /// Back-channel: the stream ended cleanly and the receiver loaded it; it waits
    /// for `Commit` before it starts the guest.
    Ready = 11,
    /// Control, after `End`: the sender hands the guest over. Only after this may
    /// the receiver start it; from here on the sender never resumes its copy.
    Commit = 12,
    /// Control, before `Switch` (postcopy streams only): pages of one block that the
    /// receiver must drop, as runs; they come again after the switch.
    Discard = 13,
    /// Every connection (postcopy streams only): the precopy part of the stream ends
    /// here, with its record count; the switch-over follows, then the postcopy part
    /// on the same connections, which ends with `End`.
    Switch = 14,
    /// Back-channel, postcopy: the receiver needs this page now (a vCPU waits on it).
    PageRequest = 15,
    /// Back-channel, postcopy: every page is in the receiver's memory; the sender may
    /// let its copy go.
    Done = 16,
    /// Back-channel, first answer to a resumed postcopy stream ([`FEATURE_RESUME`]):
    /// pages of one block the receiver still lacks, as runs (`Discard`'s layout).
    /// `Ready` ends the list; page requests follow.
    Missing = 17,
}

impl Kind {
    fn from_u8(v: u8) -> Result<Kind> {
        Ok(match v {
            1 => Kind::Header,
            2 => Kind::Pages,
            3 => Kind::ZeroPages,
            4 => Kind::DeviceState,
            5 => Kind::Sync,
            6 => Kind::End,
            7 => Kind::Ack,
            8 => Kind::Refuse,
            9 => Kind::SparsePages,
            10 => Kind::Applied,
            11 => Kind::Ready,
            12 => Kind::Commit,
            13 => Kind::Discard,
            14 => Kind::Switch,
            15 => Kind::PageRequest,
            16 => Kind::Done,
            17 => Kind::Missing,
            other => return Err(Error::UnknownRecord(other)),
        })
    }
}

/// Largest page batch for a page size: bounded by [`MAX_BATCH_PAGES`] and the body cap.
pub fn max_batch_pages(page_size: u32) -> u32 {
    let per_page = u64::from(page_size) + 8;
    let fit = (u64::from(MAX_BODY_BYTES) - 8) / per_page;
    MAX_BATCH_PAGES.min(fit as u32).max(1)
}

/// Encodes a whole small record (header and one body part).
pub(crate) fn encode_record(kind: Kind, body: &[u8]) -> Vec<u8> {
    let hdr = RecordHeader {
        kind,
        flags: 0,
        body_len: body.len() as u32,
        body_crc: checksum::crc32c(body),
    }
    .encode();
    [&hdr[..], body].concat()
}

/// The 16-byte header in front of every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Record type.
    pub kind: Kind,
    /// Type-specific flags ([`FLAG_ZSTD`]).
    pub flags: u8,
    /// Body length in bytes.
    pub body_len: u32,
    /// CRC32C of the body.
    pub body_crc: u32,
}

impl RecordHeader {
    /// Encodes the header, with its own CRC in the last four bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut b = [0u8; RECORD_HEADER_BYTES];
        b[0] = self.kind as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        b[8..12].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = checksum::crc32c(&b[..12]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header: its CRC, the type, reserved bits and the length cap.
    pub fn decode(b: &[u8; RECORD_HEADER_BYTES]) -> Result<RecordHeader> {
        if checksum::crc32c(&b[..12]) != u32_at(b, 12) {
            return Err(Error::Checksum {
                what: "record header",
            });
        }
        let kind = Kind::from_u8(b[0])?;
        let flags = b[1];
        let allowed = if kind == Kind::Pages {
            FLAG_ZSTD | FLAG_LIVE
        } else {
            0
        };
        if flags & !allowed != 0 || b[2] != 0 || b[3] != 0 {
            return Err(Error::Malformed(format!(
                "reserved bits set in {kind:?} header"
            )));
        }
        let body_len = u32_at(b, 4);
        if body_len > MAX_BODY_BYTES {
            return Err(Error::TooLong {
                what: "record body",
                len_bytes: body_len.into(),
                max_bytes: MAX_BODY_BYTES.into(),
            });
        }
        Ok(RecordHeader {
            kind,
            flags,
            body_len,
            body_crc: u32_at(b, 8),
        })
    }
}

/// The preamble every connection starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// This connection's index; 0 is the control connection.
    pub channel_index: u16,
    /// Number of connections in the stream.
    pub channel_count: u16,
    /// Random id shared by all connections of one stream.
    pub session_id: u64,
}

impl Preamble {
    /// Encodes the preamble with its CRC.
    pub fn encode(&self) -> [u8; PREAMBLE_BYTES] {
        let mut b = [0u8; PREAMBLE_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.channel_index.to_le_bytes());
        b[8..10].copy_from_slice(&self.channel_count.to_le_bytes());
        b[12..20].copy_from_slice(&self.session_id.to_le_bytes());
        let crc = checksum::crc32c(&b[..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a preamble: magic, then version, then CRC and field ranges.
    pub fn decode(b: &[u8; PREAMBLE_BYTES]) -> Result<Preamble> {
        let mut found = [0u8; 4];
        found.copy_from_slice(&b[0..4]);
        if found != MAGIC {
            return Err(Error::BadMagic { found });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(Error::BadVersion {
                found: version,
                supported: VERSION,
            });
        }
        if checksum::crc32c(&b[..20]) != u32_at(b, 20) {
            return Err(Error::Checksum { what: "preamble" });
        }
        let p = Preamble {
            channel_index: u16::from_le_bytes([b[6], b[7]]),
            channel_count: u16::from_le_bytes([b[8], b[9]]),
            session_id: u64_at(b, 12),
        };
        if b[10] != 0 || b[11] != 0 {
            return Err(Error::Malformed("reserved preamble bytes set".into()));
        }
        if p.channel_count == 0
            || p.channel_count > MAX_CHANNELS
            || p.channel_index >= p.channel_count
        {
            return Err(Error::Malformed(format!(
                "channel {} of {} (at most {MAX_CHANNELS})",
                p.channel_index, p.channel_count
            )));
        }
        Ok(p)
    }
}

/// Page-batch compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Pages travel as they are (zero-copy send).
    #[default]
    None,
    /// Each page batch is one zstd frame (level 1).
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(Error::InvalidArgument(format!(
                "compression {s:?}: expected none or zstd"
            ))),
        }
    }
}

/// One RAM block of the guest, as named in the stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockInfo {
    /// Block id (at most 255 bytes of UTF-8), e.g. `pc.ram`.
    pub id: String,
    /// Block size; a multiple of the page size.
    pub size_bytes: u64,
}

/// Features in use for the stream, fixed at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Compression of page batches.
    pub compression: Compression,
    /// Number of connections (control included).
    pub channels: u16,
    /// Whether the sender may send [`Kind::SparsePages`] records.
    pub sparse_pages: bool,
    /// The checksum of page batches ([`FEATURE_XXH3_PAGES`] when XXH3).
    pub page_checksum: PageChecksum,
    /// Whether the stream may switch to postcopy ([`FEATURE_POSTCOPY`]): its last
    /// connection is then the priority connection, which carries only the pages the
    /// receiver requested.
    pub postcopy: bool,
    /// Whether the stream resumes a postcopy stream whose connections broke
    /// ([`FEATURE_RESUME`]): it has only a postcopy part.
    pub resume: bool,
    /// The stream runs inside TLS ([`FEATURE_AEAD_PAGES`]): the body checksum of page
    /// batches is left out (zero), the AEAD authenticates those bytes; the per-page
    /// checksums of live batches stay (they find torn pages, which no AEAD can).
    pub aead_pages: bool,
}

/// Header feature bit: sparse-page records may follow.
pub const FEATURE_SPARSE_PAGES: u8 = 1;
/// Header feature bit: every checksum of a page batch (the body checksum in its
/// record header and, in live batches, the per-page checksums) is the low 32 bits of
/// XXH3-64 (seed 0) instead of CRC32C.
pub const FEATURE_XXH3_PAGES: u8 = 2;
/// Header feature bit: the stream may switch to postcopy (records `Discard`, `Switch`,
/// `PageRequest` and `Done`), and its last connection is the priority connection.
pub const FEATURE_POSTCOPY: u8 = 4;
/// Header feature bit (with [`FEATURE_POSTCOPY`]): the stream continues a postcopy
/// stream whose connections broke, named by the preamble's session id. It has no
/// precopy part: the receiver answers with `Missing` records and `Ready`, then the
/// postcopy part follows on every connection.
pub const FEATURE_RESUME: u8 = 8;
/// Header feature bit: the stream runs inside TLS 1.3 and the body checksum of every
/// page batch (type 2) is zero and not checked: the record layer's AEAD tag already
/// authenticates every byte. A receiver refuses it on a connection without TLS.
/// The per-page checksums of live batches stay.
pub const FEATURE_AEAD_PAGES: u8 = 16;
/// Every feature bit this build knows.
const KNOWN_FEATURES: u8 = FEATURE_SPARSE_PAGES
    | FEATURE_XXH3_PAGES
    | FEATURE_POSTCOPY
    | FEATURE_RESUME
    | FEATURE_AEAD_PAGES;
/// Cap on runs in one `Discard` record.
pub const MAX_DISCARD_RUNS: u32 = 65536;

/// The stream header: page size, RAM block table and features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// Guest page size in bytes (power of two).
    pub page_size: u32,
    /// RAM blocks; records address pages by index into this table.
    pub blocks: Vec<BlockInfo>,
    /// Features in use.
    pub features: Features,
}

impl StreamHeader {
    /// Checks the header's own consistency (page size, block sizes, names, channels).
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = PAGE_SIZE_RANGE_BYTES;
        if !self.page_size.is_power_of_two() || self.page_size < lo || self.page_size > hi {
            return Err(Error::Malformed(format!(
                "page size {} (power of two in {lo}..={hi})",
                self.page_size
            )));
        }
        if self.blocks.len() > MAX_BLOCKS as usize {
            return Err(Error::TooLong {
                what: "block table",
                len_bytes: self.blocks.len() as u64,
                max_bytes: MAX_BLOCKS.into(),
            });
        }
        for b in &self.blocks {
            if b.id.is_empty() || b.id.len() > MAX_NAME_BYTES {
                return Err(Error::Malformed(format!("block id {:?}", b.id)));
            }
            if b.size_bytes == 0 || b.size_bytes & (u64::from(self.page_size) - 1) != 0 {
                return Err(Error::Malformed(format!(
                    "block {:?} size {} is not a positive multiple of the page size",
                    b.id, b.size_bytes
                )));
            }
        }
        if self.features.resume && !self.features.postcopy {
            return Err(Error::Malformed(
                "a resumed stream that is not a postcopy stream".into(),
            ));
        }
        let c = self.features.channels;
        if c == 0 || c > MAX_CHANNELS || (self.features.postcopy && c < 2) {
            return Err(Error::Malformed(format!(
                "{c} channels{}",
                if self.features.postcopy {
                    " (postcopy needs a priority connection besides the control one)"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    /// Pages in block `idx`, if it exists.
    pub fn block_pages(&self, idx: usize) -> Option<u64> {
        self.blocks
            .get(idx)
            .map(|b| b.size_bytes / u64::from(self.page_size))
    }

    /// Encodes the header as a record body.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.blocks.len() * 32);
        v.extend_from_slice(&self.page_size.to_le_bytes());
        v.push(match self.features.compression {
            Compression::None => 0,
            Compression::Zstd => 1,
        });
        let mut bits = 0;
        if self.features.sparse_pages {
            bits |= FEATURE_SPARSE_PAGES;
        }
        if self.features.page_checksum == PageChecksum::Xxh3 {
            bits |= FEATURE_XXH3_PAGES;
        }
        if self.features.postcopy {
            bits |= FEATURE_POSTCOPY;
        }
        if self.features.resume {
            bits |= FEATURE_RESUME;
        }
        if self.features.aead_pages {
            bits |= FEATURE_AEAD_PAGES;
        }
        v.push(bits);
        v.extend_from_slice(&self.features.channels.to_le_bytes());
        v.extend_from_slice(&(self.blocks.len() as u32).to_le_bytes());
        for b in &self.blocks {
            v.push(b.id.len() as u8);
            v.extend_from_slice(b.id.as_bytes());
            v.extend_from_slice(&b.size_bytes.to_le_bytes());
        }
        v
    }

    /// Decodes and validates a header body.
    pub fn decode_body(body: &[u8]) -> Result<StreamHeader> {
        let mut c = Cursor::new(body);
        let page_size = c.u32()?;
        let compression = match c.u8()? {
            0 => Compression::None,
            1 => Compression::Zstd,
            other => return Err(Error::Malformed(format!("compression {other}"))),
        };
        let feature_bits = c.u8()?;
        if feature_bits & !KNOWN_FEATURES != 0 {
            return Err(Error::Malformed(format!(
                "unknown feature bits {feature_bits:#x}"
            )));
        }
        let channels = c.u16()?;
        let count = c.u32()?;
        if count > MAX_BLOCKS {
            return Err(Error::TooLong {
                what: "block table",
                len_bytes: count.into(),
                max_bytes: MAX_BLOCKS.into(),
            });
        }
        let mut blocks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let len = c.u8()? as usize;
            let id = std::str::from_utf8(c.bytes(len)?)
                .map_err(|_| Error::Malformed("block id is not UTF-8".into()))?
                .to_string();
            let size_bytes = c.u64()?;
            blocks.push(BlockInfo { id, size_bytes });
        }
        c.finish()?;
        let h = StreamHeader {
            page_size,
            blocks,
            features: Features {
                compression,
                channels,
                sparse_pages: feature_bits & FEATURE_SPARSE_PAGES != 0,
                page_checksum: if feature_bits & FEATURE_XXH3_PAGES != 0 {
                    PageChecksum::Xxh3
                } else {
                    PageChecksum::Crc32c
                },
                postcopy: feature_bits & FEATURE_POSTCOPY != 0,
                resume: feature_bits & FEATURE_RESUME != 0,
                aead_pages: feature_bits & FEATURE_AEAD_PAGES != 0,
            },
        };
        h.validate()?;
        Ok(h)
    }
}

/// The body of a `Discard` or `Missing` record: `u32 block, u32 count, (u64 first,
/// u64 pages)[count]`, for at most [`MAX_DISCARD_RUNS`] runs.
pub(crate) fn encode_runs(block_idx: usize, runs: &[(u64, u64)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(8 + 16 * runs.len());
    body.extend_from_slice(&(block_idx as u32).to_le_bytes());
    body.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for &(first, n) in runs {
        body.extend_from_slice(&first.to_le_bytes());
        body.extend_from_slice(&n.to_le_bytes());
    }
    body
}

/// Checks runs of `(first page, pages)` of block `block_idx` before they are sent:
/// the block is in `header`, every run is non-empty and inside it.
pub(crate) fn check_runs(
    header: &StreamHeader,
    block_idx: usize,
    runs: &[(u64, u64)],
    what: &str,
) -> Result<()> {
    let pages = header.block_pages(block_idx).ok_or_else(|| {
        Error::InvalidArgument(format!("block index {block_idx} not in the header"))
    })?;
    if runs
        .iter()
        .any(|&(first, n)| n == 0 || first.checked_add(n).is_none_or(|end| end > pages))
    {
        return Err(Error::InvalidArgument(format!(
            "a {what} run outside block {block_idx} ({pages} pages), or empty"
        )));
    }
    Ok(())
}

/// Decodes an [`encode_runs`] body against `header`: every run non-empty and inside
/// its block, at least one and at most [`MAX_DISCARD_RUNS`].
pub(crate) fn decode_runs(
    header: &StreamHeader,
    body: &[u8],
    what: &str,
) -> Result<(usize, Vec<(u64, u64)>)> {
    if body.len() < 8 || !(body.len() - 8).is_multiple_of(16) {
        return Err(Error::Malformed(format!(
            "{what} record of {} bytes",
            body.len()
        )));
    }
    let block_idx = u32_at(body, 0) as usize;
    let block_pages = header.block_pages(block_idx).ok_or(Error::OutOfBounds {
        block_idx: block_idx as u64,
        page_index: 0,
    })?;
    let count = u32_at(body, 4) as usize;
    if count == 0 || count > MAX_DISCARD_RUNS as usize || count * 16 != body.len() - 8 {
        return Err(Error::Malformed(format!("{what} of {count} runs")));
    }
    let runs = body[8..]
        .chunks_exact(16)
        .map(|c| {
            let (first, n) = (u64_at(c, 0), u64_at(c, 8));
            match first.checked_add(n) {
                Some(end) if n > 0 && end <= block_pages => Ok((first, n)),
                _ => Err(Error::OutOfBounds {
                    block_idx: block_idx as u64,
                    page_index: first,
                }),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((block_idx, runs))
}

/// Reads a little-endian u32 at `at` (caller guarantees the bounds).
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Reads a little-endian u64 at `at` (caller guarantees the bounds).
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Bounds-checked little-endian reader over a record body.
pub(crate) struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Cursor { b, at: 0 }
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| Error::Malformed("record body too short".into()))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(crate) fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16> {
        let s = self.bytes(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32_at(self.bytes(4)?, 0))
    }
    pub(crate) fn u64(&mut self) -> Result<u64> {
        Ok(u64_at(self.bytes(8)?, 0))
    }
    pub(crate) fn finish(&self) -> Result<()> {
        if self.at == self.b.len() {
            Ok(())
        } else {
            Err(Error::Malformed("trailing bytes in record body".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_header_round_trips_and_catches_flips() {
        let h = RecordHeader {
            kind: Kind::Pages,
            flags: FLAG_ZSTD,
            body_len: 1234,
            body_crc: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(RecordHeader::decode(&b).unwrap(), h);
        for bit in 0..RECORD_HEADER_BYTES * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert!(RecordHeader::decode(&c).is_err());
        }
    }

    #[test]
    fn header_round_trips() {
        let mut h = StreamHeader {
            page_size: 4096,
            blocks: vec![
                BlockInfo {
                    id: "pc.ram".into(),
                    size_bytes: 1 << 20,
                },
                BlockInfo {
                    id: "vga".into(),
                    size_bytes: 8192,
                },
            ],
            features: Features {
                compression: Compression::Zstd,
                channels: 4,
                sparse_pages: true,
                page_checksum: PageChecksum::Xxh3,
                postcopy: false,
                resume: false,
                aead_pages: false,
            },
        };
        for (sparse_pages, page_checksum, bits) in [
            (
                true,
                PageChecksum::Xxh3,
                FEATURE_SPARSE_PAGES | FEATURE_XXH3_PAGES,
            ),
            (true, PageChecksum::Crc32c, FEATURE_SPARSE_PAGES),
            (false, PageChecksum::Xxh3, FEATURE_XXH3_PAGES),
            (false, PageChecksum::Crc32c, 0),
        ] {
            h.features.sparse_pages = sparse_pages;
            h.features.page_checksum = page_checksum;
            let body = h.encode_body();
            assert_eq!(body[5], bits, "feature byte");
            assert_eq!(StreamHeader::decode_body(&body).unwrap(), h);
        }
        h.features.postcopy = true;
        let body = h.encode_body();
        assert_eq!(body[5] & FEATURE_POSTCOPY, FEATURE_POSTCOPY);
        assert_eq!(StreamHeader::decode_body(&body).unwrap(), h);
        h.features.postcopy = false;
        h.features.aead_pages = true;
        let body = h.encode_body();
        assert_eq!(body[5] & FEATURE_AEAD_PAGES, FEATURE_AEAD_PAGES);
        assert_eq!(StreamHeader::decode_body(&body).unwrap(), h);
        h.features.aead_pages = false;
        // Bits this build does not know are refused (and resume alone).
        let mut body = h.encode_body();
        for bit in [3, 5, 6, 7] {
            body[5] = 1 << bit;
            assert!(StreamHeader::decode_body(&body).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn batch_cap_respects_body_cap() {
        assert_eq!(max_batch_pages(4096), 1024);
        let big = max_batch_pages(1 << 20);
        assert!(u64::from(big) * ((1 << 20) + 8) + 8 <= u64::from(MAX_BODY_BYTES));
    }
}
