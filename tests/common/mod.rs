//! Helpers shared by the end-to-end tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use minivm::{Backend, MiniVm, VmConfig, Workload};

/// Bounds a hung guest only; tests wait on guest rounds, not on time.
#[path = "../../crates/minivm/tests/common/skip.rs"]
mod skip;
pub use skip::record_skip;

mod dest;
#[allow(unused_imports)] // each test binary uses a different subset
pub use dest::{ferry, Dest};

pub const TIMEOUT: Duration = Duration::from_secs(60);

static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// The backend these tests run on: KVM when /dev/kvm opens, else the host-thread
/// fallback. With FERRY_REQUIRE_KVM=1 a missing KVM fails the test instead.
pub fn backend() -> Backend {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let required = std::env::var("FERRY_REQUIRE_KVM").is_ok_and(|v| v == "1");
    assert!(
        usable || !required,
        "FERRY_REQUIRE_KVM=1 but /dev/kvm cannot be opened"
    );
    if usable {
        Backend::Kvm
    } else {
        eprintln!("no /dev/kvm: running on the host-thread fallback");
        Backend::Threads
    }
}

/// True when this test can run on KVM. Otherwise (unless FERRY_REQUIRE_KVM=1, which
/// fails the test) it records the test as skipped, for a test with nothing to check
/// on the host-thread fallback: `SKIPPED (no /dev/kvm): <test>` on stderr, and the
/// test's name appended to the file `$FERRY_SKIP_LOG` names (scripts/test counts them).
/// The test then returns at once.
pub fn kvm_or_skip() -> bool {
    if backend() == Backend::Kvm {
        return true;
    }
    record_skip();
    false
}

/// One guest at a time per test binary, so vCPU threads do not starve each other.
pub fn guest_lock() -> MutexGuard<'static, ()> {
    GUEST_LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// A config on the test backend.
pub fn config(mem_bytes: u64, vcpus: u32, workload: Workload) -> VmConfig {
    VmConfig {
        mem_bytes,
        vcpus,
        workload,
        backend: backend(),
        ..Default::default()
    }
}

/// Builds and starts a guest.
pub fn start(cfg: VmConfig) -> MiniVm {
    let mut vm = MiniVm::new(cfg).expect("build guest");
    vm.start().expect("start guest");
    vm
}

/// Waits until every vCPU has done `rounds` more rounds.
pub fn wait_all(vm: &MiniVm, rounds: u64) {
    for v in 0..vm.vcpus() {
        if let Err(e) = vm.wait_rounds(v, rounds, TIMEOUT) {
            panic!("vCPU {v} stalled: {e} (errors: {:?})", vm.errors());
        }
    }
}

/// The pages a working-set guest dirties in a steady window: its W pages and each
/// vCPU's counter page (global page indices).
pub fn expected_working_set(vm: &MiniVm) -> std::collections::BTreeSet<u64> {
    use minivm::PAGE_SIZE;
    let mut set = std::collections::BTreeSet::new();
    for v in 0..vm.vcpus() {
        let (gpa, pages) = vm.workload_region(v);
        set.extend((0..pages).map(|p| gpa / PAGE_SIZE + p));
        set.insert(vm.counter_gpa(v) / PAGE_SIZE);
    }
    set
}

/// The pages dirtied in a steady window of `rounds` guest rounds: a baseline sync
/// (absorbing the log's initial state and everything before), then the window's own.
pub fn dirty_window(
    vm: &MiniVm,
    space: &dirty_sync::AddressSpace,
    bitmap: &dirty_sync::DirtyBitmap,
    rounds: u64,
) -> (std::collections::BTreeSet<u64>, dirty_sync::SyncReport) {
    space.global_dirty_log_sync(None).expect("baseline sync");
    bitmap.clear_all();
    wait_all(vm, rounds);
    let report = space.global_dirty_log_sync(None).expect("window sync");
    (bitmap.iter_set().collect(), report)
}

/// Asserts two page sets are equal, showing a few pages each way when they are not.
pub fn assert_same_pages(
    got: &std::collections::BTreeSet<u64>,
    want: &std::collections::BTreeSet<u64>,
    what: &str,
) {
    assert!(
        got == want,
        "{what}: {} pages dirty, {} expected; extra {:?} missing {:?}",
        got.len(),
        want.len(),
        got.difference(want).take(5).collect::<Vec<_>>(),
        want.difference(got).take(5).collect::<Vec<_>>()
    );
}

/// A host-side copy of guest RAM kept up to date from the dirty log: what a precopy
/// destination would hold. Equal to guest RAM after a final sync with vCPUs paused,
/// or a write was lost.
pub struct Shadow {
    bytes: Vec<u8>,
}

impl Shadow {
    /// An all-zero shadow of `mem_bytes` of RAM (guest physical addresses from 0).
    pub fn new(mem_bytes: u64) -> Shadow {
        Shadow {
            bytes: vec![0; mem_bytes as usize],
        }
    }

    /// Copies every page dirty in `bitmap` from guest RAM, clearing it; returns how many.
    pub fn copy_dirty(
        &mut self,
        space: &dirty_sync::AddressSpace,
        bitmap: &dirty_sync::DirtyBitmap,
    ) -> u64 {
        use dirty_sync::PAGE_SIZE;
        let mut n = 0;
        for w in 0..bitmap.words().len() {
            let mut bits = bitmap.take_word(w);
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let (bi, off) = space.locate_page(page).expect("page in RAM");
                let b = &space.blocks()[bi];
                let dst =
                    &mut self.bytes[(page * PAGE_SIZE) as usize..((page + 1) * PAGE_SIZE) as usize];
                // The guest may write the page meanwhile, which the tests race on purpose.
                assert!(b.memory.read_volatile(off * PAGE_SIZE, dst));
                n += 1;
            }
        }
        n
    }

    /// Panics, naming the first differing page, unless the shadow equals guest RAM.
    pub fn assert_equals_ram(&self, space: &dirty_sync::AddressSpace, what: &str) {
        use dirty_sync::PAGE_SIZE;
        for b in space.blocks() {
            // The caller paused the guest.
            let mut ram = vec![0u8; b.size_bytes as usize];
            assert!(b.memory.read_volatile(0, &mut ram));
            let sh = &self.bytes[b.gpa as usize..(b.gpa + b.size_bytes) as usize];
            if ram != sh {
                let bad = (0..b.pages()).find(|p| {
                    let r = (p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize;
                    ram[r.clone()] != sh[r]
                });
                panic!(
                    "{what}: shadow differs from guest RAM at page {bad:?} of {}",
                    b.id
                );
            }
        }
    }
}

/// The precopy invariant, raced: a shadow copy kept up to date from the dirty log
/// (reason MIGRATION) for `rounds` syncs while the guest writes, then a final sync
/// with the vCPUs paused, must equal guest RAM byte for byte. With `deferred_clear`
/// pages are re-armed (`clear_dirty_log`) just before they are copied.
pub fn assert_no_lost_write(
    vm: &MiniVm,
    space: &dirty_sync::AddressSpace,
    mem_bytes: u64,
    rounds: u32,
    deferred_clear: bool,
    what: &str,
) {
    let bitmap = space
        .global_dirty_log_start(dirty_sync::DirtyReason::Migration)
        .unwrap();
    space.global_dirty_log_sync(None).unwrap();
    bitmap.set_all();
    let mut shadow = Shadow::new(mem_bytes);
    let rounds_at_start = vm.counter(0);
    let copy = |shadow: &mut Shadow| {
        if deferred_clear {
            space.clear_dirty_log(0, space.total_pages()).unwrap();
        }
        shadow.copy_dirty(space, &bitmap);
    };
    for round in 0..rounds {
        copy(&mut shadow);
        space.global_dirty_log_sync(None).unwrap();
        if round % 8 == 0 {
            wait_all(vm, 1);
        }
    }
    vm.pause().unwrap();
    space.global_dirty_log_sync(None).unwrap();
    copy(&mut shadow);
    shadow.assert_equals_ram(space, what);
    assert!(
        vm.counter(0) - rounds_at_start >= 4,
        "{what}: the guest wrote while the syncs ran"
    );
    space
        .global_dirty_log_stop(dirty_sync::DirtyReason::Migration)
        .unwrap();
}
