"""human-monitor-command (the HMP subset tools watch a guest with) and
x-ferry-cancel-dirty-rate, against a real minivm guest.

`xp` reads the guest's own counter page: vCPU n's counter is a u64 at
COUNTER_GPA + n * 4096 (crates/minivm/src/guest.rs), which the guest's code bumps
every round. The tests wait on those counters, never on a speed.
"""

import asyncio
import re

from qemu.qmp import ExecuteError, QMPClient

from conftest import free_port, run, skip_without_kvm

COUNTER_GPA = 0x80000
PAGE = 4096
GUEST = {"mem": "64M", "vcpus": 2, "workload": "working-set=4M"}
# A `xp /1gx` line: 16 hex digits of address, then one 0x-padded 8-byte value.
XP_LINE = re.compile(r"^([0-9a-f]{16}): 0x([0-9a-f]{16})\r\n$")


async def hmp(client, line, **extra):
    return await client.execute("human-monitor-command", {"command-line": line, **extra})


async def counter(client, vcpu):
    """vCPU `vcpu`'s counter, read from guest memory with `xp`."""
    gpa = COUNTER_GPA + vcpu * PAGE
    out = await hmp(client, f"xp /1gx 0x{gpa:x}")
    m = XP_LINE.match(out)
    assert m, repr(out)
    assert int(m.group(1), 16) == gpa
    return int(m.group(2), 16)


async def rounds(client):
    return (await client.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]


async def grows(client, vcpu, timeout=60.0):
    """True once the counter `xp` reads grows (as long as a loaded machine needs)."""
    first = await counter(client, vcpu)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await asyncio.sleep(0.02)
        if await counter(client, vcpu) > first:
            return True
    return False


def test_xp_reads_the_guest_counters(vms):
    skip_without_kvm()
    vm = vms("vm", **GUEST)

    async def body():
        c = QMPClient("hmp")
        await c.connect(vm.qmp_path)
        for vcpu in (0, 1):
            # What xp reads lies between the VMM's own reads of the same counter
            # before and after: it is this vCPU's counter, live.
            before = (await rounds(c))[vcpu]
            seen = await counter(c, vcpu)
            after = (await rounds(c))[vcpu]
            assert before <= seen <= after, (before, seen, after)
            assert await grows(c, vcpu), f"vCPU {vcpu}'s counter does not grow"

        # Stopped, the guest writes nothing: two reads are equal, and equal the VMM's.
        await c.execute("stop")
        assert await hmp(c, "info status") == "VM status: paused\r\n"
        frozen = [await counter(c, v) for v in (0, 1)]
        await asyncio.sleep(0.3)
        assert [await counter(c, v) for v in (0, 1)] == frozen
        assert await rounds(c) == frozen

        await c.execute("cont")
        assert await hmp(c, "info status") == "VM status: running\r\n"
        assert await grows(c, 0), "the counter does not grow after cont"

        # Two 8-byte values on one line: the counter and the page-write count after
        # it (paused, both hold still; the guest has written pages).
        await c.execute("stop")
        out = await hmp(c, f"xp /2gx 0x{COUNTER_GPA:x}")
        m = re.fullmatch(r"0000000000080000: 0x([0-9a-f]{16}) 0x([0-9a-f]{16})\r\n", out)
        assert m, repr(out)
        assert int(m.group(2), 16) > 0, "no page writes counted"
        assert out == await hmp(c, f"xp /2gx 0x{COUNTER_GPA:x}")
        # 64 MiB of RAM at 0: the first byte past it cannot be read.
        assert await hmp(c, "xp /1bx 0x3ffffff") == "0000000003ffffff: 0x00\r\n"
        assert (await hmp(c, "xp /1gx 0x4000000")
                == "0000000004000000: Cannot access memory\r\n")
        await c.disconnect()

    run(body())


def test_hmp_text_and_errors(vms):
    skip_without_kvm()
    vm = vms("vm", **GUEST)

    async def body():
        c = QMPClient("hmp")
        await c.connect(vm.qmp_path)
        assert await hmp(c, "info status") == "VM status: running\r\n"
        assert await hmp(c, "info status", **{"cpu-index": 1}) == "VM status: running\r\n"
        assert await hmp(c, "foo") == "unknown command: 'foo'\r\n"
        assert await hmp(c, "info foo") == "unknown command: 'info foo'\r\n"
        assert await hmp(c, "") == ""
        assert (await hmp(c, "xp /2q 0")
                == "invalid char in format: 'q'\r\nTry \"help xp\" for more information\r\n")
        # No migration yet: nothing to say.
        assert await hmp(c, "info migrate") == ""
        for args, text in [
            ({}, "Parameter 'command-line' is missing"),
            ({"command-line": "info status", "cpu-index": 2},
             "Parameter 'cpu-index' expects a CPU number"),
        ]:
            try:
                await c.execute("human-monitor-command", args)
                raise AssertionError(f"{args} accepted")
            except ExecuteError as e:
                assert e.error_class == "GenericError" and text in str(e), str(e)
        await c.disconnect()

    run(body())


def test_cancel_dirty_rate(vms):
    skip_without_kvm()
    vm = vms("vm", **GUEST)

    async def body():
        c = QMPClient("hmp")
        await c.connect(vm.qmp_path)
        # Nothing to cancel: accepted (idempotent, as migrate_cancel).
        assert await c.execute("x-ferry-cancel-dirty-rate") == {}
        assert (await c.execute("query-dirty-rate"))["status"] == "unstarted"

        await c.execute("calc-dirty-rate", {"calc-time": 10})
        assert (await c.execute("query-dirty-rate"))["status"] == "measuring"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await c.execute("x-ferry-cancel-dirty-rate") == {}
        # The reply comes once the measurement ended: long before the 10 s window
        # (the bound is slack for a loaded machine, far below the window).
        assert loop.time() - t0 < 5.0, loop.time() - t0
        info = await c.execute("query-dirty-rate")
        assert info["status"] == "measured", info
        assert info["dirty-rate"] == -1, info
        assert info["x-ferry"]["cancelled"] is True, info

        # A new measurement runs to its end after a cancelled one.
        await c.execute("calc-dirty-rate", {"calc-time": 100, "calc-time-unit": "millisecond"})
        while (info := await c.execute("query-dirty-rate"))["status"] != "measured":
            await asyncio.sleep(0.05)
        assert info["x-ferry"]["cancelled"] is False and info["dirty-rate"] >= 0, info
        assert await c.execute("x-ferry-cancel-dirty-rate") == {}
        assert (await c.execute("query-dirty-rate"))["dirty-rate"] == info["dirty-rate"]
        await c.disconnect()

    run(body())


async def wait_status(client, want):
    while (await client.execute("query-status"))["status"] != want:
        await asyncio.sleep(0.05)


def test_info_migrate_and_status_across_a_migration(vms):
    skip_without_kvm()
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = QMPClient("src")
        await s.connect(src.qmp_path)
        d = QMPClient("dst")
        await d.connect(dst.qmp_path)
        assert await hmp(d, "info status") == "VM status: paused (inmigrate)\r\n"
        assert (await hmp(d, "info migrate")).startswith("Migration status: setup\r\n")

        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while (await s.execute("query-migrate"))["status"] not in ("completed", "failed"):
            await asyncio.sleep(0.05)
        q = await s.execute("query-migrate")
        assert q["status"] == "completed", q
        text = await hmp(s, "info migrate")
        assert text.endswith("\r\n"), repr(text)
        lines = text.split("\r\n")[:-1]
        assert lines[0] == "Migration status: completed", lines
        ram = q["ram"]
        # The same numbers as query-migrate, in QEMU's labels and units.
        for want in [f"total time: {q['total-time']} ms",
                     f"downtime: {q['downtime']} ms",
                     f"setup: {q['setup-time']} ms",
                     f"transferred ram: {ram['transferred'] >> 10} kbytes",
                     "remaining ram: 0 kbytes",
                     f"total ram: {64 << 10} kbytes",
                     f"duplicate: {ram['duplicate']} pages",
                     f"normal: {ram['normal']} pages",
                     f"dirty sync count: {ram['dirty-sync-count']}",
                     "page size: 4 kbytes",
                     f"throughput: {ram['mbps']:.2f} mbps"]:
            assert want in lines, (want, lines)
        assert await hmp(s, "info status") == "VM status: paused (postmigrate)\r\n"
        await wait_status(d, "running")
        assert await hmp(d, "info status") == "VM status: running\r\n"
        assert (await hmp(d, "info migrate")).startswith("Migration status: completed\r\n")
        # The destination's guest runs on: its counter, read by xp, grows there.
        assert await grows(d, 0)
        await s.disconnect()
        await d.disconnect()

    run(body())
