"""Exceptions shared by the compiled parsers and their pure-Python twin.

Both implementations raise these exact types so a caller (and a differential test) cannot
tell them apart.
"""

from __future__ import annotations


class HeadError(ValueError):
    """An HTTP request head that must be refused with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Socks5Error(ValueError):
    """A SOCKS5 message that must be refused with reply code ``rep`` (``None``: just close)."""

    def __init__(self, rep: int | None, message: str) -> None:
        super().__init__(message)
        self.rep = rep
