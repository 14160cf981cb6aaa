"""Chaining through a corporate HTTP proxy (``HTTPS_PROXY``), and ``NO_PROXY`` bypasses.

When a tunnel is chained, the CONNECT line carries the *hostname* and the upstream proxy
resolves it, so kodarelay's resolved-address guard does not apply to chained tunnels: the
upstream is trusted to reach what it is asked for. Hosts that ``NO_PROXY`` covers (by default
loopback and the private ranges) are dialled directly and do go through the guard.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote

from ._aio import connect_within

log = logging.getLogger(__name__)

MAX_RESPONSE_HEAD = 8192
RESPONSE_TIMEOUT = 10.0


class UpstreamError(OSError):
    """The upstream proxy could not be reached or refused the CONNECT; ``status`` is its
    non-2xx status code when it answered one."""

    def __init__(self, *args: object, status: int | None = None) -> None:
        super().__init__(*args)
        self.status = status


@dataclass(frozen=True)
class UpstreamConfig:
    """Where tunnels go: directly, or through an HTTP proxy. Compares by value.

    Credentials (from ``user:pass@`` in the proxy URL) are sent as ``Proxy-Authorization:
    Basic``; they are kept out of ``repr`` and ``str`` and never logged.
    """

    host: str | None = None
    port: int | None = None
    no_proxy: tuple[str, ...] = ()
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def direct(cls) -> UpstreamConfig:
        return cls()

    @classmethod
    def http_proxy(
        cls,
        host: str,
        port: int,
        no_proxy: tuple[str, ...] | list[str] = (),
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> UpstreamConfig:
        if not host:
            raise ValueError("upstream proxy host must not be empty")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"upstream proxy port out of range: {port!r}")
        return cls(host.strip("[]"), port, tuple(no_proxy), username, password)

    @classmethod
    def from_url(cls, url: str, no_proxy: tuple[str, ...] | list[str] = ()) -> UpstreamConfig:
        """An HTTP upstream from ``[http[s]://][user:pass@]host:port[/]``; ValueError if unparseable."""
        parsed = _parse_proxy_url_full(url)
        if parsed is None:
            raise ValueError(f"unparseable proxy URL: {_redact(url)!r}")
        host, port, user, password = parsed
        return cls.http_proxy(host, port, no_proxy, username=user, password=password)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> UpstreamConfig:
        """``HTTPS_PROXY`` then ``https_proxy``; unset / blank / unparseable → direct."""
        env = os.environ if environ is None else environ
        raw = env.get("HTTPS_PROXY") or env.get("https_proxy") or ""
        if not raw.strip():
            return cls.direct()
        parsed = _parse_proxy_url_full(raw.strip())
        if parsed is None:
            log.warning("ignoring unparseable HTTPS_PROXY %r; connecting directly", _redact(raw))
            return cls.direct()
        host, port, user, password = parsed
        return cls.http_proxy(host, port, parse_no_proxy(env), username=user, password=password)

    @property
    def is_direct(self) -> bool:
        return self.host is None

    def __str__(self) -> str:
        if self.is_direct:
            return "direct"
        auth = "***@" if self.username is not None else ""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{auth}{host}:{self.port}"


def _redact(url: str) -> str:
    """``url`` with any userinfo replaced, for error messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    at = rest.rfind("@", 0, rest.find("/") if "/" in rest else len(rest))
    if at >= 0:
        rest = "***@" + rest[at + 1 :]
    return f"{scheme}://{rest}" if sep else rest


def _parse_proxy_url_full(url: str) -> tuple[str, int, str | None, str | None] | None:
    if not url or any(c.isspace() for c in url):
        return None
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme.lower() not in ("http", "https"):
            return None
    else:
        rest = url
    if rest.endswith("/"):
        rest = rest[:-1]
    if "/" in rest or "?" in rest or "#" in rest:
        return None
    user = password = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        u, colon, p = userinfo.partition(":")
        user = unquote(u)
        password = unquote(p) if colon else ""
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0 or rest[close + 1 : close + 2] != ":":
            return None
        host = rest[1:close]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        port_s = rest[close + 2 :]
    else:
        host, colon, port_s = rest.rpartition(":")
        if not colon or not host or ":" in host:
            return None
    if not port_s.isascii() or not port_s.isdigit() or len(port_s) > 5:
        return None
    port = int(port_s)
    if not 1 <= port <= 65535:
        return None
    return host, port, user, password


def parse_proxy_url(url: str) -> tuple[str, int] | None:
    """``(host, port)`` from ``[http[s]://][user:pass@]host:port[/]``, else None.

    Missing, zero or non-numeric port, whitespace, a path, or another scheme → None.
    A bracketed IPv6 host is returned without brackets.
    """
    parsed = _parse_proxy_url_full(url)
    return None if parsed is None else (parsed[0], parsed[1])


def parse_no_proxy(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``NO_PROXY`` (then ``no_proxy``) entries: comma-split, trimmed, leading dots dropped."""
    env = os.environ if environ is None else environ
    raw = env.get("NO_PROXY") or env.get("no_proxy") or ""
    out = []
    for entry in raw.split(","):
        entry = entry.strip().lstrip(".").lower()
        if entry:
            out.append(entry)
    return tuple(out)


def _as_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def bypasses_proxy(host: str, no_proxy: tuple[str, ...] | list[str]) -> bool:
    """True when ``host`` should be dialled directly rather than through the upstream.

    Entries: ``*`` (everything), an exact name, a domain suffix (``walmart.com`` covers
    ``a.b.walmart.com`` but never ``evilwalmart.com``), an IP address, or a CIDR range
    (``10.0.0.0/8``) that covers an IP-literal host. A ``:port`` on an entry is ignored.
    """
    name = host.strip().lower().rstrip(".")
    ip = _as_ip(name)
    for entry in no_proxy:
        entry = entry.strip().lower().lstrip(".")
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            if ip is None:
                continue
            try:
                net = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                continue
            if ip.version == net.version and ip in net:
                return True
            continue
        entry_ip = _as_ip(entry)
        if entry_ip is None and entry.count(":") == 1:
            entry = entry.rpartition(":")[0]
            entry_ip = _as_ip(entry)
        elif entry.startswith("[") and "]:" in entry:
            entry_ip = _as_ip(entry[1 : entry.index("]")])
        if entry_ip is not None:
            if ip is not None and ip == entry_ip:
                return True
            continue
        if ip is None and (name == entry or name.endswith("." + entry)):
            return True
    return False


# ── Dialling ─────────────────────────────────────────────────────────────────


async def open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """Connect to the IP address ``host`` (no name lookup) within ``timeout``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await connect_within(sock, (host, port), timeout)
    except TimeoutError:
        sock.close()
        raise TimeoutError(f"connect to {host}:{port} timed out after {timeout}s") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_proxy(cfg: UpstreamConfig, timeout: float) -> socket.socket:
    """Connect to the upstream proxy itself (its host may be a name or an address)."""
    assert cfg.host is not None and cfg.port is not None
    loop = asyncio.get_running_loop()
    if _as_ip(cfg.host) is not None:
        return await open_tcp(cfg.host, cfg.port, timeout)
    infos = await asyncio.wait_for(loop.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM), timeout)
    last: BaseException | None = None
    for info in infos:
        try:
            return await open_tcp(str(info[4][0]), cfg.port, timeout)
        except OSError as e:
            last = e
    raise last or OSError(f"no address for upstream proxy {cfg.host}")


def proxy_authorization(cfg: UpstreamConfig) -> str | None:
    """The ``Proxy-Authorization`` header line (no CRLF) for ``cfg``'s credentials, if any."""
    if cfg.username is None:
        return None
    token = base64.b64encode(f"{cfg.username}:{cfg.password or ''}".encode()).decode("ascii")
    return f"Proxy-Authorization: Basic {token}"


def connect_request(cfg: UpstreamConfig, host: str, port: int) -> bytes:
    """The CONNECT request sent to the upstream for ``host:port``."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", "Proxy-Connection: keep-alive"]
    auth = proxy_authorization(cfg)
    if auth is not None:
        lines.append(auth)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def _response_head_end(buf: bytes) -> int:
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


async def connect_upstream(
    cfg: UpstreamConfig,
    host: str,
    port: int,
    *,
    connect_timeout: float = 10.0,
    response_timeout: float = RESPONSE_TIMEOUT,
) -> tuple[socket.socket, bytes]:
    """Open a tunnel to ``host:port`` through the upstream HTTP proxy ``cfg``.

    Returns the connected socket and any bytes the upstream sent after its response head
    (they belong to the tunnel: the caller must relay them to the client first). Raises
    ``UpstreamError`` for a non-2xx reply or an unreadable response, ``TimeoutError`` or
    ``OSError`` when the proxy cannot be reached.
    """
    if cfg.is_direct:
        raise ValueError("connect_upstream needs an HTTP upstream, not a direct config")
    loop = asyncio.get_running_loop()
    sock = await _open_proxy(cfg, connect_timeout)
    try:
        await loop.sock_sendall(sock, connect_request(cfg, host, port))
        buf = b""

        async def read_head() -> int:
            nonlocal buf
            while True:
                end = _response_head_end(buf)
                if end >= 0:
                    return end
                if len(buf) >= MAX_RESPONSE_HEAD:
                    raise UpstreamError(f"upstream response head exceeds {MAX_RESPONSE_HEAD} bytes")
                chunk = await loop.sock_recv(sock, MAX_RESPONSE_HEAD)
                if not chunk:
                    raise UpstreamError("upstream proxy closed the connection before answering CONNECT")
                buf += chunk

        try:
            end = await asyncio.wait_for(read_head(), response_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"upstream proxy did not answer CONNECT within {response_timeout}s") from None
        status_line = buf[:end].split(b"\n", 1)[0].strip()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise UpstreamError(f"malformed upstream response {status_line[:100]!r}")
        code = int(parts[1])
        if not 200 <= code < 300:
            raise UpstreamError(f"upstream proxy refused CONNECT to {host}:{port} with {code}", status=code)
        return sock, buf[end:]
    except BaseException:
        sock.close()
        raise
