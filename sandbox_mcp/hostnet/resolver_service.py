"""The egress resolver's host side: its policy file, and the process, supervised like the rest.

One resolver per bridge (:mod:`.resolver`) serves every workspace with a domain list. Its policy file
(``<state>/.server/resolver-BRIDGE.json``: listen address, upstreams, bounds, and per workspace
address its nftables set and list) is the record of which workspaces have lists; :class:`ResolverService`
rewrites it (atomically: the resolver reads it again on its next query) whenever a workspace is admitted,
changes policy or goes. The process is started with the first workspace that has a list, started again
when it is found dead (every admit checks, and the server's watchdog every few seconds:
:mod:`sandbox_mcp.manager.watchdog`; its own supervisor restarts a dead worker at once), and
stopped with the last such workspace. It is a tagged, detached process (:mod:`sandbox_mcp.supervise`),
so it outlives a server restart, as the workspaces do, and a later server finds it by its PID file or
its tag, never leaving an orphan. Call everything under :class:`~.netlink.HostNetwork`'s firewall lock.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from .. import supervise
from ..config import Settings, upstream_addresses
from ..errors import BackendError
from ..fsutil import atomic_write, write_in_place
from .egress_sets import domain_set
from .firewall import table_name

__all__ = ["ResolverService"]

_MARKER = b"sandbox_mcp.hostnet.resolver"
_READY_TIMEOUT_S = 10.0


class ResolverService:
    """The resolver of ``settings.bridge`` for the server with ``settings.state_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        base = settings.state_dir / ".server"
        self.config_path = base / f"resolver-{settings.bridge}.json"
        self.pid_path = base / f"resolver-{settings.bridge}.pid.json"
        self.log_path = base / f"resolver-{settings.bridge}.log"
        self.tag = supervise.workspace_tag(settings.state_dir, f"resolver:{settings.bridge}")

    # -- the policy file ------------------------------------------------------------------------

    def workspaces(self) -> dict[str, dict[str, Any]]:
        """Address -> ``{"port", "set", "domains"}`` for each workspace with a list, as the file has it."""
        try:
            return dict(json.loads(self.config_path.read_text()).get("workspaces", {}))
        except (OSError, ValueError):
            return {}

    def _write(self, workspaces: dict[str, dict[str, Any]]) -> None:
        s = self.settings
        config = {
            "listen": str(s.host_ip),
            "port": s.egress_dns_port,
            "upstreams": [[str(a), p] for a, p in upstream_addresses(s)],
            "table": table_name(s.bridge),
            "ttl_min_s": s.egress_ttl_min_s,
            "ttl_max_s": s.egress_ttl_max_s,
            "rate": s.egress_dns_rate,
            "workspaces": workspaces,
        }
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        # In place: the resolver, no longer root, reads it through the fd it opened at its start.
        write_in_place(self.config_path, json.dumps(config, indent=1, sort_keys=True) + "\n", mode=0o600)

    async def set_policy(self, port: str, ip: str, domains: list[str] | None) -> None:
        """Record ``domains`` for the workspace behind ``port`` (None: it has no list any more), then start
        the resolver (a list given) or stop it (no list left).

        Raises:
            BackendError: the resolver did not start (the lists stay recorded).
        """
        before = self.workspaces()
        current = {a: w for a, w in before.items() if w.get("port") != port and a != ip}
        if domains is not None:
            current[ip] = {"port": port, "set": domain_set(port), "domains": list(domains)}
        elif current == before and not self.pid_path.exists():
            return  # a workspace without a list going, with no resolver: the common stop costs a file read
        if current or self.config_path.exists():
            self._write(current)
        if not current:
            await self.stop()
        elif domains is not None:
            await self.ensure_running()
        # else a list went and others stay: their resolver runs on, or (found dead) the watchdog or the next
        # admit starts it again; a workspace's removal never fails on it

    # -- the process ----------------------------------------------------------------------------

    def process(self) -> supervise.ProcessRef | None:
        """The running resolver (its supervisor), or None."""
        with contextlib.suppress(OSError, ValueError):
            ref = supervise.ProcessRef.model_validate_json(self.pid_path.read_text())
            if supervise.alive(ref, None) and _is_resolver(ref.pid):
                return ref
        return None

    async def ensure_running(self) -> None:
        """Start the resolver if it is not running (a cheap check when it is).

        Raises:
            BackendError: it exited at once, or did not listen within 10 s (the message has its log).
        """
        if self.process() is not None:
            return
        await supervise.kill_tagged(self.tag)  # a supervisor whose PID file was lost, or a worker left alone
        argv = [sys.executable, "-m", "sandbox_mcp.hostnet.resolver", str(self.config_path)]
        ref = await anyio.to_thread.run_sync(lambda: supervise.spawn(argv, self.log_path, tag=self.tag))
        atomic_write(self.pid_path, ref.model_dump_json())
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while not await anyio.to_thread.run_sync(self._listening):
            if not supervise.alive(ref) or time.monotonic() > deadline:
                await self._end()  # the policy file stays: the workspaces' lists, for the next try
                raise BackendError(
                    f"the egress resolver did not start on {self.settings.host_ip}:{self.settings.egress_dns_port}: "
                    f"{_tail(self.log_path)}; if something else holds that port, set egress_dns_port"
                )
            await anyio.sleep(0.05)

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(
            (str(self.settings.host_ip), self.settings.egress_dns_port), timeout=0.5
        ):
            return True
        return False

    async def stop(self) -> None:
        """End the resolver (supervisor and worker) if it runs; remove its files."""
        await self._end()
        with contextlib.suppress(FileNotFoundError):
            self.config_path.unlink()

    async def _end(self) -> None:
        """End the resolver's processes, if any, and its PID file; the policy file stays."""
        ref = self.process()
        if ref is not None:
            await supervise.terminate(ref, grace_s=2.0)
        await supervise.kill_tagged(self.tag)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()


def _is_resolver(pid: int) -> bool:
    try:
        return _MARKER in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-5:]) or "no output"
