"""A private Incus daemon for the tests and the benchmark: its own state dir, a ``dir`` pool, stopped by PID.

It runs in the caller's network namespace (the private one of ``scripts/test`` or ``bench``), so
instance NICs join the bridge there, but in a mount namespace of its own with a fresh sysfs:
Incus looks for a NIC's parent bridge in ``/sys/class/net``, and the sysfs inherited from the
host shows the host's network namespace, not ours. Its mounts die with it. The server never
starts a daemon: in production incusd is the host's (or a remote one).
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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BackendError
from .api import call_sync
from .settings import IncusSettings

__all__ = ["INCUSD", "PrivateIncusd", "default_driver", "missing_reason", "remove", "start"]

INCUSD = Path("/usr/libexec/incus/incusd")

_LAUNCH = """
set -e
mount --rbind /sys/fs/cgroup "$1"
mount -t sysfs sysfs /sys
mount --move "$1" /sys/fs/cgroup
exec "$2" --group root
"""


def missing_reason() -> str | None:
    """Why a private incusd cannot run here, or None."""
    if os.geteuid() != 0:
        return "a private incusd needs root"
    if not INCUSD.exists():
        return ("incusd is not installed (Debian: bookworm-backports incus-base; "
                "SANDBOX_MCP_SETUP_INCUS=1 scripts/setup adds it)")
    return None


@dataclass
class PrivateIncusd:
    """A running private incusd under ``base`` (its state in ``base/incus``)."""

    base: Path
    process: subprocess.Popen[bytes]
    driver: str = "dir"
    https_port: int | None = None

    @property
    def dir(self) -> Path:
        return self.base / "incus"

    @property
    def settings(self) -> IncusSettings:
        """Settings that reach this daemon over its unix socket."""
        return IncusSettings(socket=self.socket)

    @property
    def socket(self) -> Path:
        return self.dir / "unix.socket"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.crt"

    def api(self, method: str, path: str, body: object = None) -> Any:
        """A blocking API call over the unix socket, waiting for its operation; its metadata.

        Raises:
            BackendError: Incus refused or cannot be reached.
        """
        return call_sync(self.settings, method, path, body)

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until the API answers (a readiness wait on a real event, not a fixed delay)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                log = (self.base / "incusd.log").read_text()[-2000:]
                raise BackendError(f"incusd exited with {self.process.returncode}: {log}")
            with contextlib.suppress(BackendError):
                if self.api("GET", "/1.0")["auth"] == "trusted":
                    return
            if time.monotonic() > deadline:
                raise BackendError(f"incusd did not become ready within {timeout_s:g} s")
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
        for url in self.api("GET", "/1.0/instances"):
            with contextlib.suppress(BackendError):
                self.api("PUT", f"{url}/state", {"action": "stop", "force": True})
            with contextlib.suppress(BackendError):
                self.api("DELETE", url)
        for url in self.api("GET", "/1.0/storage-pools/default/volumes/custom"):
            with contextlib.suppress(BackendError):
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


def default_driver(proc: Path = Path("/proc")) -> str:
    """``btrfs`` where the kernel and btrfs-progs have it, else ``dir``.

    On btrfs an instance is a snapshot of the image (a quarter of a second here); a ``dir`` pool
    unpacks the image for every instance (seconds).
    """
    try:
        filesystems = (proc / "filesystems").read_text()
    except OSError:
        filesystems = ""
    return "btrfs" if shutil.which("mkfs.btrfs") and "\tbtrfs" in filesystems else "dir"


def start(base: Path | None = None, driver: str | None = None) -> PrivateIncusd:
    """Start a private incusd with a storage pool named ``default``; stop it with :meth:`PrivateIncusd.stop`.

    ``driver``: the pool's (``dir`` or ``btrfs`` on a loop file); by default :func:`default_driver`.

    ``base`` defaults to a new directory under /var/tmp: not under a 0700 temp dir, because the
    unprivileged container's root must traverse to its rootfs below the daemon's dir.

    Raises:
        BackendError: incusd is missing or did not come up.
    """
    reason = missing_reason()
    if reason:
        raise BackendError(reason)
    if base is None:
        base = Path(tempfile.mkdtemp(prefix="sbx-incusd-", dir="/var/tmp"))
    base.chmod(0o711)
    state = base / "incus"
    cgroup_hold = base / "cgroup-hold"
    state.mkdir(parents=True, mode=0o711)
    cgroup_hold.mkdir()
    env = {**os.environ, "INCUS_DIR": str(state)}
    with open(base / "incusd.log", "wb") as log:
        process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _LAUNCH, "sh",
             str(cgroup_hold), str(INCUSD)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    driver = driver or default_driver()
    daemon = PrivateIncusd(base=base, process=process, driver=driver)
    # btrfs: a loop file in the daemon's dir (removed with it); instances are snapshots of the image.
    pool_config = {"size": "8GiB"} if driver == "btrfs" else {}
    try:
        daemon.wait_ready()
        daemon.api("POST", "/1.0/storage-pools", {"name": "default", "driver": driver, "config": pool_config})
    except BaseException:
        daemon.stop()
        raise
    return daemon


def remove(daemon: PrivateIncusd) -> None:
    """Remove what a stopped daemon left on disk."""
    shutil.rmtree(daemon.base, ignore_errors=True)
