"""The fence's own DNS (``kodarelay.fencedns``, issue 20): its wire format, its pool, and the
server over real UDP and TCP sockets on loopback. The resolver of a fenced CMD asking it is
tested in ``test_capture.py``."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kodarelay.fencedns import (
    FORMERR, NOERROR, NOTIMP, NXDOMAIN, REFUSED, SERVFAIL, DnsServer, NameTable, answer, nameservers, parse_query,
)

A, AAAA, MX = 1, 28, 15
POOL = ipaddress.ip_network("198.18.0.0/15")


def query(name: str, qtype: int = A, ident: int = 0x1234, flags: int = 0x0100, qclass: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in name.rstrip(".").split(".") if p)
    return struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, qclass)


def decode(reply: bytes) -> tuple[int, int, int, list[str]]:
    """(id, rcode, answer count, A addresses) of a reply to one of ``query``'s questions."""
    ident, flags, qd, an, _ns, _ar = struct.unpack_from("!HHHHHH", reply)
    assert flags & 0x8000, "not a response"
    off = 12
    for _ in range(qd):
        while reply[off]:
            off += 1 + reply[off]
        off += 5
    addrs = []
    for _ in range(an):
        ptr, rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHHIH", reply, off)
        assert ptr == 0xC00C and rclass == 1
        off += 12
        if rtype == A:
            addrs.append(socket.inet_ntoa(reply[off:off + rdlen]))
        off += rdlen
    assert off == len(reply)
    return ident, flags & 0xF, an, addrs


# ── answers ──────────────────────────────────────────────────────────────────


def test_a_gets_one_synthetic_address_per_name():
    table = NameTable()
    ident, rcode, count, addrs = decode(answer(query("pypi.org", ident=7), table))
    assert (ident, rcode, count) == (7, NOERROR, 1)
    assert ipaddress.ip_address(addrs[0]) in POOL and addrs[0] != "198.18.0.0"   # .0 is the fence's own
    assert decode(answer(query("PyPI.Org."), table))[3] == addrs          # case and one trailing dot
    other = decode(answer(query("files.pythonhosted.org"), table))[3]
    assert other != addrs
    assert table.name_for(addrs[0]) == "pypi.org"
    assert table.address_for("PYPI.ORG.") == addrs[0]


def test_the_answer_echoes_the_question_and_is_authoritative():
    q = query("example.test", ident=0xBEEF)
    reply = answer(q, NameTable())
    assert reply is not None
    assert reply[12:12 + len(q) - 12] == q[12:]
    flags = struct.unpack_from("!H", reply, 2)[0]
    assert flags & 0x0400 and flags & 0x0100 and flags & 0x0080   # AA, RD copied, RA


def test_aaaa_is_noerror_with_no_answer():
    table = NameTable()
    assert decode(answer(query("pypi.org", AAAA), table))[1:3] == (NOERROR, 0)
    assert table.name_for("198.18.0.1") is None                 # nothing was handed out for it


@pytest.mark.parametrize("qtype", [MX, 16, 255, 5, 33])       # MX, TXT, ANY, CNAME, SRV
def test_other_types_are_refused(qtype):
    assert decode(answer(query("pypi.org", qtype), NameTable()))[1:3] == (REFUSED, 0)


def test_another_class_is_refused():
    assert decode(answer(query("pypi.org", A, qclass=3), NameTable()))[1] == REFUSED


def test_a_name_that_is_no_hostname_gets_nxdomain():
    raw = struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x05a b:c\x00" + struct.pack("!HH", A, 1)
    assert decode(answer(raw, NameTable()))[1] == NXDOMAIN
    assert decode(answer(query("."), NameTable()))[1] == NXDOMAIN


@pytest.mark.parametrize("raw, why", [
    (struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x03abc", "name runs past the message"),
    (struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x03abc\x00\x00", "no type and class"),
    (struct.pack("!HHHHHH", 9, 0x0100, 2, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01" * 2, "two questions"),
    (struct.pack("!HHHHHH", 9, 0x0100, 0, 0, 0, 0), "no question"),
    (struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", "a pointer"),
    (struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",
     "a name over 255 bytes"),
])
def test_malformed_queries_get_formerr(raw, why):
    ident, rcode, count, _ = decode(answer(raw, NameTable()))
    assert (ident, rcode, count) == (9, FORMERR, 0), why


def test_unreadable_messages_and_responses_are_dropped():
    assert answer(b"\x00\x01\x02", NameTable()) is None
    assert answer(query("pypi.org", flags=0x8100), NameTable()) is None      # a response: never answered


def test_other_opcodes_are_not_implemented():
    assert decode(answer(query("pypi.org", flags=0x1000), NameTable()))[1] == NOTIMP   # opcode 2 (STATUS)


# ── the pool ─────────────────────────────────────────────────────────────────


def test_the_pool_reuses_the_least_recently_used_address_with_no_open_connection():
    table = NameTable(size=2)
    a = table.address_for("a.test")
    b = table.address_for("b.test")
    assert a is not None and b is not None and a != b
    table.address_for("a.test")                   # a is now the most recently used
    c = table.address_for("c.test")
    assert c == b and table.name_for(b) == "c.test"
    assert table.opened(a) == "a.test"            # a has a connection open: never reused
    d = table.address_for("d.test")
    assert d == c and table.name_for(a) == "a.test"
    assert table.opened(d) == "d.test"
    assert table.address_for("e.test") is None    # every address is in use
    assert decode(answer(query("e.test"), table))[1] == SERVFAIL
    table.closed(a)
    assert table.address_for("e.test") == a


def test_the_full_pool_holds_131070_names():
    table = NameTable()
    assert table.size == 2 ** 17 - 2
    assert table.is_synthetic("198.19.255.255") and not table.is_synthetic("198.20.0.1")
    assert table.opened("198.19.0.9") is None     # one of the range, never handed out


def test_nameservers_of_resolv_conf():
    text = "# c\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\nnameserver bogus\nsearch x\nnameserver 10.255.255.53\n"
    assert nameservers(text) == ["10.255.255.53", "fe80::1"]
    assert nameservers("search example.test\n") == ["127.0.0.1"]     # glibc's default


# ── fuzz ─────────────────────────────────────────────────────────────────────


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_get_a_reply_or_nothing_never_an_exception(data):
    reply = answer(data, NameTable(size=4))
    if reply is not None:
        assert reply[:2] == data[:2]                      # the query's ID
        assert struct.unpack_from("!H", reply, 2)[0] & 0x8000


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=63)


@settings(max_examples=200, deadline=None)
@given(st.lists(_label, min_size=1, max_size=4), st.integers(0, 0xFFFF), st.sampled_from([A, AAAA, MX]))
def test_well_formed_queries_parse_back(labels, ident, qtype):
    raw = query(".".join(labels), qtype, ident)
    q = parse_query(raw)
    assert (q.ident, q.qtype, q.qclass) == (ident, qtype, 1)
    assert [lab.decode() for lab in q.labels] == labels
    got = decode(answer(raw, NameTable(size=4)))
    assert got[0] == ident and got[1] == {A: NOERROR, AAAA: NOERROR, MX: REFUSED}[qtype]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=80), st.integers(0, 40))
def test_truncated_or_corrupted_queries_never_raise(noise, cut):
    raw = query("pypi.org")
    for data in (raw[:cut], raw[:12] + noise, raw + noise):
        answer(data, NameTable(size=4))


# ── the server, on real sockets ──────────────────────────────────────────────


@pytest.fixture
def dns_server() -> Iterator[tuple[DnsServer, int]]:
    server = DnsServer(NameTable(), ["127.0.0.1"], port=0)
    loop = asyncio.new_event_loop()
    task: list[asyncio.Task[None]] = []
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        task.append(loop.create_task(server.serve()))
        loop.call_soon(ready.set)
        try:
            loop.run_until_complete(task[0])
        except asyncio.CancelledError:
            pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    yield server, server.ports[0]
    loop.call_soon_threadsafe(task[0].cancel)
    t.join(5)
    loop.close()
    server.close()


def test_udp_and_tcp_give_the_same_address(dns_server):
    _server, port = dns_server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(query("pypi.org", ident=1), ("127.0.0.1", port))
        udp = decode(u.recv(512))
        u.sendto(b"\x00", ("127.0.0.1", port))             # dropped: the server goes on
        u.sendto(query("pypi.org", MX, ident=2), ("127.0.0.1", port))
        assert decode(u.recv(512))[:2] == (2, REFUSED)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as t:
        for ident in (3, 4):                               # two queries on one connection
            q = query("PYPI.org.", ident=ident)
            t.sendall(struct.pack("!H", len(q)) + q)
            size = struct.unpack("!H", t.recv(2, socket.MSG_WAITALL))[0]
            tcp = decode(t.recv(size, socket.MSG_WAITALL))
            assert tcp[0] == ident and tcp[3] == udp[3]
    assert udp[:3] == (1, NOERROR, 1)
