"""SSH keys on the host: the server's client key, each workspace's pinned host key, known hosts.

Keys are ed25519, generated once and never replaced; files are complete before they appear.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import asyncssh

from ..errors import InvalidSpec, SSHError, clip_repr
from ..fsutil import atomic_write, write_new

__all__ = [
    "ensure_client_key",
    "ensure_host_key",
    "host_key_fingerprint",
    "known_hosts_line",
    "load_private_key",
    "load_public_key",
    "write_authorized_keys",
]

_PUB_SUFFIX = ".pub"


def _pub_path(path: Path) -> Path:
    return path.with_name(path.name + _PUB_SUFFIX)


def _ensure_key(path: Path, comment: str) -> asyncssh.SSHKey:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not path.exists():
            key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
            write_new(path, key.export_private_key("openssh"), 0o600)
        # Load what is on disk: if another process won the race, its key is the one that counts.
        key = asyncssh.read_private_key(path)
        pub = _pub_path(path)
        if not pub.exists():
            write_new(pub, key.export_public_key("openssh"), 0o644)
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise SSHError(f"cannot create or read the SSH key {path}: {exc}") from exc
    return key


def ensure_host_key(path: Path) -> str:
    """Make sure a workspace host key (ed25519) exists at ``path``; return its SHA256 fingerprint.

    A missing key is generated and written 0600 with its public half at ``path.pub`` (0644),
    creating parent directories (0755). An existing key is loaded, never replaced.

    Raises:
        SSHError: the key cannot be written, or the existing file is not a readable private key.
    """
    return _ensure_key(path, "sandbox-mcp host key").get_fingerprint("sha256")


def ensure_client_key(path: Path) -> str:
    """Make sure the server's own client key (ed25519) exists at ``path``; return its public key line.

    Same rules as :func:`ensure_host_key`; the result (``ssh-ed25519 AAAA... sandbox-mcp``)
    goes into each workspace's ``authorized_keys``.

    Raises:
        SSHError: the key cannot be written, or the existing file is not a readable private key.
    """
    key = _ensure_key(path, "sandbox-mcp")
    return key.export_public_key("openssh").decode().strip()


def load_public_key(path: Path) -> asyncssh.SSHKey:
    """The public key in ``path``: a public key file, or a private key file.

    Raises:
        SSHError: the file is missing or holds no key.
    """
    try:
        try:
            return asyncssh.read_public_key(path)
        except asyncssh.KeyImportError:
            return asyncssh.read_private_key(path).convert_to_public()
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise SSHError(f"cannot read the SSH key {path}: {exc}") from exc


def load_private_key(path: Path) -> asyncssh.SSHKey:
    """The private key in ``path``.

    Raises:
        SSHError: the file is missing or holds no private key.
    """
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise SSHError(f"cannot read the SSH client key {path}: {exc}") from exc


def host_key_fingerprint(pub_or_priv_path: Path) -> str:
    """The SHA256 fingerprint (``SHA256:...``) of the key in a public or private key file.

    Raises:
        SSHError: the file is missing or holds no key.
    """
    return load_public_key(Path(pub_or_priv_path)).get_fingerprint("sha256")


def write_authorized_keys(path: Path, public_key_lines: Sequence[str]) -> None:
    """Atomically write ``path`` (0644) with one public key per line.

    Raises:
        InvalidSpec: a line is not a single OpenSSH public key.
        SSHError: the file cannot be written.
    """
    lines = []
    for line in public_key_lines:
        line = line.strip()
        if not line or "\n" in line or "\r" in line:
            raise InvalidSpec(f"not a single public key line: {clip_repr(line)}")
        try:
            asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise InvalidSpec(f"not an OpenSSH public key: {line[:60]!r}: {exc}") from exc
        lines.append(line + "\n")
    try:
        Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(Path(path), "".join(lines), mode=0o644)
    except OSError as exc:
        raise SSHError(f"cannot write {path}: {exc}") from exc


def _known_hosts_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(host: str, host_pubkey_path: Path, port: int = 22) -> str:
    """The ``known_hosts`` line that pins the key in ``host_pubkey_path`` for ``host`` (and ``port``).

    Raises:
        SSHError: the key file is missing or holds no key.
    """
    algo, b64 = load_public_key(Path(host_pubkey_path)).export_public_key("openssh").decode().split()[:2]
    return f"{_known_hosts_pattern(host, port)} {algo} {b64}"
