//! Live pages (sent while the guest runs) may change in flight: a torn page is not an
//! error until the end of the stream, and only if it was never sent intact again.

mod common;

use common::temp_path;
use transport::{
    decode_bytes, BlockInfo, Compression, Error, PageChecksum, SendOptions, Sender, Uri,
};

const PAGE: usize = 512;

/// Both page checksums; every test here runs with each.
const SUMS: [PageChecksum; 2] = [PageChecksum::Xxh3, PageChecksum::Crc32c];

/// Builds a one-channel `file:` stream with `f` and page checksum `sum`, returns its
/// bytes.
fn stream(sum: PageChecksum, f: impl FnOnce(&Sender)) -> Vec<u8> {
    let path = temp_path("torn");
    let s = Sender::connect(
        &Uri::File(path.clone()),
        PAGE as u32,
        vec![BlockInfo {
            id: "ram".into(),
            size_bytes: 8 * PAGE as u64,
        }],
        SendOptions {
            channels: 1,
            compression: Compression::None,
            max_bandwidth_bytes_per_sec: 0,
            page_checksum: sum,
            ..Default::default()
        },
    )
    .unwrap();
    f(&s);
    s.finish().unwrap();
    let b = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    b
}

/// Flips one byte of the first occurrence of `page` in `bytes` (tears it in flight).
fn tear(bytes: &mut [u8], page: &[u8]) {
    let at = bytes
        .windows(page.len())
        .position(|w| w == page)
        .expect("page in stream");
    bytes[at + 100] ^= 0xff;
}

#[test]
fn an_intact_live_stream_decodes() {
    for sum in SUMS {
        let a = vec![0xaa; PAGE];
        let s = stream(sum, |s| s.send_live_pages(0, &[2], &[&a]).unwrap());
        let d = decode_bytes(&s, 1 << 20).unwrap();
        assert_eq!(&d.memory[0][2 * PAGE..3 * PAGE], &a[..]);
    }
}

#[test]
fn a_torn_page_never_resent_fails_the_stream() {
    for sum in SUMS {
        let a = vec![0xaa; PAGE];
        let mut s = stream(sum, |s| {
            s.send_live_pages(0, &[2], &[&a]).unwrap();
            s.iteration_end(1).unwrap();
        });
        tear(&mut s, &a);
        match decode_bytes(&s, 1 << 20) {
            Err(Error::Checksum { what }) => assert!(what.contains("torn"), "{what}"),
            other => panic!("{sum:?}: {other:?}"),
        }
    }
}

#[test]
fn a_torn_page_sent_again_intact_is_fine() {
    for sum in SUMS {
        let (a, b, z) = (vec![0xaa; PAGE], vec![0xbb; PAGE], vec![0x11; PAGE]);
        let mut s = stream(sum, |s| {
            s.send_live_pages(0, &[2, 3], &[&a, &z]).unwrap();
            s.iteration_end(1).unwrap();
            // The write that tore page 2 dirtied it: it comes again (paused, not live).
            s.send_pages(0, &[2], &[&b]).unwrap();
            s.iteration_end(2).unwrap();
        });
        tear(&mut s, &a);
        let d = decode_bytes(&s, 1 << 20).unwrap();
        assert_eq!(&d.memory[0][2 * PAGE..3 * PAGE], &b[..]);
        assert_eq!(
            &d.memory[0][3 * PAGE..4 * PAGE],
            &z[..],
            "only the torn page had to come again"
        );
    }
}

#[test]
fn a_torn_page_resent_as_a_zero_page_is_fine() {
    for sum in SUMS {
        let a = vec![0xaa; PAGE];
        let mut s = stream(sum, |s| {
            s.send_live_pages(0, &[5], &[&a]).unwrap();
            s.iteration_end(1).unwrap();
            s.send_zero_pages(0, &[5]).unwrap();
        });
        tear(&mut s, &a);
        let d = decode_bytes(&s, 1 << 20).unwrap();
        assert!(d.memory[0][5 * PAGE..6 * PAGE].iter().all(|b| *b == 0));
    }
}

#[test]
fn corrupt_offsets_of_a_live_batch_fail_at_once() {
    for sum in SUMS {
        let a = vec![0xaa; PAGE];
        let mut s = stream(sum, |s| s.send_live_pages(0, &[6], &[&a]).unwrap());
        // The offset 6 as a little-endian u64 right before the page's checksum and data.
        let page_at = s.windows(PAGE).position(|w| w == &a[..]).unwrap();
        let offset_at = page_at - 4 - 8;
        assert_eq!(s[offset_at], 6);
        s[offset_at] = 7;
        match decode_bytes(&s, 1 << 20) {
            Err(Error::Checksum { what }) => assert_eq!(what, "page batch offsets"),
            other => panic!("{sum:?}: {other:?}"),
        }
    }
}

#[test]
fn a_torn_page_resent_as_a_sparse_page_is_fine() {
    for sum in SUMS {
        let a = vec![0xaa; PAGE];
        let mut counter = vec![0u8; PAGE];
        counter[8..16].copy_from_slice(&42u64.to_le_bytes());
        let mut s = stream(sum, |s| {
            s.send_live_pages(0, &[5], &[&a]).unwrap();
            s.iteration_end(1).unwrap();
            let mut batch = transport::SparseBatch::default();
            assert_eq!(batch.classify(5, &counter), transport::PageClass::Sparse);
            s.send_sparse_pages(0, &batch).unwrap();
            s.iteration_end(2).unwrap();
        });
        tear(&mut s, &a);
        let d = decode_bytes(&s, 1 << 20).unwrap();
        assert_eq!(&d.memory[0][5 * PAGE..6 * PAGE], &counter[..]);
    }
}

#[test]
fn a_flipped_byte_of_a_paused_batch_fails_the_stream() {
    for sum in SUMS {
        let a = vec![0xaa; PAGE];
        let mut s = stream(sum, |s| s.send_pages(0, &[3], &[&a]).unwrap());
        tear(&mut s, &a);
        match decode_bytes(&s, 1 << 20) {
            Err(Error::Checksum { what }) => assert_eq!(what, "page batch"),
            other => panic!("{sum:?}: {other:?}"),
        }
    }
}

/// Offset of the stream header's feature byte: preamble, record header, page size
/// and compression.
const FEATURE_BYTE_AT: usize = 24 + 16 + 4 + 1;

/// Rewrites the stream header's feature byte with `f` and fixes the record's checksums.
fn rewrite_features(s: &mut [u8], f: impl FnOnce(u8) -> u8) {
    use transport::format::RecordHeader;
    let hdr: [u8; 16] = s[24..40].try_into().unwrap();
    let mut h = RecordHeader::decode(&hdr).unwrap();
    s[FEATURE_BYTE_AT] = f(s[FEATURE_BYTE_AT]);
    h.body_crc = transport::checksum::crc32c(&s[40..40 + h.body_len as usize]);
    s[24..40].copy_from_slice(&h.encode());
}

#[test]
fn the_header_bit_names_the_page_checksum_and_the_receiver_honours_it() {
    let (a, b) = (vec![0xaa; PAGE], vec![0xbb; PAGE]);
    let ops = |s: &Sender| {
        s.send_live_pages(0, &[1], &[&a]).unwrap();
        s.iteration_end(1).unwrap();
        s.send_pages(0, &[2], &[&b]).unwrap();
    };
    for sum in SUMS {
        let s = stream(sum, ops);
        let bit = s[FEATURE_BYTE_AT] & transport::FEATURE_XXH3_PAGES != 0;
        assert_eq!(bit, sum == PageChecksum::Xxh3, "{sum:?}");
        let d = decode_bytes(&s, 1 << 20).unwrap();
        assert_eq!(d.header.features.page_checksum, sum);
        assert_eq!(&d.memory[0][PAGE..2 * PAGE], &a[..]);
        assert_eq!(&d.memory[0][2 * PAGE..3 * PAGE], &b[..]);
        // The same records read with the other algorithm: the first page batch's
        // checksum does not match, so the receiver went by the header's bit.
        let mut flipped = s.clone();
        rewrite_features(&mut flipped, |f| f ^ transport::FEATURE_XXH3_PAGES);
        match decode_bytes(&flipped, 1 << 20) {
            Err(Error::Checksum { what }) => assert_eq!(what, "page batch offsets"),
            other => panic!("{sum:?} read as the other: {other:?}"),
        }
    }
}

#[test]
fn without_the_bit_page_batches_carry_crc32c() {
    let a = vec![0x5a; PAGE];
    let s = stream(PageChecksum::Crc32c, |s| {
        s.send_pages(0, &[4], &[&a]).unwrap()
    });
    assert_eq!(s[FEATURE_BYTE_AT] & transport::FEATURE_XXH3_PAGES, 0);
    // The page batch's record header sits right before its 8-byte prefix and offset.
    let page_at = s.windows(PAGE).position(|w| w == &a[..]).unwrap();
    let hdr_at = page_at - 16 - 16;
    let hdr: [u8; 16] = s[hdr_at..hdr_at + 16].try_into().unwrap();
    let h = transport::format::RecordHeader::decode(&hdr).unwrap();
    assert_eq!(h.kind, transport::format::Kind::Pages);
    let body = &s[hdr_at + 16..page_at + PAGE];
    assert_eq!(h.body_crc, crc32c::crc32c(body));
    assert_eq!(h.body_crc, PageChecksum::Crc32c.of(body));
    assert_ne!(h.body_crc, PageChecksum::Xxh3.of(body));
}
