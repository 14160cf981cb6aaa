# Type stub for the compiled module. Its shared surface is exactly the pure-Python twin's
# (kodarelay/_relay_py.py, the readable specification); the engine controls are its own.
import socket
from typing import Any

from ._errors import HeadError as HeadError
from ._errors import Socks5Error as Socks5Error

def http_head_end(buf: bytes, max_size: int = 8192) -> int: ...
def parse_request_line(head: bytes) -> tuple[str, str, str]: ...
def split_host_port(authority: str) -> tuple[str, int]: ...
def parse_http_head(head: bytes) -> tuple[str, str, str, list[tuple[bytes, bytes]]]: ...
def parse_response_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]: ...
def parse_absolute_target(target: str) -> tuple[str, int, str, str]: ...
def parse_socks5_greeting(buf: bytes) -> tuple[int, bytes] | None: ...
def parse_socks5_request(buf: bytes) -> tuple[int, int, int, str, int] | None: ...
async def relay_with_timeouts(
    a: socket.socket, b: socket.socket, idle: float = 300.0, total: float = 3600.0
) -> tuple[int, int]: ...

# Engine controls (compiled only).
def set_engine_threads(n: int) -> None: ...
def set_splice_enabled(enabled: bool) -> None: ...
def set_pipe_size(nbytes: int) -> None: ...
def shutdown_engine() -> None: ...
def engine_stats() -> dict[str, Any]: ...
def _test_fail_thread_start(k: int) -> None: ...  # test hook: the k-th thread start fails

# Native handshake front-end (compiled only; see kodarelay/serving.py).
class DialError(OSError): ...

class _Handshake:
    proto: int
    overflow: bool
    data: bytes
    user: bytes | None
    def close(self) -> None: ...
    def reply_and_close(self, reply: bytes) -> None: ...
    def detach(self) -> int: ...
    def dial(
        self, addresses: list[str], port: int, ok_reply: bytes, early: bytes, connect_timeout: float,
        idle: float, total: float, socks: bool, loop: Any = None, on_done: Any = None,
        inspect: tuple[Any, ...] | None = None,
    ) -> Any:
        """``inspect``: ``(TlsContext server, TlsContext client, RequestRules, host, client)``
        serves the tunnel inspected, in the engine."""

class _NativeListener:
    """The engine serving a listening socket (see ``native_listen``)."""

    loop: Any
    cb: Any
    direct: Any
    on_refused: Any
    @property
    def plan_generation(self) -> int: ...
    def set_plan(
        self, proto: int, host: bytes, port: int, plan: tuple[Any, ...], ttl: float, gen: int | None = None,
        record_host: str | None = None,
    ) -> bool:
        """Cache a plan for (proto 0 HTTP / 1 SOCKS5, host exactly as the client sent it, port):
        ``("direct", [ip, ...], ok_reply[, inspect])``, ``("refuse", reply, reason)`` or
        ``("chain", upstream_ip, upstream_port, connect_request, ok_reply)``; ``ttl`` seconds
        (``inf``: until ``clear_plans``; ``<= 0``: not stored). A ``gen`` older than
        ``plan_generation`` (a ``clear_plans`` ran while deciding) stores nothing. At most 4,096
        plans (the oldest is evicted); hosts over 255 bytes are never stored."""
    def clear_plans(self) -> None:
        """Drop every plan; once it returns no cached plan is used."""
    def plan_stats(self) -> dict[str, int]:
        """plans, hits, misses, refused, evicted, live (tunnels opened from plans, running)."""
    def close(self) -> None: ...

def native_listen(
    lsock: socket.socket, mode: str, handshake_timeout: float, loop: Any, cb: Any, direct: Any = None,
    on_refused: Any = None, connect_timeout: float = 10.0, idle_timeout: float = 300.0,
    total_timeout: float = 3600.0, max_handshakes: int = 0,
) -> _NativeListener:
    """Serve ``lsock``'s handshakes in the engine. A handshake whose key has a cached plan is
    served there without the GIL; its refusals reach ``on_refused(records, dropped)`` in
    batches, in order (records: ``(time, proto, host, port, reason, upstream_status)``; at most
    1,024 queued per listener, the oldest dropped and counted). Misses go to ``direct`` (on
    the completer thread) then ``cb(items, err)`` on ``loop``. Concurrent misses for one key
    all reach Python, whose Dialer shares one lookup among them."""

def _plan_key(proto: int, data: bytes) -> tuple[bytes, int, int] | None: ...

# ── inspected tunnels in the engine (_inspect.pxi, _inspect.c) ──────────────

class TlsContext:
    """An OpenSSL context of the engine's own (never one of the ``ssl`` module's)."""

def tls_server_context(pem: bytes) -> TlsContext:
    """Presents ``pem`` (leaf, chain, key); ALPN ``http/1.1`` only. ``ValueError`` if it does not load."""

def tls_client_context(cafile: str | None = None) -> TlsContext:
    """Verifies origins (chain, name) against ``cafile`` or the system's store; ALPN ``http/1.1``."""

def tls_engine() -> str | None:
    """The OpenSSL version the engine's inspected tunnels use; None when built without it."""

class RequestRules:
    """A host's request rules for the engine: ``judged``, then ``(deny, methods, path, text)``."""
    def __init__(self, judged: bool, rules: Any = ()) -> None: ...
    def judge(self, method: str, path: str) -> tuple[str | None, str | None, str | None]: ...

def _glob(pattern: str, path: str) -> bool: ...
def _bad_path(path: str) -> str | None: ...

class SecretTable:
    """``(name, phantom, value, hosts text, covers)`` per secret, for one tunnel's host."""
    def __init__(self, secrets: Any) -> None: ...
