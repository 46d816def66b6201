#!/usr/bin/env python3
"""Postcopy over the two-host link: issue #16's guest (1 GiB, 2 vCPUs, a working set
of 65536 pages written whole, which precopy cannot finish at max-bandwidth 128 MiB/s)
between two `ferry vm` processes in network namespaces joined by a veth pair limited
with `tc tbf` (scripts/netns), switched with `migrate-start-postcopy` after 1 s of
precopy, the background stream uncapped. A benchmark, not a test: it asserts nothing.

Prints, per run: total time, downtime, bytes sent, the time the link needs for those
bytes (bytes ÷ link rate) and total ÷ that, the destination's full residency, requests
and fault latency (its `x-ferry.postcopy`).

    python3 tests/qmp/postcopy_link_bench.py [--rate 1gbit] [--runs 3]

Needs root (namespaces) and /dev/kvm.
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns import NetPair, netns_unavailable  # noqa: E402

PORT = 4451
TERMINAL = ("completed", "failed", "cancelled")


def rate_bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, m in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * m
    return float(rate)


async def one_run(net: NetPair, n: int, link_bytes_per_sec: float) -> dict:
    src = net.source(f"src{n}", mem="1G", vcpus=2, workload="working-set=65536")
    dst = net.destination(PORT + n, f"dst{n}", mem="1G", vcpus=2,
                          workload="working-set=65536")
    s, d = await net.qmp(src), await net.qmp(dst)
    try:
        for c in (s, d):
            await c.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        await s.execute("migrate-set-parameters",
                        {"x-ferry-sparse-pages": False, "max-bandwidth": 128 << 20,
                         "max-postcopy-bandwidth": 0})
        await asyncio.sleep(1.0)  # every vCPU runs its rounds
        await s.execute("migrate", {"uri": net.uri(PORT + n)})
        t0 = time.monotonic()
        switched = False
        while True:
            info = await s.execute("query-migrate")
            if not switched and info["status"] == "active" and time.monotonic() - t0 >= 1.0:
                await s.execute("migrate-start-postcopy")
                switched = True
            if info["status"] in TERMINAL:
                break
            await asyncio.sleep(0.005)
        for _ in range(2000):
            dinfo = await d.execute("query-migrate")
            if dinfo["status"] in TERMINAL:
                break
            await asyncio.sleep(0.01)
        ram = info.get("ram", {})
        pc = dinfo.get("x-ferry", {}).get("postcopy", {})
        sent = ram.get("transferred", 0)
        physics_ms = sent / link_bytes_per_sec * 1000
        return {
            "status": info["status"], "total_ms": info.get("total-time", 0),
            "downtime_ms": info.get("downtime", 0), "sent_mib": sent / (1 << 20),
            "physics_ms": physics_ms,
            "ratio": info.get("total-time", 0) / physics_ms if physics_ms else 0,
            "residency_ms": pc.get("full-residency-ms"),
            "requests": pc.get("requests"), "p50_us": pc.get("fault-latency-p50-us"),
            "p99_us": pc.get("fault-latency-p99-us"),
        }
    finally:
        await s.disconnect()
        await d.disconnect()
        src.stop()
        dst.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    why = netns_unavailable()
    if why:
        sys.exit(f"postcopy_link_bench: {why}")
    link = rate_bits(a.rate) / 8
    with tempfile.TemporaryDirectory(prefix="ferry-pcbench-") as tmp:
        net = NetPair(Path(tmp), a.rate)
        try:
            rows = [asyncio.run(one_run(net, n, link)) for n in range(a.runs)]
        finally:
            net.close()
    print(f"| link | run | status | total ms | downtime ms | MiB sent | sent ÷ link ms "
          f"| total ÷ that | full residency ms | requests | fault p50 / p99 µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in enumerate(rows):
        print(f"| {a.rate} | {n + 1} | {r['status']} | {r['total_ms']} | {r['downtime_ms']} "
              f"| {r['sent_mib']:.0f} | {r['physics_ms']:.0f} | {r['ratio']:.2f} "
              f"| {r['residency_ms']} | {r['requests']} | {r['p50_us']} / {r['p99_us']} |")
    ok = [r["ratio"] for r in rows if r["status"] == "completed"]
    if ok:
        print(f"\nmedian total ÷ (sent ÷ link): {statistics.median(ok):.2f}")


if __name__ == "__main__":
    main()
