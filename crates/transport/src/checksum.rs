//! CRC32C (Castagnoli), the checksum of every preamble, record header and body.
//!
//! The values are the standard CRC-32C (iSCSI) ones; crc-fast computes them by
//! carry-less-multiply folding (VPCLMULQDQ with AVX-512 where the CPU has it, picked
//! at run time), about twice as fast in cache as the `crc32` instruction here
//! (36 vs 17 GB/s on 4 KiB pages), which matters: every page is checksummed once on
//! each side of the wire.

use crc_fast::{CrcAlgorithm, Digest};

/// CRC32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// CRC32C of the bytes that gave `crc`, followed by `data`
/// (`crc32c_append(crc32c(a), b) == crc32c(a ++ b)`; `crc32c_append(0, b) == crc32c(b)`).
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    // The digest's state is the register before the final inversion.
    let mut d = Digest::new_with_init_state(CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_values_and_append() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 + i / 977) as u8).collect();
        let whole = crc32c(&data);
        for cut in [0, 1, 7, 64, 4095, 4096, 50_000, 100_000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(crc32c_append(crc32c(a), b), whole, "cut {cut}");
        }
        assert_eq!(crc32c_append(0, &data), whole);
        let chunked = data.chunks(4096).fold(0, crc32c_append);
        assert_eq!(chunked, whole);
    }
}
