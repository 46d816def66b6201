//! Missing pages fault to the handler, which fills each once; the touching thread sees
//! the installed bytes. Needs userfaultfd (root, or /dev/userfaultfd access); without it
//! each test records itself skipped.

use std::sync::mpsc;
use std::time::Duration;

use dirty_sync::{HostMemory, PAGE_SIZE};
use uffd::{Error, Fault, Filled, UffdRegion};

#[path = "../../minivm/tests/common/skip.rs"]
mod skip;

/// Generous: bounds a hung handshake, never a speed.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A 16-page region, or None (skipped) where userfaultfd is unavailable.
fn region() -> Option<(HostMemory, UffdRegion)> {
    let mem = HostMemory::anonymous(16 * PAGE_SIZE).expect("16 pages");
    match UffdRegion::register(mem.clone()) {
        Ok(r) => Some((mem, r)),
        Err(Error::Unavailable(e)) => {
            skip::record_skip_because(&format!("no userfaultfd: {e}"));
            None
        }
        Err(e) => panic!("register: {e}"),
    }
}

/// Reads the u64 at `offset` on another thread (which blocks while the page is
/// missing); the value arrives on the returned channel.
fn reader(mem: &HostMemory, offset: u64) -> mpsc::Receiver<u64> {
    let (tx, rx) = mpsc::channel();
    let mem = mem.clone();
    std::thread::spawn(move || {
        let mut b = [0u8; 8];
        assert!(mem.read_volatile(offset, &mut b));
        let _ = tx.send(u64::from_le_bytes(b));
    });
    rx
}

/// The next fault, within TIMEOUT.
fn next_fault(r: &UffdRegion) -> Fault {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(f) = r.wait_fault(Duration::from_millis(100)).expect("wait") {
            return f;
        }
        assert!(std::time::Instant::now() < deadline, "no fault came");
    }
}

#[test]
fn a_touch_of_a_missing_page_waits_for_the_copy_and_sees_it() {
    let Some((mem, r)) = region() else { return };
    let rx = reader(&mem, 3 * PAGE_SIZE + 16);
    let fault = next_fault(&r);
    assert_eq!(fault.page_offset_bytes(), 3 * PAGE_SIZE, "{fault:?}");
    assert!(!fault.write);
    // The reader is blocked on the page until it lands.
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    let page: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 251) as u8).collect();
    assert_eq!(r.copy(3 * PAGE_SIZE, &page).expect("copy"), Filled::Done);
    let want = u64::from_le_bytes(page[16..24].try_into().unwrap());
    assert_eq!(rx.recv_timeout(TIMEOUT).expect("the reader woke"), want);
}

#[test]
fn a_page_lands_once() {
    let Some((mem, r)) = region() else { return };
    assert_eq!(r.copy(5 * PAGE_SIZE, &[7u8; 4096]).unwrap(), Filled::Done);
    // A second install (a pushed page racing a requested one) changes nothing.
    assert_eq!(
        r.copy(5 * PAGE_SIZE, &[9u8; 4096]).unwrap(),
        Filled::AlreadyPresent
    );
    assert_eq!(
        r.zero(5 * PAGE_SIZE, PAGE_SIZE).unwrap(),
        Filled::AlreadyPresent
    );
    let mut b = [0u8; 4096];
    assert!(mem.read_volatile(5 * PAGE_SIZE, &mut b));
    assert!(b.iter().all(|x| *x == 7));
    // No touch, no fault: present pages read without the handler.
    assert_eq!(r.wait_fault(Duration::from_millis(50)).unwrap(), None);
}

#[test]
fn a_write_fault_is_filled_with_zeros() {
    let Some((mem, r)) = region() else { return };
    let m = mem.clone();
    let writer =
        std::thread::spawn(move || assert!(m.write_volatile(7 * PAGE_SIZE + 8, &[1u8; 8])));
    let fault = next_fault(&r);
    assert_eq!(fault.page_offset_bytes(), 7 * PAGE_SIZE);
    assert!(fault.write, "{fault:?}");
    assert_eq!(r.zero(7 * PAGE_SIZE, PAGE_SIZE).unwrap(), Filled::Done);
    writer.join().expect("the writer finished");
    let mut b = [0u8; 24];
    assert!(mem.read_volatile(7 * PAGE_SIZE, &mut b));
    assert_eq!(b, [[0u8; 8], [1u8; 8], [0u8; 8]].concat()[..]);
}

#[test]
fn ranges_outside_the_region_or_not_whole_pages_are_refused() {
    let Some((mem, r)) = region() else { return };
    let page = [1u8; 4096];
    for (offset, len) in [
        (16 * PAGE_SIZE, PAGE_SIZE),
        (15 * PAGE_SIZE, 2 * PAGE_SIZE),
        (100, PAGE_SIZE),
        (0, 100),
        (0, 0),
    ] {
        assert!(
            matches!(r.zero(offset, len), Err(Error::OutOfRange { .. })),
            "zero {offset:#x}+{len:#x}"
        );
    }
    assert!(matches!(
        r.copy(16 * PAGE_SIZE, &page),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        r.copy(0, &page[..100]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        r.wake(u64::MAX - 4095, PAGE_SIZE),
        Err(Error::OutOfRange { .. })
    ));
    // Nothing was installed: page 0 still faults.
    let rx = reader(&mem, 0);
    assert_eq!(next_fault(&r).page_offset_bytes(), 0);
    assert_eq!(r.zero(0, PAGE_SIZE).unwrap(), Filled::Done);
    assert_eq!(rx.recv_timeout(TIMEOUT).unwrap(), 0);
}
