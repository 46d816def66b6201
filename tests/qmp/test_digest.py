"""`x-ferry-query-ram-digest`: a management tool checks, over QMP alone, that the
destination holds the source's RAM page for page (the source in postmigrate, the
destination held paused by -S), and the digest is refused while the guest runs."""

import asyncio

from qemu.qmp import ExecuteError, QMPClient

from conftest import free_port, run
from test_migration import poll_until_done, wait_status

GUEST = {"mem": "256M", "vcpus": 2, "workload": "working-set=16M"}


async def connect(name, vm):
    client = QMPClient(name)
    await client.connect(vm.qmp_path)
    return client


async def refused(client):
    try:
        await client.execute("x-ferry-query-ram-digest")
    except ExecuteError as e:
        assert e.error_class == "GenericError", e
        assert e.error.error.desc == "the guest must be paused", e
        return
    raise AssertionError("x-ferry-query-ram-digest answered while the guest runs")


def test_digests_match_after_migration_to_a_held_destination(vms):
    src = vms("src", **GUEST)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", "-S", **GUEST)

    async def body():
        s = await connect("src", src)
        d = await connect("dst", dst)
        await refused(s)
        # Whole pages, so the comparison does not depend on the sparse encoding.
        await s.execute("migrate-set-parameters", {"x-ferry-sparse-pages": False})
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        final = (await poll_until_done(s))[-1]
        assert final["status"] == "completed", final
        first = final["x-ferry"]["first-pass-convergence"]
        assert first["state"] in ("unknown", "converging", "not-converging"), first
        assert 0 <= first["at-ms"] <= final["total-time"], final
        assert (await s.execute("query-status"))["status"] == "postmigrate"
        # -S: the destination stays paused once the migration completed.
        await wait_status(d, "paused")
        assert (await d.execute("query-migrate"))["status"] == "completed"

        a = await s.execute("x-ferry-query-ram-digest")
        b = await d.execute("x-ferry-query-ram-digest")
        assert a["pages"] == b["pages"] == (256 << 20) // 4096, (a, b)
        # The guest wrote its working set: the digest is not the one of empty RAM.
        assert a["digest"] != 0, a
        assert a["digest"] == b["digest"], (a, b)

        # Once the destination runs its guest, it refuses again; a paused source
        # (stop after cont) answers, and its guest has moved on from the copy.
        await d.execute("cont")
        await wait_status(d, "running")
        await refused(d)
        await s.execute("cont")
        await refused(s)
        rounds = (await s.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]
        while (await s.execute("x-ferry-query-guest-progress"))["vcpu-rounds"] == rounds:
            await asyncio.sleep(0.01)
        await s.execute("stop")
        c = await s.execute("x-ferry-query-ram-digest")
        assert c["digest"] != a["digest"], "the source guest wrote nothing after cont"
        await s.disconnect()
        await d.disconnect()

    run(body())
