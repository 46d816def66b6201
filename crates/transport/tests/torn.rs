//! Live pages (sent while the guest runs) may change in flight: a torn page is not an
//! error until the end of the stream, and only if it was never sent intact again.

mod common;

use common::temp_path;
use transport::{decode_bytes, BlockInfo, Compression, Error, SendOptions, Sender, Uri};

const PAGE: usize = 512;

/// Builds a one-channel `file:` stream with `f`, returns its bytes.
fn stream(f: impl FnOnce(&Sender)) -> Vec<u8> {
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
    let a = vec![0xaa; PAGE];
    let s = stream(|s| s.send_live_pages(0, &[2], &[&a]).unwrap());
    let d = decode_bytes(&s, 1 << 20).unwrap();
    assert_eq!(&d.memory[0][2 * PAGE..3 * PAGE], &a[..]);
}

#[test]
fn a_torn_page_never_resent_fails_the_stream() {
    let a = vec![0xaa; PAGE];
    let mut s = stream(|s| {
        s.send_live_pages(0, &[2], &[&a]).unwrap();
        s.iteration_end(1).unwrap();
    });
    tear(&mut s, &a);
    match decode_bytes(&s, 1 << 20) {
        Err(Error::Checksum { what }) => assert!(what.contains("torn"), "{what}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_torn_page_sent_again_intact_is_fine() {
    let (a, b, z) = (vec![0xaa; PAGE], vec![0xbb; PAGE], vec![0x11; PAGE]);
    let mut s = stream(|s| {
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

#[test]
fn a_torn_page_resent_as_a_zero_page_is_fine() {
    let a = vec![0xaa; PAGE];
    let mut s = stream(|s| {
        s.send_live_pages(0, &[5], &[&a]).unwrap();
        s.iteration_end(1).unwrap();
        s.send_zero_pages(0, &[5]).unwrap();
    });
    tear(&mut s, &a);
    let d = decode_bytes(&s, 1 << 20).unwrap();
    assert!(d.memory[0][5 * PAGE..6 * PAGE].iter().all(|b| *b == 0));
}

#[test]
fn corrupt_offsets_of_a_live_batch_fail_at_once() {
    let a = vec![0xaa; PAGE];
    let mut s = stream(|s| s.send_live_pages(0, &[6], &[&a]).unwrap());
    // The offset 6 as a little-endian u64 right before the page's checksum and data.
    let page_at = s.windows(PAGE).position(|w| w == &a[..]).unwrap();
    let offset_at = page_at - 4 - 8;
    assert_eq!(s[offset_at], 6);
    s[offset_at] = 7;
    match decode_bytes(&s, 1 << 20) {
        Err(Error::Checksum { what }) => assert_eq!(what, "page batch offsets"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_torn_page_resent_as_a_sparse_page_is_fine() {
    let a = vec![0xaa; PAGE];
    let mut counter = vec![0u8; PAGE];
    counter[8..16].copy_from_slice(&42u64.to_le_bytes());
    let mut s = stream(|s| {
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
