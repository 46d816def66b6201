//! Prints the guest's measured speeds: `cargo run --release -p ferry-minivm --example measure`.

use std::time::{Duration, Instant};

use minivm::{MiniVm, VmConfig, Workload};

fn rate(vm: &MiniVm, window: Duration) -> f64 {
    let c0 = vm.counter(0);
    let t0 = Instant::now();
    std::thread::sleep(window);
    (vm.counter(0) - c0) as f64 / t0.elapsed().as_secs_f64()
}

fn main() -> Result<(), minivm::Error> {
    for (label, w) in [
        (
            "working-set=4096 rounds/s",
            Workload::WorkingSet { pages: 4096 },
        ),
        (
            "working-set=65536 rounds/s",
            Workload::WorkingSet { pages: 65536 },
        ),
        (
            "sweep=100000 pages/s (1 GiB, first touches)",
            Workload::Sweep {
                pages_per_sec: 100_000,
            },
        ),
        (
            "sweep=100000 pages/s (64 MiB)",
            Workload::Sweep {
                pages_per_sec: 100_000,
            },
        ),
        (
            "random=42,80 rounds/s (4096 writes each)",
            Workload::Random {
                seed: 42,
                hot_percent: 80,
            },
        ),
        ("idle rounds/s", Workload::Idle),
    ] {
        let mem_bytes = if label.contains("64 MiB") {
            64 << 20
        } else {
            1 << 30
        };
        let mut vm = MiniVm::new(VmConfig {
            workload: w,
            mem_bytes,
            ..Default::default()
        })?;
        vm.start()?;
        vm.wait_rounds(0, 1, Duration::from_secs(30))?;
        std::thread::sleep(Duration::from_millis(300));
        let r = rate(&vm, Duration::from_secs(1));
        vm.set_throttle_percent(50);
        std::thread::sleep(Duration::from_millis(200));
        let throttled = rate(&vm, Duration::from_secs(1));
        vm.set_throttle_percent(0);
        let mut lat = Vec::new();
        for _ in 0..20 {
            vm.pause()?;
            lat.push(vm.last_pause_latency());
            vm.resume()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        lat.sort();
        let t0 = Instant::now();
        for _ in 0..100 {
            vm.kick_all()?;
        }
        let kick = t0.elapsed() / 100;
        println!(
            "{label:45} {} tsc {} : {r:>12.0}   throttled 50%: {throttled:>12.0}   pause median {:?} max {:?}   kick_all {:?}",
            vm.backend_name(),
            vm.tsc_hz(),
            lat[lat.len() / 2],
            lat[lat.len() - 1],
            kick
        );
    }
    Ok(())
}
