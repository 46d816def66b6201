"""set-vcpu-dirty-limit / cancel-vcpu-dirty-limit / query-vcpu-dirty-limit through
QMP, on a guest with a dirty ring and on one without, with QEMU's texts."""

import asyncio
import time

from qemu.qmp import QMPClient

from conftest import expect_error, run, skip_without_kvm

NEEDS_RING = ("dirty page limit feature requires KVM with accelerator property "
              "'dirty-ring-size' set'")


def test_dirty_limit_needs_the_ring(vms):
    skip_without_kvm()
    vm = vms("vm", workload="random=5,0", vcpus=2)

    async def body():
        c = QMPClient("dl")
        await c.connect(vm.qmp_path)
        await expect_error(c, "set-vcpu-dirty-limit", {"dirty-rate": 10}, NEEDS_RING)
        # QEMU's no-op: nothing can be limited, nothing to lift.
        assert await c.execute("cancel-vcpu-dirty-limit") == {}
        assert await c.execute("query-vcpu-dirty-limit") == []
        await expect_error(c, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "dirty-limit", "state": True}]},
                           "dirty-limit requires KVM")
        await c.disconnect()

    run(body())


def test_dirty_limit_holds_one_vcpu_and_cancel_lifts_it(vms):
    skip_without_kvm()
    vm = vms("vm", "--dirty-ring", "4096", mem="1G", workload="random=5,0", vcpus=2)

    async def body():
        c = QMPClient("dl")
        await c.connect(vm.qmp_path)
        await expect_error(c, "set-vcpu-dirty-limit",
                           {"cpu-index": 2, "dirty-rate": 10},
                           "incorrect cpu index specified")
        # The limiter measures every x-vcpu-dirty-limit-period, as QEMU's. A throttled
        # vCPU still runs in slices of up to 10 ms (megabytes each), so a single period
        # reads lumpy at a low limit: judge the mean of three periods.
        await c.execute("migrate-set-parameters", {"x-vcpu-dirty-limit-period": 1000})
        await c.execute("set-vcpu-dirty-limit", {"cpu-index": 0, "dirty-rate": 8})
        rows = await c.execute("query-vcpu-dirty-limit")
        assert [(r["cpu-index"], r["limit-rate"]) for r in rows] == [(0, 8)], rows
        # First measured above the limit (the guest dirties more than 8 MB/s), then
        # held: the mean of three periods in a row near it (a bounded wait).
        deadline = time.monotonic() + 60
        above, last = False, []
        while not (above and len(last) == 3 and 0 < sum(last) / 3 <= 16):
            assert time.monotonic() < deadline, f"vCPU 0 not held at 8 MB/s: {last}"
            await asyncio.sleep(1.0)
            rate = (await c.execute("query-vcpu-dirty-limit"))[0]["current-rate"]
            above = above or rate > 16
            last = (last + [rate])[-3:]
        # A dirty-limit migration cannot start beside auto-converge.
        await c.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "dirty-limit", "state": True}]})
        await expect_error(c, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "auto-converge",
                                              "state": True}]},
                           "dirty-limit conflicts with auto-converge")
        await c.execute("cancel-vcpu-dirty-limit", {"cpu-index": 0})
        assert await c.execute("query-vcpu-dirty-limit") == []
        # A rate of 0 cancels, as in QEMU.
        await c.execute("set-vcpu-dirty-limit", {"dirty-rate": 5})
        assert len(await c.execute("query-vcpu-dirty-limit")) == 2
        await c.execute("set-vcpu-dirty-limit", {"dirty-rate": 0})
        assert await c.execute("query-vcpu-dirty-limit") == []
        await c.disconnect()

    run(body())
