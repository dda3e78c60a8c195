"""A private Incus daemon for the tests: its own state dir, a ``dir`` pool, stopped by PID afterwards.

It runs in the test's network namespace (the one ``scripts/test`` made), so instance NICs join
the test bridge, but in a mount namespace of its own with a fresh sysfs: Incus looks for a NIC's
parent bridge in ``/sys/class/net``, and the sysfs inherited from the host shows the host's
network namespace, not ours. Its mounts die with it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

INCUSD = Path("/usr/libexec/incus/incusd")

_LAUNCH = """
set -e
mount --rbind /sys/fs/cgroup "$1"
mount -t sysfs sysfs /sys
mount --move "$1" /sys/fs/cgroup
exec "$2" --group root
"""


def skip_reason() -> str | None:
    """Why real Incus tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "Incus tests need root (they run incusd)"
    if not INCUSD.exists():
        return ("incusd is not installed (Debian: bookworm-backports incus-base; "
                "SANDBOX_MCP_SETUP_INCUS=1 scripts/setup adds it)")
    if os.environ.get("SANDBOX_MCP_TEST_ISOLATED") != "1":
        return "Incus tests run only inside the private network namespace made by ./scripts/test"
    return None


@dataclass
class IncusDaemon:
    """A running private incusd."""

    dir: Path
    process: subprocess.Popen[bytes]
    https_port: int | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "unix.socket"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.crt"

    def api(self, method: str, path: str, body: object = None) -> dict:
        """A synchronous API call over the unix socket (set-up and inspection only; no CLI)."""
        import json

        import httpx2

        with httpx2.Client(transport=httpx2.HTTPTransport(uds=str(self.socket)), base_url="http://incus",
                           timeout=120) as http:
            r = http.request(method, path, json=body)
            data = r.json()
            if data.get("type") == "async":
                op = data["operation"]
                data = http.get(f"{op}/wait", params={"timeout": "120"}).json()
                meta = data.get("metadata") or {}
                assert meta.get("status") == "Success", json.dumps(meta)[:500]
            assert data.get("type") != "error", f"{method} {path}: {data.get('error')}"
            return data

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until the API answers (a readiness wait on a real event, not a fixed delay)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                log = (self.dir.parent / "incusd.log").read_text()[-2000:]
                raise RuntimeError(f"incusd exited with {self.process.returncode}: {log}")
            with contextlib.suppress(Exception):
                if self.api("GET", "/1.0")["metadata"]["auth"] == "trusted":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("incusd did not become ready")
            time.sleep(0.2)

    def listen_https(self) -> int:
        """Make the daemon listen on 127.0.0.1 (a free port); the port."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.api("PATCH", "/1.0", {"config": {"core.https_address": f"127.0.0.1:{port}"}})
        self.https_port = port
        return port

    def trust(self, cert_pem: Path, name: str) -> None:
        """Trust a client certificate (``incus config trust add-certificate``)."""
        der = ssl.PEM_cert_to_DER_cert(cert_pem.read_text())
        self.api("POST", "/1.0/certificates",
                 {"type": "client", "name": name, "certificate": base64.b64encode(der).decode()})

    def cleanup_instances(self) -> None:
        """Force-delete every instance and custom volume left (a failed test's), so incusd can stop."""
        for url in self.api("GET", "/1.0/instances")["metadata"]:
            with contextlib.suppress(AssertionError):
                self.api("PUT", f"{url}/state", {"action": "stop", "force": True})
            with contextlib.suppress(AssertionError):
                self.api("DELETE", url)
        for url in self.api("GET", "/1.0/storage-pools/default/volumes/custom")["metadata"]:
            with contextlib.suppress(AssertionError):
                self.api("DELETE", url)

    def stop(self) -> None:
        """End the daemon we started, by its PID: SIGPWR (it stops its instances), then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGPWR)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(base: Path) -> IncusDaemon:
    """Start a private incusd under ``base`` with a ``dir`` storage pool named ``default``."""
    state = base / "incus"
    cgroup_hold = base / "cgroup-hold"
    state.mkdir(parents=True, mode=0o711)
    cgroup_hold.mkdir()
    log = open(base / "incusd.log", "wb")  # noqa: SIM115 - the daemon writes it while it runs
    env = {**os.environ, "INCUS_DIR": str(state)}
    process = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _LAUNCH, "sh",
         str(cgroup_hold), str(INCUSD)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    log.close()
    daemon = IncusDaemon(dir=state, process=process)
    try:
        daemon.wait_ready()
        daemon.api("POST", "/1.0/storage-pools", {"name": "default", "driver": "dir", "config": {}})
    except BaseException:
        daemon.stop()
        raise
    return daemon


def remove(base: Path) -> None:
    """Remove what the daemon left on disk (after :meth:`IncusDaemon.stop`)."""
    shutil.rmtree(base, ignore_errors=True)
