"""Helpers for the QMP tests: start `ferry vm` processes and talk to them.

The binary is `$FERRY_BIN`, else `$CARGO_TARGET_DIR/release/ferry`, else
`target/release/ferry` (scripts/test builds it first).
"""

import asyncio
import json
import os
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ferry_bin() -> str:
    if os.environ.get("FERRY_BIN"):
        return os.environ["FERRY_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(Path(target) / "release" / "ferry")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_qmp(path: str):
    """A negotiated QMP connection on a plain Unix socket (no client library, for
    benchmarks that must not measure one): returns the socket and its reader."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b'{"execute":"qmp_capabilities"}')
    f.readline()
    return s, f


# Tests skipped by `skip_without_kvm`, listed at the end of the run (pytest captures
# what a test prints, stderr too).
_skipped_no_kvm = []


def pytest_terminal_summary(terminalreporter):
    for test in _skipped_no_kvm:
        terminalreporter.write_line(f"SKIPPED (no /dev/kvm): {test}")


async def expect_error(client, cmd, args, text):
    """`cmd` must fail with a GenericError whose text contains `text`."""
    from qemu.qmp import ExecuteError
    try:
        await client.execute(cmd, args)
    except ExecuteError as e:
        assert e.error_class == "GenericError"
        assert text in str(e), str(e)
        return
    raise AssertionError(f"{cmd} {args} accepted")


def skip_without_kvm():
    """Skips the running test when /dev/kvm cannot be opened (it has nothing to check
    on the host-thread fallback), appending its name to `$FERRY_SKIP_LOG` for
    scripts/test's count; with FERRY_REQUIRE_KVM=1 it fails instead."""
    try:
        with open("/dev/kvm", "r+b", buffering=0):
            return
    except OSError as e:
        why = f"/dev/kvm cannot be opened: {e}"
    if os.environ.get("FERRY_REQUIRE_KVM") == "1":
        pytest.fail(f"FERRY_REQUIRE_KVM=1 but {why}")
    test = os.environ.get("PYTEST_CURRENT_TEST", "unknown test").split(" ")[0]
    _skipped_no_kvm.append(test)
    log = os.environ.get("FERRY_SKIP_LOG")
    if log:
        with open(log, "a") as f:
            f.write(test + "\n")
    pytest.skip(f"no /dev/kvm: {why}")


class FerryVm:
    """One `ferry vm` process with its QMP socket."""

    def __init__(self, tmpdir: Path, name: str, *extra: str,
                 mem: str = "256M", vcpus: int = 1, workload: str = "working-set=4M",
                 qmp: str = "", wrap: tuple = ()):
        """`wrap` prefixes the command line (e.g. `ip netns exec NS`, which execs
        `ferry vm` in its place, so `proc` is still the guest's process)."""
        self.qmp_path = str(tmpdir / f"{name}.qmp")
        self.name = name
        args = [*wrap, ferry_bin(), "vm", "--mem", mem, "--vcpus", str(vcpus),
                "--workload", workload, "--qmp", qmp or f"unix:{self.qmp_path}", *extra]
        self.stderr = open(tmpdir / f"{name}.stderr", "w+")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise RuntimeError(f"ferry vm {name} did not start: {self.stderr.read()}")
        self.ready = json.loads(line)
        assert self.ready["event"] == "ready"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


@pytest.fixture
def vms():
    """Factory of `ferry vm` processes, all killed at the end of the test."""
    started = []
    with tempfile.TemporaryDirectory(prefix="ferry-qmp-") as d:
        def start(name, *extra, **kw):
            vm = FerryVm(Path(d), name, *extra, **kw)
            started.append(vm)
            return vm
        start.dir = Path(d)
        yield start
        for vm in started:
            vm.stop()


def run(coro):
    """Runs an async test body."""
    return asyncio.run(asyncio.wait_for(coro, timeout=300))


class RawClient:
    """A plain socket client, for input `qemu.qmp` would never send."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()

    def recv(self):
        line = self.file.readline()
        if not line:
            return None
        return json.loads(line)

    def send(self, data: bytes):
        self.sock.sendall(data)

    def cmd(self, data: bytes):
        self.send(data)
        while True:
            msg = self.recv()
            if msg is None or "event" not in msg:
                return msg

    def negotiate(self):
        assert self.cmd(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        return self

    def close(self):
        self.file.close()
        self.sock.close()
