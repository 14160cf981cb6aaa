"""The fence's own DNS: every name gets a synthetic address, and no query ever leaves.

Inside ``kodarelay run``'s fence (with capture, ``kodarelay.capture``), CMD's resolver asks
the nameservers the host's ``/etc/resolv.conf`` names; the fence's helper answers at each of
those addresses (UDP and TCP port 53). A client that ignores the proxy variables then
connects to the synthetic address, capture brings that connection to the proxy, and the
proxy judges (and resolves, on the host) the *name* behind it.

* ``A`` gets an address from 198.18.0.0/15 (RFC 2544's benchmarking range: never a real
  destination), one per name for the run. Names are compared case-insensitively, one
  trailing dot ignored. The pool holds 131,070 names (the first and last address are never
  handed out: 198.18.0.0 is the fence's own address on ``lo``); when it runs out, the least
  recently used address with no open connection is given to the new name, and when every
  address has a connection open the answer is ``SERVFAIL``.
* ``AAAA`` gets ``NOERROR`` with no answer (IPv4 alone is synthetic); other types and
  classes get ``REFUSED``; a name that is not a hostname (labels of letters, digits, ``-``
  and ``_``) gets ``NXDOMAIN``, since the proxy could never judge it.
* A malformed query gets ``FORMERR`` when its header can be read, else nothing; a message
  that is a response, or has more than one question, is not answered as a query
  (``FORMERR`` / dropped). Non-``QUERY`` opcodes get ``NOTIMP``.
* No query is ever forwarded: DNS carries nothing out of the fence.

The wire format (RFC 1035) is written here with ``struct``: no dependency.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import threading
from collections import OrderedDict
from typing import NamedTuple

log = logging.getLogger(__name__)

POOL = ipaddress.ip_network("198.18.0.0/15")
#: The fence's one non-loopback IPv4 address (``AI_ADDRCONFIG``); never handed out.
FENCE_ADDRESS = "198.18.0.0"
TTL = 60
TYPE_A = 1
TYPE_AAAA = 28
CLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
_HEADER = struct.Struct("!HHHHHH")
_QR = 0x8000
_AA = 0x0400
_RD = 0x0100
_RA = 0x0080
_OPCODE = 0x7800
_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")
MAX_TCP_MESSAGE = 65535
TCP_IDLE = 10.0


class DnsFormatError(ValueError):
    """A message that is not a well-formed query; ``ident`` is its ID when the header was readable."""

    def __init__(self, message: str, ident: int | None = None) -> None:
        super().__init__(message)
        self.ident = ident


class Query(NamedTuple):
    ident: int
    flags: int
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    question: bytes          # the question section as sent (echoed in the answer)


def canonical_name(name: str) -> str:
    """Lower case, one trailing dot stripped: the table's key."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def parse_query(data: bytes) -> Query:
    """One query with exactly one question; ``DnsFormatError`` for anything else."""
    if len(data) < _HEADER.size:
        raise DnsFormatError("shorter than a DNS header")
    ident, flags, qd, _an, _ns, _ar = _HEADER.unpack_from(data)
    if flags & _QR:
        raise DnsFormatError("a response, not a query", None)       # never answered: no loops
    if qd != 1:
        raise DnsFormatError(f"{qd} questions", ident)
    labels: list[bytes] = []
    off = _HEADER.size
    total = 0
    while True:
        if off >= len(data):
            raise DnsFormatError("name runs past the message", ident)
        n = data[off]
        if n & 0xC0:
            raise DnsFormatError("compressed or extended label in a question", ident)
        off += 1
        if n == 0:
            break
        if off + n > len(data):
            raise DnsFormatError("label runs past the message", ident)
        total += n + 1
        if total > 254:
            raise DnsFormatError("name longer than 255 bytes", ident)
        labels.append(data[off:off + n])
        off += n
    if off + 4 > len(data):
        raise DnsFormatError("question without type and class", ident)
    qtype, qclass = struct.unpack_from("!HH", data, off)
    return Query(ident, flags, tuple(labels), qtype, qclass, data[_HEADER.size:off + 4])


def _is_hostname(labels: tuple[bytes, ...]) -> bool:
    return bool(labels) and all(0 < len(lab) < 64 and set(lab.lower()) <= _HOST_CHARS for lab in labels)


def _reply(q: Query, rcode: int, answers: bytes = b"", count: int = 0) -> bytes:
    flags = _QR | (q.flags & (_OPCODE | _RD)) | _AA | _RA | rcode
    return _HEADER.pack(q.ident, flags, 1, count, 0, 0) + q.question + answers


def _error(ident: int, flags: int, rcode: int) -> bytes:
    return _HEADER.pack(ident, _QR | (flags & (_OPCODE | _RD)) | _RA | rcode, 0, 0, 0, 0)


class NameTable:
    """Names and their synthetic addresses for one run (thread-safe).

    ``size`` (tests) caps the pool below its full 131,070 addresses.
    """

    def __init__(self, network: str = str(POOL), size: int | None = None) -> None:
        net = ipaddress.ip_network(network)
        if net.version != 4:
            raise ValueError(f"the synthetic pool must be IPv4, not {network!r}")
        self._first = int(net.network_address) + 1           # the network address is the fence's own
        self.size = net.num_addresses - 2 if size is None else size
        if not 0 < self.size <= net.num_addresses - 2:
            raise ValueError(f"pool size {size!r} does not fit {network}")
        self._network = net
        self._lock = threading.Lock()
        self._by_name: dict[str, int] = {}
        self._by_addr: OrderedDict[int, str] = OrderedDict()     # least recently used first
        self._open: dict[int, int] = {}
        self._next = 0

    def address_for(self, name: str) -> str | None:
        """The name's address (a new one, or a reused one when the pool is full); None when
        every address has a connection open."""
        key = canonical_name(name)
        with self._lock:
            addr = self._by_name.get(key)
            if addr is None:
                if self._next < self.size:
                    addr = self._first + self._next
                    self._next += 1
                else:
                    addr = next((a for a in self._by_addr if not self._open.get(a)), None)
                    if addr is None:
                        return None
                    del self._by_name[self._by_addr.pop(addr)]
                self._by_name[key] = addr
                self._by_addr[addr] = key
            self._by_addr.move_to_end(addr)
            return str(ipaddress.IPv4Address(addr))

    def name_for(self, address: str) -> str | None:
        """The name an address was given to, if it is one of ours and still given."""
        try:
            ip = int(ipaddress.ip_address(address))
        except ValueError:
            return None
        with self._lock:
            return self._by_addr.get(ip)

    def is_synthetic(self, address: str) -> bool:
        try:
            return ipaddress.ip_address(address) in self._network
        except ValueError:
            return False

    def opened(self, address: str) -> str | None:
        """A connection to ``address`` begins: its name (and the address is not reused until
        ``closed``), or None when the address is not (or no longer) one of ours."""
        ip = int(ipaddress.ip_address(address))
        with self._lock:
            name = self._by_addr.get(ip)
            if name is not None:
                self._open[ip] = self._open.get(ip, 0) + 1
                self._by_addr.move_to_end(ip)
            return name

    def closed(self, address: str) -> None:
        ip = int(ipaddress.ip_address(address))
        with self._lock:
            left = self._open.get(ip, 0) - 1
            if left > 0:
                self._open[ip] = left
            else:
                self._open.pop(ip, None)


def answer(data: bytes, table: NameTable) -> bytes | None:
    """The reply to one DNS message (None: drop it)."""
    try:
        q = parse_query(data)
    except DnsFormatError as e:
        if e.ident is None:
            return None
        flags = _HEADER.unpack_from(data)[1]
        return _error(e.ident, flags, FORMERR)
    if q.flags & _OPCODE:
        return _error(q.ident, q.flags, NOTIMP)
    if q.qclass != CLASS_IN or q.qtype not in (TYPE_A, TYPE_AAAA):
        return _reply(q, REFUSED)
    if not _is_hostname(q.labels):
        return _reply(q, NXDOMAIN)
    if q.qtype == TYPE_AAAA:
        return _reply(q, NOERROR)
    name = b".".join(q.labels).decode("ascii").lower()
    addr = table.address_for(name)
    if addr is None:
        log.warning("fence DNS: every synthetic address has a connection open; %s gets SERVFAIL", name)
        return _reply(q, SERVFAIL)
    record = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4) + socket.inet_aton(addr)
    return _reply(q, NOERROR, record, 1)


def nameservers(resolv_conf: str) -> list[str]:
    """The nameserver addresses of a ``resolv.conf`` text, in order (a scoped IPv6 address
    loses its scope); glibc's default, 127.0.0.1, when there are none."""
    found: list[str] = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = str(ipaddress.ip_address(parts[1].split("%", 1)[0]))
            except ValueError:
                continue
            if addr not in found:
                found.append(addr)
    return found or ["127.0.0.1"]


def _serve_udp(sock: socket.socket, table: NameTable) -> None:
    """Answer datagrams on ``sock`` until it is closed: a blocking loop on a thread of its own,
    a third of what an event loop costs per query (a lookup is on every captured client's
    path: glibc asks A and AAAA for each connection)."""
    while True:
        try:
            data, addr = sock.recvfrom(4096)
        except OSError:
            return                          # closed
        try:
            reply = answer(data, table)
            if reply is not None:
                sock.sendto(reply, addr)
        except OSError:
            continue
        except Exception:                   # nothing a client sends may stop the server
            log.exception("fence DNS: unexpected error answering a query")


class DnsServer:
    """Answers at ``addresses`` (UDP and TCP, ``port``) from ``table``; sockets are bound at
    construction (before the helper forks), served once ``serve()`` runs on a loop."""

    def __init__(self, table: NameTable, addresses: list[str], port: int = 53) -> None:
        self.table = table
        self._udp: list[socket.socket] = []
        self._tcp: list[socket.socket] = []
        try:
            for addr in addresses:
                family = socket.AF_INET6 if ":" in addr else socket.AF_INET
                u = socket.socket(family, socket.SOCK_DGRAM)
                self._udp.append(u)
                u.bind((addr, port))
                t = socket.socket(family, socket.SOCK_STREAM)
                self._tcp.append(t)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind((addr, u.getsockname()[1]))
                t.listen(64)
        except BaseException:
            self.close()
            raise
        self.ports = [s.getsockname()[1] for s in self._udp]

    def close(self) -> None:
        for s in (*self._udp, *self._tcp):
            if s.type == socket.SOCK_DGRAM:
                try:
                    s.shutdown(socket.SHUT_RDWR)    # wakes a thread blocked in recvfrom
                except OSError:
                    pass
            s.close()

    async def serve(self) -> None:
        """Serve until cancelled."""
        servers = []
        for u in self._udp:
            threading.Thread(target=_serve_udp, args=(u, self.table), name="kodarelay-fence-dns", daemon=True).start()
        for t in self._tcp:
            t.setblocking(False)
            servers.append(await asyncio.start_server(self._tcp_client, sock=t))
        await asyncio.gather(*(s.serve_forever() for s in servers))

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE))[0]
                    data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
                    return
                reply = answer(data, self.table)
                if reply is None:
                    return
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except Exception:
            log.exception("fence DNS: unexpected error on a TCP connection")
        finally:
            writer.close()


__all__ = ["DnsFormatError", "DnsServer", "FENCE_ADDRESS", "NameTable", "Query", "answer", "canonical_name",
           "nameservers", "parse_query"]
