#!/usr/bin/env python3
"""CPU cost of one query-migrate: a raw-socket client asks N times back to back and
the script reports the round trip and the CPU time the ferry process and the client
each spent per query. A benchmark, not a test: it asserts nothing.

    python3 tests/qmp/query_cost.py [--queries 20000] [--workload W] [--migrating]

With `--migrating` the queries fall in a migration that lasts (4 MiB/s to a second
`ferry vm`, whole pages), so each reply is the full report, and the server's cost
is the CPU of its QMP client threads alone. Its guest must dirty memory for the
migration to last: the workload defaults to working-set=64M there (idle otherwise),
and the script waits at most 30 s for the migration to be active.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FerryVm, free_port, raw_qmp  # noqa: E402
from poll_bench import qmp_threads_cpu_s  # noqa: E402


def process_cpu_s(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--workload", default=None,
                    help="guest workload (default: idle; working-set=64M with --migrating)")
    ap.add_argument("--migrating", action="store_true")
    args = ap.parse_args()
    if args.workload is None:
        args.workload = "working-set=64M" if args.migrating else "idle"
    with tempfile.TemporaryDirectory() as tmp:
        vm = FerryVm(Path(tmp), "vm", mem="1G", vcpus=2, workload=args.workload)
        dst = None
        try:
            s, f = raw_qmp(vm.qmp_path)
            if args.migrating:
                port = free_port()
                dst = FerryVm(Path(tmp), "dst", "--incoming", f"tcp:127.0.0.1:{port}",
                              mem="1G", vcpus=2, workload=args.workload)
                for cmd in (
                    '{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":4194304,'
                    '"x-ferry-sparse-pages":false}}',
                    f'{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}',
                ):
                    s.sendall(cmd.encode())
                    assert b'"return"' in f.readline()
                deadline = time.monotonic() + 30
                while True:
                    s.sendall(b'{"execute":"query-migrate"}')
                    reply = f.readline()
                    if b'"status":"active"' in reply:
                        break
                    if (b'"status":"completed"' in reply or b'"status":"failed"' in reply
                            or time.monotonic() > deadline):
                        print(f"the migration is not active (workload {args.workload}; "
                              f"an idle guest completes at once): {reply.decode().strip()}",
                              file=sys.stderr)
                        return 1
                    time.sleep(0.05)
                qmp0 = qmp_threads_cpu_s(vm.proc.pid)
            pid, n = vm.proc.pid, args.queries
            vm0, me0, t0 = process_cpu_s(pid), time.process_time(), time.perf_counter()
            for _ in range(n):
                s.sendall(b'{"execute":"query-migrate"}')
                f.readline()
            wall = time.perf_counter() - t0
            vm_cpu = process_cpu_s(pid) - vm0
            me_cpu = time.process_time() - me0
            if args.migrating:
                s.sendall(b'{"execute":"query-migrate"}')
                assert b'"status":"active"' in f.readline(), "the migration ended early"
                qmp = qmp_threads_cpu_s(vm.proc.pid) - qmp0
                print(f"{n} queries during a migration: round trip {wall / n * 1e6:.1f} us; "
                      f"ferry's QMP thread {qmp / n * 1e6:.1f} us CPU per query; "
                      f"client {me_cpu / n * 1e6:.1f} us")
                s.sendall(b'{"execute":"migrate_cancel"}')
                f.readline()
                return 0
            # The guest's own CPU over the same time, to subtract.
            idle0 = process_cpu_s(pid)
            time.sleep(wall)
            idle = process_cpu_s(pid) - idle0
            print(f"{n} queries: round trip {wall / n * 1e6:.1f} us; ferry "
                  f"{(vm_cpu - idle) / n * 1e6:.1f} us CPU per query (guest's own "
                  f"CPU subtracted); client {me_cpu / n * 1e6:.1f} us")
        finally:
            vm.stop()
            if dst:
                dst.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
