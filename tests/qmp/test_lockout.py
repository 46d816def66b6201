"""No client can lock the operator out of `ferry vm`'s QMP server (default limits:
64 clients, 10 s to negotiate, 5 s to take a write)."""

import threading
import time

from conftest import RawClient

MAX_CLIENTS = 64
HANDSHAKE_TIMEOUT_S = 10
WRITE_TIMEOUT_S = 5
SLACK_S = 10


def running(c):
    return c.cmd(b'{"execute": "query-status", "id": 1}') == {
        "return": {"running": True, "singlestep": False, "status": "running"}, "id": 1}


def until_eof(c):
    """Lines read before the server closed the connection (fails on the 60 s timeout)."""
    n = 0
    try:
        while c.recv() is not None:
            n += 1
    except ConnectionResetError:
        pass
    return n


def test_full_server_serves_a_newcomer_and_closes_the_client_idle_longest(vms):
    vm = vms("vm")
    idle = [RawClient(vm.qmp_path).negotiate() for _ in range(MAX_CLIENTS)]
    newcomer = RawClient(vm.qmp_path).negotiate()
    assert running(newcomer)
    assert "qemu" in newcomer.cmd(b'{"execute": "query-version"}')["return"]
    assert until_eof(idle[0]) == 0
    for c in idle[1:]:
        assert running(c)
    for c in idle + [newcomer]:
        c.close()
    assert vm.alive()


def test_a_connection_that_never_negotiates_is_closed(vms):
    vm = vms("vm")
    listener = RawClient(vm.qmp_path).negotiate()
    start = time.monotonic()
    silent = RawClient(vm.qmp_path)
    assert until_eof(silent) == 0
    assert time.monotonic() - start < HANDSHAKE_TIMEOUT_S + SLACK_S
    # A negotiated client idle as long is not cut while the server is not full.
    assert running(listener)
    silent.close()
    listener.close()


def test_a_client_that_never_reads_is_dropped_and_blocks_no_one(vms):
    vm = vms("vm")
    bystander = RawClient(vm.qmp_path).negotiate()
    stuck = RawClient(vm.qmp_path).negotiate()
    requests = b'{"execute":"query-commands"}{"execute":"query-migrate"}' * 10000
    outcome = []

    def send():
        try:
            stuck.sock.sendall(requests)
            outcome.append("sent")
        except OSError as e:  # BrokenPipe / ConnectionReset once the server closes
            outcome.append(type(e).__name__)

    start = time.monotonic()
    sender = threading.Thread(target=send)
    sender.start()
    answered = 0
    slowest = 0.0
    while sender.is_alive():
        assert time.monotonic() - start < WRITE_TIMEOUT_S + SLACK_S, \
            "the client that never reads was not dropped"
        t = time.monotonic()
        assert running(bystander)
        slowest = max(slowest, time.monotonic() - t)
        answered += 1
    sender.join()
    assert outcome and outcome[0] != "sent", outcome
    assert answered > 0
    assert slowest < WRITE_TIMEOUT_S, slowest
    assert until_eof(stuck) < 20000
    assert running(bystander)
    stuck.close()
    bystander.close()
    assert vm.alive()
