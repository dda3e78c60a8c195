"""Secrets for the manager: placeholders at create, the proxy and the workspace's files at start, cleanup.

The manager calls :class:`SecretsService` at four points: :meth:`~SecretsService.placeholders` when a
workspace is registered (unknown or forbidden names refuse the create), :meth:`~SecretsService.attach`
once its runtime runs (its client file for the proxy, its address into the firewall's set, the proxy
started if it is not running), :meth:`~SecretsService.provision` once SSH answers (the environment and
git configuration inside, as root), and :meth:`~SecretsService.detach` when it stops or dies (the proxy
ends with the last workspace that has secrets). :meth:`~SecretsService.sync` makes all of that match the
registry when a server starts, starting the proxy again if it died meanwhile.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import os
import secrets as token_source
import socket
import sys
import time
from collections.abc import Iterable, Mapping

import anyio

from .. import claude_workspace, supervise
from ..errors import AccessDenied, BackendError, InvalidSpec, SandboxError, SSHError
from ..fsutil import async_file_lock, atomic_write
from ..hostnet import firewall as policy
from .files import ClientFile, ClientSecret, ProxyConfig, ProxyPaths
from .firewall import close_script, open_script
from .settings import SecretSpec

__all__ = ["GITCONFIG_INSIDE", "SecretsService", "check_script_result", "endpoint", "workspace_environment"]

log = logging.getLogger(__name__)
_BEGIN = "# BEGIN sandbox-mcp secrets"
_END = "# END sandbox-mcp secrets"
GITCONFIG_INSIDE = "/etc/sandbox-mcp/secrets.gitconfig"
SSHD_DROP_IN_INSIDE = "/etc/ssh/sshd_config.d/05-sandbox-mcp-secrets.conf"
_READY_TIMEOUT_S = 15.0


def endpoint(host_ip: ipaddress.IPv4Address, port: int, host: str) -> str:
    """The proxy's URL for ``host``: what a workspace uses instead of ``https://host``."""
    return f"http://{host_ip}:{port}/{host}"


def workspace_environment(specs: Mapping[str, SecretSpec], placeholders: Mapping[str, str],
                          host_ip: ipaddress.IPv4Address, port: int) -> dict[str, str]:
    """The variables a workspace gets for its secrets: placeholders and base URLs (never a value)."""
    env: dict[str, str] = {}
    for name, placeholder in sorted(placeholders.items()):
        spec = specs[name]
        env.update({var: placeholder for var in spec.env})
        env.update({var: endpoint(host_ip, port, spec.hosts[0]) for var in spec.base_url_env})
    return env


def _gitconfig(specs: Mapping[str, SecretSpec], placeholders: Mapping[str, str],
               host_ip: ipaddress.IPv4Address, port: int) -> str:
    """git's configuration inside: https://HOST/ goes to the proxy with the placeholder as basic auth."""
    out = ["# Written by sandbox-mcp at each start: git over HTTPS to these hosts goes through the host's",
           "# secrets proxy, which puts the real token in place of the placeholder below.", ""]
    for name, placeholder in sorted(placeholders.items()):
        spec = specs[name]
        if not spec.git:
            continue
        auth = base64.b64encode(f"{spec.username}:{placeholder}".encode()).decode()
        for host in spec.hosts:
            url = endpoint(host_ip, port, host) + "/"
            out += [f'[url "{url}"]', f"\tinsteadOf = https://{host}/",
                    f'[http "{url}"]', f"\textraHeader = Authorization: Basic {auth}", ""]
    return "\n".join(out)


def _placeholder(name: str) -> str:
    return f"sandbox-placeholder-{name}-{token_source.token_hex(16)}"


class SecretsService:
    """The secrets of one server (its settings and state dir). See the module docstring."""

    def __init__(self, settings: object) -> None:
        from ..config import Settings

        assert isinstance(settings, Settings)
        self.settings = settings
        self.specs: dict[str, SecretSpec] = dict(settings.secrets)
        self.proxy = settings.secrets_proxy
        self.paths = ProxyPaths.of(settings.state_dir)
        self._tag = supervise.workspace_tag(settings.state_dir, ".secrets-proxy")

    # Create --------------------------------------------------------------------------------------

    def placeholders(self, names: Iterable[str], owner_uid: int | None, on_bridge: bool) -> dict[str, str]:
        """A fresh placeholder per secret named, after checking each is configured and the owner's to use.

        Raises:
            InvalidSpec: a name that is not configured, given twice, or a workspace type off this host's bridge.
            AccessDenied: the secret is restricted to other uids.
        """
        names = list(names)
        if not names:
            return {}
        if len(set(names)) != len(names):
            raise InvalidSpec(f"secrets lists a name twice: {names}")
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            known = ", ".join(sorted(self.specs)) or "none are configured on this host"
            raise InvalidSpec(f"unknown secret(s) {', '.join(map(repr, unknown))}; the secrets this server offers: "
                              f"{known}. Secrets are configured by whoever runs the server ([secrets.NAME] in its "
                              "settings), not by create_workspace")
        if not on_bridge:
            raise InvalidSpec("secrets need a workspace on this host's bridge (direct mode: container, vm or a "
                              "local incus); this type runs elsewhere")
        for n in names:
            uids = self.specs[n].uids
            if uids is not None and owner_uid not in (None, 0) and owner_uid not in uids:
                raise AccessDenied(f"secret {n!r} is not offered to uid {owner_uid}; ask whoever runs the server")
        return {n: _placeholder(n) for n in names}

    def environment(self, placeholders: Mapping[str, str]) -> dict[str, str]:
        """The variables a workspace with these placeholders gets."""
        known = {n: p for n, p in placeholders.items() if n in self.specs}
        return workspace_environment(self.specs, known, self.settings.host_ip, self.proxy.port)

    # Start and stop ------------------------------------------------------------------------------

    def _client(self, name: str, placeholders: Mapping[str, str]) -> ClientFile:
        return ClientFile(workspace=name, secrets=[
            ClientSecret(name=n, placeholder=p, spec=self.specs[n]) for n, p in sorted(placeholders.items())
            if n in self.specs
        ])

    async def attach(self, name: str, ip: str | None, placeholders: Mapping[str, str]) -> None:
        """Make the proxy serve the workspace at ``ip``: its client file, the firewall, the proxy running.

        Raises:
            BackendError: nft refused, or the proxy did not start (the message has its log's tail).
        """
        if not placeholders or ip is None:  # (a workspace without a network has no secrets: create refused them)
            return
        await anyio.to_thread.run_sync(self.paths.make)
        await self._firewall(ip, open_=True)
        # Under the proxy's lock, as the last detach's check: a stop never ends a proxy just given a client.
        async with async_file_lock(self.paths.root / "lock"):
            await anyio.to_thread.run_sync(self.paths.write_client, ip, self._client(name, placeholders))
            await self._ensure_proxy()

    async def detach(self, ip: str | None) -> None:
        """The workspace at ``ip`` no longer uses the proxy; the proxy stops with the last one. Never raises
        for what is already gone."""
        if ip is None:
            return
        had = self.paths.client(ip).exists()
        if not had and not self.paths.process.exists():
            return  # the common case: a workspace without secrets
        await anyio.to_thread.run_sync(self.paths.remove_client, ip)
        if had:
            with contextlib.suppress(SandboxError):
                await self._firewall(ip, open_=False)
        await self.stop_proxy(only_if_idle=True)

    async def sync(self, running: Mapping[str, tuple[str | None, Mapping[str, str]]]) -> None:
        """Match the proxy to ``running`` (name -> (ip, placeholders)) after a server (re)start."""
        want = {ip: (name, ph) for name, (ip, ph) in running.items() if ph and ip}
        for ip in self.paths.client_ips():
            if ip not in want:
                await self.detach(ip)
        for ip, (name, ph) in want.items():
            try:
                await self.attach(name, ip, ph)
            except SandboxError as exc:
                # The workspace runs on without its proxy; its next start tries again.
                log.warning("secrets proxy for %s: %s", name, exc)
        if not want:
            await self.stop_proxy()
            await supervise.kill_tagged(self._tag)  # one a killed server never recorded

    async def revive(self) -> bool:
        """Start the proxy again if a workspace uses it and it is not running (its supervisor was killed, by
        hand or by the OOM killer; the supervisor itself restarts a dead worker). True if it was started.
        Cheap when all is well: a PID file and /proc, no lock.

        Raises:
            BackendError: it did not start (the message has its log's tail).
        """
        if self._running() is not None or not self.paths.client_ips():
            return False
        async with async_file_lock(self.paths.root / "lock"):  # as attach: one start, never one over a stop
            if self._running() is not None or not self.paths.client_ips():
                return False
            await self._ensure_proxy()
            return True

    async def _firewall(self, ip: str, *, open_: bool) -> None:
        bridge = self.settings.bridge
        # The same lock HostNetwork takes for its changes to these tables.
        async with async_file_lock(self.settings.state_dir / ".server" / f"firewall-{bridge}.lock"):
            present = await policy.table_exists(bridge)
            if present is None:
                if open_:
                    raise BackendError("the network policy tables are missing; start the workspace again")
                return
            address = ipaddress.IPv4Address(ip)
            script = (open_script(bridge, self.settings.host_ip, self.proxy.port, address,
                                  self.proxy.max_connections, present)
                      if open_ else close_script(bridge, address, present))
            await policy.run_script(script)

    # The proxy process ---------------------------------------------------------------------------

    def _marker(self) -> bytes:
        return str(self.paths.root).encode()

    def _running(self) -> supervise.ProcessRef | None:
        try:
            ref = supervise.ProcessRef.model_validate_json(self.paths.process.read_bytes())
        except (OSError, ValueError):
            return None
        return ref if supervise.alive(ref, self._marker()) else None

    async def _ensure_proxy(self) -> None:
        """Start the proxy unless it runs with these settings (call under the proxy's lock)."""
        config = ProxyConfig(listen=str(self.settings.host_ip), settings=self.proxy,
                             log_max_bytes=self.settings.console_log_mib << 20).model_dump_json().encode()
        ref = self._running()
        with contextlib.suppress(OSError):
            if ref is not None and self.paths.config.read_bytes() != config:
                await self._stop(ref)  # the settings changed: start it afresh with the new ones
                ref = None
        if ref is not None:
            return
        await supervise.kill_tagged(self._tag)  # a proxy whose PID was never recorded
        atomic_write(self.paths.config, config, mode=0o600)
        ref = await anyio.to_thread.run_sync(self._spawn)
        atomic_write(self.paths.process, ref.model_dump_json().encode(), mode=0o600)
        await self._wait_ready(ref)

    def _proxy_environment(self) -> dict[str, str]:
        """What the proxy inherits: the variables its env: sources name, and what Python needs; not the rest
        of the server's environment (its HTTP token, other credentials)."""
        names = {spec.source[4:] for spec in self.specs.values() if spec.source.startswith("env:")}
        keep = names | {"PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "SSL_CERT_FILE", "SSL_CERT_DIR"}
        return {k: v for k, v in os.environ.items() if k in keep}

    def _spawn(self) -> supervise.ProcessRef:
        """Start the proxy, its output appended to its log (kept across restarts; the proxy moves it to
        proxy.log.1 whenever it passes the console log's size)."""
        log_path = self.paths.log
        argv = [sys.executable, "-m", "sandbox_mcp.secrets.supervisor", str(self.paths.root)]
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            return supervise.spawn(argv, log_path, env=self._proxy_environment(), tag=self._tag, stdout=fd)
        finally:
            os.close(fd)

    async def _wait_ready(self, ref: supervise.ProcessRef) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        address = (str(self.settings.host_ip), self.proxy.port)
        while time.monotonic() < deadline and supervise.alive(ref):
            with contextlib.suppress(OSError):
                with socket.create_connection(address, timeout=0.5):
                    return
            await anyio.sleep(0.05)
        tail = ""
        with contextlib.suppress(OSError):
            tail = self.paths.log.read_text(errors="replace")[-2000:]
        raise BackendError(f"the secrets proxy did not start listening on {address[0]}:{address[1]} (is the port "
                           f"taken? secrets_proxy.port); its log:\n{tail}")

    async def _stop(self, ref: supervise.ProcessRef | None) -> None:
        await supervise.terminate(ref, grace_s=5, marker=self._marker())
        await supervise.kill_tagged(self._tag)
        self.paths.process.unlink(missing_ok=True)

    async def stop_proxy(self, *, only_if_idle: bool = False) -> None:
        """End the proxy (and its worker) if it runs; with ``only_if_idle``, only when no workspace uses it."""
        if self.paths.process.exists():
            async with async_file_lock(self.paths.root / "lock"):
                if not (only_if_idle and self.paths.client_ips()):
                    await self._stop(self._running())

    def proxy_running(self) -> supervise.ProcessRef | None:
        """The proxy's supervisor process, if it runs."""
        return self._running()

    # Inside the workspace ------------------------------------------------------------------------

    def inside_script(self, placeholders: Mapping[str, str]) -> str | None:
        """The root shell script that writes the workspace's environment and git configuration (None: nothing)."""
        known = {n: p for n, p in placeholders.items() if n in self.specs}
        if not known:
            return None
        env = workspace_environment(self.specs, known, self.settings.host_ip, self.proxy.port)
        block = "\n".join([_BEGIN, *(f"{k}={v}" for k, v in env.items()), _END]) + "\n"
        # sshd runs without PAM and takes a session's environment from SetEnv, whose first line wins whole:
        # this drop-in sorts before the image's and repeats its variables.
        base = claude_workspace.environment_lines(self.settings.user)
        setenv = "SetEnv " + " ".join([*base, *(f"{k}={v}" for k, v in env.items())]) + "\n"
        git = _gitconfig(self.specs, known, self.settings.host_ip, self.proxy.port)
        b64 = base64.b64encode
        return "\n".join([
            "set -e",
            "umask 022",
            "mkdir -p /etc/sandbox-mcp",
            f"sed -i '/^{_BEGIN}$/,/^{_END}$/d' /etc/environment",
            f"printf %s {b64(block.encode()).decode()} | base64 -d >> /etc/environment",
            f"printf %s {b64(git.encode()).decode()} | base64 -d > {GITCONFIG_INSIDE}",
            f"printf %s {b64(setenv.encode()).decode()} | base64 -d > {SSHD_DROP_IN_INSIDE}",
            "sshd -t",
            "systemctl reload ssh.service",
            f"git config --system --get-all include.path | grep -qxF {GITCONFIG_INSIDE} || "
            f"git config --system --add include.path {GITCONFIG_INSIDE}",
        ])

    async def provision(self, run_as_root: object, placeholders: Mapping[str, str]) -> None:
        """Write the workspace's secrets files as root through ``run_as_root(script)`` (an awaitable that
        raises on failure).

        Raises:
            SSHError, BackendError: as ``run_as_root`` does.
        """
        script = self.inside_script(placeholders)
        if script is not None:
            await run_as_root(script)  # type: ignore[operator]


def check_script_result(exit_code: int | None, stderr: str) -> None:
    """Raise when the provisioning script failed inside.

    Raises:
        SSHError: it did not exit 0 (the message has its stderr tail).
    """
    if exit_code != 0:
        raise SSHError(f"writing the workspace's secrets configuration failed ({exit_code}): {stderr[-500:]}")

