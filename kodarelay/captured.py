"""The proxy's door for captured connections (``kodarelay run``'s capture; the fence's side is
``kodarelay.capture``).

The fence's helper hands each connection CMD opened to an address it did not mean for the
proxy over a socket file of its own, the *capture socket* (``capture_uds_path``), with one
line first: ``CONNECT host:port HTTP/1.1`` and a blank line, ``host`` being the name behind
a synthetic address or the literal address CMD dialled. Then come CMD's own bytes. Nothing
is ever answered on success: CMD talks to the origin as if directly.

Why a socket file of its own and no header: every byte CMD sends through the proxy
variables also arrives over the fence's UDS bridge, so "came over the bridge" proves
nothing; but CMD cannot open any Unix socket (the fence's seccomp filter; ``--allow-unix``
mediates only the paths it names), so whatever reaches the capture socket came from the
helper. The socket is 0600 like the bridge's; another process of the same user on the host
could connect to it, and gets nothing it could not get from the TCP port: a capture is
judged exactly like a CONNECT, with more checks, never fewer.

Each capture is judged as a CONNECT to ``host:port`` (filter, decider, guard, upstream;
``needs_inspection`` for hosts with request rules), recorded with protocol ``"capture"``:

* **443**: the TLS ClientHello is read first; when it carries an SNI naming another host
  than ``host``, the connection is refused (``sni_mismatch``; so is any SNI on a connection
  CMD made to a literal address: a name is not that address). No SNI, not TLS, or no hello
  within ``handshake_timeout``: judged by ``host`` alone.
* **80**: served by plain-HTTP forwarding (``kodarelay.forward``), one request at a time:
  each request's ``Host`` (when present) must name ``host``, else ``421`` with reason
  ``host_mismatch`` (the connection stays usable when the request had no body); refusals
  are the usual ``403`` with a body. Request rules judge each request. An absolute-form
  request must name ``host`` too, and a ``CONNECT`` is a ``400``: the origin is no proxy. A
  captured request names no client (a ``Proxy-Authorization`` there was meant for no proxy).
* **other ports**: judged without reading the client's bytes (server-first protocols work).
* A refusal on any port but 80 closes the connection, with no byte written.
* A synthetic address the fence no longer knows (``198.18.0.0/15``, handed over as a
  literal) is refused ``unknown_address``: the proxy never dials that range.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import tempfile
import time
from typing import TYPE_CHECKING, Any

from . import relay
from .dial import Refusal
from .events import Event
from .fencedns import POOL, canonical_name
from .serving import HandshakeTimeout, Protocol, Target
from .violations import _printable

if TYPE_CHECKING:
    from .serving import Handoff, ProxyServer

log = logging.getLogger(__name__)

PROTOCOL = "capture"
MAX_PREAMBLE = 1024
MAX_CLIENT_HELLO = 65536          # read no further for an SNI: judged by the name alone


class CaptureProtocol(Protocol):
    """A captured connection: no reply on success, none on refusal (the connection closes)."""

    name = PROTOCOL
    ok_reply = b""

    def refusal_reply(self, r: Refusal, host: str, port: int | None) -> bytes:
        return b""


CAPTURE = CaptureProtocol()


def capture_uds_path(pid: int, port: int) -> str:
    """The capture socket of proxy ``port`` of process ``pid``, beside its UDS bridge."""
    return os.path.join(tempfile.gettempdir(), f"kodarelay-capture-{pid}-{port}.sock")


def client_hello_sni(data: bytes) -> tuple[bool, str | None]:
    """``(complete, sni)`` for the first bytes of a TLS connection.

    ``complete`` is False while more bytes could still complete the ClientHello (at most
    ``MAX_CLIENT_HELLO``); True with ``sni`` None when the bytes are not a ClientHello or it
    names no server. A hello spread over several records is put together."""
    if not data:
        return False, None
    if data[0] != 0x16:
        return True, None
    hs = bytearray()
    off = 0
    while off + 5 <= len(data):
        ctype, _version, length = struct.unpack_from("!BHH", data, off)
        if ctype != 0x16:
            return True, None
        chunk = data[off + 5:off + 5 + length]
        hs += chunk
        off += 5 + length
        if len(hs) >= 4:
            if hs[0] != 0x01:
                return True, None
            need = 4 + int.from_bytes(hs[1:4], "big")
            if len(hs) >= need:
                return True, _sni_of(bytes(hs[4:need]))
        if len(chunk) < length:
            break
    return len(data) >= MAX_CLIENT_HELLO, None


def _sni_of(body: bytes) -> str | None:
    """The host_name of a ClientHello body's server_name extension (None: none, or malformed)."""
    try:
        off = 2 + 32
        off += 1 + body[off]                                   # session id
        off += 2 + int.from_bytes(body[off:off + 2], "big")    # cipher suites
        off += 1 + body[off]                                   # compression methods
        end = off + 2 + int.from_bytes(body[off:off + 2], "big")
        off += 2
        while off + 4 <= min(end, len(body)):
            etype, elen = struct.unpack_from("!HH", body, off)
            off += 4
            if etype == 0:
                ext = body[off:off + elen]
                pos = 2
                while pos + 3 <= len(ext):
                    ntype, nlen = ext[pos], int.from_bytes(ext[pos + 1:pos + 3], "big")
                    name = ext[pos + 3:pos + 3 + nlen]
                    if ntype == 0:
                        return name.decode("ascii", "backslashreplace")
                    pos += 3 + nlen
                return None
            off += elen
    except IndexError:
        return None
    return None


def host_header_names(value: bytes, host: str) -> bool:
    """Whether a ``Host`` value names ``host`` (its port, if any, is not compared)."""
    text = value.decode("ascii", "replace").strip()
    if text.startswith("["):
        name = text[1:text.find("]")] if "]" in text else text
    else:
        name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return canonical_name(name) == canonical_name(host.strip("[]"))


def _stale_synthetic(host: str) -> bool:
    try:
        return ipaddress.ip_address(host) in POOL
    except ValueError:
        return False


def refuse(srv: ProxyServer, host: str, port: int | None, reason: str, detail: str | None = None,
           method: str = "CONNECT", path: str | None = None, protocol: str = PROTOCOL) -> None:
    """Record a capture refused by capture's own checks (a violation and a refuse event);
    an inspected tunnel's requests are checked the same way under their own ``protocol``."""
    srv.record(protocol, host, port, reason, None, detail, method=method if path else None, path=path)
    srv.emit(Event(time.time(), "refuse", protocol, method, host, port, None, reason, None, "default",
                   detail=detail, path=path))


async def capture_session(srv: ProxyServer, conn: socket.socket) -> Handoff | None:
    """Serve one connection from the capture socket (see the module docstring)."""
    deadline = srv._loop.time() + srv.handshake_timeout
    buf = b""
    try:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_PREAMBLE:
                return None
            chunk = await srv.recv_some(conn, deadline, MAX_PREAMBLE)
            if not chunk:
                return None
            buf += chunk
        method, target, _version = relay.parsers.parse_request_line(buf[:end + 4])
        host, port = relay.parsers.split_host_port(target)
    except (HandshakeTimeout, relay.parsers.HeadError) as e:
        log.info("capture socket: bad preamble: %s", e)
        return None
    if method != "CONNECT":
        return None
    early = buf[end + 4:]
    if _stale_synthetic(host):
        refuse(srv, host, port, "unknown_address", "a synthetic address the fence's DNS did not give out")
        return None
    if port == 80:
        import asyncio

        from . import forward

        srv._handshaking.pop(asyncio.current_task(), None)  # type: ignore[arg-type]   # as a Handover
        return await forward.captured_session(srv, conn, host, port, early, deadline)
    if port == 443:
        complete, sni = client_hello_sni(early)
        while not complete:
            try:
                chunk = await srv.recv_some(conn, deadline, MAX_CLIENT_HELLO)
            except HandshakeTimeout:
                break                   # no hello in time: judged by the name alone
            if not chunk:
                return None
            early += chunk
            complete, sni = client_hello_sni(early)
        if sni is not None and canonical_name(sni) != canonical_name(host):
            refuse(srv, host, port, "sni_mismatch", f"the TLS SNI names {_printable(sni)}")
            return None
    return await srv.serve_parsed(conn, CAPTURE, Target(host, port, early, "CONNECT", None))


class CaptureSocket:
    """The capture socket of one server: accepts on its loop and serves each connection."""

    def __init__(self, srv: ProxyServer, path: str, mode: int = 0o600) -> None:
        from .bridge import _bind_private

        self.path = path
        self._srv = srv
        self._listener, st = _bind_private(path, mode)
        self._ident = (st.st_dev, st.st_ino)
        self._closed = False
        self._task = srv._loop.create_task(self._accept())

    async def _accept(self) -> None:
        from ._aio import accept_forever

        try:
            await accept_forever(self._listener, self._accepted, what=f"capture socket {self.path}", log=log,
                                 backoff=0.1, closed=lambda: self._closed)
        finally:
            self._listener.close()

    def _accepted(self, conn: socket.socket) -> None:
        srv = self._srv
        conn.setblocking(False)
        if srv._closed:
            conn.close()
            return

        async def session(c: socket.socket) -> Handoff | None:
            return await capture_session(srv, c)

        # A capture counts as a handshake until judged, as on the proxy's port: at
        # ``max_handshakes`` the oldest is shed (a CMD opening connections that never send).
        while len(srv._handshaking) >= srv.max_handshakes and srv._shed_oldest():
            pass
        task = srv._loop.create_task(srv._run(conn, session))
        srv._handshaking[task] = None
        srv._track(task)

    def close(self) -> None:
        """Stop accepting and unlink the path (if still ours); on the server's loop or after it stopped."""
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass
        if self._srv._loop.is_closed() or not self._srv._loop.is_running():
            self._listener.close()


def open_capture_socket(srv: ProxyServer) -> Any:
    """A ``CaptureSocket`` for ``srv`` at ``capture_uds_path`` (on the server's running loop)."""
    return CaptureSocket(srv, capture_uds_path(os.getpid(), srv.port))


__all__ = ["CAPTURE", "CaptureSocket", "capture_session", "capture_uds_path", "client_hello_sni",
           "host_header_names", "open_capture_socket"]
