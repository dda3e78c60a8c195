"""Each daemon user's own SSH client key: what lets `sandbox-mcp ssh` work for a user, in their workspaces only.

The server's client key opens every workspace, so it stays root's. For a user (a uid other than
root) the daemon keeps a key pair of that uid's own and authorises its public half only in the
workspaces that uid owns (their ``authorized_keys``, written at create and at every start). The
private key is handed over through the file system, where the kernel checks who reads it (the
copy is made at create and start, and whenever that uid connects and it is missing):

    <state>/.server/users/<uid>_ed25519    the key itself (root, 0600, in root's 0700 dir)
    <socket dir>/keys/                      root, 0711: anyone may pass, nobody may list
    <socket dir>/keys/<uid>/                owned by that uid, 0700
    <socket dir>/keys/<uid>/id_ed25519      a copy, owned by that uid, 0600

The socket's directory is used because every user of the daemon can reach it already (the state
dir may sit in root's home). The user owns their directory, so the daemon never follows what they
may have planted there: the copy is written to a new file (O_EXCL, O_NOFOLLOW), chowned through
its descriptor and renamed over whatever had the name. The CLI, as that user, pins the
workspace's host key from the daemon's answer (``ssh.known_hosts``) and runs OpenSSH with this key.
"""

from __future__ import annotations

import logging
import pwd
from pathlib import Path

from . import ssh
from .config import Settings
from .fsutil import atomic_write, own_dir

__all__ = ["UserKeys", "user_key_path"]

log = logging.getLogger(__name__)


def user_key_path(settings: Settings, uid: int) -> Path:
    """Where user ``uid`` finds their private key (the daemon's published copy)."""
    return settings.daemon_socket.parent / "keys" / str(uid) / "id_ed25519"


class UserKeys:
    """The per-uid client keys of one daemon (its state dir and socket dir)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store = settings.state_dir / ".server" / "users"

    def public_key(self, uid: int) -> str:
        """User ``uid``'s public key line, making the key pair and publishing its private half first.

        Raises:
            SSHError: the key cannot be made or read.
            OSError: the copy cannot be published (a directory planted at its name, say).
        """
        line = ssh.ensure_client_key(self._store / f"{uid}_ed25519")
        self._publish(uid)
        return line

    def ensure_published(self, uid: int) -> None:
        """Publish user ``uid``'s key unless its copy is in place (the daemon does this as they connect).

        Raises:
            SSHError, OSError: as :meth:`public_key`.
        """
        if not user_key_path(self.settings, uid).exists():
            self.public_key(uid)

    def _publish(self, uid: int) -> None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:  # an account gone since: the uid alone still owns the file
            gid = uid
        target = user_key_path(self.settings, uid)
        keys = target.parent.parent
        keys.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        own_dir(keys, 0, 0, 0o711)
        own_dir(target.parent, uid, gid, 0o700)
        private = (self._store / f"{uid}_ed25519").read_bytes()
        atomic_write(target, private, mode=0o600, owner=(uid, gid))
