"""Imported first by the ssh package, before anything imports asyncssh.

asyncssh still names DSA key types (which nothing here uses); cryptography 51 warns about that
when asyncssh is imported, on stderr, where the CLI's ``exec`` passes on the workspace's own
stderr. That one warning is silenced; every other stays.
"""

from __future__ import annotations

import warnings

__all__: list[str] = []

warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh\.")
