"""``kodarelay run|serve --ask``: a decider that asks the person at the terminal.

The prompt goes to the controlling terminal (``/dev/tty``), never to CMD's stdout, and names
the protocol, host, port and client; answers: ``y`` allow once, ``a`` allow always, ``n``
deny once, ``N`` deny always (an empty answer or end of input denies once). One question
at a time: the decider shares each pending question among the clients that wait for it.
CMD shares the terminal, so it should not be reading it while a question is open.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import IO

from .events import Request

ANSWERS = {"y": "allow", "yes": "allow", "a": "allow_always", "always": "allow_always",
           "n": "deny", "no": "deny", "N": "deny_always", "never": "deny_always"}


class TerminalDecider:
    """Asks on ``tty`` (default: the controlling terminal); ``OSError`` when there is none."""

    def __init__(self, tty: str = "/dev/tty") -> None:
        self._in: IO[str] = os.fdopen(os.open(tty, os.O_RDONLY | os.O_NOCTTY), "r", encoding="utf-8",
                                      errors="replace")
        try:
            self._out: IO[str] = os.fdopen(os.open(tty, os.O_WRONLY | os.O_NOCTTY), "w", encoding="utf-8",
                                           errors="replace")
        except BaseException:
            self._in.close()
            raise
        self._lock = threading.Lock()

    async def __call__(self, request: Request) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, self._ask, request)

    def _ask(self, request: Request) -> str:
        shown = f"[{request.host}]" if ":" in request.host else request.host
        who = f" for {request.client}" if request.client else ""
        question = (f"\nkodarelay: {request.method} {shown}:{request.port} ({request.protocol}{who}) is not "
                    "on the allowlist. Allow? [y]es once, [a]lways, [n]o, [N]ever: ")
        with self._lock:
            self._out.write(question)
            self._out.flush()
            line = self._in.readline()
        answer = line.strip()
        return ANSWERS.get(answer, ANSWERS.get(answer.lower(), "deny")) if answer else "deny"

    def close(self) -> None:
        self._in.close()
        self._out.close()


__all__ = ["TerminalDecider"]
