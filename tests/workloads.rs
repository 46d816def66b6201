//! The workloads that write like real programs (`dense`, `zipf`) on a real guest: each
//! dirties exactly the pages it claims, and every page holds the content the host
//! computes for it from the counters (content that changes every round).
//!
//! Runs on KVM wherever /dev/kvm exists (FERRY_REQUIRE_KVM=1 makes that mandatory),
//! else on the host-thread fallback.

mod common;

use std::collections::BTreeSet;

use common::{
    assert_same_pages, config, dirty_window, expected_working_set, guest_lock, start, wait_all,
};
use dirty_sync::{DirtyReason, PAGE_SIZE};
use minivm::{
    page_words, xorshift_next, xorshift_seed, zipf_levels, zipf_page, DirtyTracking, MiniVm,
    Workload, ZIPF_SEED,
};
use vm_memory::{Bytes, GuestAddress};

/// The first `words` 8-byte words of the page at `gpa`.
fn read_words(vm: &MiniVm, gpa: u64, words: usize) -> Vec<u64> {
    let mut buf = vec![0u8; words * 8];
    vm.memory()
        .read_slice(&mut buf, GuestAddress(gpa))
        .expect("read guest page");
    buf.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn dense_exact_set(pages: u64, bytes_per_page: u64, vcpus: u32) {
    let _g = guest_lock();
    let vm = start(config(
        1 << 30,
        vcpus,
        Workload::Dense {
            pages,
            bytes_per_page,
        },
    ));
    let space = vm.address_space(DirtyTracking::default()).unwrap();
    let bitmap = space
        .global_dirty_log_start(DirtyReason::DirtyRate)
        .unwrap();
    wait_all(&vm, 2);
    let (got, _) = dirty_window(&vm, &space, &bitmap, 2);
    let want = expected_working_set(&vm);
    assert_same_pages(
        &got,
        &want,
        &format!("dense={pages},{bytes_per_page} vcpus={vcpus}"),
    );
}

#[test]
fn dense_dirties_exactly_its_pages() {
    for (pages, bytes, vcpus) in [(4096, 4096, 1), (65536, 4096, 2), (65536, 256, 2)] {
        dense_exact_set(pages, bytes, vcpus);
    }
}

/// With the guest paused, every page of a vCPU's part holds round r+1's words (the
/// pages it has rewritten this round) up to some page, and round r's after it, where
/// r is the vCPU's counter; beyond `bytes_per_page`, the first round's words stay.
fn assert_dense_content(vm: &MiniVm, bytes_per_page: u64) -> Vec<u64> {
    let words = (bytes_per_page / 8) as usize;
    let mut rounds = Vec::new();
    for v in 0..vm.vcpus() {
        let round = vm.counter(v);
        assert!(round >= 2, "vCPU {v} has done {round} rounds");
        let (base, pages) = vm.workload_region(v);
        // Pages rewritten this round, then at most one being rewritten (the vCPU
        // paused inside it: a prefix of its words new), then the last round's.
        let mut in_next_round = true;
        for p in 0..pages {
            let gpa = base + p * PAGE_SIZE;
            let page = read_words(vm, gpa, 512);
            let next: Vec<u64> = page_words(gpa, round + 1).take(words).collect();
            let cur: Vec<u64> = page_words(gpa, round).take(words).collect();
            if in_next_round && page[..words] != next[..] {
                in_next_round = false;
                let new_words = page.iter().zip(&next).take_while(|(a, b)| a == b).count();
                assert_eq!(
                    page[new_words..words],
                    cur[new_words..],
                    "vCPU {v} page {p}: neither round {} nor {round}",
                    round + 1
                );
            } else if !in_next_round {
                assert_eq!(
                    page[..words],
                    cur[..],
                    "vCPU {v} page {p}: not round {round}"
                );
            }
            let first: Vec<u64> = page_words(gpa, 1).take(512).collect();
            assert_eq!(
                page[words..],
                first[words..],
                "vCPU {v} page {p}: the bytes past {bytes_per_page} changed"
            );
        }
        rounds.push(round);
    }
    rounds
}

#[test]
fn dense_content_is_the_rounds_stream_and_changes_every_round() {
    let _g = guest_lock();
    let bytes_per_page = 256;
    let vm = start(config(
        64 << 20,
        2,
        Workload::Dense {
            pages: 4096,
            bytes_per_page,
        },
    ));
    wait_all(&vm, 3);
    vm.pause().unwrap();
    let before = assert_dense_content(&vm, bytes_per_page);
    let (base, _) = vm.workload_region(0);
    let page_before = read_words(&vm, base, 32);
    vm.resume().unwrap();
    wait_all(&vm, 2);
    vm.pause().unwrap();
    let after = assert_dense_content(&vm, bytes_per_page);
    let page_after = read_words(&vm, base, 32);
    vm.resume().unwrap();
    assert!(after.iter().zip(&before).all(|(a, b)| a > b));
    assert!(
        page_before.iter().zip(&page_after).all(|(a, b)| a != b),
        "every word of the rewritten part changed between rounds"
    );
}

/// What the zipf guest's writes `(from, to]` of vCPU `v` touched: (page GPA, last
/// write number) per page, replayed on the host from the seed.
fn zipf_replay(vm: &MiniVm, v: u32, from: u64, to: u64) -> std::collections::BTreeMap<u64, u64> {
    let (base, pages) = vm.workload_region(v);
    let levels = zipf_levels(pages);
    let mut x = xorshift_seed(ZIPF_SEED, v);
    let mut last = std::collections::BTreeMap::new();
    for n in 1..=to {
        x = xorshift_next(x);
        if n > from {
            last.insert(base + zipf_page(x, levels, pages) * PAGE_SIZE, n);
        }
    }
    last
}

#[test]
fn zipf_dirties_exactly_the_pages_its_writes_pick() {
    let _g = guest_lock();
    let pages = 65536;
    let mut vm = start(config(
        1 << 30,
        2,
        Workload::Zipf {
            pages,
            writes_per_sec: 40_000,
        },
    ));
    let space = vm.address_space(DirtyTracking::default()).unwrap();
    let bitmap = space
        .global_dirty_log_start(DirtyReason::DirtyRate)
        .unwrap();
    wait_all(&vm, 1000);
    // Window: from one pause to the next, the writes between the counters.
    vm.pause().unwrap();
    let from: Vec<u64> = (0..2).map(|v| vm.counter(v)).collect();
    space.global_dirty_log_sync(None).unwrap();
    bitmap.clear_all();
    vm.resume().unwrap();
    wait_all(&vm, 5000);
    vm.pause().unwrap();
    let to: Vec<u64> = (0..2).map(|v| vm.counter(v)).collect();
    space.global_dirty_log_sync(None).unwrap();
    let got: BTreeSet<u64> = bitmap.iter_set().collect();
    let mut want = BTreeSet::new();
    let mut in_flight = BTreeSet::new();
    let mut writes = 0;
    for v in 0..2u32 {
        let i = v as usize;
        writes += to[i] - from[i];
        want.extend(
            zipf_replay(&vm, v, from[i], to[i])
                .keys()
                .map(|gpa| gpa / PAGE_SIZE),
        );
        want.insert(vm.counter_gpa(v) / PAGE_SIZE);
        // A vCPU paused inside a write has dirtied that page before bumping its counter.
        in_flight.extend(
            zipf_replay(&vm, v, to[i], to[i] + 1)
                .keys()
                .map(|gpa| gpa / PAGE_SIZE),
        );
    }
    let extra: Vec<u64> = got.difference(&want).copied().collect();
    let missing: Vec<u64> = want.difference(&got).copied().collect();
    assert!(
        missing.is_empty() && extra.iter().all(|p| in_flight.contains(p)),
        "{} pages dirty, {} expected from {writes} writes; extra {:?} missing {:?}",
        got.len(),
        want.len(),
        &extra[..extra.len().min(5)],
        &missing[..missing.len().min(5)]
    );
    // Skewed: the writes hit far fewer pages than they number.
    assert!(
        (want.len() as u64) < writes / 2,
        "{} pages from {writes} writes",
        want.len()
    );

    // Content: every page a completed write touched holds its last write's words.
    for v in 0..2u32 {
        let i = v as usize;
        for (gpa, n) in zipf_replay(&vm, v, 0, to[i]) {
            if in_flight.contains(&(gpa / PAGE_SIZE)) {
                continue;
            }
            let want: Vec<u64> = page_words(gpa, n).take(512).collect();
            assert!(
                read_words(&vm, gpa, 512) == want,
                "vCPU {v}: page {gpa:#x} does not hold write {n}'s words"
            );
        }
    }
    vm.resume().unwrap();
    vm.shutdown();
}
