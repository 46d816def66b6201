#!/usr/bin/env python3
"""Polling load: 4 clients each polling query-migrate as fast as they can during a
migration between two `ferry vm` processes, beside a run nobody polls.

Prints the query-migrate round trip (p50, p99, max; also for the queries answered
during stop-and-copy) and each migration's throughput. A benchmark, not a test: it
asserts nothing.

    python3 tests/qmp/poll_bench.py [--runs 3] [--clients 4] [--mem 1G] [--vcpus 2]
        [--workload sweep=32768] [--warmup 9] [--nice 0] [--floor]

The default workload writes 128 MiB/s through all of guest RAM, so after the warm-up
every page has been touched and the migration moves the whole 1 GiB (minivm sends
only pages the guest touched; sparse pages are off, so every page travels whole); `--workload working-set=16M --warmup 1` is the
issue's guest, a short migration.

`--floor` points the polling clients at `crates/qmp/examples/floor.rs` instead of the
source's QMP socket: a responder that answers every read with a canned reply and does
no work, under the same migration. Its numbers are what any QMP server gets on this
machine, the floor under Ferry's.
"""

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FerryVm, ferry_bin, free_port, raw_qmp  # noqa: E402

from qemu.qmp import QMPClient  # noqa: E402

REQ = b'{"execute":"query-migrate"}'


def poller(path, ready, stop, out, nice=0):
    """Polls query-migrate back to back on a raw unix socket; records each round trip."""
    if nice:
        os.nice(nice)
    s, f = raw_qmp(path)
    ready.wait()
    lat, phase, dev_span = [], [], [None, None]
    clock = time.perf_counter_ns
    while not stop.is_set():
        t0 = clock()
        s.sendall(REQ)
        line = f.readline()
        t1 = clock()
        lat.append(t1 - t0)
        i = line.find(b'"status":"')
        ph = line[i + 10:i + 13].decode() if i >= 0 else "?"
        phase.append(ph)
        if ph == "dev":
            dev_span[0] = dev_span[0] or t0
            dev_span[1] = t1
    s.close()
    t = os.times()
    out.put((lat, phase, dev_span, t.user + t.system))


def floor_bin() -> str:
    return str(Path(ferry_bin()).parent / "examples" / "floor")


def qmp_threads_cpu_s(pid, prefix="qmp/client"):
    """CPU seconds used so far by the server's QMP client threads (prefix "" for
    every thread of the process)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm.startswith(prefix):
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def pct(sorted_ns, p):
    if not sorted_ns:
        return float("nan")
    k = min(len(sorted_ns) - 1, int(round(p / 100 * (len(sorted_ns) - 1))))
    return sorted_ns[k] / 1e6


def summary(ns):
    ns = sorted(ns)
    return (f"n={len(ns):6d}  p50={pct(ns, 50):6.3f} ms  p99={pct(ns, 99):6.3f} ms  "
            f"max={ns[-1] / 1e6 if ns else float('nan'):6.3f} ms")


async def one_run(tmp, args, polled, idx):
    port = free_port()
    src = FerryVm(tmp, f"src{idx}", mem=args.mem, vcpus=args.vcpus, workload=args.workload)
    dst = FerryVm(tmp, f"dst{idx}", "--incoming", f"tcp:127.0.0.1:{port}",
                  mem=args.mem, vcpus=args.vcpus, workload=args.workload)
    procs = []
    floor = None
    poll_path = src.qmp_path
    if polled and args.floor:
        poll_path = str(tmp / f"floor{idx}.sock")
        floor = subprocess.Popen([floor_bin(), poll_path], stdout=subprocess.PIPE)
        floor.stdout.readline()  # listening
    try:
        c = QMPClient("bench")
        await c.connect(src.qmp_path)
        # Whole pages: the guest writes one word per page, and sparse pages would
        # shrink the stream to a few MiB, leaving no throughput to measure.
        await c.execute("migrate-set-parameters",
                        {"max-bandwidth": 0, "downtime-limit": 300,
                         "x-ferry-sparse-pages": False})
        await asyncio.sleep(args.warmup)
        ctx = mp.get_context("fork")
        ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        if polled:
            procs = [ctx.Process(target=poller, args=(poll_path, ready, stop, out, args.nice))
                     for _ in range(args.clients)]
            for p in procs:
                p.start()
            await asyncio.sleep(0.5)  # all connected and negotiated
            ready.set()
            await asyncio.sleep(0.2)
        await c.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        while True:
            info = await c.execute("query-migrate")
            if info["status"] in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.1)
        server_cpu_s = (qmp_threads_cpu_s(floor.pid, "") if floor
                        else qmp_threads_cpu_s(src.proc.pid))
        stop.set()
        lat, phase, dev_ms, client_cpu_s = [], [], 0.0, 0.0
        for _ in procs:
            lt, ph, span, cpu = out.get(timeout=60)
            lat += lt
            phase += ph
            client_cpu_s += cpu
            if span[0]:
                dev_ms = max(dev_ms, (span[1] - span[0]) / 1e6)
        for p in procs:
            p.join()
        await c.disconnect()
        ram = info.get("ram", {})
        ms = max(1, info.get("total-time", 0) - info.get("setup-time", 0))
        return {
            "status": info["status"],
            "transferred": ram.get("transferred", 0),
            "total_ms": info.get("total-time"),
            "downtime_ms": info.get("downtime"),
            "mb_per_s": ram.get("transferred", 0) / 1e6 / (ms / 1000),
            "lat": lat,
            "device_lat": [t for t, p in zip(lat, phase) if p == "dev"],
            "device_ms": dev_ms,
            "server_cpu_s": server_cpu_s,
            "client_cpu_s": client_cpu_s,
        }
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if floor:
            floor.kill()
            floor.wait()
        src.stop()
        dst.stop()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--vcpus", type=int, default=2)
    ap.add_argument("--workload", default="sweep=32768")
    ap.add_argument("--warmup", type=float, default=9.0)
    ap.add_argument("--nice", type=int, default=0, help="niceness of the polling clients")
    ap.add_argument("--floor", action="store_true",
                    help="poll a do-nothing responder (examples/floor) instead of Ferry")
    args = ap.parse_args()
    if args.floor and not os.path.exists(floor_bin()):
        sys.exit(f"{floor_bin()} is missing: cargo build --release -p ferry-qmp --example floor")
    results = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="ferry-bench-") as d:
        tmp = Path(d)
        for i in range(args.runs):
            for polled in ((False, True) if i % 2 == 0 else (True, False)):
                r = await one_run(tmp, args, polled, f"{i}{int(polled)}")
                results[polled].append(r)
                print(f"run {i} {'polled  ' if polled else 'unpolled'}: {r['status']}, "
                      f"{r['transferred'] / 2**20:.0f} MiB in {r['total_ms']} ms "
                      f"(downtime {r['downtime_ms']} ms): {r['mb_per_s']:.0f} MB/s"
                      + (f"; status device seen for {r['device_ms']:.0f} ms; "
                         f"cpu: server {r['server_cpu_s']:.2f} s, clients {r['client_cpu_s']:.2f} s; "
                         f"rtt {summary(r['lat'])}" if polled else ""), flush=True)
    lat = [t for r in results[True] for t in r["lat"]]
    dev = [t for r in results[True] for t in r["device_lat"]]
    print(f"\nquery-migrate round trip, {args.clients} clients, all runs: {summary(lat)}")
    print(f"  answered during stop-and-copy (status device):     {summary(dev)}")
    tp_u = statistics.median(r["mb_per_s"] for r in results[False])
    tp_p = statistics.median(r["mb_per_s"] for r in results[True])
    print(f"throughput (median of {args.runs}): unpolled {tp_u:.0f} MB/s, "
          f"polled {tp_p:.0f} MB/s, cost {100 * (tp_u - tp_p) / tp_u:+.1f} %")
    print(json.dumps({"unpolled_mb_per_s": tp_u, "polled_mb_per_s": tp_p,
                      "p50_ms": pct(sorted(lat), 50), "p99_ms": pct(sorted(lat), 99),
                      "max_ms": max(lat) / 1e6 if lat else None}))


if __name__ == "__main__":
    asyncio.run(main())
