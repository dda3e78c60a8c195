"""A stand-in "internet" for egress tests: an authoritative DNS server and HTTP servers, run in a network
namespace the test makes (never any real address).

Run as ``python dns_world.py ZONE_JSON``: ZONE_JSON maps names to ``["A", address, ttl]`` or
``["CNAME", target, ttl]``; the DNS server listens on every address given with ``--dns`` (UDP and TCP
port 53), an HTTP server on port 80 of each ``--http`` address answers ``hello from ADDRESS``.
Every DNS query it gets is printed (``query NAME TYPE``), so a test can show a name never left the host.
"""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import socketserver
import sys
import threading

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def answer(zone: dict[str, list], wire: bytes) -> bytes:
    query = dns.message.from_wire(wire)
    reply = dns.message.make_response(query)
    reply.flags |= 0x0400  # AA
    q = query.question[0]
    name = q.name.to_text(omit_final_dot=True).lower()
    print(f"query {name} {dns.rdatatype.to_text(q.rdtype)}", flush=True)
    seen = 0
    while name in zone and seen < 8:
        kind, value, ttl = zone[name]
        owner = name + "."
        if kind == "CNAME":
            reply.answer.append(dns.rrset.from_text(owner, ttl, "IN", "CNAME", value + "."))
            name, seen = value, seen + 1
            continue
        if q.rdtype == dns.rdatatype.A:
            reply.answer.append(dns.rrset.from_text(owner, ttl, "IN", "A", value))
        break
    else:
        if not reply.answer:
            reply.set_rcode(dns.rcode.NXDOMAIN)
    return reply.to_wire()


def serve_dns(zone: dict[str, list], address: str) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((address, 53))
    tcp = socket.socket()
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((address, 53))
    tcp.listen(16)

    def tcp_loop() -> None:
        while True:
            c, _ = tcp.accept()
            with c:
                n = int.from_bytes(c.recv(2), "big")
                data = b""
                while len(data) < n:
                    data += c.recv(n - len(data))
                out = answer(zone, data)
                c.sendall(len(out).to_bytes(2, "big") + out)

    threading.Thread(target=tcp_loop, daemon=True).start()
    while True:
        data, peer = udp.recvfrom(4096)
        udp.sendto(answer(zone, data), peer)


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = f"hello from {self.server.server_address[0]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("zone")
    p.add_argument("--dns", action="append", default=[])
    p.add_argument("--http", action="append", default=[])
    args = p.parse_args()
    zone = json.loads(args.zone)
    for address in args.http:
        server = socketserver.ThreadingTCPServer((address, 80), _Hello)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for address in args.dns[1:]:
        threading.Thread(target=serve_dns, args=(zone, address), daemon=True).start()
    print("ready", flush=True)
    serve_dns(zone, args.dns[0])


if __name__ == "__main__":
    sys.exit(main())
