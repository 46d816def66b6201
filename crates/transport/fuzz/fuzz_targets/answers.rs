//! Fuzz target: the sender's back-channel parser (Applied, Ready, Ack, Refuse and
//! their order) over arbitrary bytes, with every record's CRC fixed first so
//! mutations reach the parser. It must never panic, and never take bytes that
//! break the order for an answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/crc.rs"]
mod crc;

fuzz_target!(|data: &[u8]| {
    let mut v = data.to_vec();
    crc::fix_record_crcs(&mut v, 0);
    let a = transport::decode_answers(&v);
    // An answer needs the switch-over offer before it.
    if a.answer.is_ok() {
        assert!(a.ready);
    }
});
