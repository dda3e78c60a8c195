"""A stand-in for the internet the secrets tests (and bench) talk to: a network namespace of the test's own.

It holds its own CA and HTTPS servers: ``api.anthropic.test`` (198.51.100.2: records every request and
answers like the Messages API) and ``git.example.test`` (198.51.100.3: ``git http-backend`` behind a
check of the basic-auth token), plus ``evil.test`` (198.51.100.4: records what reaches it). Names under
``.test`` (RFC 6761) never resolve anywhere real; the proxy is told their addresses (secrets_proxy.resolve).
Every request a server receives is one JSON line in ``requests.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sandbox_mcp.bench.standin import SERVER, certificates

__all__ = ["ANTHROPIC", "EVIL", "GIT", "Internet", "internet"]

ANTHROPIC, GIT, EVIL = "api.anthropic.test", "git.example.test", "evil.test"
ADDRESSES = {ANTHROPIC: "198.51.100.2", GIT: "198.51.100.3", EVIL: "198.51.100.4"}
HOST_SIDE = "198.51.100.1"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@dataclass
class Internet:
    ca: Path
    log: Path
    repos: Path

    def requests(self, server: str | None = None) -> list[dict]:
        """Every request the stand-ins received so far (of ``server`` only, if given)."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        seen = [json.loads(line) for line in lines]
        return [r for r in seen if server is None or r["server"] == server]

    @property
    def resolve(self) -> dict[str, str]:
        return dict(ADDRESSES)


@contextmanager
def internet(directory: Path, git_token: str) -> Iterator[Internet]:
    """The namespace with its servers, torn down afterwards (also on failure). Needs root."""
    ns, host_if, ns_if = f"sbxt-in{os.getpid()}", f"sbxi{os.getpid() % 100000}", "sbxt-inu"
    directory.mkdir(parents=True, exist_ok=True)
    ca, cert, key = certificates(directory, list(ADDRESSES))
    repos = directory / "repos"
    _make_repo(repos / "project.git")
    log = directory / "requests.jsonl"
    _run("ip", "netns", "add", ns)
    server = None
    try:
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _run("ip", "addr", "add", f"{HOST_SIDE}/24", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        for ip in ADDRESSES.values():
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ns_if)
        _run("ip", "-n", ns, "link", "set", ns_if, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(cert), str(key), str(log), str(repos),
             git_token, json.dumps({n: ip for n, ip in ADDRESSES.items()})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield Internet(ca=ca, log=log, repos=repos)
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)


def _make_repo(bare: Path) -> None:
    work = bare.with_name("work")
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_SYSTEM": "/dev/null",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True, env=env)
    (work / "README").write_text("cloned through the secrets proxy\n")
    subprocess.run(["git", "-C", str(work), "add", "README"], check=True, env=env)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "first"], check=True, env=env)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, env=env)
