"""A guest that writes real data, migrated as a user runs it: source and destination
`ferry vm` processes on two hosts (network namespaces) behind a 1 Gbit/s link, the
destination fresh and held by -S; afterwards every page of the destination equals the
source's (x-ferry-query-ram-digest on both, taken while both are paused)."""

import pytest

from conftest import run
from netns import netpair  # noqa: F401  (the fixture)
from test_faults import TERMINAL, wait_migration
from test_migration import wait_status

PORT = 4447


@pytest.mark.parametrize("workload", ["dense=4096", "dense=4096,256"])
def test_dense_guest_over_1_gbit_arrives_page_for_page(netpair, workload):
    net = netpair(rate="1gbit")
    guest = {"mem": "256M", "vcpus": 2, "workload": workload}
    src = net.source("src", **guest)
    net.destination(PORT, "dst", "-S", **guest)
    dst = net.vms[-1]

    async def body():
        s = await net.qmp(src)
        d = await net.qmp(dst)
        # Past the first round, which fills whole pages: the guest now rewrites its
        # pages with fresh data every round.
        r0 = (await s.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]
        await wait_migration(s, lambda _: True, "a reply")
        while True:
            r = (await s.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]
            if all(b >= max(a, 1) + 2 for a, b in zip(r0, r)):
                break
        await s.execute("migrate", {"uri": net.uri(PORT)})
        final = await wait_migration(s, lambda i: i.get("status") in TERMINAL, "an end", 120)
        assert final["status"] == "completed", final
        ram = final["ram"]
        # Dense pages cross whole: at least the 16 MiB the guest rewrites.
        assert ram["normal-bytes"] >= 4096 * 4096, ram
        # Only low memory (page tables, code, counters: < 256 pages) is sparse.
        assert final["x-ferry"]["sparse-pages"] < 256, final
        assert (await s.execute("query-status"))["status"] == "postmigrate"
        await wait_status(d, "paused")
        a = await s.execute("x-ferry-query-ram-digest")
        b = await d.execute("x-ferry-query-ram-digest")
        assert a["pages"] == b["pages"] == (256 << 20) // 4096, (a, b)
        assert a["digest"] != 0 and a["digest"] == b["digest"], (a, b)
        # The guest runs on exactly one side: the destination after cont, the source
        # stays in postmigrate.
        progress = (await d.execute("x-ferry-query-guest-progress"))["vcpu-rounds"]
        await d.execute("cont")
        while (await d.execute("x-ferry-query-guest-progress"))["vcpu-rounds"] == progress:
            pass
        assert (await s.execute("query-status"))["status"] == "postmigrate"
        await s.disconnect()
        await d.disconnect()

    run(body())
