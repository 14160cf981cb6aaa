"""The built-in SOCKS5 proxy against real loopback sockets."""

from __future__ import annotations

import functools
import socket
import time

import pytest

from kodarelay import BuiltInProxy, BuiltInSocks5Proxy

from peers import connect, dead_port, http_connect, pinned, recv_exact, socks5_connect, status_of



@pytest.fixture
def start_socks(start_proxy):  # type: ignore[no-untyped-def]
    """``start_proxy`` with the SOCKS5 proxy as the default kind."""
    return functools.partial(start_proxy, cls=BuiltInSocks5Proxy)


def test_connect_allowed_domain(start_socks, echo):
    h = start_socks()
    s, rep = socks5_connect(h.port, b"localhost", echo.port)
    assert rep[:2] == b"\x05\x00"
    s.sendall(b"hello")
    assert recv_exact(s, 5) == b"hello"


def test_not_allowed_gets_rep_02(start_socks, echo):
    h = start_socks()
    s, rep = socks5_connect(h.port, b"evil.test", echo.port)
    assert rep[:2] == b"\x05\x02"
    assert s.recv(1) == b""
    assert echo.accepted == 0
    assert [(v.protocol, v.reason) for v in h.violations()] == [("socks5", "not_allowed")]


def test_ipv4_and_ipv6_literals_no_ip_rule_names_get_rep_08(start_socks, echo):
    h = start_socks(["localhost"])
    s, rep = socks5_connect(h.port, socket.inet_aton("127.0.0.1"), echo.port, atyp=1)
    assert rep[:2] == b"\x05\x08"
    s, rep = socks5_connect(h.port, socket.inet_pton(socket.AF_INET6, "::1"), echo.port, atyp=4)
    assert rep[:2] == b"\x05\x08"
    assert echo.accepted == 0
    assert {v.reason for v in h.violations()} == {"address_type"}


def test_ipv4_literal_an_ip_rule_names_is_tunnelled(start_socks, echo):
    """issue 13.4: an IPv4 ATYP is judged like a CONNECT to that literal."""
    h = start_socks(["127.0.0.1"])
    s, rep = socks5_connect(h.port, socket.inet_aton("127.0.0.1"), echo.port, atyp=1)
    assert rep[:2] == b"\x05\x00"
    s.sendall(b"hi")
    assert recv_exact(s, 2) == b"hi"
    # another address is still refused as address_type, a denied one as denied
    s2, rep = socks5_connect(h.port, socket.inet_aton("127.0.0.2"), echo.port, atyp=1)
    assert rep[:2] == b"\x05\x08"
    assert [v.reason for v in h.violations()] == ["address_type"]


def test_domain_carrying_a_port_is_refused_and_recorded(start_socks, echo, caplog):
    """issue 10.6: ``allowed.test:9001`` as a DOMAIN got no reply and an ERROR traceback."""
    h = start_socks(["localhost"])
    s, rep = socks5_connect(h.port, f"localhost:{echo.port}".encode(), echo.port)
    assert rep[:2] == b"\x05\x01"
    assert [v.reason for v in h.violations()] == ["bad_host"]
    assert echo.accepted == 0
    assert not [r for r in caplog.records if r.levelno >= 40]


def test_username_password_is_accepted_and_attributes(start_socks, echo):
    """RFC 1929 (0x02) is chosen when offered, even beside no-auth; the password is ignored."""
    h = start_socks(["localhost"])
    s = connect(h.port)
    s.sendall(b"\x05\x02\x00\x02")
    assert recv_exact(s, 2) == b"\x05\x02"
    s.sendall(b"\x01\x05job-7\x03pwd")
    assert recv_exact(s, 2) == b"\x01\x00"
    s.sendall(bytes([5, 1, 0, 3, 8]) + b"evil.com" + (443).to_bytes(2, "big"))
    assert recv_exact(s, 10)[:2] == b"\x05\x02"
    [v] = h.violations()
    assert (v.host, v.reason, v.client) == ("evil.com", "not_allowed", "job-7")


@pytest.mark.parametrize("cmd", [2, 3])
def test_bind_and_udp_get_rep_07(start_socks, echo, cmd):
    h = start_socks()
    s = connect(h.port)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(bytes([5, cmd, 0, 3, 9]) + b"localhost" + echo.port.to_bytes(2, "big"))
    assert recv_exact(s, 10)[:2] == b"\x05\x07"


def test_no_acceptable_method_gets_ff(start_socks):
    h = start_socks()
    s = connect(h.port)
    s.sendall(b"\x05\x01\x01")  # GSSAPI only
    assert recv_exact(s, 2) == b"\x05\xff"
    assert s.recv(1) == b""


@pytest.mark.parametrize("greeting", [b"\x04\x01\x00\x50", b"GET / HTTP/1.1\r\n\r\n", b"\x00"])
def test_wrong_version_is_closed(start_socks, echo, greeting):
    h = start_socks()
    s = connect(h.port)
    s.sendall(greeting)
    assert s.recv(16) == b""
    # and the server keeps serving others
    s2, rep = socks5_connect(h.port, b"localhost", echo.port)
    assert rep[:2] == b"\x05\x00"


@pytest.mark.parametrize("domain, rep", [(b"", 1), (b"\xff\xfe.test", 1)])
def test_bad_domain_gets_rep_01(start_socks, domain, rep):
    h = start_socks()
    s = connect(h.port)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(bytes([5, 1, 0, 3, len(domain)]) + domain + b"\x01\xbb")
    assert recv_exact(s, 10)[1] == rep


def test_unknown_atyp_is_closed(start_socks):
    h = start_socks()
    s = connect(h.port)
    s.sendall(b"\x05\x01\x00")
    assert recv_exact(s, 2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x09" + b"\x00" * 8)
    assert s.recv(16) == b""


def test_connection_refused_gets_rep_05(start_socks):
    dead = dead_port()
    h = start_socks()
    s, rep = socks5_connect(h.port, b"localhost", dead)
    assert rep[:2] == b"\x05\x05"


def test_unresolvable_gets_rep_04(start_socks):
    h = start_socks(["nowhere.test"], resolver=pinned({}))
    s, rep = socks5_connect(h.port, b"nowhere.test", 443)
    assert rep[:2] == b"\x05\x04"


def test_guard_refusal_gets_rep_02(start_socks, echo):
    h = start_socks(["meta.test"], resolver=pinned({"meta.test": ["169.254.169.254"]}))
    s, rep = socks5_connect(h.port, b"meta.test", echo.port)
    assert rep[:2] == b"\x05\x02"
    assert [v.reason for v in h.violations()] == ["resolved_address"]


def test_tunnel_outlives_the_handshake_timeout(start_socks, echo):
    """fix: the crate wrapped the whole session in the 10 s handshake timeout."""
    h = start_socks(handshake_timeout=0.3)
    s, rep = socks5_connect(h.port, b"localhost", echo.port)
    assert rep[:2] == b"\x05\x00"
    time.sleep(0.6)  # let the handshake timeout pass: the tunnel must not care
    s.sendall(b"still here")
    assert recv_exact(s, 10) == b"still here"


def test_slow_handshake_is_closed(start_socks):
    h = start_socks(handshake_timeout=0.3)
    s = connect(h.port)
    s.sendall(b"\x05")
    assert s.recv(16) == b""


def test_early_bytes_after_request_are_forwarded(start_socks, echo):
    h = start_socks()
    s = connect(h.port)
    s.sendall(b"\x05\x01\x00" + bytes([5, 1, 0, 3, 9]) + b"localhost" + echo.port.to_bytes(2, "big") + b"eager")
    assert recv_exact(s, 2) == b"\x05\x00"
    assert recv_exact(s, 10)[:2] == b"\x05\x00"
    assert recv_exact(s, 5) == b"eager"


def test_one_port_serves_both_protocols(start_socks, echo):
    h = start_socks(cls=BuiltInProxy, socks5=True)
    s, rep = socks5_connect(h.port, b"localhost", echo.port)
    assert rep[:2] == b"\x05\x00"
    s.sendall(b"socks")
    assert recv_exact(s, 5) == b"socks"
    s2, head = http_connect(h.port, f"localhost:{echo.port}")
    assert status_of(head) == 200
    s3, rep = socks5_connect(h.port, b"evil.test", echo.port)
    assert rep[:2] == b"\x05\x02"
    s4, head = http_connect(h.port, f"evil.test:{echo.port}")
    assert status_of(head) == 403
    assert [(v.protocol, v.host) for v in h.violations()] == [("socks5", "evil.test"), ("http", "evil.test")]


def test_a_name_of_spaces_and_text_is_bad_host_and_shown_escaped(start_proxy):
    """Issue 17 item 11: a SOCKS5 name of 150 spaces and text appeared verbatim in the summary,
    where it could pass for a line of its own."""
    from kodarelay.cli import summarize

    from peers import socks5_connect, wait_until

    events: list = []
    h = start_proxy(["*.test"], socks5=True, on_event=events.append)
    forged = b" " * 150 + b"kodarelay: allowed 1 connection"
    s, reply = socks5_connect(h.port, forged, 443)
    assert reply[1] != 0
    (v,) = h.violations()
    assert v.reason == "bad_host" and " " not in v.host and v.host.startswith("\\x20")
    lines = summarize(h.violations(), 1)
    assert len(lines) == 2 and " " * 10 not in lines[1] and "\\x20\\x20" in lines[1]
    wait_until(lambda: any(e.kind == "refuse" for e in events), what="the refuse event")
    assert all(" " not in (e.host or "") for e in events)
