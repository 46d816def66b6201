"""The fault matrix: a migration between two `ferry vm` processes in two network
namespaces (tests/qmp/netns.py), a fault injected at a known phase, then:

- a decision (completed, failed or cancelled on the source) within a bound derived
  from the configured timeouts plus slack;
- exactly one running copy: after completed, the source is `postmigrate` and the
  destination `running`; otherwise the source runs again and the destination does not
  (its process exits on a failed incoming migration, or it is still `inmigrate`);
- after completed, a new `migrate` is refused (QEMU: postmigrate); otherwise a SECOND
  migration from the source to a fresh destination completes.

The bounded waits are migration parameters `x-ferry-connect-timeout-ms`,
`x-ferry-io-timeout-ms` and `x-ferry-switchover-timeout-ms`, set to 2000 ms here. Each
case's time to a decision and outcome go to target/fault-matrix.md at the end.
"""

import asyncio
import signal
import socket
import struct
import sys
import time

import pytest
from qemu.qmp import ExecuteError

from conftest import ROOT, run
from netns import netpair  # noqa: F401  (the fixture)

TIMEOUT_MS = 2000
TIMEOUTS = {
    "x-ferry-connect-timeout-ms": TIMEOUT_MS,
    "x-ferry-io-timeout-ms": TIMEOUT_MS,
    "x-ferry-switchover-timeout-ms": TIMEOUT_MS,
}
# Slack on every bound: process scheduling on a loaded 2-core host, TCP's own timers.
SLACK_S = 5.0
# A cancel interrupts every wait at once (connect included): 2 s leaves room for a
# loaded host and still tells it from f27e339's 3 s (and 129 s on a real black hole).
CANCEL_BOUND_S = 2.0
TERMINAL = ("completed", "failed", "cancelled")
# A small guest whose working set, sent whole, takes seconds under a bandwidth cap.
GUEST = {"mem": "64M", "vcpus": 1, "workload": "working-set=16M"}
PORT, PORT2 = 4444, 4445

RESULTS = []


@pytest.fixture(scope="session", autouse=True)
def fault_matrix_report():
    """Writes target/fault-matrix.md (case | time to decision | outcome) at the end."""
    yield
    if not RESULTS:
        return
    lines = ["| case | time to decision | outcome |", "|---|---|---|"]
    for case, secs, outcome in RESULTS:
        t = "-" if secs is None else f"{secs:.2f} s"
        lines.append(f"| {case} | {t} | {outcome} |")
    path = ROOT / "target" / "fault-matrix.md"
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"\nfault matrix: {path}", file=sys.__stderr__)


class Case:
    """Records one case's time to a decision and its outcome, or why it failed."""

    def __init__(self, name):
        self.name = name
        self.secs = None
        self.outcome = "no decision"
        self.notes = []

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        outcome = self.outcome
        if self.notes:
            outcome += " (" + "; ".join(self.notes) + ")"
        if err is not None:
            first = str(err).strip().splitlines()[0] if str(err).strip() else kind.__name__
            outcome = f"**FAIL**: {first[:200]} [{outcome}]"
        RESULTS.append((self.name, self.secs, outcome.replace("|", "/")))
        return False


async def set_timeouts(s, case, **timeouts_ms):
    """Sets bounded waits, noting in the case when this build does not know them (the
    case then shows what the build does without them)."""
    try:
        await s.execute("migrate-set-parameters", timeouts_ms)
    except ExecuteError as e:
        note = f"timeouts not set: {e}"
        if note not in case.notes:
            case.notes.append(note)


async def prepare(s, case, **params):
    """Sets the bounded waits to TIMEOUT_MS and `params`."""
    await set_timeouts(s, case, **TIMEOUTS)
    if params:
        await s.execute("migrate-set-parameters", params)


async def status_of(s):
    return (await s.execute("query-migrate")).get("status")


async def wait_migration(s, pred, what, bound_s=60.0):
    """Polls query-migrate until `pred(info)`; fails after `bound_s`."""
    t0 = time.monotonic()
    while True:
        info = await s.execute("query-migrate")
        if pred(info):
            return info
        assert info.get("status") not in TERMINAL, f"ended before {what}: {info}"
        assert time.monotonic() - t0 < bound_s, f"no {what} in {bound_s} s: {info}"
        await asyncio.sleep(0.01)


def transferred(info):
    return info.get("ram", {}).get("transferred", 0)


async def decision(s, case, since, bound_s):
    """Waits for a terminal status; records the time since `since`; asserts the bound."""
    while True:
        info = await s.execute("query-migrate")
        elapsed = time.monotonic() - since
        if info.get("status") in TERMINAL:
            case.secs = elapsed
            case.outcome = info["status"]
            if info["status"] == "failed":
                case.notes.append(info.get("error-desc", "")[:120])
            assert elapsed <= bound_s, f"decision after {elapsed:.1f} s > {bound_s} s"
            return info
        if elapsed > bound_s:
            case.outcome = f"still {info.get('status')} after {bound_s:.0f} s"
            raise AssertionError(f"no decision within {bound_s:.0f} s: {info}")
        await asyncio.sleep(0.02)


async def run_status(s):
    return (await s.execute("query-status"))["status"]


async def wait_run_status(s, want, bound_s=10.0):
    t0 = time.monotonic()
    while True:
        st = await run_status(s)
        if st == want:
            return
        assert time.monotonic() - t0 < bound_s, f"status {st}, not {want}, after {bound_s} s"
        await asyncio.sleep(0.05)


async def destination_not_running(net, dst, bound_s=10.0):
    """The destination does not run the guest: its process exited (a failed incoming
    migration ends it), or it reports a status other than running."""
    try:
        dst.proc.wait(timeout=bound_s)
        return "exited"
    except Exception:
        pass
    d = await asyncio.wait_for(net.qmp(dst), 10)
    try:
        st = await asyncio.wait_for(run_status(d), 10)
    finally:
        await d.disconnect()
    assert st != "running", "two running copies: the destination runs too"
    return st


async def second_migration(net, s, port=PORT2):
    """A fresh destination; the source migrates to it, which must complete."""
    dst2 = net.destination(port, "dst2", **GUEST)
    # Sparse pages (the default): the working set's pages carry one counter each, so
    # the second migration converges at 300 ms even over the 50 Mbit/s links, where
    # whole pages cannot (the engine then rightly never switches over).
    await s.execute("migrate-set-parameters", {"max-bandwidth": 0, "downtime-limit": 300,
                                               "x-ferry-sparse-pages": True})
    await s.execute("migrate", {"uri": net.uri(port)})
    info = await wait_migration(s, lambda i: i.get("status") in TERMINAL, "an end", 60)
    assert info["status"] == "completed", f"second migration: {info}"
    assert await run_status(s) == "postmigrate"
    d2 = await net.qmp(dst2)
    await wait_run_status(d2, "running")
    await d2.disconnect()


async def check_outcome(net, s, dst, case, expect):
    """Exactly one running copy, the reported state true; then the second migration
    (or, after completed, its refusal)."""
    status = case.outcome
    assert status in expect, f"outcome {status}, expected one of {expect}"
    if status == "completed":
        assert await run_status(s) == "postmigrate"
        d = await net.qmp(dst)
        await wait_run_status(d, "running")
        await d.disconnect()
        try:
            await s.execute("migrate", {"uri": net.uri(PORT2)})
            raise AssertionError("a new migrate after completed was accepted")
        except ExecuteError:
            pass
        return
    await wait_run_status(s, "running")
    where = await destination_not_running(net, dst)
    case.notes.append(f"destination {where}")
    await second_migration(net, s)


async def mid_precopy(net, case, **params):
    """Source and destination; a migration capped at 8 MiB/s of whole pages (16 MiB of
    working set rewritten every round cannot converge), waited until active with bytes
    on the wire. Returns (source client, source, destination)."""
    src = net.source("src", **GUEST)
    dst = net.destination(PORT, "dst", **GUEST)
    s = await net.qmp(src)
    await prepare(s, case, **{"x-ferry-sparse-pages": False, "max-bandwidth": 8 << 20,
                              **params})
    await s.execute("migrate", {"uri": net.uri(PORT)})
    await wait_migration(s, lambda i: i.get("status") == "active" and transferred(i) > 1 << 20,
                         "active precopy")
    return s, src, dst


async def final_phase(net, case):
    """Over a 50 Mbit/s link with a huge downtime limit, the migration switches over at
    once after the bulk pass, and the stop-and-copy of 16 MiB lasts seconds: waited
    until the source reports `device`."""
    src = net.source("src", **GUEST)
    dst = net.destination(PORT, "dst", **GUEST)
    s = await net.qmp(src)
    await prepare(s, case, **{"x-ferry-sparse-pages": False, "downtime-limit": 600_000})
    await s.execute("migrate", {"uri": net.uri(PORT)})
    await wait_migration(s, lambda i: i.get("status") == "device", "the final phase")
    return s, src, dst


# --- link cuts ---------------------------------------------------------------------


def test_link_down_in_setup(netpair):
    with Case("link down before migrate") as case:
        net = netpair()

        async def body():
            src = net.source("src", **GUEST)
            dst = net.destination(PORT, "dst", **GUEST)
            s = await net.qmp(src)
            await prepare(s, case)
            net.link("down")
            t0 = time.monotonic()
            await s.execute("migrate", {"uri": net.uri(PORT)})
            await decision(s, case, t0, TIMEOUT_MS / 1000 + SLACK_S)
            net.link("up")
            await check_outcome(net, s, dst, case, ("failed",))
            await s.disconnect()

        run(body())


def test_link_down_for_2s_mid_precopy_completes(netpair):
    with Case("link down 2 s mid-precopy") as case:
        net = netpair()

        async def body():
            # An I/O timeout longer than the cut plus TCP's retransmit backoff, set
            # before the migrate (a running migration keeps the parameters it began
            # with; only bandwidth and downtime limits change live).
            s, src, dst = await mid_precopy(net, case, **{"x-ferry-io-timeout-ms": 8000})
            t0 = time.monotonic()
            net.link("down")
            await asyncio.sleep(2)
            net.link("up")
            await s.execute("migrate-set-parameters", {"max-bandwidth": 0})
            await decision(s, case, t0, 2 + 8 + SLACK_S)
            await check_outcome(net, s, dst, case, ("completed",))
            await s.disconnect()

        run(body())


def test_link_down_for_good_mid_precopy_fails(netpair):
    with Case("link down for good mid-precopy") as case:
        net = netpair()

        async def body():
            s, src, dst = await mid_precopy(net, case)
            t0 = time.monotonic()
            net.link("down")
            await decision(s, case, t0, TIMEOUT_MS / 1000 + SLACK_S)
            net.link("up")
            await check_outcome(net, s, dst, case, ("failed",))
            await s.disconnect()

        run(body())


def test_link_down_in_final_phase_fails(netpair):
    with Case("link down in the final phase") as case:
        net = netpair(rate="50mbit")

        async def body():
            s, src, dst = await final_phase(net, case)
            t0 = time.monotonic()
            net.link("down")
            # The switch-over or an I/O wait times out, whichever is first.
            await decision(s, case, t0, 2 * TIMEOUT_MS / 1000 + SLACK_S)
            net.link("up")
            await check_outcome(net, s, dst, case, ("failed",))
            await s.disconnect()

        run(body())


# --- the destination ----------------------------------------------------------------


def test_destination_killed_mid_precopy(netpair):
    with Case("destination SIGKILL mid-precopy") as case:
        net = netpair()

        async def body():
            s, src, dst = await mid_precopy(net, case)
            t0 = time.monotonic()
            dst.proc.send_signal(signal.SIGKILL)
            await decision(s, case, t0, TIMEOUT_MS / 1000 + SLACK_S)
            await check_outcome(net, s, dst, case, ("failed",))
            await s.disconnect()

        run(body())


def test_destination_stopped_mid_precopy(netpair):
    with Case("destination SIGSTOP mid-precopy") as case:
        net = netpair()

        async def body():
            s, src, dst = await mid_precopy(net, case)
            t0 = time.monotonic()
            dst.proc.send_signal(signal.SIGSTOP)
            try:
                # The socket buffers fill (~1 s at 8 MiB/s), then the I/O wait times out.
                await decision(s, case, t0, 1 + TIMEOUT_MS / 1000 + SLACK_S)
            finally:
                dst.proc.send_signal(signal.SIGCONT)
            await check_outcome(net, s, dst, case, ("failed",))
            await s.disconnect()

        run(body())


def test_destination_black_holed_mid_precopy(netpair):
    with Case("destination black-holed mid-precopy") as case:
        net = netpair()

        async def body():
            s, src, dst = await mid_precopy(net, case)
            t0 = time.monotonic()
            net.blackhole("on")
            try:
                await decision(s, case, t0, 1 + TIMEOUT_MS / 1000 + SLACK_S)
            finally:
                net.blackhole("off")
            await check_outcome(net, s, dst, case, ("failed",))
            await s.disconnect()

        run(body())


# --- rogue connections to the destination's port ------------------------------------


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def lying_preamble() -> bytes:
    """A valid preamble (crates/transport/FORMAT.md) for channel 0 of a 64-channel
    stream whose 63 other channels never come."""
    head = b"FRRY" + struct.pack("<HHHHQ", 3, 0, 64, 0, 0x5EED_F00D_0000_0001)
    return head + struct.pack("<I", crc32c(head))


ROGUE = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(bytes.fromhex(sys.argv[3]))
print("connected", flush=True)
time.sleep(120)
"""


def rogue_first(netpair, name, payload: bytes):
    with Case(name) as case:
        net = netpair()

        async def body():
            src = net.source("src", **GUEST)
            dst = net.destination(PORT, "dst", **GUEST)
            # From namespace A, as the source would connect, before the source does.
            import subprocess
            rogue = subprocess.Popen(
                ["ip", "netns", "exec", net.ns_a, sys.executable, "-c", ROGUE,
                 net.addr_b, str(PORT), payload.hex()],
                stdout=subprocess.PIPE, text=True)
            try:
                assert rogue.stdout.readline().strip() == "connected"
                s = await net.qmp(src)
                await prepare(s, case)
                t0 = time.monotonic()
                await s.execute("migrate", {"uri": net.uri(PORT)})
                await decision(s, case, t0, 2 * TIMEOUT_MS / 1000 + SLACK_S + 10)
                # The destination takes the real stream beside the rogue: a silent or
                # lying connection must not make the real source fail (f27e339: the
                # real source failed, or waited behind the rogue for ever).
                await check_outcome(net, s, dst, case, ("completed",))
                await s.disconnect()
            finally:
                rogue.kill()
                rogue.wait()

        run(body())


def test_silent_connection_before_the_source(netpair):
    rogue_first(netpair, "silent connection first", b"")


def test_lying_preamble_before_the_source(netpair):
    rogue_first(netpair, "preamble claiming 64 channels first", lying_preamble())


# --- migrate_cancel in each phase -----------------------------------------------------


def test_cancel_in_setup(netpair):
    with Case("migrate_cancel in setup") as case:
        net = netpair()

        async def body():
            src = net.source("src", **GUEST)
            dst = net.destination(PORT, "dst", **GUEST)
            s = await net.qmp(src)
            await prepare(s, case)
            # A black hole holds the connect, so the migration stays in setup.
            net.blackhole("on")
            await s.execute("migrate", {"uri": net.uri(PORT)})
            assert await status_of(s) == "setup"
            t0 = time.monotonic()
            await s.execute("migrate_cancel")
            try:
                await decision(s, case, t0, CANCEL_BOUND_S)
            finally:
                net.blackhole("off")
            await check_outcome(net, s, dst, case, ("cancelled",))
            await s.disconnect()

        run(body())


def test_cancel_in_active(netpair):
    with Case("migrate_cancel in active") as case:
        net = netpair()

        async def body():
            s, src, dst = await mid_precopy(net, case)
            t0 = time.monotonic()
            await s.execute("migrate_cancel")
            await decision(s, case, t0, SLACK_S)
            await check_outcome(net, s, dst, case, ("cancelled",))
            await s.disconnect()

        run(body())


def test_cancel_in_device(netpair):
    with Case("migrate_cancel in device") as case:
        net = netpair(rate="50mbit")

        async def body():
            s, src, dst = await final_phase(net, case)
            t0 = time.monotonic()
            await s.execute("migrate_cancel")
            await decision(s, case, t0, SLACK_S)
            await check_outcome(net, s, dst, case, ("cancelled",))
            await s.disconnect()

        run(body())
