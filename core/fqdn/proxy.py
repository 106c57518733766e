"""The DNS proxy: a pod's DNS traffic, sent here transparently by the datapath, is checked
against the pod's ``rules: dns`` and forwarded to the server it asked (Cilium's
``pkg/fqdn/dnsproxy/proxy.go``).

It listens on one port, UDP and TCP, IPv4 and IPv6, with ``IP_TRANSPARENT`` sockets: the
datapath delivers packets addressed to any server to it unchanged, so the server the pod asked
is the packet's original destination (UDP: the ``IP_ORIGDSTADDR`` ancillary data; TCP: the
accepted socket's own address). UDP answers go back from that address and port, so
the pod sees the server it asked answer.

What it asks of the agent is a :class:`Gate`: who sent this, may it ask that, and — before
the answer reaches the pod — take note of the answer. Per question (Cilium's order):

- refused by the rules: the question echoed with ``--tofqdns-dns-reject-response-code``
  (REFUSED by default), no answer records;
- no endpoint for the source, an unreadable destination, over
  ``--dnsproxy-concurrency-limit``, an upstream error: SERVFAIL;
- upstream timeout, or the rules not known yet after a start: no reply at all (the client
  asks again);
- otherwise the server's answer, with the pod's message ID (the upstream one is random).

A message that is not DNS is dropped; nothing a pod sends can stop the proxy.
"""

import asyncio
import ipaddress
import logging
import secrets
import socket
import struct
import time
from typing import Protocol

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.rcode

from meshagent.model.net import Address

log = logging.getLogger(__name__)

# Linux socket options Python does not name (linux/in.h, linux/in6.h)
IP_RECVORIGDSTADDR = 20  # also IP_ORIGDSTADDR, the ancillary data's type
IPV6_TRANSPARENT = 75
IPV6_RECVORIGDSTADDR = 74  # also IPV6_ORIGDSTADDR
SOL_IPV6 = socket.IPPROTO_IPV6

MAX_UDP_MESSAGE = 65535
MAX_TCP_MESSAGE = 65535  # the two-byte length prefix allows no more
FORWARD_TIMEOUT = 10.0  # Cilium's ProxyForwardTimeout
TCP_IDLE_TIMEOUT = 10.0  # a client connection with no question for this long is closed

REJECT_CODES = {"refused": dns.rcode.REFUSED, "nameError": dns.rcode.NXDOMAIN}


@attrs.frozen
class Request:
    """One question as it reached the proxy."""

    client: tuple[Address, int]
    server: tuple[Address, int]  # the original destination: the server the pod asked
    protocol: str  # "UDP" or "TCP"
    message: dns.message.Message
    received: float  # time.time()
    wire: bytes = b""  # the message as the pod sent it

    @property
    def qname(self) -> str:
        return self.message.question[0].name.to_text().lower() if self.message.question else ""


class NotReady(Exception):
    """Raised by :meth:`Gate.allowed` when the rules are not known yet (the agent is still
    listing its policies after a start): the question gets no answer, and the client asks
    again."""


class Gate(Protocol):
    """What the proxy asks of the agent."""

    def endpoint(self, ip: Address) -> int | None:
        """The local endpoint with that address (None: none)."""

    def allowed(self, endpoint: int, request: Request) -> bool:
        """Whether the endpoint's DNS rules allow the question of that server; may raise
        :class:`NotReady`."""

    async def answered(self, endpoint: int, request: Request,
                       response: dns.message.Message) -> None:
        """Take note of an answer before the pod sees it (returns when the pod may)."""

    def record(self, endpoint: int | None, request: Request,
               response: dns.message.Message | None, verdict: str, info: str) -> None:
        """A request or response to report (``response`` None: the request)."""


@attrs.frozen
class ProxyOptions:
    port: int = 0  # --tofqdns-proxy-port (0: any free port)
    reject_rcode: int = dns.rcode.REFUSED  # --tofqdns-dns-reject-response-code
    concurrency_limit: int = 0  # --dnsproxy-concurrency-limit (0: none)
    forward_timeout: float = FORWARD_TIMEOUT


class DNSProxy:
    def __init__(self, gate: Gate, options: ProxyOptions):
        self.gate = gate
        self.options = options
        self.port = 0
        self.sockets: list[socket.socket] = []
        self.servers: list[asyncio.AbstractServer] = []
        self.families: list[int] = []
        self.in_flight = 0
        self.tasks: set[asyncio.Task] = set()
        self.stats = {"requests": 0, "refused": 0, "errors": 0, "timeouts": 0, "dropped": 0,
                      "not_ready": 0}

    # -- sockets --------------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen; the port, picked by the OS when ``options.port`` is 0."""
        for attempt in range(20):
            try:
                await self._listen(self.options.port)
                return self.port
            except OSError as exc:
                self._close_sockets()
                if self.options.port or attempt == 19:
                    raise OSError(exc.errno, f"DNS proxy cannot listen on port"
                                  f" {self.options.port or 'any'}: {exc.strerror}") from None
        raise AssertionError("unreachable")

    async def _listen(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        families = [socket.AF_INET] + ([socket.AF_INET6] if socket.has_ipv6 else [])
        for family in families:
            try:
                udp = _transparent(family, socket.SOCK_DGRAM)
            except OSError:
                if family == socket.AF_INET6:  # no IPv6 here: IPv4 only
                    continue
                raise
            self.sockets.append(udp)
            udp.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            port = port or udp.getsockname()[1]
            if family == socket.AF_INET:
                udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            else:
                udp.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
            tcp = _transparent(family, socket.SOCK_STREAM)
            self.sockets.append(tcp)
            tcp.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            tcp.listen(128)
            self.servers.append(await asyncio.start_server(self._tcp_client, sock=tcp,
                                                           limit=MAX_TCP_MESSAGE + 2))
            loop.add_reader(udp.fileno(), self._udp_ready, udp)
            self.families.append(family)
        self.port = port

    def _close_sockets(self) -> None:
        loop = asyncio.get_running_loop()
        for server in self.servers:
            server.close()
        for sock in self.sockets:
            if sock.type == socket.SOCK_DGRAM and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets, self.servers, self.families = [], [], []

    async def stop(self) -> None:
        self._close_sockets()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=1.0)

    # -- UDP ------------------------------------------------------------------------------------

    def _udp_ready(self, sock: socket.socket) -> None:
        for _ in range(64):  # a burst at a time, then others get the loop
            try:
                data, ancillary, _flags, client = sock.recvmsg(MAX_UDP_MESSAGE, 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("DNS proxy: UDP receive failed: %s", exc)
                return
            server = _original_destination(ancillary)
            self._spawn(self._udp_question(data, client, server))

    async def _udp_question(self, data: bytes, client, server) -> None:
        async def reply(wire: bytes) -> None:
            _send_from(wire, server, client)
        await self._question(data, "UDP", _endpoint(client), server, reply)

    # -- TCP ------------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            server = _endpoint(sock.getsockname())  # transparent: the address the pod asked
            client = _endpoint(writer.get_extra_info("peername"))

            async def reply(wire: bytes) -> None:
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        size = struct.unpack("!H", await reader.readexactly(2))[0]
                        data = await reader.readexactly(size)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                await self._question(data, "TCP", client, server, reply)
        except (ConnectionError, OSError) as exc:
            log.debug("DNS proxy: TCP client: %s", exc)
        finally:
            writer.close()

    # -- one question ---------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("DNS proxy: a question failed: %r", task.exception())

    async def _question(self, data: bytes, protocol: str, client, server, reply) -> None:
        try:
            message = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError, IndexError, struct.error):
            self.stats["dropped"] += 1  # not DNS: nobody to answer
            return
        if message.flags & dns.flags.QR or len(message.question) != 1:
            self.stats["dropped"] += 1
            return
        self.stats["requests"] += 1
        if server is None or client is None:
            request = Request(client or _NOWHERE, server or _NOWHERE, protocol, message,
                              time.time(), data)
            await self._error(reply, None, request, "cannot read the original destination")
            return
        request = Request(client, server, protocol, message, time.time(), data)
        limit = self.options.concurrency_limit
        if limit and self.in_flight >= limit:
            await self._error(reply, None, request, "concurrency limit reached")
            return
        self.in_flight += 1
        try:
            await self._serve(request, reply)
        finally:
            self.in_flight -= 1

    async def _serve(self, request: Request, reply) -> None:
        gate = self.gate
        endpoint = gate.endpoint(request.client[0])
        if endpoint is None:
            await self._error(reply, None, request,
                              f"no local endpoint has address {request.client[0]}")
            return
        try:
            allowed = gate.allowed(endpoint, request)
        except NotReady:
            self.stats["not_ready"] += 1
            return
        if not allowed:
            self.stats["refused"] += 1
            response = dns.message.make_response(request.message)
            response.set_rcode(self.options.reject_rcode)
            response.answer, response.authority, response.additional = [], [], []
            await reply(response.to_wire())  # reply first, then report (as Cilium)
            gate.record(endpoint, request, None, "Denied", "Denied by policy")
            return
        gate.record(endpoint, request, None, "Forwarded", "Allowed by policy")
        try:
            response, wire = await self._forward(request)
        except TimeoutError:
            self.stats["timeouts"] += 1  # no reply: the client asks again
            log.debug("DNS proxy: %s did not answer %s in time", request.server, request.qname)
            return
        except (OSError, dns.exception.DNSException, ValueError, EOFError) as exc:
            await self._error(reply, endpoint, request, f"forwarding failed: {exc}")
            return
        await gate.answered(endpoint, request, response)
        await reply(wire)
        gate.record(endpoint, request, response, "Forwarded", "Allowed by policy")

    async def _error(self, reply, endpoint, request: Request, why: str) -> None:
        self.stats["errors"] += 1
        response = dns.message.make_response(request.message)
        response.set_rcode(dns.rcode.SERVFAIL)
        try:
            await reply(response.to_wire())
        except OSError as exc:
            log.debug("DNS proxy: cannot send SERVFAIL: %s", exc)
        self.gate.record(endpoint, request, None, "Error", f"Error: {why}")

    async def _forward(self, request: Request) -> tuple[dns.message.Message, bytes]:
        """The question to the server the pod asked, over the pod's protocol, under a random
        ID; the answer read, and as the server sent it but for the pod's ID (the bytes are
        passed on, not re-encoded)."""
        query_id = secrets.randbelow(65536)
        query = struct.pack("!H", query_id) + request.wire[2:]
        ip, port = request.server
        async with asyncio.timeout(self.options.forward_timeout):
            if request.protocol == "UDP":
                wire = await _udp_exchange(query, str(ip), port, query_id)
            else:
                wire = await _tcp_exchange(query, str(ip), port)
        response = dns.message.from_wire(wire)
        if response.id != query_id:
            raise ValueError("the answer's ID is not the question's")
        response.id = request.message.id
        return response, struct.pack("!H", request.message.id) + wire[2:]


_NOWHERE = (None, 0)


def _transparent(family: int, kind: int) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
    except OSError:
        sock.close()
        raise
    return sock


def _endpoint(sockaddr) -> tuple[Address, int] | None:
    if not sockaddr:
        return None
    ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip, sockaddr[1]


def _original_destination(ancillary) -> tuple[Address, int] | None:
    """The ``IP_ORIGDSTADDR``/``IPV6_ORIGDSTADDR`` of a datagram (a sockaddr_in/in6)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port = struct.unpack("!H", data[2:4])[0]
            return ipaddress.IPv4Address(data[4:8]), port
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            port = struct.unpack("!H", data[2:4])[0]
            return ipaddress.IPv6Address(data[8:24]), port
    return None


def _send_from(wire: bytes, source: tuple[Address, int], client: tuple) -> None:
    """Send a datagram to ``client`` from ``source`` (address and port: the server the pod
    asked), through a transparent socket bound there for the one reply (as Cilium's
    ``sessionUDP`` does): the pod takes only an answer from the server it asked."""
    ip, port = source
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        with _transparent(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(ip), port))
            sock.sendto(wire, client)
    except OSError as exc:  # the address taken by a socket of this node, a full buffer
        log.warning("DNS proxy: cannot answer %s from %s:%d: %s", client[0], ip, port, exc)


async def _udp_exchange(wire: bytes, ip: str, port: int, query_id: int) -> bytes:
    """One question over a fresh connected UDP socket (a new source port each, as Cilium's
    per-request dial); the first datagram carrying its ID is the answer."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((ip, port))
        await loop.sock_sendall(sock, wire)
        while True:
            data = await loop.sock_recv(sock, MAX_UDP_MESSAGE)
            if len(data) >= 2 and struct.unpack("!H", data[:2])[0] == query_id:
                return data


async def _tcp_exchange(wire: bytes, ip: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(ip, port)
    try:
        writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        size = struct.unpack("!H", await reader.readexactly(2))[0]
        return await reader.readexactly(size)
    finally:
        writer.close()
