"""calc-dirty-rate / query-dirty-rate through QMP, in each mode."""

import asyncio

from qemu.qmp import ExecuteError, QMPClient

from conftest import expect_error, run, skip_without_kvm


async def measure(client, **args):
    """Starts a measurement; the very next query must already say `measuring`."""
    await client.execute("calc-dirty-rate", args)
    first = await client.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
    assert first["status"] == "measuring", first
    # A second request while measuring is refused (there is one job at a time).
    try:
        await client.execute("calc-dirty-rate", args)
        raise AssertionError("second calc-dirty-rate accepted while measuring")
    except ExecuteError as e:
        assert e.error_class == "GenericError"
        assert "already being measured" in str(e)
    while True:
        info = await client.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
        if info["status"] == "measured":
            return info
        await asyncio.sleep(0.05)


def test_dirty_rate_bitmap_guest(vms):
    vm = vms("vm", workload="working-set=8M")

    async def body():
        c = QMPClient("dr")
        await c.connect(vm.qmp_path)
        unstarted = await c.execute("query-dirty-rate")
        assert unstarted["status"] == "unstarted"

        info = await measure(c, **{"calc-time": 300, "calc-time-unit": "millisecond"})
        assert info["mode"] == "page-sampling" and info["sample-pages"] == 512
        assert info["calc-time-unit"] == "millisecond" and info["calc-time"] >= 300
        assert isinstance(info["dirty-rate"], int) and "start-time" in info
        # The same result in seconds (QEMU's default unit, truncated).
        sec = await c.execute("query-dirty-rate")
        assert sec["calc-time-unit"] == "second" and sec["calc-time"] == info["calc-time"] // 1000

        info = await measure(c, **{"calc-time": 300, "calc-time-unit": "millisecond",
                                   "sample-pages": 4096})
        assert info["sample-pages"] == 4096

        info = await measure(c, **{"calc-time": 1, "mode": "dirty-bitmap"})
        assert info["mode"] == "dirty-bitmap" and info["calc-time-unit"] == "millisecond"
        assert info["dirty-rate"] > 0, info
        assert "vcpu-dirty-rate" not in info

        await expect_error(c, "calc-dirty-rate", {"calc-time": 1, "mode": "dirty-ring"},
                           "mode dirty-ring is not enabled")
        await expect_error(c, "calc-dirty-rate", {"calc-time": 0}, "out of range")
        await expect_error(c, "calc-dirty-rate",
                           {"calc-time": 1, "mode": "dirty-bitmap", "sample-pages": 512},
                           "sample-pages is used only in page-sampling mode")
        await expect_error(c, "calc-dirty-rate", {"calc-time": 1, "sample-pages": 100},
                           "sample-pages is out of range")
        # A refused request leaves the last result in place.
        assert (await c.execute("query-dirty-rate"))["mode"] == "dirty-bitmap"
        await c.disconnect()

    run(body())


def test_dirty_rate_ring_guest(vms):
    skip_without_kvm()
    vm = vms("vm", "--dirty-ring", "4096", workload="working-set=8M", vcpus=2)

    async def body():
        c = QMPClient("dr")
        await c.connect(vm.qmp_path)
        info = await measure(c, **{"calc-time": 500, "calc-time-unit": "millisecond",
                                   "mode": "dirty-ring"})
        assert info["mode"] == "dirty-ring", info
        assert info["dirty-rate"] > 0, info
        vcpus = info["vcpu-dirty-rate"]
        assert [v["id"] for v in vcpus] == [0, 1], vcpus
        info = await measure(c, **{"calc-time": 500, "calc-time-unit": "millisecond",
                                   "mode": "dirty-bitmap"})
        assert info["mode"] == "dirty-bitmap" and info["dirty-rate"] > 0
        info = await measure(c, **{"calc-time": 300, "calc-time-unit": "millisecond"})
        assert info["mode"] == "page-sampling"
        await c.disconnect()

    run(body())
