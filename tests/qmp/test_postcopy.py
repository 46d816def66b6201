"""Postcopy over QMP alone, as libvirt drives it: `postcopy-ram` on both sides, a
migration that cannot converge, `migrate-start-postcopy` once a pass is over, then
the guest runs on the destination while the pages it lacks arrive (on request and in
the background) and the source stays paused for good (postmigrate)."""

import asyncio

from qemu.qmp import EventListener, ExecuteError

from conftest import free_port, run, skip_without_kvm
from test_faults import wait_migration
from test_migration import TERMINAL, connect, wait_status

# The engine's non-converging guest (tests/migration.rs): 65536 pages (256 MiB)
# rewritten all the time, sent whole at 128 MiB/s, so precopy alone never ends.
GUEST = {"mem": "1G", "vcpus": 2, "workload": "working-set=65536"}
MAX_BANDWIDTH = 128 << 20

CANCEL_REFUSED = "Postcopy migration in progress, cannot cancel"
CAP_OFF = "Enable postcopy with migrate_set_capability before the start of migration"
NOT_STARTED = "Postcopy must be started after migration has been started"


def caps(postcopy):
    return {"capabilities": [{"capability": "events", "state": True},
                             {"capability": "postcopy-ram", "state": postcopy}]}


async def expect_error(client, cmd, desc_prefix, args=None):
    try:
        r = await client.execute(cmd, args)
    except ExecuteError as e:
        assert e.error_class == "GenericError", e
        assert e.error.error.desc.startswith(desc_prefix), e.error.error.desc
        return e.error.error.desc
    raise AssertionError(f"{cmd} answered {r}, expected the error {desc_prefix!r}")


async def prepare(s, d, postcopy_bandwidth):
    """postcopy-ram (and events) on both sides, as libvirt sets them; the source's
    precopy cannot converge (whole pages at 128 MiB/s)."""
    await s.execute("migrate-set-capabilities", caps(True))
    await d.execute("migrate-set-capabilities", caps(True))
    for c in (s, d):
        on = await c.execute("query-migrate-capabilities")
        assert {"capability": "postcopy-ram", "state": True} in on, on
    await s.execute("migrate-set-parameters",
                    {"max-bandwidth": MAX_BANDWIDTH, "x-ferry-sparse-pages": False,
                     "max-postcopy-bandwidth": postcopy_bandwidth})
    params = await s.execute("query-migrate-parameters")
    assert params["max-postcopy-bandwidth"] == postcopy_bandwidth, params


async def past_first_pass(s):
    """Waits until the source is active with a pass over (the working set keeps the
    bitmap busy: precopy would go on)."""
    return await wait_migration(
        s, lambda i: i.get("status") == "active"
        and i.get("x-ferry", {}).get("iterations", 0) >= 1, "a finished pass", 120)


async def statuses_until_end(listener, bound_s=120):
    """The MIGRATION statuses of `listener` up to a terminal one."""
    seen = []
    while not seen or seen[-1] not in TERMINAL:
        ev = await asyncio.wait_for(listener.get(), bound_s)
        seen.append(ev["data"]["status"])
    return seen


async def wait_incoming(d, want, bound_s=120):
    """Polls the destination's query-migrate until `want`; fails on another end."""
    async def poll():
        while True:
            info = await d.execute("query-migrate")
            if info.get("status") == want:
                return info
            assert info.get("status") not in TERMINAL, f"destination ended before {want}: {info}"
            await asyncio.sleep(0.01)
    return await asyncio.wait_for(poll(), bound_s)


def assert_postcopy_order(statuses, side):
    assert statuses[-1] == "completed", (side, statuses)
    assert "postcopy-active" in statuses, (side, statuses)
    pc = statuses.index("postcopy-active")
    assert "active" in statuses[:pc], (side, statuses)
    # Nothing but the end after the switch: no cancelling, no second precopy.
    assert statuses[pc + 1:] == ["completed"], (side, statuses)


def test_postcopy_completes_what_precopy_cannot(vms):
    """The destination runs the guest during postcopy: it faults on the pages it
    lacks, the source serves them, and both sides end completed."""
    skip_without_kvm()
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        # The background stream capped at 64 MiB/s: the 256 MiB working set takes it
        # seconds, so the running destination guest asks for pages of its own.
        await prepare(s, d, 64 << 20)
        src_events = EventListener(("MIGRATION",))
        dst_events = EventListener(("MIGRATION",))
        s.register_listener(src_events)
        d.register_listener(dst_events)
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await past_first_pass(s)
        assert info["ram"]["postcopy-bytes"] == 0, info
        assert await s.execute("migrate-start-postcopy") == {}

        src_statuses = await statuses_until_end(src_events)
        assert_postcopy_order(src_statuses, "source")
        final = await s.execute("query-migrate")
        assert final["status"] == "completed", final
        ram = final["ram"]
        assert ram["postcopy-bytes"] > 0, final
        assert ram["postcopy-requests"] > 0, final
        assert ram["remaining"] == 0, final
        # The source's guest stays paused for good: its RAM is the switch's copy.
        assert await s.execute("query-status") == {"running": False, "singlestep": False, "status": "postmigrate"}

        await wait_incoming(d, "completed")
        await wait_status(d, "running")
        # (Its `setup` went out at start, before this client connected.)
        dst_statuses = await statuses_until_end(dst_events)
        assert_postcopy_order(dst_statuses, "destination")
        # The guest goes on running on the destination.
        rounds = (await d.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]

        async def advanced():
            while True:
                now = (await d.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]
                if all(n > r for n, r in zip(now, rounds)):
                    return
                await asyncio.sleep(0.01)
        await asyncio.wait_for(advanced(), 60)
        # Over: nothing to cancel, `{}` as QEMU answers.
        assert await s.execute("migrate_cancel") == {}
        assert (await s.execute("query-migrate"))["status"] == "completed"
        await s.disconnect()
        await d.disconnect()

    run(body())
    assert src.alive() and dst.alive()


def test_postcopy_cannot_be_cancelled_and_lands_every_page(vms):
    """A destination held by -S (libvirt's way): postcopy-active on both sides,
    migrate_cancel refused while the destination lacks pages, and the destination
    ends with the source's RAM page for page."""
    skip_without_kvm()
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "-S", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        # The held guest faults on nothing: the background stream alone, at 16 MiB/s,
        # takes ~16 s over the 256 MiB working set, the window for the cancel below.
        await prepare(s, d, 16 << 20)
        src_events = EventListener(("MIGRATION",))
        s.register_listener(src_events)
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await past_first_pass(s)
        assert await s.execute("migrate-start-postcopy") == {}

        info = await wait_migration(s, lambda i: i.get("status") == "postcopy-active",
                                    "postcopy-active", 120)
        assert "ram" in info, info
        assert (await s.execute("query-status"))["running"] is False
        await wait_incoming(d, "postcopy-active")
        # The guest is the destination's now: the source refuses to cancel, and the
        # migration goes on.
        desc = await expect_error(s, "migrate_cancel", CANCEL_REFUSED)
        assert "destination" in desc, desc
        info = await s.execute("query-migrate")
        assert info["status"] in ("postcopy-active", "completed"), info
        # A second switch request changes nothing (QEMU accepts it).
        assert await s.execute("migrate-start-postcopy") == {}

        statuses = await statuses_until_end(src_events)
        assert_postcopy_order(statuses, "source")
        final = await s.execute("query-migrate")
        assert final["status"] == "completed", final
        assert final["ram"]["postcopy-bytes"] > 0, final
        assert await s.execute("query-status") == {"running": False, "singlestep": False, "status": "postmigrate"}
        await wait_incoming(d, "completed")
        # -S: held paused after the migration, with every page.
        await wait_status(d, "paused")
        a = await s.execute("x-ferry-query-ram-digest")
        b = await d.execute("x-ferry-query-ram-digest")
        assert a["pages"] == b["pages"] == (1 << 30) // 4096, (a, b)
        assert a["digest"] != 0, a
        assert a["digest"] == b["digest"], (a, b)
        await d.execute("cont")
        await wait_status(d, "running")
        await s.disconnect()
        await d.disconnect()

    run(body())
    assert src.alive() and dst.alive()


def test_start_postcopy_needs_the_capability(vms):
    """QEMU's errors without postcopy-ram (or before any migration); a precopy
    migration then stays precopy and cancels as before."""
    src = vms("src")
    port = free_port()
    # A real destination (it ends when the migration is cancelled, as QEMU's).
    vms("dst", "--incoming", f"tcp:127.0.0.1:{port}")

    async def body():
        s = await connect("src", src)
        await expect_error(s, "migrate-start-postcopy", CAP_OFF)
        await s.execute("migrate-set-capabilities", caps(True))
        await expect_error(s, "migrate-start-postcopy", NOT_STARTED)
        await s.execute("migrate-set-capabilities", caps(False))
        # 1 MiB/s: the first pass of the 4 MiB working set alone takes seconds.
        await s.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
        listener = EventListener(("MIGRATION",))
        s.register_listener(listener)
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await wait_migration(s, lambda i: i.get("status") == "active", "active")
        await expect_error(s, "migrate-start-postcopy", CAP_OFF)
        # Refused while the migration runs, as every capability change.
        await expect_error(s, "migrate-set-capabilities", "There's a migration process",
                           caps(True))
        assert await s.execute("migrate_cancel") == {}
        statuses = await statuses_until_end(listener, 60)
        assert statuses[-1] == "cancelled", statuses
        assert "postcopy-active" not in statuses, statuses
        await wait_status(s, "running")
        await s.disconnect()

    run(body())
    assert src.alive()


PAUSE_REFUSED = ("migrate-pause is currently only supported during postcopy-active or "
                 "postcopy-recover state")
NOT_PAUSED = "Migrate recover can only be run when postcopy is paused."
RECOVERY_PENDING = "Migrate recovery is triggered already"
NO_PAUSED = "Cannot resume if there is no paused migration"
# After the first switch: a pause, the recovery, the rest of postcopy, the end.
RECOVERED = ["postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-active",
             "completed"]


async def next_status(listener, want, bound_s=60):
    """The MIGRATION statuses of `listener` up to `want` (fails on a terminal one)."""
    seen = []
    while not seen or seen[-1] != want:
        ev = await asyncio.wait_for(listener.get(), bound_s)
        seen.append(ev["data"]["status"])
        assert seen[-1] not in TERMINAL, f"ended before {want}: {seen}"
    return seen


def assert_recovered(statuses, side):
    """One precopy, the switch, then exactly a pause and a recovery before the end."""
    assert "postcopy-active" in statuses, (side, statuses)
    pc = statuses.index("postcopy-active")
    assert "active" in statuses[:pc], (side, statuses)
    assert statuses[pc:] == RECOVERED, (side, statuses)


def pause_and_recover(vms, pause_on):
    """Postcopy paused on purpose by `migrate-pause` on `pause_on` ("src" or "dst"),
    both sides postcopy-paused saying why, then `migrate-recover` on the destination
    and `migrate` with `resume` on the source: both end completed."""
    skip_without_kvm()
    # Held by -S when the source pauses (its RAM then compares page for page); a
    # running destination when the destination pauses (its vCPUs fault on missing
    # pages while the stream is down, and run again once it is back).
    held = pause_on == "src"
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", *(["-S"] if held else []), "--incoming", f"tcp:127.0.0.1:{port}",
              **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        # 4 MiB/s: the background pass over the 256 MiB working set would take a
        # minute, so postcopy is still on when it is paused.
        await prepare(s, d, 4 << 20)
        src_events = EventListener(("MIGRATION",))
        dst_events = EventListener(("MIGRATION",))
        s.register_listener(src_events)
        d.register_listener(dst_events)
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await past_first_pass(s)
        # Not in postcopy yet: neither side pauses, nothing resumes or recovers.
        await expect_error(s, "migrate-pause", PAUSE_REFUSED)
        await expect_error(d, "migrate-pause", PAUSE_REFUSED)
        await expect_error(s, "migrate", NO_PAUSED,
                           {"uri": f"tcp:127.0.0.1:{port}", "resume": True})
        await expect_error(d, "migrate-recover", NOT_PAUSED, {"uri": "tcp:127.0.0.1:0"})
        assert await s.execute("migrate-start-postcopy") == {}
        src_seen = await next_status(src_events, "postcopy-active")
        dst_seen = await next_status(dst_events, "postcopy-active")
        await wait_incoming(d, "postcopy-active")

        pauser = s if pause_on == "src" else d
        assert await pauser.execute("migrate-pause") == {}
        src_seen += await next_status(src_events, "postcopy-paused")
        dst_seen += await next_status(dst_events, "postcopy-paused")
        src_info = await wait_migration(s, lambda i: i.get("status") == "postcopy-paused",
                                        "postcopy-paused")
        dst_info = await wait_incoming(d, "postcopy-paused")
        for side, info in (("source", src_info), ("destination", dst_info)):
            assert "postcopy paused" in info.get("error-desc", ""), (side, info)
        if pause_on == "src":
            assert "paused by the user" in src_info["error-desc"], src_info
        # Paused: no second pause on either side, no cancel, the guest still on the
        # destination.
        await expect_error(s, "migrate-pause", PAUSE_REFUSED)
        await expect_error(d, "migrate-pause", PAUSE_REFUSED)
        await expect_error(s, "migrate_cancel", CANCEL_REFUSED)
        assert (await s.execute("query-migrate"))["status"] == "postcopy-paused"
        assert (await s.execute("query-status"))["running"] is False

        # QEMU's migrate-recover returns nothing: the test names the port.
        recovery = f"tcp:127.0.0.1:{free_port()}"
        assert await d.execute("migrate-recover", {"uri": recovery}) == {}
        await expect_error(d, "migrate-recover", RECOVERY_PENDING, {"uri": recovery})
        assert (await d.execute("query-migrate"))["status"] == "postcopy-paused"
        await s.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        assert await s.execute("migrate", {"uri": recovery, "resume": True}) == {}

        src_seen += await statuses_until_end(src_events)
        dst_seen += await statuses_until_end(dst_events)
        assert_recovered(src_seen, "source")
        assert_recovered(dst_seen, "destination")
        final = await s.execute("query-migrate")
        assert final["status"] == "completed", final
        assert final["ram"]["remaining"] == 0, final
        assert final["ram"]["postcopy-bytes"] > 0, final
        assert "error-desc" not in final, final
        assert await s.execute("query-status") == {"running": False, "singlestep": False, "status": "postmigrate"}
        dst_final = await wait_incoming(d, "completed")
        assert "error-desc" not in dst_final, dst_final
        if held:
            await wait_status(d, "paused")
            a = await s.execute("x-ferry-query-ram-digest")
            b = await d.execute("x-ferry-query-ram-digest")
            assert a["pages"] == b["pages"] == (1 << 30) // 4096, (a, b)
            assert a["digest"] != 0, a
            assert a["digest"] == b["digest"], (a, b)
            await d.execute("cont")
        await wait_status(d, "running")
        # The guest runs on the destination after the recovery.
        rounds = (await d.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]

        async def advanced():
            while True:
                now = (await d.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]
                if all(n > r for n, r in zip(now, rounds)):
                    return
                await asyncio.sleep(0.01)
        await asyncio.wait_for(advanced(), 60)
        # Over: nothing to pause or resume any more.
        await expect_error(s, "migrate-pause", PAUSE_REFUSED)
        await expect_error(d, "migrate-pause", PAUSE_REFUSED)
        await expect_error(s, "migrate", NO_PAUSED, {"uri": recovery, "resume": True})
        await s.disconnect()
        await d.disconnect()

    run(body())
    assert src.alive() and dst.alive()


def test_postcopy_paused_by_the_source_recovers(vms):
    """`migrate-pause` on the source: both sides postcopy-paused; `migrate-recover` on
    the destination and `migrate` with `resume` on the source finish the migration,
    the destination's RAM equal to the source's."""
    pause_and_recover(vms, "src")


def test_postcopy_paused_by_the_destination_recovers(vms):
    """`migrate-pause` on the destination, whose guest runs and faults on the pages it
    lacks while the stream is down: the same recovery finishes it, the guest runs."""
    pause_and_recover(vms, "dst")
