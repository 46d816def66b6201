#!/usr/bin/env python3
"""CPU cost of one query-migrate: a raw-socket client asks N times back to back and
the script reports the round trip and the CPU time the ferry process and the client
each spent per query. A benchmark, not a test: it asserts nothing.

    python3 tests/qmp/query_cost.py [--queries 20000] [--workload idle]
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FERRY = Path(__file__).resolve().parents[2] / "target" / "release" / "ferry"


def process_cpu_s(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--workload", default="idle")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/qmp.sock"
        vm = subprocess.Popen([str(FERRY), "vm", "--mem", "1G", "--vcpus", "2",
                               "--workload", args.workload, "--qmp", f"unix:{path}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(400):
                if os.path.exists(path):
                    break
                time.sleep(0.025)
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            f = s.makefile("rb")
            f.readline()
            s.sendall(b'{"execute":"qmp_capabilities"}')
            f.readline()
            n = args.queries
            vm0, me0, t0 = process_cpu_s(vm.pid), time.process_time(), time.perf_counter()
            for _ in range(n):
                s.sendall(b'{"execute":"query-migrate"}')
                f.readline()
            wall = time.perf_counter() - t0
            vm_cpu = process_cpu_s(vm.pid) - vm0
            me_cpu = time.process_time() - me0
            # The guest's own CPU over the same time, to subtract.
            idle0 = process_cpu_s(vm.pid)
            time.sleep(wall)
            idle = process_cpu_s(vm.pid) - idle0
            print(f"{n} queries: round trip {wall / n * 1e6:.1f} us; ferry "
                  f"{(vm_cpu - idle) / n * 1e6:.1f} us CPU per query (guest's own "
                  f"CPU subtracted); client {me_cpu / n * 1e6:.1f} us")
        finally:
            vm.kill()
            vm.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
