"""A stand-in for the internet the secrets tests (and bench) talk to: a network namespace of the test's own.

It holds its own CA and HTTPS servers: ``api.anthropic.test`` (198.51.100.2: records every request and
answers like the Messages API) and ``git.example.test`` (198.51.100.3: ``git http-backend`` behind a
check of the basic-auth token), plus ``evil.test`` (198.51.100.4: records what reaches it). Names under
``.test`` (RFC 6761) never resolve anywhere real; the proxy is told their addresses (secrets_proxy.resolve).
Every request a server receives is one JSON line in ``requests.jsonl``.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["ANTHROPIC", "EVIL", "GIT", "Internet", "internet"]

ANTHROPIC, GIT, EVIL = "api.anthropic.test", "git.example.test", "evil.test"
ADDRESSES = {ANTHROPIC: "198.51.100.2", GIT: "198.51.100.3", EVIL: "198.51.100.4"}
HOST_SIDE = "198.51.100.1"

SERVER = r"""
import base64, json, os, ssl, subprocess, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

cert, key, log_path, repos, token = sys.argv[1:6]
addresses = json.loads(sys.argv[6])
lock = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args): pass
    def _record(self, body):
        with lock, open(log_path, "a") as f:
            f.write(json.dumps({"server": self.server.name, "method": self.command, "path": self.path,
                                "headers": {k.lower(): v for k, v in self.headers.items()},
                                "body": body.decode("latin-1")[:2000]}) + "\n")
    def _body(self):
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""
    def _send(self, status, body, ctype="application/json", extra=()):
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self): self.handle_any()
    def do_POST(self): self.handle_any()
    def handle_any(self):
        body = self._body()
        self._record(body)
        if self.server.name == "git.example.test":
            return self.git(body)
        if self.path.startswith("/bytes/"):
            return self._send(200, b"x" * int(self.path.split("/")[2]), "application/octet-stream")
        self._send(200, json.dumps({"type": "message", "role": "assistant",
                                    "content": [{"type": "text", "text": "hello from the stand-in"}]}).encode())
    def git(self, body):
        auth = self.headers.get("authorization", "")
        want = "Basic " + base64.b64encode(("x-access-token:" + token).encode()).decode()
        if auth != want:
            return self._send(401, b"no\n", "text/plain", [("www-authenticate", 'Basic realm="git"')])
        url = urlsplit(self.path)
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": repos, "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": url.path, "QUERY_STRING": url.query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("content-type", ""), "REMOTE_USER": "x-access-token",
               "CONTENT_LENGTH": str(len(body))}
        if self.headers.get("content-encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["content-encoding"]
        if self.headers.get("git-protocol"):
            env["GIT_PROTOCOL"] = self.headers["git-protocol"]
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        status, headers = 200, []
        for line in head.decode().split("\r\n"):
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers.append((k, v.strip()))
        ctype = dict((k.lower(), v) for k, v in headers).get("content-type", "application/octet-stream")
        self._send(status, rest, ctype, [(k, v) for k, v in headers if k.lower() not in ("content-type", "content-length")])

ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(cert, key)
servers = []
for name, ip in addresses.items():
    s = ThreadingHTTPServer((ip, 443), Handler)
    s.daemon_threads = True
    s.name = name
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    servers.append(s)
print("ready", flush=True)
sys.stdin.read()
"""


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for every stand-in name: (ca, cert, key) PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandbox-mcp test internet CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ANTHROPIC)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in ADDRESSES]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


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
    ca, cert, key = _certificates(directory)
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
