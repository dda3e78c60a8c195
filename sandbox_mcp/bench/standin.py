"""HTTPS stand-ins for the services secrets go to: a CA of their own and a small server (bench and tests).

:func:`certificates` makes a CA and a server certificate it signed; :data:`SERVER` is a Python script
(run with ``python -c SERVER CERT KEY LOG REPOS TOKEN ADDRESSES``, ``ADDRESSES`` a JSON object of
name -> "ip[:port]") serving HTTPS on each address: it records every request as a JSON line in LOG,
answers like the Anthropic Messages API, serves ``/bytes/N`` (N bytes), and for the name
``git.example.test`` runs ``git http-backend`` over REPOS behind a check of basic auth with TOKEN.
Nothing here reaches any real address: callers bind it to loopback or a namespace of their own.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["SERVER", "certificates"]

SERVER = r"""
import base64, json, os, ssl, subprocess, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

cert, key, log_path, repos, token = sys.argv[1:6]
addresses = json.loads(sys.argv[6])
lock = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers do: headers and body go out at once
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
        if self.path.startswith("/stream"):  # server-sent events; the second waits for LOG + ".release"
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(b"event: one\ndata: {}\n\n")
            self.wfile.flush()
            for _ in range(300):
                if os.path.exists(log_path + ".release"):
                    break
                time.sleep(0.1)
            self.wfile.write(b"event: two\ndata: {}\n\n")
            self.close_connection = True
            return
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
for name, address in addresses.items():
    ip, _, port = address.partition(":")
    s = ThreadingHTTPServer((ip, int(port or 443)), Handler)
    s.daemon_threads = True
    s.name = name
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    servers.append(s)
print("ready", flush=True)
sys.stdin.read()
"""



def certificates(directory: Path, names: Sequence[str], ips: Sequence[str] = ()) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for ``names`` (and ``ips``): (ca, cert, key) PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
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
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([*(x509.DNSName(n) for n in names), *(x509.IPAddress(ipaddress.ip_address(a)) for a in ips)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths
