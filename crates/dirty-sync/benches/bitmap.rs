//! Bitmap micro-benchmarks: the merge (GiB of guest RAM covered per second) and set-bit
//! iteration at 1 %, 10 % and 100 % density beside a plain `trailing_zeros` word scan.

#![allow(missing_docs)] // criterion_group! generates undocumented public items
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dirty_sync::{DirtyBitmap, PAGE_SIZE};

/// 8 GiB of guest RAM in 4 KiB pages.
const PAGES: u64 = (8 << 30) / PAGE_SIZE;

/// A deterministic bitmap with about `percent` % of bits set.
fn pattern(percent: u64) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..PAGES / 64)
        .map(|_| {
            let mut w = 0;
            for bit in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x % 100 < percent {
                    w |= 1 << bit;
                }
            }
            w
        })
        .collect()
}

fn merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge_le");
    g.throughput(Throughput::Bytes(PAGES * PAGE_SIZE));
    for percent in [1u64, 100] {
        let src = pattern(percent);
        let dst = DirtyBitmap::new(PAGES);
        g.bench_with_input(BenchmarkId::new("density_pct", percent), &src, |b, src| {
            b.iter(|| black_box(dst.merge_le(0, src, PAGES)))
        });
    }
    g.finish();
}

fn iterate(c: &mut Criterion) {
    let mut g = c.benchmark_group("iter_set");
    g.throughput(Throughput::Elements(PAGES));
    for percent in [1u64, 10, 100] {
        let words = pattern(percent);
        let bitmap = DirtyBitmap::new(PAGES);
        bitmap.merge_le(0, &words, PAGES);
        g.bench_with_input(
            BenchmarkId::new("dirty_bitmap", percent),
            &bitmap,
            |b, bm| b.iter(|| bm.iter_set().fold(0u64, |a, p| a.wrapping_add(p))),
        );
        g.bench_with_input(
            BenchmarkId::new("plain_word_scan", percent),
            &words,
            |b, ws| {
                b.iter(|| {
                    let mut acc = 0u64;
                    for (i, &w) in ws.iter().enumerate() {
                        let mut w = w;
                        while w != 0 {
                            acc = acc.wrapping_add(i as u64 * 64 + u64::from(w.trailing_zeros()));
                            w &= w - 1;
                        }
                    }
                    black_box(acc)
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = merge, iterate
}
criterion_main!(benches);
