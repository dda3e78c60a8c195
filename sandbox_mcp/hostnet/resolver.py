"""The egress resolver: DNS for workspaces with a domain list, and the addresses they may reach.

It listens on the bridge's host address (UDP and TCP) and answers a workspace, known by its source
address (anti-spoofing ties that to its port), only for the names on its list:

* a query for a name not on the list is answered NXDOMAIN and never leaves the host (no name a
  workspace makes up reaches any DNS server: DNS is no way out);
* a listed name is asked of the upstream resolvers (the host's, or ``egress_dns_upstreams``); the
  answer is given only when the CNAME chain it follows ends in a listed name too (an alias into
  the list works, one out of it is NXDOMAIN): every address handed out belongs to a listed name;
* each IPv4 address handed out first enters the workspace's nftables set with a timeout of the
  record's TTL, bounded by ``egress_ttl_min_s``/``egress_ttl_max_s`` (the TTLs in the answer never
  exceed it), and only then is the answer sent, so the connection that follows finds it;
* AAAA is answered empty (workspaces have no IPv6), ANY and zone transfers are refused;
* queries from an address with no policy, or past a workspace's rate (a token bucket:
  ``egress_dns_rate`` per second, bursts of twice that) or its in-flight bound, are REFUSED.

The policy is a JSON file the server rewrites atomically (:mod:`.resolver_service`); it is read again
when it changes (a stat per query), so a ``set_egress`` applies to the next query.

Run as ``python -m sandbox_mcp.hostnet.resolver CONFIG``: a small supervisor that runs the worker
(``--worker``) and starts it again if it dies (with a back-off); the worker dies with the supervisor
(``PR_SET_PDEATHSIG``), so killing the supervisor leaves nothing behind. The worker binds its sockets and
opens the policy file as root, then becomes ``nobody`` holding only CAP_NET_ADMIN (for the sets; the
bounding set and no_new_privs keep it so): what parses packets from workspaces is not root. DNS wire format and upstream
queries are dnspython's; this module only decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ..egress import allows
from .egress_sets import add_addresses_script
from .nft import Nft

__all__ = ["Resolver", "ResolverConfig", "main"]

log = logging.getLogger("sandbox_mcp.resolver")

_MAX_CHAIN = 12  # CNAME links followed in one answer
_MAX_TCP = 64  # TCP connections at once, all workspaces
_MAX_TCP_PER_SOURCE = 8
_MAX_INFLIGHT = 256  # upstream queries at once, all workspaces
_MAX_INFLIGHT_PER_SOURCE = 16
_TCP_IDLE_S = 10.0
_REFUSED_TYPES = {dns.rdatatype.ANY, dns.rdatatype.AXFR, dns.rdatatype.IXFR}
_PR_SET_PDEATHSIG = 1
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_CAP_NET_ADMIN = 12
_CAP_LAST = 63  # past the kernel's last capability: dropping an unknown one just fails
_CAPABILITY_VERSION_3 = 0x20080522
_NOBODY = 65534
_MAX_CONFIG = 8 << 20


@dataclass
class ResolverConfig:
    """What the server tells the resolver (the JSON file's content)."""

    listen: str
    port: int
    upstreams: list[tuple[str, int]]
    table: str
    ttl_min_s: int = 5
    ttl_max_s: int = 3600
    rate: float = 50.0
    timeout_s: float = 3.0
    workspaces: dict[str, dict[str, Any]] = field(default_factory=dict)  # ip -> {"set": ..., "domains": [...]}

    @classmethod
    def load(cls, path: Path) -> ResolverConfig:
        return cls.parse(path.read_bytes())

    @classmethod
    def parse(cls, raw: bytes) -> ResolverConfig:
        data = json.loads(raw)
        data["upstreams"] = [(str(h), int(p)) for h, p in data.get("upstreams", [])]
        return cls(**data)


class _Bucket:
    """A token bucket: ``rate`` per second, bursts up to twice that."""

    __slots__ = ("last", "rate", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.last = rate, 2 * rate, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(2 * self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Resolver:
    """Answers workspace queries by their policies (see the module docstring). One per bridge."""

    def __init__(self, config_path: Path, config_fd: int | None = None) -> None:
        self.config_path = config_path
        self._fd = config_fd  # the worker's: it reads through an fd opened before it gave up root
        self._stamp: tuple[int, int] | None = None
        self._raw: bytes | None = None
        self.config = ResolverConfig.load(config_path) if config_fd is None else self._reload()
        self._buckets: dict[str, _Bucket] = {}
        self._inflight: dict[str, int] = {}
        self._tcp: dict[str, int] = {}
        self._upstream_slots = asyncio.Semaphore(_MAX_INFLIGHT)
        self._nft_lock = asyncio.Lock()
        self._nft = Nft()  # its own context: this runs in the resolver's process

    def _reload(self) -> ResolverConfig:
        """The policy as the file has it now. Through the fd, the file is rewritten in place by the server:
        the bytes are compared (a few KiB, no parse unless they changed; a half-written file is not valid
        JSON, so it keeps the last good policy until the write is whole)."""
        if self._fd is not None:
            raw = os.pread(self._fd, min(os.fstat(self._fd).st_size, _MAX_CONFIG), 0)
            if raw != self._raw:
                self.config = ResolverConfig.parse(raw)
                self._raw = raw
            return self.config
        st = self.config_path.stat()
        stamp = (st.st_ino, st.st_mtime_ns)
        if stamp != self._stamp:
            self.config = ResolverConfig.load(self.config_path)
            self._stamp = stamp
        return self.config

    # -- one query ------------------------------------------------------------------------------

    async def answer(self, wire: bytes, source: str, *, tcp: bool) -> bytes | None:
        """The reply to ``wire`` from ``source``; None for what is not worth one (not a DNS query)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - anything unparseable gets no reply
            return None
        if query.flags & dns.flags.QR:
            return None
        with contextlib.suppress(OSError, ValueError, TypeError):
            self._reload()  # a broken or half-written file keeps the last good policy
        reply = await self._decide(query, source)
        limit = 65535 if tcp else max(512, query.payload if query.edns >= 0 else 512)
        try:
            return reply.to_wire(max_size=limit)
        except dns.exception.TooBig:
            reply.answer = []
            reply.flags |= dns.flags.TC
            return reply.to_wire()

    def _reply(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.RA
        reply.set_rcode(rcode)
        return reply

    async def _decide(self, query: dns.message.Message, source: str) -> dns.message.Message:
        policy = self.config.workspaces.get(source)
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return self._reply(query, dns.rcode.REFUSED if policy is None else dns.rcode.FORMERR)
        if policy is None:
            return self._reply(query, dns.rcode.REFUSED)
        bucket = self._buckets.get(source)
        if bucket is None or bucket.rate != self.config.rate:
            bucket = self._buckets[source] = _Bucket(self.config.rate)
        if not bucket.take():
            return self._reply(query, dns.rcode.REFUSED)
        question = query.question[0]
        qname = question.name.to_text(omit_final_dot=True).lower()
        domains = policy.get("domains") or []
        if question.rdclass != dns.rdataclass.IN or question.rdtype in _REFUSED_TYPES:
            return self._reply(query, dns.rcode.REFUSED)
        if not allows(domains, qname):
            return self._reply(query, dns.rcode.NXDOMAIN)
        if question.rdtype == dns.rdatatype.AAAA:
            return self._reply(query, dns.rcode.NOERROR)  # no IPv6 inside: an empty answer, at once
        if self._inflight.get(source, 0) >= _MAX_INFLIGHT_PER_SOURCE:
            return self._reply(query, dns.rcode.REFUSED)
        self._inflight[source] = self._inflight.get(source, 0) + 1
        try:
            upstream = await self._ask_upstream(question.name, question.rdtype)
        finally:
            self._inflight[source] -= 1
            if not self._inflight[source]:
                del self._inflight[source]
        if upstream is None:
            return self._reply(query, dns.rcode.SERVFAIL)
        if upstream.rcode() != dns.rcode.NOERROR:
            return self._reply(query, upstream.rcode())
        return await self._filtered(query, upstream, question.name, question.rdtype, domains, policy, source)

    async def _ask_upstream(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message | None:
        """The first upstream's answer (UDP, TCP when truncated); None when none answers in time."""
        request = dns.message.make_query(qname, rdtype)
        async with self._upstream_slots:
            for host, port in self.config.upstreams:
                try:
                    response, _ = await dns.asyncquery.udp_with_fallback(
                        request, host, timeout=self.config.timeout_s, port=port
                    )
                    return response
                except (dns.exception.DNSException, OSError) as exc:
                    log.warning("upstream %s:%s: %s", host, port, exc)
        return None

    async def _filtered(
        self,
        query: dns.message.Message,
        upstream: dns.message.Message,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        domains: list[str],
        policy: dict[str, Any],
        source: str,
    ) -> dns.message.Message:
        """The upstream's answer cut to the CNAME chain from ``qname`` and the records at its end; NXDOMAIN when
        the chain leaves the list. A addresses enter the set first."""
        chain: list[dns.rrset.RRset] = []
        name = qname
        for _ in range(_MAX_CHAIN):
            if rdtype == dns.rdatatype.CNAME:
                break
            link = _find(upstream, name, dns.rdatatype.CNAME)
            if link is None:
                break
            chain.append(link)
            name = link[0].target
            if not allows(domains, name.to_text(omit_final_dot=True)):
                log.info("%s: %s leads out of the list (to %s)", source, qname, name)
                return self._reply(query, dns.rcode.NXDOMAIN)
        final = _find(upstream, name, rdtype)
        cap = self.config.ttl_max_s
        timeout = None
        if final is not None and rdtype == dns.rdatatype.A:
            timeout = max(self.config.ttl_min_s, min(final.ttl, cap))
            addresses = {ipaddress.IPv4Address(r.address): timeout for r in final}
            if not await self._allow(policy, addresses):
                return self._reply(query, dns.rcode.SERVFAIL)
        reply = self._reply(query, dns.rcode.NOERROR)
        for rrset in [*chain, *([final] if final is not None else [])]:
            rrset = rrset.copy()
            rrset.ttl = min(rrset.ttl, cap if timeout is None else timeout)
            reply.answer.append(rrset)
        return reply

    async def _allow(self, policy: dict[str, Any], addresses: dict[ipaddress.IPv4Address, int]) -> bool:
        """Put ``addresses`` into the workspace's set (with their timeouts) before the answer goes out."""
        script = add_addresses_script(self.config.table, str(policy["set"]), addresses)
        async with self._nft_lock:  # one change at a time: a burst of answers is a queue
            if self._nft.available:
                ok, _, err_text = await asyncio.to_thread(self._nft.run, script)
                error = None if ok else err_text or "failed"
            else:
                proc = await asyncio.create_subprocess_exec(
                    "nft", "-f", "-", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                _, err = await proc.communicate(script.encode())
                error = err.decode(errors="replace") if proc.returncode else None
        if error is not None:
            log.warning("nft refused %s: %s", policy["set"], error.strip()[:300])
            return False
        return True

    # -- transports -----------------------------------------------------------------------------

    def bind(self) -> tuple[socket.socket, socket.socket]:
        """The UDP and TCP sockets on the configured address (before privileges go: the port is below 1024)."""
        cfg = self.config
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((cfg.listen, cfg.port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((cfg.listen, cfg.port))
        tcp.listen(64)
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp

    async def serve(self, udp: socket.socket, tcp: socket.socket) -> None:
        """Answer on the sockets of :meth:`bind` until cancelled."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        server = await asyncio.start_server(self._tcp_client, sock=tcp)
        log.warning("resolver listening on %s:%s (udp, tcp) as uid %s", cfg.listen, cfg.port, os.getuid())
        print("ready", flush=True)
        try:
            async with server:
                await server.serve_forever()
        finally:
            transport.close()

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = str(writer.get_extra_info("peername")[0])
        total = sum(self._tcp.values())
        if total >= _MAX_TCP or self._tcp.get(source, 0) >= _MAX_TCP_PER_SOURCE:
            writer.close()
            return
        self._tcp[source] = self._tcp.get(source, 0) + 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), _TCP_IDLE_S)
                wire = await asyncio.wait_for(reader.readexactly(int.from_bytes(head, "big")), _TCP_IDLE_S)
                reply = await self.answer(wire, source, tcp=True)
                if reply is None:
                    break
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp[source] -= 1
            if not self._tcp[source]:
                del self._tcp[source]
            writer.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment] - a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(self.tasks) >= _MAX_INFLIGHT * 2:
            return  # flooded: drop, the client retries
        task = asyncio.ensure_future(self._one(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = await self.resolver.answer(data, addr[0], tcp=False)
        except Exception:  # noqa: BLE001 - one bad query never ends the resolver
            log.exception("answering %s", addr[0])
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def _find(message: dns.message.Message, name: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
    for rrset in message.answer:
        if rrset.name == name and rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN:
            return rrset
    return None


# -- the processes ------------------------------------------------------------------------------


def _drop_privileges(libc: ctypes.CDLL) -> None:
    """Become ``nobody`` holding CAP_NET_ADMIN alone (to update the sets), for good: what parses DNS from
    workspaces must not be root. Before any thread exists (capabilities are per thread; threads made
    later inherit these)."""
    for cap in range(_CAP_LAST + 1):  # the bounding set: nothing else can be gained back, not by exec
        if cap != _CAP_NET_ADMIN:
            libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    if libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(_NOBODY, _NOBODY, _NOBODY)
    os.setresuid(_NOBODY, _NOBODY, _NOBODY)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(1 << _CAP_NET_ADMIN, 1 << _CAP_NET_ADMIN, 0, 0, 0, 0)  # effective, permitted
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _preload() -> None:
    """Import now what would be imported on first use: as nobody the interpreter's own files may be out of
    reach (a Python under /root), and a failed lazy import would fail every query after it."""
    import concurrent.futures.thread  # noqa: F401 - asyncio.to_thread's pool
    import encodings.idna  # noqa: F401 - dnspython's names
    import importlib
    import pkgutil

    import dns._asyncio_backend  # noqa: F401
    import dns.asyncbackend
    import dns.rdtypes.ANY
    import dns.rdtypes.IN

    dns.asyncbackend.get_backend("asyncio")
    for package in (dns.rdtypes.ANY, dns.rdtypes.IN):  # every record type an upstream answer may carry
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")


def _worker(config_path: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(config_path, os.O_RDONLY | os.O_CLOEXEC)  # under root's 0700 dir: opened while still root
    resolver = Resolver(config_path, fd)
    udp, tcp = resolver.bind()
    _preload()
    _drop_privileges(libc)
    # After the uid change, which clears it: gone with the supervisor, whatever kills it.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        return
    asyncio.run(resolver.serve(udp, tcp))


def _supervise(config_path: Path) -> int:
    """Run the worker, again after it dies (0.2 s back-off, doubling to 5 s while it keeps dying fast)."""
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backoff = 0.2
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "sandbox_mcp.hostnet.resolver", "--worker", str(config_path)])
        child.wait()
        if stopping:
            break
        log.warning("resolver worker exited (%s); starting it again", child.returncode)
        backoff = 0.2 if time.monotonic() - started > 10 else min(backoff * 2, 5.0)
        time.sleep(backoff)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``resolver CONFIG`` (the supervisor) or ``resolver --worker CONFIG``."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    if args[:1] == ["--worker"]:
        _worker(Path(args[1]))
        return 0
    return _supervise(Path(args[0]))


if __name__ == "__main__":
    sys.exit(main())
