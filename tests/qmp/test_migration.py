"""A migration between two `ferry vm` processes driven by QMP alone (qemu.qmp client)."""

import asyncio

from qemu.qmp import EventListener, ExecuteError, QMPClient

from conftest import free_port, run, skip_without_kvm

TERMINAL = ("completed", "failed", "cancelled")


async def connect(name, vm):
    client = QMPClient(name)
    await client.connect(vm.qmp_path)
    return client


async def set_events(client):
    await client.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "events", "state": True}]})


async def drain(listener):
    events = []
    while not listener.empty():
        events.append(await listener.get())
    return events


async def poll_until_done(client, period=0.1):
    """query-migrate every `period` s until a terminal status; returns every reply."""
    replies = []
    while True:
        info = await client.execute("query-migrate")
        replies.append(info)
        if info.get("status") in TERMINAL:
            return replies
        await asyncio.sleep(period)


async def wait_status(client, want):
    while True:
        st = await client.execute("query-status")
        if st["status"] == want:
            return st
        await asyncio.sleep(0.05)


# The guest: `ferry vm --mem 1G --vcpus 2 --workload working-set=16M`.
GUEST = {"mem": "1G", "vcpus": 2, "workload": "working-set=16M"}


def test_migration_by_qmp_alone(vms):
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        assert await s.execute("query-status") == {"running": True, "singlestep": False, "status": "running"}
        assert await d.execute("query-status") == {"running": False, "singlestep": False, "status": "inmigrate"}
        # The destination listens at once and says so in query-migrate.
        assert (await d.execute("query-migrate"))["status"] == "setup"
        assert await s.execute("query-migrate") == {}
        await set_events(s)
        await set_events(d)
        caps = await s.execute("query-migrate-capabilities")
        assert {"capability": "events", "state": True} in caps
        params = await s.execute("query-migrate-parameters")
        assert params["x-ferry-sparse-pages"] is True
        await s.execute("migrate-set-parameters",
                        {"downtime-limit": 400, "x-ferry-sparse-pages": False})
        params = await s.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 400 and params["x-ferry-sparse-pages"] is False
        src_events = EventListener(("MIGRATION", "MIGRATION_PASS"))
        dst_events = EventListener(("MIGRATION",))
        s.register_listener(src_events)
        d.register_listener(dst_events)

        assert await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"}) == {}
        replies = await poll_until_done(s, 0.1)
        final = replies[-1]
        assert final["status"] == "completed", final
        ram = final["ram"]
        assert ram["transferred"] > 0 and ram["total"] == 1 << 30
        # Sparse pages were off: every written page travelled whole.
        assert final["x-ferry"]["sparse-pages"] == 0
        assert ram["normal-bytes"] <= ram["transferred"]
        assert ram["remaining"] == 0 and ram["dirty-sync-count"] >= 2
        assert "downtime" in final and "total-time" in final
        for info in replies:
            assert info["status"] in ("setup", "active", "device", "completed"), info
            if info["status"] in ("active", "device"):
                assert "ram" in info and "expected-downtime" in info
        assert (await s.execute("query-status"))["status"] == "postmigrate"

        # The destination resumes the guest and reports completed.
        await wait_status(d, "running")
        assert (await d.execute("query-migrate"))["status"] == "completed"

        # MIGRATION events on both sides, in order; MIGRATION_PASS on the source.
        await asyncio.sleep(0.2)
        evs = await drain(src_events)
        statuses = [e["data"]["status"] for e in evs if e["event"] == "MIGRATION"]
        assert statuses[0] == "setup" and statuses[-1] == "completed", statuses
        assert "active" in statuses
        passes = [e["data"]["pass"] for e in evs if e["event"] == "MIGRATION_PASS"]
        assert passes and passes == sorted(passes), passes
        for e in evs:
            assert set(e["timestamp"]) == {"seconds", "microseconds"}
        dst_statuses = [e["data"]["status"] for e in await drain(dst_events)]
        assert dst_statuses[-1] == "completed", dst_statuses
        assert "active" in dst_statuses

        # A second migrate-incoming is refused; the destination keeps running.
        try:
            await d.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            raise AssertionError("second migrate-incoming accepted")
        except ExecuteError as e:
            assert e.error_class == "GenericError"
        assert (await d.execute("query-status"))["status"] == "running"
        await s.disconnect()
        await d.disconnect()

    run(body())
    assert src.alive() and dst.alive()


def test_deferred_incoming_and_events_off(vms):
    src = vms("src")
    dst = vms("dst", "--incoming", "defer")
    sock = str(vms.dir / "mig.sock")

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        assert (await d.execute("query-status"))["status"] == "inmigrate"
        assert await d.execute("query-migrate") == {}
        # Not a destination: migrate-incoming is refused, as QEMU without -incoming.
        try:
            await s.execute("migrate-incoming", {"uri": f"unix:{sock}"})
            raise AssertionError("migrate-incoming accepted without --incoming")
        except ExecuteError as e:
            assert "-incoming" in str(e)
        # A destination cannot migrate out.
        try:
            await d.execute("migrate", {"uri": f"unix:{sock}"})
            raise AssertionError("migrate accepted while inmigrate")
        except ExecuteError as e:
            assert str(e) == "Guest is waiting for an incoming migration"
        listener = EventListener(("MIGRATION", "MIGRATION_PASS"))
        s.register_listener(listener)
        dst_listener = EventListener(("MIGRATION",))
        d.register_listener(dst_listener)
        await d.execute("migrate-incoming", {"uri": f"unix:{sock}"})
        await s.execute("migrate", {"uri": f"unix:{sock}"})
        replies = await poll_until_done(s, 0.1)
        assert replies[-1]["status"] == "completed", replies[-1]
        await wait_status(d, "running")
        # The events capability is off: QEMU sends no MIGRATION events then, except
        # the destination's announcement of the incoming setup.
        await asyncio.sleep(0.2)
        assert await drain(listener) == []
        assert [e["data"]["status"] for e in await drain(dst_listener)] == ["setup"]
        await s.disconnect()
        await d.disconnect()

    run(body())


def test_cancel_keeps_the_source_running(vms):
    src = vms("src")
    # A destination that never resumes: a plain listening socket that reads nothing.
    import socket
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    async def body():
        s = await connect("src", src)
        await set_events(s)
        listener = EventListener(("MIGRATION",))
        s.register_listener(listener)
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        try:
            await s.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "events", "state": False}]})
            busy = False
        except ExecuteError as e:
            busy = True
            assert "in progress" in str(e)
        await s.execute("migrate_cancel")
        replies = await poll_until_done(s, 0.05)
        # The stream could have ended before the cancel (nothing reads it) only as failed.
        assert replies[-1]["status"] in ("cancelled", "failed"), replies[-1]
        await wait_status(s, "running")
        statuses = []
        while not statuses or statuses[-1] not in TERMINAL:
            ev = await asyncio.wait_for(listener.get(), 30)
            statuses.append(ev["data"]["status"])
        assert statuses[0] == "setup"
        if replies[-1]["status"] == "cancelled" and busy:
            assert "cancelling" in statuses or statuses[-1] == "cancelled"
        await s.disconnect()

    try:
        run(body())
    finally:
        lsock.close()
    assert src.alive()


def test_stop_on_the_destination_keeps_it_paused(vms):
    """`stop` during inmigrate (QEMU's autostart off): paused after the migration."""
    src = vms("src")
    sock = str(vms.dir / "mig.sock")
    dst = vms("dst", "--incoming", f"unix:{sock}")

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        await d.execute("stop")
        assert (await d.execute("query-status"))["status"] == "inmigrate"
        await s.execute("migrate", {"uri": f"unix:{sock}"})
        assert (await poll_until_done(s))[-1]["status"] == "completed"
        while (await d.execute("query-migrate"))["status"] != "completed":
            await asyncio.sleep(0.05)
        await wait_status(d, "paused")
        await d.execute("cont")
        assert await d.execute("query-status") == {"running": True, "singlestep": False, "status": "running"}
        # The source may be resumed after a completed migration (postmigrate -> running).
        await s.execute("cont")
        assert (await s.execute("query-status"))["status"] == "running"
        await s.disconnect()
        await d.disconnect()

    run(body())


def test_migration_with_dirty_ring(vms):
    """`--dirty-ring ENTRIES` passes through: both sides track with the KVM dirty ring."""
    skip_without_kvm()
    src = vms("src", "--dirty-ring", "4096", **GUEST)
    sock = str(vms.dir / "mig.sock")
    dst = vms("dst", "--dirty-ring", "4096", "--incoming", f"unix:{sock}", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        await s.execute("migrate", {"uri": f"unix:{sock}"})
        final = (await poll_until_done(s))[-1]
        assert final["status"] == "completed", final
        await wait_status(d, "running")
        await s.disconnect()
        await d.disconnect()

    run(body())


def test_dash_S_holds_the_guest_until_cont(vms):
    """libvirt's way: the destination runs with -S, the source completes, the
    destination's guest stays paused with all of its state until `cont`."""
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "-S", "--incoming", f"tcp:127.0.0.1:{port}", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        replies = await poll_until_done(s, 0.05)
        assert replies[-1]["status"] == "completed", replies[-1]
        assert (await s.execute("query-status"))["status"] == "postmigrate"
        while (await d.execute("query-migrate")).get("status") != "completed":
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        assert await d.execute("query-status") == {"running": False, "singlestep": False, "status": "paused"}
        await d.execute("cont")
        assert await d.execute("query-status") == {"running": True, "singlestep": False, "status": "running"}
        await s.disconnect()
        await d.disconnect()

    run(body())
    assert src.alive() and dst.alive()


def test_dash_S_needs_incoming(vms):
    try:
        vms("lone", "-S")
        raise AssertionError("-S accepted without --incoming")
    except RuntimeError as e:
        assert "--incoming" in str(e)
