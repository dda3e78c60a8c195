"""End to end with real Incus: ``type="incus"`` through the MCP client, on a private incusd.

The daemon (sandbox_mcp/incusd.py) runs in the test's network namespace with its own state dir
and a ``dir`` pool, and is stopped by PID at the end. Local: the instance's NIC joins the test
bridge and the workspace dir is the host's, shifted. Remote: the same daemon on 127.0.0.1 over
TLS with a trusted client certificate and the server's certificate pinned; the workspace dir is
then a custom volume. Both check what is left on the host and in Incus after destroy.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from sandbox_mcp import claude_workspace
from sandbox_mcp.config import Settings
from sandbox_mcp.hostnet import HostNetwork, firewall
from sandbox_mcp.images import ImageStore
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.naming import veth_names
from sandbox_mcp.paths import WorkspacePaths
from sandbox_mcp.runtimes import RuntimeContext
from sandbox_mcp.runtimes.incus import IncusRuntime, instance_name
from sandbox_mcp.runtimes.incus import incusd as incus_daemon
from sandbox_mcp.runtimes.incus.api import probe
from sandbox_mcp.runtimes.incus.image import IncusImage
from sandbox_mcp.runtimes.incus.settings import IncusSettings
from sandbox_mcp.server import build_server

from .conftest import TEST_BRIDGE, destroy_all, e2e_settings, e2e_skip_reason
from .processes_flow import web_server_flow
from .test_e2e import Session
from .test_egress_domains import world  # noqa: F401 - the stand-in internet, a fixture

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture(scope="module")
def incusd() -> Iterator[incus_daemon.PrivateIncusd]:
    reason = e2e_skip_reason() or incus_daemon.missing_reason()
    if reason:
        pytest.skip(reason)
    daemon = incus_daemon.start()  # under /var/tmp: pytest's tmp dirs are 0700, see start()
    try:
        yield daemon
    finally:
        try:
            daemon.cleanup_instances()
        finally:
            daemon.stop()
            incus_daemon.remove(daemon)


@pytest.fixture(autouse=True)
async def firewall_retired(tmp_path: Path) -> AsyncIterator[None]:
    """After each test no workspace port is admitted, and our tables go (as with the last workspace).

    Later tests on the same bridge load the tables their settings want (NAT or not) only when
    they are missing, so a table left here would change them.
    """
    yield
    if e2e_skip_reason() is None:
        network = HostNetwork(e2e_settings(tmp_path / "retire"))
        if not await network.retire():
            # Fail this test, but do not hand its leftover rules to the next one: the next first address
            # is the same, and its admit would be refused as taken.
            present = await firewall.table_exists(network.bridge)
            await firewall.remove_tables(network.bridge)
            pytest.fail(f"a workspace port is still admitted: {firewall.admitted_ports(present or '')}")


@pytest.fixture(scope="module")
def client_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("incus-client")
    cert, key = d / "client.crt", d / "client.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=sandbox-mcp-test"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def incus_settings(tmp_path: Path, incus: IncusSettings) -> Settings:
    base = e2e_settings(tmp_path / "state")
    return base.model_copy(update={"boot_timeout_s": 90}).with_runtime("incus", **incus.model_dump(exclude_unset=True))


@pytest.fixture
def local_settings(incusd: incus_daemon.PrivateIncusd, tmp_path: Path) -> Settings:
    # NAT and the stand-in internet's DNS (tests/test_egress_domains.py's world) for the egress-by-domain check.
    return incus_settings(tmp_path, IncusSettings(socket=incusd.socket)).model_copy(
        update={"nat": True, "egress_dns_upstreams": ["203.0.113.53"]})


@pytest.fixture
def remote_settings(incusd: incus_daemon.PrivateIncusd, client_cert: tuple[Path, Path], tmp_path: Path) -> Settings:
    if incusd.https_port is None:
        incusd.listen_https()
        incusd.trust(client_cert[0], "sandbox-mcp-test")
    cert, key = client_cert
    return incus_settings(tmp_path, IncusSettings(
        url=f"https://127.0.0.1:{incusd.https_port}", client_cert=cert, client_key=key,
        server_cert=incusd.server_cert,
    ))  # fmt: skip


async def _session(settings: Settings) -> AsyncIterator[Any]:
    try:
        async with Client(build_server(settings)) as client:
            yield client
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)


@pytest.fixture
async def local(local_settings: Settings) -> AsyncIterator[Any]:
    async for c in _session(local_settings):
        yield c


@pytest.fixture
async def remote(remote_settings: Settings) -> AsyncIterator[Any]:
    async for c in _session(remote_settings):
        yield c


async def call(client: Any, tool: str, progress: list[str] | None = None, **args: Any) -> dict[str, Any]:
    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        if progress is not None:
            progress.append(message or "")

    result = await client.call_tool(tool, args, progress_callback=on_progress)
    assert not result.is_error, f"{tool} failed: {result.content}"
    return result.structured_content


def bridge_ports() -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show", "master", TEST_BRIDGE], capture_output=True, text=True).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def incus_leftovers(daemon: incus_daemon.PrivateIncusd, settings: Settings) -> dict[str, Any]:
    """What Incus still holds beyond the cached image: instances, custom volumes, other images."""
    store = ImageStore(settings.image_dir)
    images = IncusImage(settings, store)
    cached = images.fingerprint(images.key(()))
    return {
        "instances": daemon.api("GET", "/1.0/instances"),
        "volumes": daemon.api("GET", "/1.0/storage-pools/default/volumes/custom"),
        "images": [i for i in daemon.api("GET", "/1.0/images") if not i.endswith(f"/{cached}")],
    }


NOTHING = {"instances": [], "volumes": [], "images": []}


@pytest.mark.usefixtures("world")
async def test_local_lifecycle(local: Any, local_settings: Settings, incusd: incus_daemon.PrivateIncusd) -> None:
    s = local_settings
    progress: list[str] = []
    ws = await call(local, "create_workspace", progress, name="inc1", type="incus", cpus=0.5, memory_mib=512)
    assert ws["state"] == "running" and ws["type"] == "incus"
    assert any("Incus" in m for m in progress), progress
    inst = incusd.api("GET", f"/1.0/instances/{instance_name('inc1')}")
    assert inst["ephemeral"] is True
    assert ws["isolation"] == "unprivileged-container" and ws["limits"]["cpus"] == 0.5
    config = inst["config"]
    assert (config["limits.cpu"], config["limits.cpu.allowance"], config["limits.memory"]) == ("1", "50ms/100ms", "512MiB")
    assert config["limits.processes"] == str(s.tasks_max)
    assert inst["devices"]["eth0"]["parent"] == TEST_BRIDGE and inst["devices"]["eth0"]["hwaddr"] == ws_mac(s, "inc1")
    assert bridge_ports() == [veth_names("inc1")[0]]  # our name for the host end: the firewall's port rules apply

    r = await call(local, "exec", name="inc1", command="id -un; hostname; pwd; sudo -n id -u; head -1 /proc/self/uid_map")
    assert r["exit_code"] == 0, r
    user, host, cwd, root, uid_map = r["stdout"].splitlines()
    assert (user, host, cwd, root) == (s.user, "inc1", f"/home/{s.user}/workspace", "0")
    assert uid_map.split()[:2] != ["0", "0"], f"not a user namespace: {uid_map}"  # unprivileged
    assert inst["config"]["security.idmap.isolated"] == "true"

    # The workspace dir is the host's: files written inside belong to the host user.
    await call(local, "write_file", name="inc1", path="notes/a.txt", content="kept\n")
    r = await call(local, "exec", name="inc1", command="touch made-inside && sudo touch /root-marker")
    assert r["exit_code"] == 0, r
    host_dir = Path(ws["host_workspace_dir"])
    assert (host_dir / "notes/a.txt").read_text() == "kept\n"
    assert (host_dir / "made-inside").stat().st_uid == s.user_uid

    # A restart is a clean root; the workspace dir survives.
    await call(local, "stop_workspace", name="inc1")
    assert incus_leftovers(incusd, s)["instances"] == [] and bridge_ports() == []
    await call(local, "start_workspace", name="inc1")
    r = await call(local, "exec", name="inc1", command="cat notes/a.txt; test -e /root-marker; echo $?")
    assert r["stdout"] == "kept\n1\n", r

    # Egress by domain on the running local instance (its port is on our bridge): DNS redirected to the
    # egress resolver, only what a listed name resolved to connects.
    await call(local, "set_egress", name="inc1", egress=["api.allowed.test"])
    r = await call(local, "exec", name="inc1", command="curl -s --max-time 30 http://api.allowed.test/; echo; "
                   "curl -s --max-time 3 http://203.0.113.11/ || echo failed")
    assert r["stdout"].splitlines() == ["hello from 203.0.113.10", "failed"], r

    status = await call(local, "workspace_status", name="inc1")
    assert status["runtime"]["running"] is True and status["runtime"]["runtime"] == "incus"
    log = (await call(local, "workspace_logs", name="inc1", lines=500))["log"]
    assert "OpenBSD Secure Shell server" in log, log[-2000:]  # the instance's console: systemd's boot

    await call(local, "destroy_workspace", name="inc1")
    assert incus_leftovers(incusd, s) == NOTHING
    assert bridge_ports() == []
    assert not host_dir.exists()


def ws_mac(settings: Settings, name: str) -> str:
    from sandbox_mcp.naming import mac_for

    return mac_for(name)


async def test_remote_lifecycle(remote: Any, remote_settings: Settings, incusd: incus_daemon.PrivateIncusd) -> None:
    s = remote_settings
    info = probe(IncusSettings.of(s))
    assert info.auth == "trusted" and info.api_version == "1.0"
    checks = {c.name: c for c in IncusRuntime(RuntimeContext.for_settings(s, "")).checks()}
    assert checks["incus certificate pin"].ok, checks

    # A remote server's instances sit on a bridge there that an admin connected to the workspace
    # subnet; here "there" is this namespace, so the test makes that bridge as the admin would.
    await HostNetwork(s).ensure()
    ws = await call(remote, "create_workspace", name="rem1", type="incus")
    assert ws["state"] == "running"
    inst = incusd.api("GET", f"/1.0/instances/{instance_name('rem1')}")
    assert inst["devices"]["workspace"]["source"] == "sbx-rem1-workspace"  # a volume, not a host path
    r = await call(remote, "exec", name="rem1", command="stat -c %U .; echo data > f; id -un")
    assert r["stdout"] == f"{s.user}\n{s.user}\n", r
    # The seeded Claude config was pushed into the fresh root, owned by the workspace user.
    host_config = WorkspacePaths.of(s.state_dir, "rem1").claude_config
    expected = sorted(p.name for p in host_config.iterdir() if p.is_file())
    inside = claude_workspace.claude_config_dir_inside(s.user)
    r = await call(remote, "exec", name="rem1", command=f"cd {inside} && find . -maxdepth 1 -type f -user {s.user} "
                   "-printf '%f\\n' | sort")
    assert expected and r["stdout"].split() == expected, (r, expected)
    # A remote server's network policy is its own: a domain list is refused, saying so; nothing changed.
    refused = await remote.call_tool("set_egress", {"name": "rem1", "egress": ["pypi.org"]})
    assert refused.is_error and "remote Incus server" in str(refused.content), refused.content
    assert (await call(remote, "workspace_status", name="rem1"))["egress"] == "none"
    await call(remote, "stop_workspace", name="rem1")
    await call(remote, "start_workspace", name="rem1")
    r = await call(remote, "exec", name="rem1", command="cat f")
    assert r["stdout"] == "data\n"
    await call(remote, "destroy_workspace", name="rem1")
    assert incus_leftovers(incusd, s) == NOTHING
    assert bridge_ports() == []


async def test_remote_refuses_another_certificate(remote_settings: Settings, client_cert: tuple[Path, Path]) -> None:
    # Pin the client's own certificate instead of the server's: the server must be refused.
    wrong = remote_settings.with_runtime("incus", server_cert=client_cert[0])
    checks = IncusRuntime(RuntimeContext.for_settings(wrong, "")).checks()
    assert [c.ok for c in checks] == [False]
    assert "certificate" in checks[0].detail.lower() or "ssl" in checks[0].detail.lower(), checks[0].detail


async def test_reconcile_deletes_instances_the_registry_does_not_run(
    local_settings: Settings, incusd: incus_daemon.PrivateIncusd
) -> None:
    # A server that died after starting the instance but with the record saying stopped (or one
    # whose stop was interrupted): the next server's reconcile deletes the instance.
    async with WorkspaceManager(local_settings) as m:
        try:
            await m.create(CreateSpec(name="rc1", type="incus"))
            assert incusd.api("GET", "/1.0/instances") == [f"/1.0/instances/{instance_name('rc1')}"]
            record = await m.registry.get("rc1")
            record.state = "stopped"
            await m.registry.put(record)
            async with WorkspaceManager(local_settings):
                pass  # open() reconciles
            assert incusd.api("GET", "/1.0/instances") == []
            assert bridge_ports() == []
            present = await firewall.table_exists(local_settings.bridge) or ""
            assert veth_names("rc1")[0] not in firewall.admitted_ports(present)
        finally:
            await destroy_all(m)
    assert incus_leftovers(incusd, local_settings) == NOTHING and bridge_ports() == []


@pytest.mark.parametrize("moment", ["creating the Incus instance", "booting the Incus instance"])
async def test_create_cancelled_leaves_nothing(
    local_settings: Settings, incusd: incus_daemon.PrivateIncusd, moment: str
) -> None:
    seen: list[str] = []
    async with WorkspaceManager(local_settings) as m:
        with anyio.CancelScope() as scope:

            async def progress(message: str, fraction: float | None = None) -> None:
                seen.append(message)
                if message.startswith(moment):
                    scope.cancel()  # delivered at the next checkpoint: the API call that follows

            await m.create(CreateSpec(name="cx1", type="incus"), progress)
        assert scope.cancelled_caught and any(x.startswith(moment) for x in seen)
        assert (await m.registry.read()).workspaces == {}
    assert incus_leftovers(incusd, local_settings) == NOTHING and bridge_ports() == []
    present = await firewall.table_exists(local_settings.bridge) or ""
    assert veth_names("cx1")[0] not in firewall.admitted_ports(present)


async def test_instances_get_uid_ranges_of_their_own(local: Any) -> None:
    maps = []
    for name in ("idm1", "idm2"):
        await call(local, "create_workspace", name=name, type="incus")
        r = await call(local, "exec", name=name, command="head -1 /proc/self/uid_map")
        inside, outside, _count = r["stdout"].split()
        maps.append((inside, outside))
    assert maps[0][0] == maps[1][0] == "0"
    assert maps[0][1] != maps[1][1] and "0" not in (maps[0][1], maps[1][1]), maps
    for name in ("idm1", "idm2"):
        await call(local, "destroy_workspace", name=name)


async def test_processes_and_ports(local_settings: Settings) -> None:
    """The web-server story (tests/processes_flow.py) in an Incus container; a new server after the restart."""

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[Session]:
        async with Client(build_server(local_settings)) as client:
            yield Session(client)

    async def restart() -> None:
        """Nothing more: the next session's server is a new one, which finds the process and the port again."""

    try:
        await web_server_flow(session, restart, "incweb", "incus")
    finally:
        async with WorkspaceManager(local_settings) as m:
            await destroy_all(m)
