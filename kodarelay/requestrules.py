"""Request rules: ``[METHODS ]HOST[:PORT][/PATH]`` and ``read-only HOST`` (the pattern grammar's
request half; ``kodarelay.filter`` parses the host half and keeps the rules).

``METHODS`` is a comma list of upper-case methods (``GET,HEAD``) or ``*``; ``PATH`` starts with
``/``; in it ``*`` matches any run of characters (slashes included) and everything else
matches literally; the query string is never matched. ``read-only HOST`` is
``GET,HEAD,OPTIONS HOST/*``. After an IP literal ``/N`` (digits only) stays a CIDR prefix, so a
request rule on an address names a path that is not all digits (``10.1.2.3/api/*``). A
pattern with neither methods nor a path is a host rule.

Paths are judged as sent, and must be plain: a dot segment, a backslash or a percent-encoded
``/``, ``\\``, ``.`` or NUL is ``bad_path`` (what a rule matched is what the origin receives).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

READ_ONLY = frozenset({"GET", "HEAD", "OPTIONS"})
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}")
_CIDR_TAIL = re.compile(r"/[0-9]+(:[0-9]*)?")
_PATH_CHARS = re.compile(r"/[!-~]*")            # printable ASCII, no space
_BAD_ESCAPES = re.compile(r"%(2[fFeE]|5[cC]|00)")


@dataclass(frozen=True)
class RequestPart:
    """What a request rule adds to its host rule: the methods (None: any) and the path
    pattern as written (None: any path)."""

    methods: frozenset[str] | None
    path: str | None
    regex: re.Pattern[str] | None

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(path.split("?", 1)[0]) is not None
        return True


def _path_regex(path: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(piece) for piece in path.split("*")), re.S)


def split_request_pattern(text: str) -> tuple[str, RequestPart | None, str | None]:
    """``(host_part, request part or None, error or None)`` for a stripped pattern text.

    The host part is left for the host grammar; an error is a reason (the caller names the
    pattern)."""
    methods: frozenset[str] | None = None
    path: str | None = None
    lowered = text.lower()
    if lowered.startswith("read-only ") or lowered.startswith("read-only\t"):
        host_part = text[len("read-only"):].strip()
        if not host_part or "/" in host_part and not _CIDR_TAIL.fullmatch(host_part[host_part.find("/"):]):
            return text, None, "read-only takes a host[:port] only (it means GET,HEAD,OPTIONS HOST/*)"
        return host_part, RequestPart(READ_ONLY, "/*", _path_regex("/*")), None
    if " " in text or "\t" in text:
        head, _, rest = text.replace("\t", " ").partition(" ")
        rest = rest.strip()
        if not rest or " " in rest:
            return text, None, "has whitespace; a request rule is 'METHODS host[:port][/path]'"
        if head == "*":
            methods = None
        else:
            names = head.split(",")
            if any(not _METHOD.fullmatch(m) for m in names):
                return text, None, (f"has bad methods {head!r}: write upper-case methods separated by commas "
                                    "(GET,HEAD) or *")
            methods = frozenset(names)
        text = rest
        explicit_methods = True
    else:
        explicit_methods = False
    host_part = text
    cut = _path_start(text)
    if cut >= 0:
        host_part, path = text[:cut], text[cut:]
        if not _PATH_CHARS.fullmatch(path):
            return text, None, "has a path with whitespace or non-ASCII characters"
        if "?" in path or "#" in path:
            return text, None, "has a query or fragment in its path; the query string is never matched"
    if not explicit_methods and path is None:
        return host_part, None, None
    return host_part, RequestPart(methods, path, None if path is None else _path_regex(path)), None


def _path_start(text: str) -> int:
    """Where the path begins in ``host[:port]/path``, or -1; a CIDR prefix is not a path."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return -1
        i = text.find("/", end)
        if i < 0:
            return -1
        if i == end + 1 and _CIDR_TAIL.fullmatch(text[i:]):       # [fd00::]/8, [fd00::]/8:443
            return -1
        return i
    i = text.find("/")
    if i < 0:
        return -1
    if "[" in text[:i]:
        return -1
    head = text[:i]
    tail = text[i:]
    looks_ip = head.replace(".", "").isdigit() or head.count(":") > 1
    if looks_ip and _CIDR_TAIL.fullmatch(tail):
        return -1
    return i


def bad_path(path: str) -> str | None:
    """Why ``path`` (as sent, query included) is not plain, or None."""
    target = path.split("?", 1)[0]
    if not target.startswith("/"):
        return "the path does not start with /"
    if "\\" in target:
        return "a backslash in the path"
    if _BAD_ESCAPES.search(target):
        return "a percent-encoded '/', '\\', '.' or NUL in the path"
    segments = target.split("/")
    if any(s in (".", "..") for s in segments):
        return "a dot segment in the path"
    return None


def shown_path(path: str) -> str:
    """A path for events, violations and replies: never its query string."""
    return path.split("?", 1)[0].split("#", 1)[0]


__all__ = ["READ_ONLY", "RequestPart", "bad_path", "shown_path", "split_request_pattern"]
