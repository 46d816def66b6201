"""A management tool's conversation, replayed against two `ferry vm` processes.

The fixture below is the sequence a libvirt-style driver sends for three kinds of
migration (plain live, multifd, auto-converge), written from reading libvirt's
migration-parameter code: it sets *every* capability it knows on each side with an
explicit state (mostly false), resets the TLS parameters to empty strings, then sets
the tunables the migration asks for. Every reply is checked against the shape Ferry
itself publishes in `query-qmp-schema`.
"""

import asyncio
from pathlib import Path

from qemu.qmp import ExecuteError, QMPClient

from conftest import free_port, run

TERMINAL = ("completed", "failed", "cancelled")

# The capabilities a libvirt-style driver knows, each sent with an explicit state.
# `return-path` is on unless the migration is tunnelled; `late-block-activate` is on
# on the destination; `pause-before-switchover` on at the source when the binary lists
# it (the driver then finishes its own work in `pre-switchover` and sends
# `migrate-continue`).
DRIVER_CAPS = ("xbzrle", "auto-converge", "rdma-pin-all", "events", "postcopy-ram",
               "compress", "pause-before-switchover", "late-block-activate", "multifd",
               "dirty-bitmaps", "return-path", "zero-copy-send")

SCENARIOS = {
    "live": {
        "src_on": {"events", "return-path", "pause-before-switchover"},
        "dst_on": {"events", "return-path", "late-block-activate"},
        "src_params": {"max-bandwidth": 1 << 30, "downtime-limit": 500},
        "dst_params": {},
    },
    "multifd": {
        "src_on": {"events", "return-path", "multifd"},
        "dst_on": {"events", "return-path", "late-block-activate", "multifd"},
        "src_params": {"multifd-channels": 4, "max-bandwidth": 1 << 30},
        "dst_params": {"multifd-channels": 4},
    },
    "auto-converge": {
        "src_on": {"events", "return-path", "auto-converge"},
        "dst_on": {"events", "return-path", "late-block-activate"},
        "src_params": {"cpu-throttle-initial": 30, "cpu-throttle-increment": 15,
                       "downtime-limit": 300},
        "dst_params": {},
    },
    # libvirt's --postcopy: postcopy-ram on both sides, migrate-start-postcopy once
    # the migration runs. Whole pages at 8 MiB/s: the 4 MiB working set cannot
    # converge, so the switch is what ends it.
    "postcopy": {
        "src_on": {"events", "return-path", "postcopy-ram"},
        "dst_on": {"events", "return-path", "late-block-activate", "postcopy-ram"},
        "src_params": {"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 0,
                       "x-ferry-sparse-pages": False},
        "dst_params": {},
        "start_postcopy": True,
    },
}


def caps_list(on):
    return {"capabilities": [{"capability": c, "state": c in on} for c in DRIVER_CAPS]}


def tls_reset():
    return {"tls-creds": "", "tls-hostname": ""}


class Schema:
    """Ferry's own introspection document, and a checker of values against it."""

    def __init__(self, doc):
        assert isinstance(doc, list) and doc
        self.by_name = {e["name"]: e for e in doc}
        self.commands = {e["name"]: e for e in doc if e["meta-type"] == "command"}
        self.events = {e["name"] for e in doc if e["meta-type"] == "event"}
        for e in doc:
            assert e["meta-type"] in ("command", "event", "object", "enum", "builtin",
                                      "array"), e
            for key in ("arg-type", "ret-type", "element-type"):
                if key in e:
                    assert e[key] in self.by_name, (key, e)
            for m in e.get("members", []):
                if "type" in m:
                    assert m["type"] in self.by_name, m

    def check(self, value, type_name, path="value"):
        t = self.by_name[type_name]
        meta = t["meta-type"]
        if meta == "builtin":
            jt = t["json-type"]
            ok = {
                "string": lambda v: isinstance(v, str),
                "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
                "boolean": lambda v: isinstance(v, bool),
                "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                "null": lambda v: v is None,
                "value": lambda v: True,
            }[jt](value)
            assert ok, f"{path}: {value!r} is not {jt}"
        elif meta == "enum":
            assert value in t["values"], f"{path}: {value!r} not in {type_name}"
        elif meta == "array":
            assert isinstance(value, list), f"{path}: not a list"
            for i, v in enumerate(value):
                self.check(v, t["element-type"], f"{path}[{i}]")
        elif meta == "object":
            assert isinstance(value, dict), f"{path}: {value!r} not an object"
            members = {m["name"]: m for m in t["members"]}
            for k, v in value.items():
                assert k in members, f"{path}: member {k!r} not in {type_name}"
                self.check(v, members[k]["type"], f"{path}.{k}")
            for name, m in members.items():
                if "default" not in m:
                    assert name in value, f"{path}: required {name!r} missing"
        else:
            raise AssertionError(f"{path}: unexpected meta-type {meta}")

    def args_ok(self, command, args):
        self.check(args or {}, self.commands[command]["arg-type"], f"{command} args")


class Checked:
    """A client whose every command and reply is checked against the schema."""

    def __init__(self, client, schema):
        self.client = client
        self.schema = schema
        self.seen = []

    async def execute(self, command, args=None):
        assert command in self.schema.commands, command
        self.schema.args_ok(command, args)
        ret = await self.client.execute(command, args)
        self.schema.check(ret, self.schema.commands[command]["ret-type"], command)
        self.seen.append(command)
        return ret


async def open_checked(name, vm):
    c = QMPClient(name)
    await c.connect(vm.qmp_path)
    # What a driver reads first: the schema, then the version.
    schema = Schema(await c.execute("query-qmp-schema"))
    chk = Checked(c, schema)
    ver = await chk.execute("query-version")
    assert {"major", "minor", "micro"} <= set(ver["qemu"])
    assert ver["package"].startswith("ferry")
    names = [x["name"] for x in await chk.execute("query-commands")]
    assert set(names) == set(schema.commands), "query-commands agrees with the schema"
    events = [x["name"] for x in await chk.execute("query-events")]
    assert set(events) == schema.events
    return chk


async def migrate_once(vms, kind):
    sc = SCENARIOS[kind]
    src = vms(f"src-{kind}")
    dst = vms(f"dst-{kind}", "--incoming", "defer")
    port = free_port()
    s = await open_checked("src", src)
    d = await open_checked("dst", dst)
    try:
        for side in (s, d):
            caps = await side.execute("query-migrate-capabilities")
            known = {c["capability"] for c in caps}
            assert set(DRIVER_CAPS) <= known, set(DRIVER_CAPS) - known
            params = await side.execute("query-migrate-parameters")
            assert params["tls-creds"] == "" and params["xbzrle-cache-size"] > 0
        # Destination first, as a driver prepares it before the source migrates.
        await d.execute("migrate-set-capabilities", caps_list(sc["dst_on"]))
        await d.execute("migrate-set-parameters", {**tls_reset(), **sc["dst_params"]})
        await d.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        await s.execute("migrate-set-capabilities", caps_list(sc["src_on"]))
        await s.execute("migrate-set-parameters", {**tls_reset(), **sc["src_params"]})
        on = {c["capability"] for c in await s.execute("query-migrate-capabilities")
              if c["state"]}
        assert on == sc["src_on"], on
        params = await s.execute("query-migrate-parameters")
        for k, v in sc["src_params"].items():
            assert params[k] == v, (k, params[k])
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        if sc.get("start_postcopy"):
            # Accepted from setup on; the switch happens once the migration is active.
            assert await s.execute("migrate-start-postcopy") == {}
        continued = False
        while True:
            info = await s.execute("query-migrate")
            if info.get("status") in TERMINAL:
                break
            if info.get("status") == "pre-switchover":
                # The guest is paused for the switch-over and waits for the driver.
                assert (await s.execute("query-status"))["status"] == "finish-migrate"
                dinfo = await d.execute("query-migrate")
                assert dinfo["socket-address"] == [
                    {"type": "inet", "host": "127.0.0.1", "port": str(port)}], dinfo
                assert "ram" not in dinfo, dinfo
                assert await s.execute("migrate-continue", {"state": "pre-switchover"}) == {}
                continued = True
            await asyncio.sleep(0.05)
        assert info["status"] == "completed", info
        assert continued == ("pause-before-switchover" in sc["src_on"]), info
        if sc.get("start_postcopy"):
            assert info["ram"]["postcopy-bytes"] > 0, info
        while (await d.execute("query-status"))["status"] != "running":
            await asyncio.sleep(0.05)
        assert (await d.execute("query-migrate"))["status"] == "completed"
        assert (await s.execute("query-status"))["status"] == "postmigrate"
    finally:
        await s.client.disconnect()
        await d.client.disconnect()


def test_live_migration_conversation(vms):
    run(migrate_once(vms, "live"))


def test_multifd_migration_conversation(vms):
    run(migrate_once(vms, "multifd"))


def test_auto_converge_migration_conversation(vms):
    run(migrate_once(vms, "auto-converge"))


def test_postcopy_migration_conversation(vms):
    run(migrate_once(vms, "postcopy"))


async def expect_error(client, command, args, desc):
    try:
        await client.execute(command, args)
    except ExecuteError as e:
        assert e.error_class == "GenericError", e
        assert str(e).startswith(desc), str(e)
        return
    raise AssertionError(f"{command} {args} accepted")


def test_capability_and_parameter_edge_cases(vms):
    src = vms("src")
    import socket
    # A destination that accepts the connection and never reads: the migration
    # stays in progress until it is cancelled.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    async def body():
        s = await open_checked("src", src)
        c = s.client
        before = await s.execute("query-migrate-capabilities")
        await expect_error(c, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "warp-drive", "state": False}]},
                           "Parameter 'capability' does not accept value 'warp-drive'")
        await expect_error(c, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "xbzrle", "state": True}]},
                           "Migration capability 'xbzrle' is not supported")
        await expect_error(c, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "events", "state": True},
                                             {"capability": "x-colo", "state": True}]},
                           "QEMU compiled without replication module can't enable COLO")
        # A refused list changes nothing, not even its valid entries.
        assert await s.execute("query-migrate-capabilities") == before
        await expect_error(c, "migrate-set-parameters", {"xbzrle-cache-size": 1 << 20},
                           "Parameter 'xbzrle-cache-size' expects 67108864")
        await expect_error(c, "migrate-set-parameters", {"compress-level": 5},
                           "Parameter 'compress-level' expects 1")
        # At their defaults they are accepted.
        await s.execute("migrate-set-parameters",
                        {"xbzrle-cache-size": 1 << 26, "compress-threads": 8,
                         "max-postcopy-bandwidth": 0, "tls-authz": ""})
        await s.execute("migrate-set-parameters", {"x-ferry-io-timeout-ms": 120000})
        # block-bitmap-mapping: QEMU's rules and texts; absent until set, then kept.
        assert "block-bitmap-mapping" not in await s.execute("query-migrate-parameters")
        mapping = [{"node-name": "drive0", "alias": "d0",
                    "bitmaps": [{"name": "b0", "alias": "a0"}]}]
        await expect_error(c, "migrate-set-parameters", {"block-bitmap-mapping": mapping * 2},
                           "The node name 'drive0' is mapped twice")
        await s.execute("migrate-set-parameters", {"block-bitmap-mapping": mapping})
        params = await s.execute("query-migrate-parameters")
        assert params["block-bitmap-mapping"] == mapping, params
        assert await s.execute("query-migrationthreads") == []
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await s.execute("query-migrate")
        assert info["status"] in ("setup", "active"), info
        # The migration's threads, each a real thread of the process under its name.
        # (The migration thread lists itself once it runs.)
        while not (threads := await s.execute("query-migrationthreads")):
            await asyncio.sleep(0.02)
        assert threads[0]["name"] == "mig/src", threads
        for t in threads:
            comm = Path(f"/proc/{src.proc.pid}/task/{t['thread-id']}/comm")
            try:
                name = comm.read_text().strip()
            except FileNotFoundError:
                # A sender whose pass ended since: it left the list before it exited.
                assert t not in await s.execute("query-migrationthreads"), t
                continue
            assert name == t["name"][:15], (t, name)
        await expect_error(c, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "auto-converge", "state": True}]},
                           "There's a migration process in progress")
        # QEMU's order of errors: the arguments' parse first, then the running
        # migration, then whether the capability can be set at all.
        await expect_error(c, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "warp-drive", "state": False}]},
                           "Parameter 'capability' does not accept value 'warp-drive'")
        await expect_error(c, "migrate-set-capabilities",
                           {"capabilities": [{"capability": "xbzrle", "state": True}]},
                           "There's a migration process in progress")
        # Parameters may change while it runs; their values are still checked.
        await expect_error(c, "migrate-set-parameters", {"multifd-channels": 0},
                           "Parameter 'multifd-channels' expects a value between 1 and 255")
        info = await s.execute("query-migrate")
        assert info["status"] in ("setup", "active"), info
        await s.execute("migrate_cancel")
        while (await s.execute("query-migrate"))["status"] not in TERMINAL:
            await asyncio.sleep(0.05)
        # After a cancel, QEMU answers the status alone.
        assert await s.execute("query-migrate") == {"status": "cancelled"}
        while await s.execute("query-migrationthreads"):
            await asyncio.sleep(0.05)
        await expect_error(c, "migrate-continue", {"state": "pre-switchover"},
                           "Migration not in expected state: cancelled")
        # The other replies a monitoring tool reads have the published shapes too.
        assert (await s.execute("query-dirty-rate"))["status"] == "unstarted"
        await s.execute("calc-dirty-rate", {"calc-time": 200, "calc-time-unit": "millisecond"})
        while (await s.execute("query-dirty-rate"))["status"] != "measured":
            await asyncio.sleep(0.05)
        await s.execute("query-status")
        await s.execute("human-monitor-command", {"command-line": "info status"})
        # Once it ended, the same change is accepted.
        await s.execute("migrate-set-capabilities",
                        {"capabilities": [{"capability": "auto-converge", "state": True}]})
        await c.disconnect()

    try:
        run(body())
    finally:
        lsock.close()
