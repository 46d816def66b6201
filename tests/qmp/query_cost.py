#!/usr/bin/env python3
"""CPU cost of one query-migrate: a raw-socket client asks N times back to back and
the script reports the round trip and the CPU time the ferry process and the client
each spent per query. A benchmark, not a test: it asserts nothing.

    python3 tests/qmp/query_cost.py [--queries 20000] [--workload idle]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FerryVm, raw_qmp  # noqa: E402


def process_cpu_s(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--workload", default="idle")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        vm = FerryVm(Path(tmp), "vm", mem="1G", vcpus=2, workload=args.workload)
        try:
            s, f = raw_qmp(vm.qmp_path)
            pid, n = vm.proc.pid, args.queries
            vm0, me0, t0 = process_cpu_s(pid), time.process_time(), time.perf_counter()
            for _ in range(n):
                s.sendall(b'{"execute":"query-migrate"}')
                f.readline()
            wall = time.perf_counter() - t0
            vm_cpu = process_cpu_s(pid) - vm0
            me_cpu = time.process_time() - me0
            # The guest's own CPU over the same time, to subtract.
            idle0 = process_cpu_s(pid)
            time.sleep(wall)
            idle = process_cpu_s(pid) - idle0
            print(f"{n} queries: round trip {wall / n * 1e6:.1f} us; ferry "
                  f"{(vm_cpu - idle) / n * 1e6:.1f} us CPU per query (guest's own "
                  f"CPU subtracted); client {me_cpu / n * 1e6:.1f} us")
        finally:
            vm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
