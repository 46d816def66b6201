"""The run state tells the truth and the guest runs in exactly one place.

Each test reads the guest's own progress (`x-ferry-query-guest-progress`: per-vCPU
round counters) beside `query-status`: a guest reported running must make rounds,
one reported paused must not. The first three reproduce what an operator saw on
f27e339: a migrate from postmigrate that made two running copies, a `stop` that a
failed migration overrode, and STOP/RESUME events that did not match the vCPUs.
"""

import asyncio
import os
import signal

from qemu.qmp import EventListener, ExecuteError

from conftest import free_port, run
from test_migration import (TERMINAL, connect, drain, poll_until_done, set_events,
                            wait_status)

GUEST = {"mem": "256M", "vcpus": 2, "workload": "working-set=4M"}
# How long a guest must not move to count as paused. A paused vCPU never moves; the
# wait only has to outlast a read of the counters racing with the pause (none: pause
# returns once no vCPU runs), so any value is a real check, loaded or not.
HELD_S = 0.3


async def rounds(client):
    return (await client.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]


async def runs(client, timeout=60.0):
    """True once every vCPU made progress (waits as long as a loaded machine needs)."""
    first = await rounds(client)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await asyncio.sleep(0.02)
        now = await rounds(client)
        if all(b > a for a, b in zip(first, now)):
            return True
    return False


async def held(client):
    """True when no vCPU moves for HELD_S."""
    before = await rounds(client)
    await asyncio.sleep(HELD_S)
    return await rounds(client) == before


async def check_true(client, want):
    """`query-status` says `want`, and the guest's counters agree."""
    st = await client.execute("query-status")
    assert st["status"] == want, st
    if st["running"]:
        assert await runs(client), f"reported {st} but the guest makes no progress"
    else:
        assert await held(client), f"reported {st} but the guest runs"


async def expect_error(coro, text):
    try:
        await coro
    except ExecuteError as e:
        assert text in str(e), str(e)
        return str(e)
    raise AssertionError(f"accepted, expected an error with {text!r}")


def test_a_migrate_from_postmigrate_is_refused_and_never_starts_a_second_copy(vms):
    """Observation 1: A->B completes; a `migrate` from A (postmigrate) is refused, as
    QEMU refuses it, and A stays paused; a third destination never gets the guest."""
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)
    port3 = free_port()
    third = vms("third", "--incoming", f"tcp:127.0.0.1:{port3}", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        t = await connect("third", third)
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        assert (await poll_until_done(s, 0.05))[-1]["status"] == "completed"
        await check_true(s, "postmigrate")
        await wait_status(d, "running")
        await check_true(d, "running")
        await expect_error(s.execute("migrate", {"uri": "tcp:127.0.0.1:1"}),
                           "Can't migrate the vm that was paused due to previous migration")
        await check_true(s, "postmigrate")
        await expect_error(s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port3}"}),
                           "previous migration")
        await check_true(s, "postmigrate")
        assert (await t.execute("query-status"))["status"] == "inmigrate"
        assert (await t.execute("query-migrate"))["status"] == "setup"
        await check_true(d, "running")
        for c in (s, d, t):
            await c.disconnect()

    run(body())


def test_stop_then_a_failed_migration_leaves_the_source_paused(vms):
    """Observation 2: `stop` during precopy, then the destination dies: the migration
    fails and the source stays paused, as the operator asked."""
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = await connect("src", src)
        # Whole pages at 1 MiB/s: precopy lasts long enough to stop the guest in it.
        await s.execute("migrate-set-parameters",
                        {"x-ferry-sparse-pages": False, "max-bandwidth": 1 << 20})
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while (await s.execute("query-migrate"))["status"] != "active":
            await asyncio.sleep(0.02)
        await s.execute("stop")
        await check_true(s, "paused")
        dst.proc.kill()
        final = (await poll_until_done(s, 0.05))[-1]
        assert final["status"] == "failed", final
        await check_true(s, "paused")
        # The operator resumes it, and a new migration is allowed.
        await s.execute("cont")
        await check_true(s, "running")
        await s.disconnect()

    run(body())


def test_stop_during_the_switch_over_then_a_hung_destination(vms):
    """Observation 2, final phase: the source is stopped while the destination hangs
    (SIGSTOP) in the switch-over; when the migration fails the source stays paused."""
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = await connect("src", src)
        await set_events(s)
        events = EventListener(("MIGRATION", "STOP", "RESUME"))
        s.register_listener(events)
        await s.execute("migrate-set-parameters", {"x-ferry-switchover-timeout-ms": 1500})
        # Hang the destination before the switch-over: stopping the source makes the
        # migration converge at once, and its final phase then waits for a peer that
        # never answers.
        os.kill(dst.proc.pid, signal.SIGSTOP)
        try:
            await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            await s.execute("stop")
            final = (await poll_until_done(s, 0.05))[-1]
        finally:
            os.kill(dst.proc.pid, signal.SIGCONT)
        assert final["status"] == "failed", final
        await check_true(s, "paused")
        # One STOP (the operator's), no RESUME: the vCPUs never started again.
        names = [e["event"] for e in await drain(events)]
        assert names.count("STOP") == 1 and "RESUME" not in names, names
        await s.disconnect()

    run(body())


def test_events_follow_the_vcpus(vms):
    """Observation 3: STOP and RESUME only when the vCPUs change, and at the
    switch-over STOP comes before MIGRATION `device` on the source and RESUME on the
    destination once it runs."""
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        await set_events(s)
        await set_events(d)
        se = EventListener(("MIGRATION", "STOP", "RESUME"))
        de = EventListener(("MIGRATION", "STOP", "RESUME"))
        s.register_listener(se)
        d.register_listener(de)
        for cmd in ("stop", "stop", "cont", "cont"):
            await s.execute(cmd)
        await check_true(s, "running")
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        assert (await poll_until_done(s, 0.05))[-1]["status"] == "completed"
        await wait_status(d, "running")
        await asyncio.sleep(0.2)

        def flat(evs):
            return [e["event"] if e["event"] != "MIGRATION" else e["data"]["status"]
                    for e in evs]
        src_seq = flat(await drain(se))
        dst_seq = flat(await drain(de))
        assert src_seq[:2] == ["STOP", "RESUME"], src_seq
        rest = src_seq[2:]
        assert rest.count("STOP") == 1 and "RESUME" not in rest, src_seq
        assert rest.index("STOP") < rest.index("device") < rest.index("completed"), src_seq
        assert dst_seq.count("RESUME") == 1 and "STOP" not in dst_seq, dst_seq
        await check_true(s, "postmigrate")
        await check_true(d, "running")
        # `cont` on a running guest and `stop` on a postmigrate one change nothing and
        # say nothing.
        await d.execute("cont")
        await s.execute("stop")
        await asyncio.sleep(0.2)
        assert se.empty() and de.empty()
        for c in (s, d):
            await c.disconnect()

    run(body())


def test_a_paused_source_arrives_paused(vms):
    """QEMU's global state: a guest stopped on the source is paused on the
    destination after the migration, never started by it."""
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        await s.execute("stop")
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        assert (await poll_until_done(s, 0.05))[-1]["status"] == "completed"
        while (await d.execute("query-migrate"))["status"] not in TERMINAL:
            await asyncio.sleep(0.02)
        await check_true(s, "postmigrate")
        await check_true(d, "paused")
        await d.execute("cont")
        await check_true(d, "running")
        for c in (s, d):
            await c.disconnect()

    run(body())


def test_random_sequences_keep_one_running_copy(vms):
    """Seeded random sequences of stop, cont, migrate (to a fresh destination) that
    completes, is cancelled, or whose destination is killed, with the source itself
    migrating on from wherever the guest went: after every step at most one guest
    makes progress, and every live side's `query-status` matches its counters."""
    import random

    for seed in (1, 2, 3):
        rng = random.Random(seed)
        state = {"n": 0}

        def fresh():
            state["n"] += 1
            sock = str(vms.dir / f"s{seed}-{state['n']}.sock")
            return vms(f"d{seed}-{state['n']}", "--incoming", f"unix:{sock}", **GUEST), sock

        async def body():
            holder = vms(f"a{seed}", **GUEST)
            sides = {holder.name: (holder, await connect(holder.name, holder))}
            current = holder.name  # where the guest lives (or last lived)
            for step in range(8):
                op = rng.choice(["stop", "cont", "migrate", "migrate", "cancel", "kill"])
                vm, c = sides[current]
                what = f"seed {seed} step {step} {op} on {current}"
                if op in ("stop", "cont"):
                    await c.execute(op)
                else:
                    dst, sock = fresh()
                    d = await connect(dst.name, dst)
                    sides[dst.name] = (dst, d)
                    try:
                        await c.execute("migrate", {"uri": f"unix:{sock}"})
                    except ExecuteError as e:
                        # Refused only where QEMU refuses it.
                        st = (await c.execute("query-status"))["status"]
                        assert st == "postmigrate", f"{what}: {e} in {st}"
                        await c.execute("cont")
                        await c.execute("migrate", {"uri": f"unix:{sock}"})
                    if op == "cancel":
                        await c.execute("migrate_cancel")
                    elif op == "kill":
                        dst.proc.kill()
                    final = (await poll_until_done(c, 0.02))[-1]
                    print(what, final["status"])
                    if final["status"] == "completed":
                        current = dst.name
                    if op == "kill" or final["status"] != "completed":
                        del sides[dst.name]
                        # A destination that did not get the guest never runs it: it
                        # waits (inmigrate) or has exited on its failed migration.
                        try:
                            st = (await d.execute("query-status"))["status"]
                        except Exception:  # noqa: BLE001 (its QMP socket is gone)
                            st = "exited"
                        assert st in ("inmigrate", "exited"), f"{what}: {st}"
                        dst.proc.kill()
                live = []
                for name, (v, cl) in list(sides.items()):
                    if not v.alive():
                        del sides[name]
                        continue
                    st = (await cl.execute("query-status"))
                    if st["status"] == "inmigrate":
                        continue
                    await check_true(cl, st["status"])
                    live.append((name, st["running"]))
                assert sum(1 for _, r in live if r) <= 1, f"{what}: {live}"
            for _, (v, cl) in sides.items():
                v.proc.kill()

        run(body())
