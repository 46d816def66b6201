"""TLS over QMP: `object-add` of `tls-creds-x509` and `authz-list`, `object-del`, the
`tls-creds` / `tls-hostname` / `tls-authz` parameters, and TLS migrations between two
`ferry vm` processes (two network namespaces), with refusals the source survives.

Credentials are made at test time by `examples/tls_creds` (rcgen), never committed.
"""

import asyncio
import json
import os
import subprocess
from pathlib import Path

from conftest import ROOT, expect_error, free_port, run, skip_without_kvm
from netns import netpair  # noqa: F401  (the fixture)
from test_conformance import open_checked
from test_faults import TERMINAL, wait_migration

GUEST = {"mem": "64M", "vcpus": 1, "workload": "working-set=4M"}


def creds_tool() -> str:
    """The `tls_creds` example binary, built if missing."""
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    exe = Path(target) / "release" / "examples" / "tls_creds"
    if not exe.exists():
        subprocess.run(["cargo", "build", "--release", "--example", "tls_creds"],
                       cwd=ROOT, check=True, capture_output=True)
    return str(exe)


def make_creds(d: Path, *args: str) -> dict:
    """A fresh CA and certificates in `d` (QEMU's layout); returns dir and client DN."""
    out = subprocess.run([creds_tool(), str(d), *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_object_add_tls_creds_and_the_parameters(vms):
    skip_without_kvm()
    d = vms.dir / "creds"
    c = make_creds(d)
    vm = vms("vm", **GUEST)

    async def body():
        s = await open_checked("vm", vm)
        creds = {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(d),
                 "endpoint": "server", "verify-peer": True}
        assert await s.execute("object-add", creds) == {}
        await expect_error(s.client, "object-add", creds, "duplicate property 'tls0'")
        await expect_error(s.client, "object-add",
                           {**creds, "id": "tls1", "dir": str(vms.dir / "none")},
                           "ca-cert.pem")
        await expect_error(s.client, "object-add",
                           {**creds, "id": "tls1", "endpoint": "sideways"},
                           "Parameter 'endpoint' does not accept value 'sideways'")
        authz = {"qom-type": "authz-list", "id": "auth0", "policy": "deny",
                 "rules": [{"match": c["client-dn"], "policy": "allow", "format": "exact"}]}
        assert await s.execute("object-add", authz) == {}
        await s.execute("migrate-set-parameters",
                        {"tls-creds": "tls0", "tls-hostname": "dst.example",
                         "tls-authz": "auth0"})
        p = await s.execute("query-migrate-parameters")
        assert (p["tls-creds"], p["tls-hostname"], p["tls-authz"]) == \
            ("tls0", "dst.example", "auth0"), p
        # The source side needs client credentials: server ones are refused at migrate.
        await expect_error(s.client, "migrate", {"uri": "tcp:127.0.0.1:1"},
                           "Expecting TLS credentials with a client endpoint")
        assert await s.execute("object-del", {"id": "tls0"}) == {}
        await expect_error(s.client, "object-del", {"id": "tls0"}, "object 'tls0' not found")
        await expect_error(s.client, "migrate", {"uri": "tcp:127.0.0.1:1"},
                           "No TLS credentials with id 'tls0'")
        # Back to plaintext.
        await s.execute("migrate-set-parameters",
                        {"tls-creds": "", "tls-hostname": "", "tls-authz": ""})
        p = await s.execute("query-migrate-parameters")
        assert p["tls-creds"] == "" and p["tls-authz"] == "", p
        assert (await s.execute("query-status"))["status"] == "running"
        await s.client.disconnect()

    run(body())


async def setup_tls(client, d: Path, endpoint: str, authz_dn: str = ""):
    await client.execute("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                        "dir": str(d), "endpoint": endpoint})
    params = {"tls-creds": "tls0"}
    if authz_dn:
        await client.execute("object-add", {
            "qom-type": "authz-list", "id": "auth0", "policy": "deny",
            "rules": [{"match": authz_dn, "policy": "allow"}]})
        params["tls-authz"] = "auth0"
    await client.execute("migrate-set-parameters", params)


def test_a_tls_migration_between_two_ferry_vms_in_two_namespaces(netpair):
    net = netpair()
    d = net.dir / "creds"
    c = make_creds(d, "--server-name", net.addr_b)
    src = net.source("src", **GUEST)
    # -S: the destination holds the guest paused after the migration, for the digest.
    dst = net._start(net.ns_b, "dst", "--incoming", "defer", "-S", **GUEST)
    port = free_port()

    async def body():
        s = await net.qmp(src)
        t = await net.qmp(dst)
        await setup_tls(t, d, "server", c["client-dn"])
        await t.execute("migrate-incoming", {"uri": net.uri(port)})
        await setup_tls(s, d, "client")
        await s.execute("migrate-set-parameters", {"x-ferry-sparse-pages": False})
        await s.execute("migrate", {"uri": net.uri(port)})
        final = await wait_migration(s, lambda i: i.get("status") in TERMINAL, "an end", 120)
        assert final["status"] == "completed", final
        # The source is paused after the switch-over: its digest is the guest's.
        a = await s.execute("x-ferry-query-ram-digest")
        for _ in range(3000):
            if (await t.execute("query-status"))["status"] == "paused":
                break
            await asyncio.sleep(0.01)
        assert (await t.execute("query-migrate"))["status"] == "completed"
        b = await t.execute("x-ferry-query-ram-digest")
        assert a["digest"] == b["digest"] and a["digest"] != 0, (a, b)
        await s.disconnect()
        await t.disconnect()

    run(body())


def test_refused_sources_keep_running(netpair):
    """A plaintext source, a source of another CA, a wrong tls-hostname and a client
    outside tls-authz: each migration fails saying why, the source's guest keeps
    running, and the destination still waits (it started nothing)."""
    net = netpair()
    d = net.dir / "creds"
    c = make_creds(d, "--server-name", net.addr_b)
    other = make_creds(net.dir / "other", "--server-name", net.addr_b)
    src = net.source("src", **GUEST)
    dst = net._start(net.ns_b, "dst", "--incoming", "defer", **GUEST)
    port = free_port()

    async def attempt(s, expect):
        await s.execute("migrate", {"uri": net.uri(port)})
        final = await wait_migration(s, lambda i: i.get("status") in TERMINAL, "an end", 60)
        assert final["status"] == "failed", final
        assert expect in final.get("error-desc", ""), final
        assert (await s.execute("query-status"))["status"] == "running"

    async def body():
        s = await net.qmp(src)
        t = await net.qmp(dst)
        # Only someone else may migrate here.
        await setup_tls(t, d, "server", c["client-dn"].replace("ferry-source", "someone-else"))
        await t.execute("migrate-incoming", {"uri": net.uri(port)})
        await attempt(s, "requires TLS")
        await setup_tls(s, Path(other["dir"]), "client")
        await attempt(s, "TLS: the destination's certificate is not signed by a CA")
        await s.execute("object-del", {"id": "tls0"})
        await s.execute("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                       "dir": str(d), "endpoint": "client"})
        await s.execute("migrate-set-parameters", {"tls-hostname": "wrong.example"})
        await attempt(s, "is not valid for name 'wrong.example'")
        await s.execute("migrate-set-parameters", {"tls-hostname": ""})
        await attempt(s, f"client certificate '{c['client-dn']}' is not in tls-authz 'auth0'")
        info = await t.execute("query-migrate")
        assert info.get("status") in (None, "setup"), info
        assert (await t.execute("query-status"))["status"] == "inmigrate"
        await s.disconnect()
        await t.disconnect()

    run(body())


def test_ferry_vm_tls_flags_make_the_objects_and_parameters(vms):
    """`ferry vm --tls-creds DIR [--tls-authz DN]` is `object-add` plus
    `migrate-set-parameters` at start (endpoint server with --incoming): a migration
    between two such processes goes over TLS, and a plaintext one is refused."""
    skip_without_kvm()
    d = vms.dir / "creds"
    c = make_creds(d)
    port = free_port()
    dst = vms("dst", "--incoming", f"tcp:127.0.0.1:{port}", "-S", "--tls-creds", str(d),
              "--tls-authz", c["client-dn"], **GUEST)
    plain = vms("plain", **GUEST)
    src = vms("src", "--tls-creds", str(d), **GUEST)

    async def body():
        p = await open_checked("plain", plain)
        await p.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        final = await wait_migration(p.client, lambda i: i.get("status") in TERMINAL,
                                     "an end", 60)
        assert final["status"] == "failed" and "requires TLS" in final["error-desc"], final
        s = await open_checked("src", src)
        t = await open_checked("dst", dst)
        for side, authz in ((s, ""), (t, "authz0")):
            params = await side.execute("query-migrate-parameters")
            assert (params["tls-creds"], params["tls-authz"]) == ("tls0", authz), params
        await s.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        final = await wait_migration(s.client, lambda i: i.get("status") in TERMINAL,
                                     "an end", 120)
        assert final["status"] == "completed", final
        await p.client.disconnect()
        await s.client.disconnect()
        await t.client.disconnect()

    run(body())
