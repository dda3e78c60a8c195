"""Imported first by the ssh package, before anything imports asyncssh.

asyncssh still names the DSA key classes in its type hints, and cryptography 47+ deprecates
touching them: five CryptographyDeprecationWarning blocks at import, on stderr, where the CLI's
``exec`` passes on the workspace's own stderr. We never generate, offer or accept DSA (keys are
ed25519; ``connect`` pins the host key and its algorithm), so that one warning, from asyncssh's
modules only, is noise. Kept for the process's life: asyncssh may touch the names lazily too.
Every other warning still shows (the CLI tests run with ``-W error``).
"""

from __future__ import annotations

import warnings

from cryptography.utils import CryptographyDeprecationWarning

__all__: list[str] = []

warnings.filterwarnings(
    "ignore", message=r"DSA is deprecated", category=CryptographyDeprecationWarning, module=r"asyncssh(\.|$)"
)
