"""Our login is one userauth request (the signed public key), against a real workspace's OpenSSH 9.2.

What asyncssh sends is recorded at its one place for userauth requests, on the wire's side of the
auth classes; the workspace's sshd is the real one of the image. The control is a stock asyncssh
client in the same process, whose login must stay the usual three requests (none, the key query, the
signed request): only our connections change. A key the workspace does not hold is still refused,
with one request and a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.ssh import ensure_client_key, login
from sandbox_mcp.ssh.commands import SSHTarget
from sandbox_mcp.ssh.connect import open_connection
from sandbox_mcp.ssh.keys import load_private_key, load_public_key

from .conftest import destroy_all

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

Request = tuple[str, bool]  # (method, signed)


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, list[Request]]]:
    """Every userauth request asyncssh sends, by connection (its id)."""
    sent: dict[int, list[Request]] = {}
    original = asyncssh.SSHClientConnection.send_userauth_request

    async def record(self: asyncssh.SSHClientConnection, method: bytes, *args: bytes, key=None, trivial=True):  # type: ignore[no-untyped-def]
        sent.setdefault(id(self), []).append((method.decode(), key is not None))
        return await original(self, method, *args, key=key, trivial=trivial)

    monkeypatch.setattr(asyncssh.SSHClientConnection, "send_userauth_request", record)
    yield sent


async def test_a_login_is_one_signed_request(settings: Settings, requests: dict[int, list[Request]]) -> None:
    assert login.direct_login_client() is not None, (
        "asyncssh's internals changed: see sandbox_mcp/ssh/login.py"
    )
    try:
        async with WorkspaceManager(settings) as m:
            await m.create(CreateSpec(name="login"))
            target: SSHTarget = m._target(await m.registry.get("login"))
            conn = await open_connection(target, tcp_timeout_s=5, timeout_s=30, keepalive_interval_s=0)
            try:
                assert requests[id(conn)] == [("publickey", True)]
                assert login.in_use(conn)
                r = await conn.run("id -un", check=True)
                assert r.stdout == f"{settings.user}\n"
            finally:
                conn.close()

            # The control: asyncssh's own client, same key and pinned host key, logs in the usual way.
            stock = await asyncssh.connect(
                target.host, target.port, config=[], username=target.user,
                known_hosts=([load_public_key(target.host_key_path)], [], []),
                client_keys=[load_private_key(target.client_key_path)], agent_path=None,
                preferred_auth="publickey", gss_auth=False,
            )  # fmt: skip
            try:
                assert requests[id(stock)] == [("none", False), ("publickey", False), ("publickey", True)]
                assert not login.in_use(stock)
            finally:
                stock.close()
            await m.destroy("login")
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)


async def test_a_key_the_workspace_does_not_hold_is_refused(
    settings: Settings, tmp_path: Path, requests: dict[int, list[Request]]
) -> None:
    stranger = tmp_path / "stranger_ed25519"
    ensure_client_key(stranger)
    try:
        async with WorkspaceManager(settings) as m:
            await m.create(CreateSpec(name="refuse"))
            target = replace(m._target(await m.registry.get("refuse")), client_key_path=stranger)
            before = set(requests)
            with pytest.raises(asyncssh.PermissionDenied):
                await open_connection(target, tcp_timeout_s=5, timeout_s=30, keepalive_interval_s=0)
            (tried,) = [v for k, v in requests.items() if k not in before]
            assert tried == [("publickey", True)]  # refused once, not retried, no other method tried
            await m.destroy("refuse")
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)
