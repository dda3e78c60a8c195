"""The egress resolver's answer time: ``sandbox-mcp bench --egress also|only|no``.

No workspace boots: the figures are the resolver's own. In the bench's private namespace the bridge
and our tables are made, a stand-in workspace address is put on the bridge (the resolver knows a
workspace by its source address) and admitted with a domain list, which starts the real resolver
process. A stand-in upstream (a small authoritative server, dnspython, on loopback) answers every name
below ``bench.test`` with an A record. Measured, each as p50/p95 of the same client's queries:

* ``direct``: the stand-in asked directly (the baseline: what the upstream alone costs);
* ``allowed_new``: a fresh allowed name through the resolver: upstream + the nft set insertion;
* ``allowed_repeat``: the same allowed name again (the set element's timeout refreshed);
* ``refused``: a name off the list (answered at once, nothing sent upstream).
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from typing import Any

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset

from .. import hostcmd
from ..config import Settings
from ..hostnet import HostNetwork

__all__ = ["format_egress", "run_egress"]

_PORT = "sb-benchdns"  # a port name no workspace has (names are at most 12 characters + "sb-")


class _StandIn:
    """An authoritative server for ``*.bench.test`` on 127.0.0.1 (UDP), in a thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            q = query.question[0]
            if q.rdtype == dns.rdatatype.A:
                n = sum(q.name.to_text().encode()) % 250 + 1
                reply.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", f"203.0.113.{n}"))
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


def _ask(server: str, port: int, name: str, source: str | None) -> tuple[float, int]:
    query = dns.message.make_query(name, dns.rdatatype.A)
    t0 = time.perf_counter()
    reply = dns.query.udp(query, server, port=port, timeout=5, source=source)
    return (time.perf_counter() - t0) * 1000, reply.rcode()


def _figures(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": statistics.median(values), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}


async def run_egress(settings: Settings, queries: int) -> dict[str, Any]:
    """The figures (milliseconds); everything made is removed again."""
    import anyio

    stand_in = _StandIn()
    s = settings.model_copy(update={"nat": True, "egress_dns_upstreams": [f"127.0.0.1:{stand_in.port}"]})
    network = HostNetwork(s)
    source = str(s.subnet.network_address + 200)
    try:
        await network.ensure()
        await hostcmd.run(["ip", "addr", "add", f"{source}/32", "dev", s.bridge], timeout_s=10)
        await network.admit(_PORT, source, "02:00:00:be:4c:01", egress=["*.bench.test"])
        host, port = str(s.host_ip), s.egress_dns_port

        def measure() -> dict[str, Any]:
            for i in range(5):  # warm both paths (imports, first nft run)
                _ask("127.0.0.1", stand_in.port, f"warm{i}.bench.test", None)
                _ask(host, port, f"warm{i}.bench.test", source)
            out: dict[str, Any] = {}
            out["direct"] = _figures([_ask("127.0.0.1", stand_in.port, f"d{i}.bench.test", None)[0]
                                      for i in range(queries)])
            rcodes: dict[str, set[int]] = {}
            for key, name in (("allowed_new", "n{}.bench.test"), ("allowed_repeat", "same.bench.test"),
                              ("refused", "x{}.elsewhere.test")):
                times = []
                for i in range(queries):
                    ms, rcode = _ask(host, port, name.format(i), source)
                    times.append(ms)
                    rcodes.setdefault(key, set()).add(rcode)
                    time.sleep(1 / 40)  # under a workspace's rate (50/s): REFUSED answers would flatter it
                out[key] = _figures(times)
            out["answers_as_expected"] = float(
                rcodes["allowed_new"] == rcodes["allowed_repeat"] == {dns.rcode.NOERROR}
                and rcodes["refused"] == {dns.rcode.NXDOMAIN}
            )
            out["allowed_new_over_direct_p50"] = out["allowed_new"]["p50"] / out["direct"]["p50"]
            out["queries"] = float(queries)
            return out

        return await anyio.to_thread.run_sync(measure)
    finally:
        await network.revoke(_PORT)
        await network.retire()
        stand_in.close()
        await hostcmd.run(["ip", "addr", "del", f"{source}/32", "dev", s.bridge], timeout_s=10, check=False)


def format_egress(results: dict[str, Any]) -> str:
    """The section as people read it."""
    lines = ["egress resolver (ms, p50 / p95; a stand-in upstream on loopback):"]
    for key, label in (("direct", "direct to the upstream (baseline)"),
                       ("allowed_new", "allowed name, new (upstream + nft set)"),
                       ("allowed_repeat", "allowed name, repeated (timeout refreshed)"),
                       ("refused", "name off the list (NXDOMAIN, no upstream)")):
        f = results[key]
        lines.append(f"  {label:<46} {f['p50']:7.2f} / {f['p95']:7.2f}")
    lines.append(f"  allowed new / direct (p50): {results['allowed_new_over_direct_p50']:.1f}x"
                 + ("" if results["answers_as_expected"] else "  (SOME ANSWERS WERE WRONG)"))
    return "\n".join(lines)

