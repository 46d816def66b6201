//! Fuzz target: the whole receive path (preamble, header, every record kind,
//! zstd, bounds checks) over arbitrary bytes. It must never panic or allocate
//! beyond the format's caps.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = transport::decode_bytes(data, 1 << 22);
});
