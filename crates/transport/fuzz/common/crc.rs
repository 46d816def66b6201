//! Shared by the `*_fixcrc`-style targets: rewrites checksums so mutations reach
//! the parsers behind them.

use transport::format::RECORD_HEADER_BYTES;

/// Rewrites the body and header CRC of every record from byte `at` on, walking the
/// records by their length fields (a length past the end covers the rest).
pub fn fix_record_crcs(data: &mut [u8], mut at: usize) {
    while at + RECORD_HEADER_BYTES <= data.len() {
        let len = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
        let body_start = at + RECORD_HEADER_BYTES;
        let body_end = body_start.saturating_add(len).min(data.len());
        let body_crc = crc32c::crc32c(&data[body_start..body_end]);
        data[at + 8..at + 12].copy_from_slice(&body_crc.to_le_bytes());
        let head_crc = crc32c::crc32c(&data[at..at + 12]);
        data[at + 12..at + 16].copy_from_slice(&head_crc.to_le_bytes());
        at = body_end;
    }
}
