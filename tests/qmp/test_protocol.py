"""QMP protocol behaviour: greeting, negotiation, ids, errors, bad input, many clients."""

import asyncio
import json
import socket

from qemu.qmp import EventListener, ExecuteError, QMPClient

from conftest import RawClient, run


def error(reply):
    assert set(reply) <= {"error", "id"}, reply
    return reply["error"]["class"], reply["error"]["desc"]


def test_greeting_and_negotiation(vms):
    vm = vms("vm")
    c = RawClient(vm.qmp_path)
    qmp = c.greeting["QMP"]
    assert set(qmp) == {"version", "capabilities"}
    assert qmp["capabilities"] == []
    assert set(qmp["version"]["qemu"]) == {"major", "minor", "micro"}
    assert isinstance(qmp["version"]["package"], str)
    # Nothing but qmp_capabilities before negotiation.
    assert error(c.cmd(b'{"execute": "query-status", "id": 7}')) == (
        "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
    assert c.cmd(b'{"execute": "query-status", "id": 7}')["id"] == 7
    # Capabilities the server did not offer are refused.
    cls, _ = error(c.cmd(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}'))
    assert cls == "GenericError"
    assert c.cmd(b'{"execute": "qmp_capabilities", "id": {"any": ["json"]}}') == {
        "return": {}, "id": {"any": ["json"]}}
    assert error(c.cmd(b'{"execute": "qmp_capabilities"}'))[0] == "CommandNotFound"
    assert c.cmd(b'{"execute": "query-status", "id": "s"}') == {
        "return": {"running": True, "singlestep": False, "status": "running"}, "id": "s"}
    c.close()

    async def body():
        client = QMPClient("t")
        await client.connect(vm.qmp_path)
        ver = await client.execute("query-version")
        assert "qemu" in ver
        names = {c["name"] for c in await client.execute("query-commands")}
        for cmd in ("query-migrate", "migrate", "migrate-incoming", "migrate_cancel",
                    "calc-dirty-rate", "query-dirty-rate", "stop", "cont", "quit"):
            assert cmd in names
        await client.disconnect()

    run(body())


def test_bad_input_gets_qemu_errors_and_harms_no_one(vms):
    vm = vms("vm")
    bystander_events = []

    async def body():
        # A well-behaved client, connected throughout.
        good = QMPClient("good")
        await good.connect(vm.qmp_path)
        listener = EventListener(("STOP", "RESUME"))
        good.register_listener(listener)

        c = RawClient(vm.qmp_path).negotiate()
        cases = [
            (b'{"execute": }', "GenericError", "JSON parse error"),
            (b'{"execute" "x"}', "GenericError", "JSON parse error"),
            (b'}', "GenericError", "JSON parse error, stray '}'"),
            (b'[1, 2]', "GenericError", "QMP input must be a JSON object"),
            (b'42 ', "GenericError", "QMP input must be a JSON object"),
            (b'"text"', "GenericError", "QMP input must be a JSON object"),
            (b'{}', "GenericError", "QMP input lacks member 'execute'"),
            (b'{"execute": 1}', "GenericError", "QMP input member 'execute' must be a string"),
            (b'{"execute": "stop", "arguments": []}', "GenericError",
             "QMP input member 'arguments' must be an object"),
            (b'{"execute": "stop", "bogus": 1}', "GenericError",
             "QMP input member 'bogus' is unexpected"),
            (b'{"execute": "no-such-command"}', "CommandNotFound",
             "The command no-such-command has not been found"),
            (b'{"execute": "migrate"}', "GenericError", "Parameter 'uri' is missing"),
            (b'{"execute": "migrate", "arguments": {"uri": 5}}', "GenericError",
             "Invalid parameter type for 'uri', expected: string"),
            (b'{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1", "x": 1}}',
             "GenericError", "Parameter 'x' is unexpected"),
            (b'{"execute": "query-status", "arguments": {"x": 1}}', "GenericError",
             "Parameter 'x' is unexpected"),
            (b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "1"}}',
             "GenericError", "Invalid parameter type for 'downtime-limit', expected: integer"),
            (b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 3000000}}',
             "GenericError", "Parameter 'downtime-limit' expects"),
            # Known (QEMU 8.2 has it) but Ferry has no XBZRLE: only its default.
            (b'{"execute": "migrate-set-parameters", "arguments": {"xbzrle-cache-size": 1}}',
             "GenericError", "Parameter 'xbzrle-cache-size' expects 67108864"),
            (b'{"execute": "migrate-set-parameters", "arguments": {"no-such": "x"}}',
             "GenericError", "Parameter 'no-such' is unexpected"),
            (b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
             b'[{"capability": "no-such", "state": true}]}}', "GenericError",
             "Parameter 'capability' does not accept value 'no-such'"),
            (b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
             b'[{"capability": "events"}]}}', "GenericError", "Parameter 'state' is missing"),
            (b'{"execute": "calc-dirty-rate"}', "GenericError", "Parameter 'calc-time' is missing"),
            (b'{"execute": "calc-dirty-rate", "arguments": {"calc-time": "1"}}', "GenericError",
             "Invalid parameter type for 'calc-time', expected: integer"),
            (b'{"execute": "calc-dirty-rate", "arguments": {"calc-time": 1, "mode": "x"}}',
             "GenericError", "Parameter 'mode' does not accept value 'x'"),
        ]
        for req, cls, desc in cases:
            reply = c.cmd(req)
            got_cls, got_desc = error(reply)
            assert (got_cls, got_desc.startswith(desc)) == (cls, True), (req, reply)
        # An error reply to an object with an id echoes the id.
        assert c.cmd(b'{"execute": "nope", "id": 3}')["id"] == 3
        # Invalid UTF-8 is a parse error, not a crash.
        assert error(c.cmd(b'{"execute": "\xff\xfe"}'))[0] == "GenericError"

        # A 10 MiB request: one error, the rest of it skipped, the connection usable.
        big = b'{"execute": "query-status", "arguments": {"pad": "' + b"A" * (10 << 20) + b'"}}'
        reply = c.cmd(big + b"\n")
        assert error(reply) == ("GenericError", "JSON token size limit exceeded")
        assert c.cmd(b'{"execute": "query-status"}')["return"]["status"] == "running"
        # A 10 MiB line of garbage with no JSON structure: the same.
        assert error(c.cmd(b"x" * (10 << 20) + b"\n")) == (
            "GenericError", "JSON token size limit exceeded")
        # Deep nesting.
        assert error(c.cmd(b"[" * 2000 + b"]" * 2000)) == (
            "GenericError", "JSON nesting depth limit exceeded")
        assert c.cmd(b'{"execute": "query-status"}')["return"]["status"] == "running"

        # The other client saw nothing of this and still works.
        assert (await good.execute("query-status"))["status"] == "running"
        assert listener.empty()
        c.close()
        await good.disconnect()

    run(body())
    assert vm.alive()


def test_disconnects_mid_request_and_mid_reply(vms):
    vm = vms("vm")
    # Half a request, then gone.
    c = RawClient(vm.qmp_path).negotiate()
    c.send(b'{"execute": "query-mig')
    c.close()
    # Many requests whose replies are never read, then gone (replies hit a closed socket).
    c = RawClient(vm.qmp_path).negotiate()
    c.sock.settimeout(5)
    try:
        c.send(b'{"execute": "query-migrate-parameters"}' * 4000)
    except (TimeoutError, socket.timeout):
        pass  # the server stopped reading: its replies fill the socket; fine
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    # Gone before the greeting was read.
    s = socket.socket(socket.AF_UNIX)
    s.connect(vm.qmp_path)
    s.close()

    async def body():
        client = QMPClient("after")
        await client.connect(vm.qmp_path)
        assert (await client.execute("query-status"))["status"] == "running"
        await client.disconnect()

    run(body())
    assert vm.alive()


def test_several_clients_and_events(vms):
    vm = vms("vm")

    async def body():
        clients = []
        listeners = []
        for i in range(6):
            c = QMPClient(f"c{i}")
            await c.connect(vm.qmp_path)
            lst = EventListener(("STOP", "RESUME"))
            c.register_listener(lst)
            clients.append(c)
            listeners.append(lst)
        # A connected client that never negotiates gets no events and blocks no one.
        raw = RawClient(vm.qmp_path)
        results = await asyncio.gather(*(c.execute("query-status") for c in clients))
        assert all(r["status"] == "running" for r in results)
        await clients[0].execute("stop")
        assert (await clients[1].execute("query-status")) == {"running": False, "singlestep": False, "status": "paused"}
        await clients[2].execute("cont")
        for lst in listeners:
            stop = await asyncio.wait_for(lst.get(), 30)
            resume = await asyncio.wait_for(lst.get(), 30)
            assert (stop["event"], resume["event"]) == ("STOP", "RESUME")
            assert "data" not in stop
            assert set(stop["timestamp"]) == {"seconds", "microseconds"}
        raw.sock.settimeout(0.3)
        try:
            extra = raw.file.readline()
        except (TimeoutError, socket.timeout):
            extra = b""
        assert extra == b"", extra
        raw.close()
        # The event a command causes comes before its reply, as in QEMU.
        r = RawClient(vm.qmp_path).negotiate()
        r.send(b'{"execute": "stop", "id": 1}')
        assert r.recv()["event"] == "STOP"
        assert r.recv() == {"return": {}, "id": 1}
        r.send(b'{"execute": "cont", "id": 2}')
        assert r.recv()["event"] == "RESUME"
        assert r.recv() == {"return": {}, "id": 2}
        r.close()
        for c in clients:
            await c.disconnect()

    run(body())
    assert vm.alive()


def test_tcp_endpoint_and_quit(vms):
    vm = vms("vm", qmp="tcp:127.0.0.1:0")
    addr = vm.ready["qmp"]
    host, port = addr[len("tcp:"):].rsplit(":", 1)

    async def body():
        client = QMPClient("tcp")
        await client.connect((host, int(port)))
        assert (await client.execute("query-status"))["status"] == "running"
        await client.execute("quit")
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 - the server went away, as after QEMU's quit
            pass

    run(body())
    assert vm.proc.wait(timeout=30) == 0
