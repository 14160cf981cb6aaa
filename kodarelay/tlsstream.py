"""A TLS side of an inspected connection, for the pure-Python request pipeline.

The pipeline (``kodarelay.forward``) reads and writes ``_Stream`` objects over non-blocking
sockets it waits on itself, with one idle clock per connection; ``ssl.SSLObject`` over two
memory BIOs fits that without a second event-loop protocol: records go through the same
socket waits, and the clock sees every byte either way.
"""

from __future__ import annotations

import socket
import ssl

from .forward import CHUNK, _Idle, _Stream


class TlsStream(_Stream):
    """``_Stream`` whose bytes are TLS records; ``buf`` and ``sent`` count plaintext."""

    raw = False

    def __init__(self, sock: socket.socket, clock: _Idle, ctx: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None, received: bytes = b"") -> None:
        super().__init__(sock, clock)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._eof_seen = False
        self.tls = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        if received:
            self._in.write(received)

    async def _flush(self) -> None:
        """The records the TLS object wrote onto the socket (not counted: ``sent`` is plaintext)."""
        await self._send_raw(self._out.read(), False)

    async def _receive(self) -> bool:
        """Move received records into the TLS object; False at EOF (after which reads end)."""
        data = await self._recv_raw()
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        """Complete the TLS handshake (``ssl.SSLError`` / ``ConnectionError`` when it fails)."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._receive():
                    try:
                        self.tls.do_handshake()
                    except ssl.SSLWantReadError:
                        pass
                    raise ConnectionResetError("the peer closed during the TLS handshake")
        await self._flush()

    @property
    def alpn(self) -> str | None:
        return self.tls.selected_alpn_protocol()

    async def fill(self) -> bool:
        while True:
            try:
                data = self.tls.read(CHUNK)
            except ssl.SSLWantReadError:
                await self._flush()         # a key update or ticket may want an answer
                if self._in.eof or not await self._receive():
                    if self._in.eof and self._in.pending == 0 and self._eof_seen:
                        return False
                    self._eof_seen = self._in.eof
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return False                # many peers close without close_notify
            if self._out.pending:
                await self._flush()
            if not data:
                return False
            self.clock.touch()
            self.buf += data
            return True

    async def send(self, data: bytes | memoryview) -> None:
        if not data:
            return
        self.tls.write(data)
        self.sent += len(data)
        await self._flush()

    async def close_notify(self) -> None:
        """Say goodbye in TLS (best effort: the socket is closed right after)."""
        try:
            self.tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        try:
            await self._flush()
        except (OSError, TimeoutError):
            pass


__all__ = ["TlsStream"]
