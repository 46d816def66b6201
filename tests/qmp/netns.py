"""Two hosts on one machine: a source `ferry vm` in network namespace A, a destination
`ferry vm --incoming tcp:<B>:<port>` in namespace B, joined by a veth pair that tests
can cut, black-hole or rate-limit (scripts/netns). QMP runs over Unix sockets in a temp
dir, which work across network namespaces.

Use the `netpair` fixture: `net = netpair(rate="100mbit")` creates the namespaces
(removed in teardown, even on failure), `net.source(...)`, `net.destination(port, ...)`
start `ferry vm` processes there, `net.qmp(vm)` connects a qemu.qmp client.

Without root or `ip netns`, the tests skip with the reason printed; with
FERRY_REQUIRE_KVM=1 they fail instead.
"""

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from conftest import ROOT, FerryVm

NETNS = str(ROOT / "scripts" / "netns")
_names = itertools.count()


def netns_unavailable() -> str:
    """Why two namespaces cannot be made here, or "" when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns` does not work here: {r.stderr.strip()}"
    return ""


def require_netns():
    """Skips the test (or fails it under FERRY_REQUIRE_KVM=1) without namespaces."""
    why = netns_unavailable()
    if not why:
        return
    msg = f"fault matrix not run: {why}"
    # Printed past pytest's capture: a skip must never pass for a pass.
    print(f"\n{msg}", file=sys.__stderr__)
    if os.environ.get("FERRY_REQUIRE_KVM") == "1":
        pytest.fail(f"{msg} (FERRY_REQUIRE_KVM=1)")
    pytest.skip(msg)


class NetPair:
    """Two namespaces joined by a veth pair, and the `ferry vm` processes in them."""

    def __init__(self, tmpdir: Path, rate: str = ""):
        self.dir = tmpdir
        self.name = f"ferry-{os.getpid() % 100000}-{next(_names)}"
        args = [NETNS, "up", "--name", self.name]
        if rate:
            args += ["--rate", rate]
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        self.info = dict(line.split("=", 1) for line in out.split())
        self.ns_a, self.ns_b = self.info["ns_a"], self.info["ns_b"]
        self.addr_a, self.addr_b = self.info["addr_a"], self.info["addr_b"]
        self.vms = []

    def _start(self, ns, name, *extra, **kw) -> FerryVm:
        kw.setdefault("mem", "64M")
        kw.setdefault("vcpus", 1)
        vm = FerryVm(self.dir, name, *extra, wrap=("ip", "netns", "exec", ns), **kw)
        self.vms.append(vm)
        return vm

    def source(self, name="src", *extra, **kw) -> FerryVm:
        """A running guest in namespace A."""
        return self._start(self.ns_a, name, *extra, **kw)

    def destination(self, port: int, name="dst", *extra, **kw) -> FerryVm:
        """A destination in namespace B listening at tcp:<addr_b>:<port>."""
        return self._start(self.ns_b, name, "--incoming", self.uri(port), *extra, **kw)

    def uri(self, port: int) -> str:
        return f"tcp:{self.addr_b}:{port}"

    async def qmp(self, vm: FerryVm) -> QMPClient:
        client = QMPClient(vm.name)
        await client.connect(vm.qmp_path)
        return client

    def netns(self, *args: str):
        subprocess.run([NETNS, *args], check=True, capture_output=True)

    def link(self, state: str):
        """Cuts (`down`) or restores (`up`) the link."""
        self.netns("link", self.name, state)

    def blackhole(self, state: str):
        """Drops (`on`) every packet between the namespaces, or stops (`off`)."""
        self.netns("blackhole", self.name, state)

    def in_b(self, *cmd: str, **kw) -> subprocess.Popen:
        """A command in namespace B (e.g. a rogue client of the destination's port)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns_b, *cmd], **kw)

    def close(self):
        for vm in self.vms:
            try:
                if vm.alive():
                    vm.proc.send_signal(18)  # SIGCONT, should a test have stopped it
                vm.stop()
            except Exception as e:  # teardown goes on: the namespaces must go
                print(f"stopping {vm.name}: {e}", file=sys.__stderr__)
        subprocess.run([NETNS, "down", self.name], capture_output=True)


@pytest.fixture
def netpair():
    """Factory of namespace pairs, each removed at the end of the test."""
    require_netns()
    pairs = []
    with tempfile.TemporaryDirectory(prefix="ferry-netns-") as d:
        def make(rate: str = "") -> NetPair:
            sub = Path(d) / str(len(pairs))
            sub.mkdir()
            pair = NetPair(sub, rate)
            pairs.append(pair)
            return pair
        try:
            yield make
        finally:
            for p in pairs:
                p.close()
