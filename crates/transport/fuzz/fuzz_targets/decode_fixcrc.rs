//! Fuzz target: like `decode`, but first rewrites every checksum in the input
//! (preamble CRC, then each record's body and header CRC, walking the record
//! lengths) so mutations reach the record parsers instead of dying at a CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use transport::format::PREAMBLE_BYTES;

#[path = "../common/crc.rs"]
mod crc;

fn fix_crcs(data: &mut [u8]) {
    if data.len() < PREAMBLE_BYTES {
        return;
    }
    let crc = crc32c::crc32c(&data[..20]);
    data[20..24].copy_from_slice(&crc.to_le_bytes());
    crc::fix_record_crcs(data, PREAMBLE_BYTES);
}

fuzz_target!(|data: &[u8]| {
    let mut v = data.to_vec();
    fix_crcs(&mut v);
    let _ = transport::decode_bytes(&v, 1 << 22);
});
