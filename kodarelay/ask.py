"""``kodarelay run|serve --ask``: a decider that asks the person at the terminal.

The prompt goes to the controlling terminal (``/dev/tty``), never to CMD's stdout, and names
the protocol, host, port and client; answers: ``y`` allow once, ``a`` allow always, ``n``
deny once, ``N`` deny always (an empty answer or end of input denies once). One question
at a time: the decider shares each pending question among the clients that wait for it.
CMD shares the terminal, so it should not be reading it while a question is open. The fence
refuses CMD the ioctls that push input into a terminal (``TIOCSTI``, ``TIOCLINUX``), so CMD
cannot answer for the person; it can still print on that terminal, and the prompt says so.

A question can be withdrawn: when the decider's wait is cancelled (its timeout) or the
decider is closed (CMD ended), the open question ends at once with ``QuestionWithdrawn``
(the proxy records ``decider_error``), so nothing waits on a person who is no longer asked
and the next question is not answered by a stale read.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading

from .events import Request

ANSWERS = {"y": "allow", "yes": "allow", "a": "allow_always", "always": "allow_always",
           "n": "deny", "no": "deny", "N": "deny_always", "never": "deny_always"}

#: what ``run``'s summary says of the decider reasons when the decider is ``--ask``
SUMMARY_TEXT = {
    "decider_denied": "you answered no",
    "decider_timeout": "you did not answer in time",
    "decider_error": "not answered: the question was still open when it was withdrawn (CMD ended)",
}

MAX_ANSWER = 256


class QuestionWithdrawn(Exception):
    """The question was withdrawn before anyone answered it."""

    quiet = True        # the dialer logs it without a traceback: an expected end, not a bug


class _Question:
    """One open question: a pipe whose write end withdraws it. The asking thread closes it;
    a withdraw after that is a no-op (never a write to a reused fd)."""

    def __init__(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        self.withdrawn = False
        self._closed = False
        self._lock = threading.Lock()

    def withdraw(self) -> None:
        with self._lock:
            if self.withdrawn or self._closed:
                return
            self.withdrawn = True
            os.write(self.wake_w, b"x")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.wake_r)
                os.close(self.wake_w)


class TerminalDecider:
    """Asks on ``tty`` (default: the controlling terminal); ``OSError`` when there is none."""

    def __init__(self, tty: str = "/dev/tty") -> None:
        self._in = os.open(tty, os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            self._out = os.open(tty, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._in)
            raise
        self._lock = threading.Lock()        # one question on the terminal at a time
        self._state = threading.Lock()       # guards _open and _closed
        self._open: set[_Question] = set()
        self._closed = False

    async def __call__(self, request: Request) -> str:
        question = _Question()
        with self._state:
            if self._closed:
                question.close()
                raise QuestionWithdrawn("the terminal decider is closed")
            self._open.add(question)
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._ask, request, question)
        finally:
            question.withdraw()       # a cancelled wait (timeout) must not leave a read behind

    def _ask(self, request: Request, question: _Question) -> str:
        try:
            with self._lock:
                if question.withdrawn:
                    raise QuestionWithdrawn("withdrawn before it was asked")
                shown = f"[{request.host}]" if ":" in request.host else request.host
                who = f" for {request.client}" if request.client else ""
                self._write(f"\nkodarelay: {request.method} {shown}:{request.port} ({request.protocol}{who}) is not "
                            "on the allowlist. (CMD shares this terminal and can print here, but cannot type "
                            "for you.) Allow? [y]es once, [a]lways, [n]o, [N]ever: ")
                answer = self._read_answer(question).strip()
        finally:
            with self._state:
                self._open.discard(question)
            question.close()
        return ANSWERS.get(answer, ANSWERS.get(answer.lower(), "deny")) if answer else "deny"

    def _write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        while data:
            data = data[os.write(self._out, data):]

    def _read_answer(self, question: _Question) -> str:
        """One line from the terminal, or ``QuestionWithdrawn`` as soon as it is withdrawn."""
        buf = b""
        while True:
            ready, _, _ = select.select([self._in, question.wake_r], [], [])
            if question.wake_r in ready:
                self._write("(question withdrawn)\n")
                raise QuestionWithdrawn("withdrawn before an answer came")
            data = os.read(self._in, MAX_ANSWER)
            if not data:                       # end of input: deny once
                return buf.decode("utf-8", "replace")
            buf += data
            if b"\n" in buf or len(buf) >= MAX_ANSWER:
                return buf.split(b"\n", 1)[0].decode("utf-8", "replace")

    def withdraw_all(self) -> int:
        """End every open question now (CMD ended: nobody needs the answer) and refuse new
        ones; returns how many were open."""
        with self._state:
            self._closed = True
            for question in self._open:
                question.withdraw()
            return len(self._open)

    def close(self) -> None:
        self.withdraw_all()
        with self._lock:                       # an _ask in progress has returned
            os.close(self._in)
            os.close(self._out)


__all__ = ["QuestionWithdrawn", "SUMMARY_TEXT", "TerminalDecider"]
