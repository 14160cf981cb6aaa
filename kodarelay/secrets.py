"""Phantom secrets: the agent holds a look-alike, the proxy swaps in the real value.

``Secret(name, value, hosts)`` gives CMD ``secret.phantom`` (``secret_env``); on an
inspected (decrypted) request to one of ``hosts`` every occurrence of the phantom in the
request target and header values, ``Authorization: Basic`` included (decoded, swapped,
re-encoded), is replaced by the value, and the value an origin echoes in a response header
goes back as the phantom. Bodies are not rewritten. A phantom in plain HTTP to a secret's
host is refused (``secret_plaintext``: it would go out in clear, and the value was never
meant to), and a phantom to any other host is refused (``secret_leak``). A phantom inside a
blind tunnel is not seen: it is only a phantom.

Choices where the SPEC is silent:

* the phantom keeps the value's prefix up to and including its first ``_`` or ``-`` when
  that comes within the first 12 characters (``ghp_``, ``sk-``, ``xoxb-``), then random
  letters and digits: as many as keep the value's length when that leaves at least 22 of
  them (130 bits), else 22;
* ``Proxy-Authorization`` is the proxy's own header and never checked (it is dropped before
  the request goes on);
* a file-backed secret (``Secret.from_file``) re-reads its first line when the file's
  modification time or size changed, checked at most once a second;
* ``repr`` and ``str`` of a secret show its name and hosts only, never value or phantom.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets as _random
import string
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from .filter import Filter

RANDOM_CHARS = 22
MAX_PREFIX = 12
_ALPHABET = string.ascii_letters + string.digits
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BASIC = re.compile(rb"^(\s*basic\s+)([A-Za-z0-9+/=]+)(\s*)$", re.IGNORECASE)
#: never looked into: the proxy's own credentials, dropped before the request goes on
_SKIPPED = frozenset({b"proxy-authorization"})


def make_phantom(value: str) -> str:
    """A random stand-in for ``value`` of the same shape (see the module docstring)."""
    prefix = ""
    for i, c in enumerate(value[:MAX_PREFIX]):
        if c in "_-":
            prefix = value[: i + 1]
            break
    n = max(len(value) - len(prefix), RANDOM_CHARS)
    while True:
        phantom = prefix + "".join(_random.choice(_ALPHABET) for _ in range(n))
        if phantom != value and phantom not in value and value not in phantom:
            return phantom


class Secret:
    """A credential CMD never sees: ``phantom`` stands in for ``value`` on ``hosts``."""

    __slots__ = ("name", "hosts", "filter", "phantom", "phantom_bytes", "_value", "_path", "_stamp", "_checked",
                 "_lock", "_covers")

    def __init__(self, name: str, value: str, hosts: Iterable[str]) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"a secret's name is an environment variable name, not {name!r}")
        if not isinstance(value, str) or not value or "\n" in value or "\r" in value:
            raise ValueError(f"secret {name}: the value must be one non-empty line of text")
        if isinstance(hosts, str):
            hosts = [h for h in hosts.split(",") if h]
        self.hosts: tuple[str, ...] = tuple(hosts)
        if not self.hosts:
            raise ValueError(f"secret {name}: give the hosts it may go to")
        self.name = name
        self.filter = Filter(allow=self.hosts)
        self._value = value
        self.phantom = make_phantom(value)
        self.phantom_bytes = self.phantom.encode()
        self._covers: dict[tuple[str, int | None], bool] = {}    # (host, port) -> whether it is ours
        self._path: str | None = None
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, name: str, path: str | os.PathLike[str], hosts: Iterable[str]) -> Secret:
        """A secret whose value is the first line of ``path``, re-read when the file changes."""
        value, stamp = _first_line(name, os.fspath(path))
        secret = cls(name, value, hosts)
        secret._path = os.path.abspath(os.fspath(path))
        secret._stamp = stamp
        secret._checked = time.monotonic()
        return secret

    @property
    def path(self) -> str | None:
        """The file a ``from_file`` secret is read from (the fence hides it from CMD)."""
        return self._path

    @property
    def value(self) -> str:
        if self._path is not None and time.monotonic() - self._checked >= 1.0:
            with self._lock:
                self._checked = time.monotonic()
                try:
                    st = os.stat(self._path)
                    if (st.st_mtime, st.st_size) != self._stamp:
                        self._value, self._stamp = _first_line(self.name, self._path)
                except (OSError, ValueError):
                    pass            # keep the last good value
        return self._value

    def covers(self, host: str, port: int | None) -> bool:
        key = (host, port)
        known = self._covers.get(key)
        if known is None:
            known = self.filter.allows(host, port)
            if len(self._covers) >= 4096:
                self._covers.clear()
            self._covers[key] = known
        return known

    def __repr__(self) -> str:
        return f"Secret({self.name!r}, hosts={list(self.hosts)!r})"

    __str__ = __repr__

    def __reduce__(self) -> str | tuple[object, ...]:
        raise TypeError("a kodarelay.Secret is not pickled: its value stays in this process")


def _first_line(name: str, path: str) -> tuple[str, tuple[float, int]]:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        line = f.readline(65536).decode("utf-8").strip()
    if not line:
        raise ValueError(f"secret {name}: {path} has no value on its first line")
    return line, (st.st_mtime, st.st_size)


def secret_env(secrets: Iterable[Secret]) -> list[tuple[str, str]]:
    """``(NAME, phantom)`` pairs: what CMD's environment gets instead of the values."""
    return [(s.name, s.phantom) for s in secrets]


class Swapped(NamedTuple):
    """A request the secrets allow: its target and fields with values swapped in."""

    target: str
    fields: list[tuple[bytes, bytes]]
    names: tuple[str, ...]


class Leak(NamedTuple):
    """A request the secrets refuse: ``secret_leak`` or ``secret_plaintext``."""

    reason: str
    name: str
    hosts: tuple[str, ...]


class SecretSet:
    """The secrets of one server, checked on every request it reads."""

    def __init__(self, secrets: Sequence[Secret]) -> None:
        for s in secrets:
            if not isinstance(s, Secret):
                raise TypeError(f"secrets takes kodarelay.Secret objects, not {type(s).__name__}")
        names = [s.name for s in secrets]
        if len(set(names)) != len(names):
            raise ValueError("two secrets share a name")
        self.secrets = tuple(secrets)
        self.hosts = Filter(allow=[h for s in secrets for h in s.hosts])

    def __bool__(self) -> bool:
        return bool(self.secrets)

    def for_host(self, host: str, port: int | None) -> bool:
        """Whether ``host`` is some secret's: its tunnels are decrypted."""
        return self.hosts.allows(host, port)

    def check(self, host: str, port: int, target: str, fields: list[tuple[bytes, bytes]],
              over_tls: bool) -> Swapped | Leak | None:
        """Judge and rewrite one request: None when it carries no phantom."""
        found = [s for s in self.secrets if self._carries(s, target, fields)]
        if not found:
            return None
        for s in found:
            if not s.covers(host, port):
                return Leak("secret_leak", s.name, s.hosts)
            if not over_tls:
                return Leak("secret_plaintext", s.name, s.hosts)
        out = list(fields)
        for s in found:
            value = s.value
            target = target.replace(s.phantom, value)
            out = [(k, v if k.lower() in _SKIPPED else _swap_value(v, s.phantom.encode(), value.encode()))
                   for k, v in out]
        return Swapped(target, out, tuple(s.name for s in found))

    def unswap(self, host: str, port: int, fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Response fields with any value of ``host``'s secrets given back as its phantom."""
        out = fields
        for s in self.secrets:
            if not s.covers(host, port):
                continue
            value, phantom = s.value.encode(), s.phantom_bytes
            if any(value in v or _basic_has(v, value) for _, v in out):
                out = [(k, _swap_value(v, value, phantom)) for k, v in out]
        return out

    #: the most secrets the engine's search takes (``kodarelay/_inspect.c``: one bit each)
    ENGINE_MAX = 32

    def engine_table(self, host: str, port: int) -> Any:
        """These secrets as the engine's request pipeline takes them for a tunnel to
        ``host:port`` (``_relay.SecretTable``): every request is searched for every phantom,
        a leak to another host included. The values are read now, once per tunnel. None when
        there are more than the engine takes (the asyncio path serves them)."""
        from . import relay

        if len(self.secrets) > self.ENGINE_MAX:
            return None
        return relay.impl.SecretTable([(s.name, s.phantom_bytes, s.value.encode(), ",".join(s.hosts),  # type: ignore[attr-defined]
                                        s.covers(host, port)) for s in self.secrets])

    def redact(self, text: str) -> str:
        """``text`` with every phantom and value replaced by ``[NAME]`` (for records)."""
        for s in self.secrets:
            if s.phantom in text:
                text = text.replace(s.phantom, f"[{s.name}]")
            v = s.value
            if v in text:
                text = text.replace(v, f"[{s.name}]")
        return text

    @staticmethod
    def _carries(s: Secret, target: str, fields: list[tuple[bytes, bytes]]) -> bool:
        if s.phantom in target:
            return True
        p = s.phantom_bytes
        return any(k.lower() not in _SKIPPED and (p in v or _basic_has(v, p)) for k, v in fields)


def _basic_decoded(v: bytes) -> tuple[bytes, bytes, bytes] | None:
    if b"basic" not in v[:16].lower():
        return None                     # (most values: no regex, no decoding)
    m = _BASIC.match(v)
    if m is None:
        return None
    try:
        return m.group(1), base64.b64decode(m.group(2), validate=True), m.group(3)
    except (binascii.Error, ValueError):
        return None


def _basic_has(v: bytes, needle: bytes) -> bool:
    d = _basic_decoded(v)
    return d is not None and needle in d[1]


def _swap_value(v: bytes, old: bytes, new: bytes) -> bytes:
    if old in v:
        v = v.replace(old, new)
    d = _basic_decoded(v)
    if d is not None and old in d[1]:
        v = d[0] + base64.b64encode(d[1].replace(old, new)) + d[2]
    return v


__all__ = ["Leak", "Secret", "SecretSet", "Swapped", "make_phantom", "secret_env"]
