//! Fuzz target: like `decode`, but first rewrites every checksum in the input
//! (preamble CRC, then each record's body and header CRC, walking the record
//! lengths) so mutations reach the record parsers instead of dying at a CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::format::{PREAMBLE_BYTES, RECORD_HEADER_BYTES};

fn fix_crcs(data: &mut [u8]) {
    if data.len() < PREAMBLE_BYTES {
        return;
    }
    let crc = crc32c::crc32c(&data[..20]);
    data[20..24].copy_from_slice(&crc.to_le_bytes());
    let mut at = PREAMBLE_BYTES;
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

fuzz_target!(|data: &[u8]| {
    let mut v = data.to_vec();
    fix_crcs(&mut v);
    let _ = transport::decode_bytes(&v, 1 << 22);
});
