"""Just enough rtnetlink to set up capture in the fence's own network namespace.

``ip route add local 0.0.0.0/0 dev lo table local`` (and ``::/0``) makes every address local
to the namespace, so a listener on the wildcard address accepts a connection to any address
(``getsockname()`` then tells where it was going); ``ip addr add ADDR dev lo`` gives the
namespace the addresses its resolver and ``AI_ADDRCONFIG`` look for. Both are a single
request over ``AF_NETLINK``: written here with ``struct`` so that capture needs neither the
``ip`` command nor a new dependency. Everything needs ``CAP_NET_ADMIN`` in the namespace's
user namespace (the fence's helper has it; CMD does not, so its requests fail with ``EPERM``).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

RT_TABLE_LOCAL = 255
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_HOST = 254
RTN_LOCAL = 2
RTA_DST = 1
RTA_OIF = 4
RTA_TABLE = 15
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_NODAD = 0x02       # an IPv6 address usable at once (no duplicate detection on lo)

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_seq = itertools.count(1)


def _attr(kind: int, data: bytes) -> bytes:
    body = _RTATTR.pack(_RTATTR.size + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def _request(kind: int, flags: int, payload: bytes) -> int:
    """Send one request and wait for its acknowledgement; ``OSError`` with the kernel's errno."""
    seq = next(_seq)
    msg = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0) + payload
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.settimeout(5.0)
        s.bind((0, 0))
        s.sendto(msg, (0, 0))
        while True:
            data = s.recv(65536)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
                if length < _NLMSGHDR.size:
                    raise OSError(0, "malformed netlink answer")
                if mseq == seq and mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", data, off + _NLMSGHDR.size)
                    if err:
                        raise OSError(-err, os.strerror(-err))
                    return 0
                off += (length + 3) & ~3


def _route(kind: int, flags: int, network: str, table: int, ifname: str) -> None:
    net = ipaddress.ip_network(network)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    payload = _RTMSG.pack(family, net.prefixlen, 0, 0, table if table < 256 else 252, RTPROT_BOOT, RT_SCOPE_HOST,
                          RTN_LOCAL, 0)
    if net.prefixlen:
        payload += _attr(RTA_DST, net.network_address.packed)
    payload += _attr(RTA_TABLE, struct.pack("=I", table))
    payload += _attr(RTA_OIF, struct.pack("=i", socket.if_nametoindex(ifname)))
    _request(kind, flags, payload)


def add_local_route(network: str, ifname: str = "lo", table: int = RT_TABLE_LOCAL) -> None:
    """``ip route add local NETWORK dev IFNAME table local``; an existing route is fine."""
    try:
        _route(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, network, table, ifname)
    except FileExistsError:
        pass


def delete_local_route(network: str, ifname: str = "lo", table: int = RT_TABLE_LOCAL) -> None:
    """``ip route del local NETWORK dev IFNAME table local`` (the tests use it: CMD gets ``EPERM``)."""
    _route(RTM_DELROUTE, 0, network, table, ifname)


def add_address(address: str, ifname: str = "lo") -> None:
    """``ip addr add ADDRESS/32`` (``/128``) ``dev IFNAME``; an address already there is fine."""
    ip = ipaddress.ip_address(address)
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    payload = _IFADDRMSG.pack(family, ip.max_prefixlen, IFA_F_NODAD if ip.version == 6 else 0,
                              RT_SCOPE_HOST if ip.is_loopback else RT_SCOPE_UNIVERSE, socket.if_nametoindex(ifname))
    payload += _attr(IFA_LOCAL, ip.packed) + _attr(IFA_ADDRESS, ip.packed)
    if ip.version == 6:
        payload += _attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD))
    try:
        _request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, payload)
    except FileExistsError:
        pass


__all__ = ["add_address", "add_local_route", "delete_local_route"]
