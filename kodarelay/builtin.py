"""``BuiltInProxy`` and ``BuiltInSocks5Proxy``: start kodarelay's own servers, get a ``ProxyHandle``.

``await spawn()`` serves on the running event loop (and stops with it); ``start()`` is for
code without a loop: the proxy gets its own loop in a daemon thread. Either way the handle
stops it from any thread, with or without a running loop, and on garbage collection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from typing import Any, Callable

from .filter import Filter
from .handle import ProxyHandle
from .serving import ProxyServer
from .server import Server
from .socks5 import Socks5Server
from .upstream import UpstreamConfig

log = logging.getLogger(__name__)

STOP_WAIT = 10.0


def _stop_on_loop(
    loop: asyncio.AbstractEventLoop, thread_id: int, server: ProxyServer, bridge: Any
) -> None:
    """Stop a server that serves on ``loop``, from whichever thread asks.

    On the loop's own thread the listener and bridge close at once and live tunnels end
    on the loop's next iterations; from another thread we wait for all of it; with the loop
    closed or no longer running, the listener and the UDS path are released by hand.
    """
    if loop.is_closed() or not loop.is_running():
        _close_without_loop(server, bridge)
    elif threading.get_ident() == thread_id:
        if bridge is not None:
            bridge.close()
        server.close()
    else:

        async def aclose() -> None:
            if bridge is not None:
                bridge.close()
            await server.aclose()

        try:
            asyncio.run_coroutine_threadsafe(aclose(), loop).result(STOP_WAIT)
        except RuntimeError:  # the loop closed meanwhile
            _close_without_loop(server, bridge)


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and finish what is still pending (a decider's call, say) before the loop closes,
    as ``asyncio.run`` does: no "Task was destroyed but it is pending"."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


class _BuiltIn:
    _server_cls: type[ProxyServer] = Server
    _bridge = False

    def __init__(
        self,
        filter: Filter,
        port: int | None = None,
        startup_timeout: float = 5.0,
        upstream: UpstreamConfig | None = None,
        **options: Any,
    ) -> None:
        self.filter = filter
        self.port = port
        self.startup_timeout = startup_timeout
        self.upstream = upstream
        #: ``capture=True`` (``kodarelay run``'s fence): also a capture socket (``kodarelay.captured``)
        self.capture = bool(options.pop("capture", False))
        self.options = options

    async def _bind(self) -> ProxyServer:
        upstream = self.upstream if self.upstream is not None else UpstreamConfig.from_env()
        return await self._server_cls.bind(self.port, self.filter, upstream=upstream, **self.options)

    async def _start_parts(self) -> tuple[ProxyServer, Any]:
        server = await self._bind()
        bridge = None
        if self._bridge and sys.platform.startswith("linux"):
            from .bridge import proxy_uds_path, spawn_uds_bridge, sweep_stale_uds_paths

            try:
                sweep_stale_uds_paths()
                bridge = await spawn_uds_bridge(proxy_uds_path(os.getpid(), server.port), server.port)
            except Exception as e:  # the bridge is optional: the TCP port still serves
                log.warning("could not attach the UDS bridge for port %d: %s", server.port, e)
            if bridge is not None and self.capture:
                bridge = _with_capture(server, bridge)
        return server, bridge

    async def spawn(self) -> ProxyHandle:
        """Bind and serve on the running loop; returns once the port accepts connections."""
        loop = asyncio.get_running_loop()
        server, bridge = await self._start_parts()
        loop.create_task(server.serve())
        thread_id = threading.get_ident()
        return self._handle(server, bridge, lambda: _stop_on_loop(loop, thread_id, server, bridge))

    def start(self) -> ProxyHandle:
        """Start the proxy on its own event loop in a daemon thread (for code without a loop)."""
        loop = asyncio.new_event_loop()
        ready: dict[str, Any] = {}
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                server, bridge = loop.run_until_complete(self._start_parts())
            except BaseException as e:
                ready["error"] = e
                started.set()
                loop.close()
                return
            ready["parts"] = (server, bridge)
            serve_task = loop.create_task(server.serve())
            started.set()
            try:
                loop.run_until_complete(serve_task)
            finally:
                try:
                    if bridge is not None:
                        bridge.close()
                    loop.run_until_complete(server.aclose())
                    _cancel_leftover_tasks(loop)
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        thread = threading.Thread(target=run, name=f"kodarelay-{self._server_cls.protocol}", daemon=True)
        thread.start()
        if not started.wait(self.startup_timeout):
            raise TimeoutError(f"built-in proxy did not start within {self.startup_timeout}s")
        if "error" in ready:
            raise ready["error"]
        server, bridge = ready["parts"]

        def stop() -> None:
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(server.close)
                except RuntimeError:  # loop closed between the check and the call
                    pass
            if threading.current_thread() is not thread:
                thread.join(STOP_WAIT)

        return self._handle(server, bridge, stop)

    def _handle(self, server: ProxyServer, bridge: Any, stop: Callable[[], None]) -> ProxyHandle:
        handle = ProxyHandle(
            server.port,
            "builtin",
            stop,
            uds_path=getattr(bridge, "path", None),
            violations=server.violations,
            servers=(server,),
        )
        handle.capture_path = getattr(bridge, "capture_path", None)
        return handle


class _BridgeAndCapture:
    """The UDS bridge and the capture socket beside it, closed together (``capture=True``)."""

    def __init__(self, bridge: Any, capture: Any) -> None:
        self.bridge = bridge
        self.capture = capture
        self.path = bridge.path
        self.capture_path = capture.path

    def close(self) -> None:
        self.capture.close()
        self.bridge.close()


def _with_capture(server: ProxyServer, bridge: Any) -> Any:
    from .captured import open_capture_socket

    try:
        return _BridgeAndCapture(bridge, open_capture_socket(server))
    except Exception as e:      # capture is optional: the fence then holds as before
        log.warning("could not open the capture socket for port %d: %s", server.port, e)
        return bridge


def _close_without_loop(server: ProxyServer, bridge: Any) -> None:
    """Last-resort cleanup when the server's loop is gone: release the port and the UDS path."""
    server._closed = True
    server._release_listener()
    if bridge is not None:
        try:
            bridge.close()
        except Exception:
            log.debug("closing the UDS bridge without a loop failed", exc_info=True)
        from .bridge import cleanup_uds_path

        cleanup_uds_path(bridge.path)


class BuiltInProxy(_BuiltIn):
    """kodarelay's HTTP CONNECT proxy (plus a UDS bridge on Linux).

    ``upstream=None`` reads ``HTTPS_PROXY`` / ``NO_PROXY`` when the proxy starts; pass
    ``UpstreamConfig.direct()`` to ignore the environment. Other keyword options are those of
    ``Server.bind`` (timeouts, ``resolver``, ``deny_private``, ``on_violation``,
    ``violation_capacity``, ``dns_ttl``, ``decider``, ``decider_timeout``, ``on_event``,
    ``max_handshakes``, ``socks5=True`` for one port that speaks both protocols,
    ``forward_http=True`` to forward plain-HTTP requests instead of answering 405).
    """

    _server_cls = Server
    _bridge = True


class BuiltInSocks5Proxy(_BuiltIn):
    """kodarelay's SOCKS5 proxy; same options as ``BuiltInProxy``, no UDS bridge."""

    _server_cls = Socks5Server
    _bridge = False
