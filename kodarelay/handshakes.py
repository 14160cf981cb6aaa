"""What a handshake becomes once parsed (``Target``, ``Reject``, ``Handover``), what a
protocol module supplies (``Protocol``), an allowed tunnel's ``Ticket``, and how a served
connection ends: shared by ``kodarelay.serving`` and its compiled front-end glue
(``kodarelay.native_front``), which import it and not each other's internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from typing import Any, Iterator, NamedTuple, Optional, Tuple, Union

from . import relay
from .dial import Refusal
from .events import next_tunnel_id

log = logging.getLogger("kodarelay.serving")

#: how a tunnel normally ends: the peer left (never worth more than a debug line)
_NORMAL_ENDS = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN}


#: What a successful handshake hands to the relay: the connected upstream socket, bytes the
#: client sent after its request (for the upstream), bytes the upstream sent after its
#: response (for the client), and the tunnel's ticket (for its end event).
Handoff = Tuple[socket.socket, bytes, bytes, "Ticket"]


class Target(NamedTuple):
    """A handshake parsed into what the policy judges (host as the client sent it)."""

    host: str
    port: int
    early: bytes = b""
    method: str = "CONNECT"
    client: Optional[str] = None
    #: a SOCKS5 IPv4 / IPv6 address: only an IP / CIDR rule (or a decider) admits it, and
    #: without one the refusal is ``address_type`` (the client should send the name)
    literal: bool = False
    #: the SHA-256 (hex) of the password the client sent with its name, never the password
    token: Optional[str] = None


class Reject(NamedTuple):
    """A handshake refused before any policy (malformed, unsupported): its reply (None: close
    silently) and the violation to record (``reason`` None: none)."""

    reply: Optional[bytes]
    reason: Optional[str]
    host: str = ""
    port: Optional[int] = None
    client: Optional[str] = None


class Handover(NamedTuple):
    """A connection another session serves from here on (plain-HTTP forwarding): what was
    read of it so far."""

    data: bytes


Parsed = Union[Target, Reject, Handover]


class Protocol:
    """What a protocol module supplies: parsing a complete handshake and encoding replies."""

    name = "tcp"
    ok_reply = b""

    def parse(self, data: bytes) -> Parsed:
        raise NotImplementedError

    def parse_handshake(self, h: Any) -> Parsed:
        """``parse`` for a handshake the engine read."""
        return self.parse(h.data)

    def refusal_reply(self, r: Refusal, host: str, port: int | None) -> bytes:
        raise NotImplementedError


class Ticket:
    """An allowed tunnel, from its allow event to its end event."""

    __slots__ = ("id", "protocol", "method", "host", "port", "client", "start", "path", "inspected", "status",
                 "secrets", "account")

    def __init__(self, protocol: str, method: str, host: str, port: int, client: str | None,
                 path: str | None = None, tunnel: Ticket | None = None, inspected: bool = False,
                 secrets: tuple[str, ...] = ()) -> None:
        # a request inside an inspected tunnel shares that tunnel's id (SPEC: events for requests)
        self.id: int = tunnel.id if tunnel is not None else next_tunnel_id()
        self.protocol = protocol
        self.method = method
        self.host = host
        self.port = port
        self.client = client
        self.start = time.monotonic()
        self.path = path              # a forwarded request's path (never its query)
        self.inspected = inspected    # decrypted (the tunnel itself, or a request in one)
        self.status: int | None = None   # the origin's status, for a request's end event
        self.secrets = secrets        # the names of the secrets swapped into the request
        self.account: Any = None      # the known client whose limits hold a slot for it


def native_frontend_available() -> bool:
    """The compiled engine serves accept and handshakes (``KODARELAY_NO_NATIVE_FRONTEND`` turns it off)."""
    return hasattr(relay.impl, "native_listen") and not relay.env_flag("KODARELAY_NO_NATIVE_FRONTEND")


@contextlib.contextmanager
def _connection_ends(conn: socket.socket) -> Iterator[None]:
    """How every served connection ends: closed, its normal endings logged, never raised."""
    try:
        yield
    except asyncio.CancelledError:
        pass
    except TimeoutError as e:
        log.debug("tunnel ended: %s", e)
    except OSError as e:
        log.debug("connection error: %s", e)
    except Exception:
        log.exception("unexpected error serving a connection")
    finally:
        conn.close()


class HandshakeTimeout(Exception):
    """The client did not finish its handshake within ``handshake_timeout``."""


__all__ = ["Handoff", "Handover", "HandshakeTimeout", "Parsed", "Protocol", "Reject", "Target", "Ticket",
           "native_frontend_available"]
