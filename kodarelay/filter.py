"""The allowlist: which ``host[:port]`` a sandboxed process may reach.

A ``Filter`` holds allow and deny rules. Every host is canonicalised before any rule sees
it (see ``canonical_host``), so two spellings of one destination always get one answer and
a malformed host never matches by accident (the reference crate split the port with
``rsplit(':')`` and mangled IPv6 literals and stray colons).

Rule kinds, each optionally limited to one port with ``:port``:

* exact name: ``github.com`` (case-insensitive, one trailing dot ignored);
* single-label wildcard: ``*.npmjs.org`` matches ``registry.npmjs.org`` only, never the
  apex ``npmjs.org`` nor ``a.b.npmjs.org``;
* IP address or CIDR: ``10.1.2.3``, ``10.0.0.0/8``, ``::1``, ``[::1]``, ``fd00::/8``,
  ``[::1]/128`` (bracket an IPv6 rule that carries a port: ``[::1]:8080``,
  ``[fd00::/8]:443``, ``[fd00::]/8:443``).

A pattern is never a URL: ``https://pypi.org`` or ``pypi.org/simple`` raise a
``PatternError`` that says so and suggests the ``host[:port]`` (see ``url_hint``).

Names only match name rules and IP literals only match IP / CIDR rules. Deny wins over
allow. A port-limited allow rule never matches an unknown port; a port-limited deny rule
always does (fail closed).

``Filter.check_resolved`` is the resolved-address guard the servers run after DNS: it
refuses loopback, link-local, cloud-metadata, unspecified, "this network" (0.0.0.0/8),
multicast, broadcast, reserved (240.0.0.0/4 and others), benchmarking (198.18.0.0/15,
2001:2::/48) and documentation addresses (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
2001:db8::/32, 3fff::/20) -- none of them is a destination a sandboxed client has a
reason to reach, and several reach the host itself -- and, with ``deny_private``, the
private ranges (RFC 1918, CGNAT, ULA), unless an IP / CIDR allow rule names them. "Names" means the rule covers the address and lies inside the refused range it is
in: ``127.0.0.1``, ``[::1]:8080`` or ``10.0.0.0/8`` unlock those addresses, while a broad
``0.0.0.0/0`` (any IP literal) or ``169.254.0.0/16`` never unlocks loopback or the
metadata address 169.254.169.254.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence, Union

from .hostaddrs import own_addresses
from .requestrules import RequestPart, split_request_pattern

log = logging.getLogger(__name__)

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
#: A canonical host: a lowercase ASCII name without trailing dot, or an IP address object.
CanonicalHost = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]

Reason = Literal["allowed", "not_allowed", "denied", "bad_host", "resolved_address", "request_not_allowed",
                 "request_denied", "bad_path"]

DEFAULT_DEV_ALLOWLIST: tuple[str, ...] = (
    "github.com",
    "*.githubusercontent.com",
    "api.github.com",
    "codeload.github.com",
    "*.npmjs.org",
    "registry.npmjs.org",
    "*.pypi.org",
    "pypi.org",
    "files.pythonhosted.org",
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    "*.docker.io",
    "registry-1.docker.io",
    "auth.docker.io",
)

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
# Characters a name may hold. "_" is accepted: it is legal in DNS, appears in real
# internal and service names, and cannot make one name match another's rule.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdef")
_OCT_DIGITS = frozenset("01234567")


class PatternError(ValueError):
    """An allow or deny pattern that cannot be parsed; the message names the pattern."""


@dataclass(frozen=True)
class Decision:
    """The verdict on one target, and the rule that made it.

    ``rule`` is the pattern (trimmed, lowercased) that decided, or None. Only ``allowed``,
    ``rule`` and ``reason`` take part in equality; ``host`` (canonical text, IPv6 without
    brackets, for dialling and logging), ``port`` and ``detail`` (why a host was bad or an
    address refused) are informational. ``bool(decision)`` is ``decision.allowed``, so a
    careless ``if decision:`` cannot admit a refused target.
    """

    allowed: bool
    rule: str | None
    reason: Reason
    host: str | None = field(default=None, compare=False)
    port: int | None = field(default=None, compare=False)
    detail: str = field(default="", compare=False)
    #: the address the guard refused (canonical text), for a ``resolved_address`` refusal
    address: str | None = field(default=None, compare=False)
    #: whether that address is in a private range (``--allow-private`` would admit it)
    private: bool = field(default=False, compare=False)

    def __bool__(self) -> bool:
        return self.allowed


# ── host canonicalisation ───────────────────────────────────────────────────


def _check_port_text(text: str) -> int:
    """A port written as plain decimal 1..65535: no sign, no spaces, no leading zero, no hex."""
    if not text:
        raise ValueError("empty port")
    if len(text) > 5 or not all(c in _DIGITS for c in text) or (len(text) > 1 and text[0] == "0"):
        raise ValueError(f"port {text!r} is not plain decimal")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return port


def split_pattern_target(text: str) -> tuple[str, int | None]:
    """Split a pattern's ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or bare ``v6`` into
    (host, port): the pattern grammar, where the port is optional (a CONNECT target's
    ``host:port``, port required, is ``relay.parsers.split_host_port``).

    The host comes back as written, brackets kept, so that ``canonical_host`` can insist a
    bracketed host is an IPv6 address (``[github.com]:443`` must not pass as github.com).
    Text with two or more colons and no brackets is a bare IPv6 address and carries no port.
    Raises ``ValueError`` for a malformed port or stray brackets.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '['")
        rest = text[end + 1 :]
        if not rest:
            return text, None
        if rest[0] != ":":
            raise ValueError("unexpected text after ']'")
        return text[: end + 1], _check_port_text(rest[1:])
    if "]" in text or "[" in text:
        raise ValueError("stray bracket")
    colons = text.count(":")
    if colons == 1:
        host, _, port_text = text.partition(":")
        return host, _check_port_text(port_text)
    return text, None


def _ends_in_number(label: str) -> bool:
    """WHATWG URL rule: a last label of digits or 0x-hex makes the host an IPv4 attempt."""
    if label and all(c in _DIGITS for c in label):
        return True
    return label.startswith("0x") and all(c in _HEX_DIGITS for c in label[2:])


def _ipv4_part(part: str) -> int:
    if part.startswith("0x"):
        digits, base, allowed = part[2:], 16, _HEX_DIGITS
    elif len(part) > 1 and part[0] == "0":
        digits, base, allowed = part[1:], 8, _OCT_DIGITS
    else:
        digits, base, allowed = part, 10, _DIGITS
    if not digits or not all(c in allowed for c in digits):
        raise ValueError(f"{part!r} is not a decimal, octal or hex number")
    return int(digits, base)


def parse_ipv4(text: str) -> ipaddress.IPv4Address:
    """Parse every numeric IPv4 spelling ``inet_aton`` accepts, strictly.

    One to four dot-separated parts, each decimal, octal (leading 0) or hex (0x); all but
    the last part are bytes, the last fills the remaining bytes (``127.1``, ``0x7f.1``,
    ``2130706433``). Anything else, including trailing garbage, is a ``ValueError``. The
    input must already be lowercase ASCII.
    """
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or len(text) > 64:
        raise ValueError(f"{text!r} is not an IPv4 address")
    values = [_ipv4_part(p) for p in parts]
    last = values.pop()
    if any(v > 255 for v in values) or last >= 256 ** (4 - len(values)):
        raise ValueError(f"{text!r} is not an IPv4 address: a part is out of range")
    number = last
    for i, v in enumerate(values):
        number |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def _parse_ipv6(text: str) -> IPAddress:
    """An IPv6 literal (no brackets); IPv4-mapped addresses become the IPv4 address."""
    if "%" in text:
        raise ValueError("IPv6 zone ids are not accepted")
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv6 address") from None
    return addr.ipv4_mapped or addr


def _check_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` (lowercase, no trailing dot) is a valid DNS name."""
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"name is longer than {MAX_NAME_LENGTH} bytes")
    bad = sorted({c for c in name if c not in _NAME_CHARS})
    if bad:
        raise ValueError(f"characters {''.join(bad)!r} are not allowed in a host name")
    for label in name.split("."):
        if not label:
            raise ValueError("empty label")
        if len(label) > MAX_LABEL_LENGTH:
            raise ValueError(f"label longer than {MAX_LABEL_LENGTH} bytes")


def canonical_host(host: str | IPAddress) -> CanonicalHost:
    """The one canonical form of a host (no port), or ``ValueError`` saying why it is bad.

    Names come back as lowercase ASCII ``str`` without the trailing dot; IP literals as
    ``ipaddress`` objects (IPv4-mapped IPv6 as the IPv4 address). Rules, in order:

    * ASCII only (IDN must arrive as punycode ``xn--``), checked before lowercasing so
      that e.g. the Kelvin sign cannot fold into ``k``;
    * no control bytes, NUL, DEL or whitespace anywhere; at most 255 characters;
    * ``[...]`` must hold an IPv6 address; any other bracket is stray;
    * a colon means IPv6 (bare ``::1``); zone ids (``fe80::1%eth0``) are refused;
    * ``@`` (userinfo) is refused;
    * lowercase, then strip ONE trailing dot; a name whose last label is numeric or
      ``0x``-hex is an IPv4 attempt (WHATWG URL rule): it parses in any ``inet_aton``
      spelling (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``) or is bad;
    * otherwise a name: labels 1..63 bytes of ``[a-z0-9-_]``, whole name at most 253.
    """
    if isinstance(host, str):
        known = _CANONICAL.get(host)
        if known is not None:
            return known                # (every request of a kept-alive connection asks again)
        canon = _canonical_text(host)
        if len(_CANONICAL) >= _CANONICAL_MAX:
            _CANONICAL.clear()
        _CANONICAL[host] = canon
        return canon
    if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        if isinstance(host, ipaddress.IPv6Address):
            if host.scope_id:
                raise ValueError("IPv6 zone ids are not accepted")
            return host.ipv4_mapped or host
        return host
    raise TypeError(f"host must be a str, not {type(host).__name__}")


#: control bytes, NUL, space and DEL (refused anywhere in a host)
_CONTROL = re.compile(r"[\x00-\x20\x7f]")

#: hosts already made canonical (the function is pure; bad hosts are never kept)
_CANONICAL: dict[str, CanonicalHost] = {}
_CANONICAL_MAX = 4096


def _canonical_text(host: str) -> CanonicalHost:
    if not host:
        raise ValueError("empty host")
    if not host.isascii():
        raise ValueError("non-ASCII host; IDN must arrive as punycode (xn--)")
    if _CONTROL.search(host):
        raise ValueError("control byte, NUL or whitespace in host")
    if len(host) > MAX_NAME_LENGTH + 2:
        raise ValueError(f"host is longer than {MAX_NAME_LENGTH} bytes")
    text = host.lower()
    if text.startswith("[") and text.endswith("]"):
        return _parse_ipv6(text[1:-1])
    if "[" in text or "]" in text:
        raise ValueError("stray bracket in host")
    if ":" in text:
        return _parse_ipv6(text)
    if "@" in text:
        raise ValueError("userinfo ('@') in host")
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValueError("empty host")
    last = text.rpartition(".")[2]
    if _ends_in_number(last):
        return parse_ipv4(text)
    _check_name(text)
    return text


def parse_target(text: str | IPAddress, port: int | None = None) -> tuple[CanonicalHost, int | None]:
    """Canonical (host, port) from ``host[:port]`` / ``[v6][:port]`` / bare v6 plus a port.

    A port in the text and the ``port`` argument must agree; both must be 1..65535.
    Raises ``ValueError`` (``TypeError`` for a non-int port) with the reason.
    """
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, int):
            raise TypeError(f"port must be an int or None, not {type(port).__name__}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
    if isinstance(text, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return canonical_host(text), port
    if not isinstance(text, str):
        raise TypeError(f"host must be a str, not {type(text).__name__}")
    if text.isascii() and _CONTROL.search(text):
        raise ValueError("control byte, NUL or whitespace in host")
    host, text_port = split_pattern_target(text)
    if text_port is not None and port is not None and text_port != port:
        raise ValueError(f"host carries port {text_port} but port {port} was given")
    return canonical_host(host), text_port if text_port is not None else port


def is_ip_literal(host: str | IPAddress) -> bool:
    """True when ``host`` (optionally with a port) is a valid IP literal in any accepted form."""
    try:
        canon, _ = parse_target(host)
    except (ValueError, TypeError):
        return False
    return not isinstance(canon, str)


def format_host(host: CanonicalHost, port: int | None = None) -> str:
    """Text form of a canonical host: IPv6 bracketed when a port follows."""
    if isinstance(host, ipaddress.IPv6Address):
        text = f"[{host}]" if port is not None else str(host)
    else:
        text = str(host)
    return text if port is None else f"{text}:{port}"


# ── patterns ────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class _Rule:
    text: str
    index: int
    port: int | None
    name: str | None = None  # exact name, or the suffix of a wildcard
    wildcard: bool = False
    net: IPNetwork | None = None
    request: RequestPart | None = None   # methods / path: a request rule (``kodarelay.requestrules``)

    def port_matches(self, port: int | None, *, deny: bool) -> bool:
        if self.port is None:
            return True
        if port is None:
            return deny  # unknown port: a port-limited deny applies, a port-limited allow does not
        return port == self.port


def _pattern_error(raw: str, reason: str) -> PatternError:
    return PatternError(f"pattern {raw!r} {reason}")


_URL_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://")
_CIDR_TAIL = re.compile(r"/[0-9]+(:.*)?")


def url_hint(text: str) -> tuple[str, str | None] | None:
    """What a pattern or target written as a URL means: ``(what, suggestion)``, else None.

    Users paste URLs (``https://pypi.org``, ``pypi.org/simple``) where a ``host[:port]`` is
    wanted; without this the parsers would report a puzzling ``invalid port '//pypi.org'``.
    ``what`` is ``"is a URL"`` (a ``scheme://``) or ``"has a path"``; ``suggestion`` is the
    ``host[:port]`` it names (userinfo dropped; the port kept only when the URL writes one,
    since a scheme's default port would narrow an allow rule), or None when the URL names no
    usable host. CIDR rules (``10.0.0.0/8``, ``10.0.0.0/8:443``, ``[fd00::/8]:443``,
    ``fd00::/8``) are not URLs.
    """
    text = text.strip().lower()
    m = _URL_SCHEME.match(text)
    if m is not None:
        what, rest = "is a URL", text[m.end() :]
    else:
        cut = min((i for i in (text.find(c) for c in "/?#") if i >= 0), default=-1)
        if cut < 0:
            return None
        if text[cut] == "/" and (_CIDR_TAIL.fullmatch(text[cut:]) or ("[" in text[:cut] and "]" not in text[:cut])):
            return None
        what, rest = "has a path", text
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[2]
    candidates = [authority]
    if not authority.startswith("[") and authority.count(":") == 1:
        candidates.append(authority.partition(":")[0])  # scp-like git@github.com:org/repo
    for suggestion in candidates:
        if not suggestion:
            continue
        try:
            _parse_pattern(suggestion, 0)
        except (PatternError, TypeError):
            continue
        return what, suggestion
    return what, None


def _url_error(raw: str, hint: tuple[str, str | None]) -> PatternError:
    what, suggestion = hint
    tail = f" (did you mean {suggestion!r}?)" if suggestion else ""
    return _pattern_error(raw, f"{what}; patterns are host[:port], e.g. 'pypi.org' or '*.npmjs.org:443'{tail}")


def _ipv4_from_mapped_net(net: ipaddress.IPv6Network) -> IPNetwork:
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if net.prefixlen >= 96 and net.subnet_of(mapped):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def _parse_network(raw: str, text: str) -> IPNetwork:
    addr_text, _, prefix = text.partition("/")
    if not prefix or not all(c in _DIGITS for c in prefix) or len(prefix) > 3:
        raise _pattern_error(raw, "has an invalid CIDR prefix length")
    try:
        if ":" in addr_text:
            if "%" in addr_text:
                raise ValueError
            return _ipv4_from_mapped_net(ipaddress.IPv6Network(text, strict=False))
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise _pattern_error(raw, "is not a valid CIDR network") from None


def _parse_pattern(raw: str, index: int) -> _Rule:
    if not isinstance(raw, str):
        raise TypeError(f"pattern must be a str, not {type(raw).__name__}: {raw!r}")
    text = raw.strip()
    if not text:
        raise _pattern_error(raw, "must not be empty")
    if not text.isascii():
        raise _pattern_error(raw, "must be ASCII; write IDN labels as punycode (xn--...)")
    if any((c < " " and c != "\t") or c == "\x7f" for c in text):
        raise _pattern_error(raw, "contains a control byte")
    if _URL_SCHEME.match(text.lower()) or "@" in text:     # a URL, or scp-like git@host:path
        hint = url_hint(text)
        if hint is not None:
            raise _url_error(raw, hint)
    text, request, why = split_request_pattern(text)
    if why is not None:
        raise _pattern_error(raw, why)
    if any(c <= " " for c in text):
        raise _pattern_error(raw, "contains whitespace")
    text = text.lower()
    hint = url_hint(text)
    if hint is not None:
        raise _url_error(raw, hint)
    rule = _parse_host_pattern(raw, text, index)
    if request is None:
        return rule
    return dataclasses.replace(rule, text=raw.strip(), request=request)


def _parse_host_pattern(raw: str, text: str, index: int) -> _Rule:
    """The host half of a pattern (lower-cased, no methods, no path)."""

    port: int | None = None
    bracketed = text.startswith("[")
    if bracketed:
        end = text.find("]")
        if end < 0:
            raise _pattern_error(raw, "has an unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest.startswith("/") and "/" not in host:  # [::1]/128, [fd00::]/8:443
            prefix, colon, after = rest.partition(":")
            host, rest = host + prefix, colon + after
        if rest:
            if rest[0] != ":":
                raise _pattern_error(raw, "has unexpected text after ']'")
            port_text = rest[1:]
        else:
            port_text = None
    elif "[" in text or "]" in text:
        raise _pattern_error(raw, "has a stray bracket")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None
    if port_text is not None:
        try:
            port = _check_port_text(port_text)
        except ValueError:
            raise _pattern_error(raw, f"has an invalid port {port_text!r}") from None
    if not host:
        raise _pattern_error(raw, "has no host")

    if bracketed or ":" in host:
        if "/" in host:
            return _Rule(text, index, port, net=_parse_network(raw, host))
        try:
            addr = _parse_ipv6(host)
        except ValueError as e:
            raise _pattern_error(raw, f"is not a valid IPv6 rule: {e}") from None
        return _Rule(text, index, port, net=ipaddress.ip_network(addr))
    if "/" in host:
        return _Rule(text, index, port, net=_parse_network(raw, host))
    if host.startswith("*."):
        suffix = host[2:]
        if "*" in suffix:
            raise _pattern_error(raw, "may use '*' only as the whole leftmost label ('*.example.com')")
        if suffix.endswith("."):
            suffix = suffix[:-1]
        if not suffix:
            raise _pattern_error(raw, "needs at least one label after '*.'")
        if _ends_in_number(suffix.rpartition(".")[2]):
            raise _pattern_error(raw, "puts a wildcard over an IP address; use a CIDR rule")
        try:
            _check_name(suffix)
        except ValueError as e:
            raise _pattern_error(raw, f"is not a valid name: {e}") from None
        return _Rule(text, index, port, name=suffix, wildcard=True)
    if "*" in host:
        raise _pattern_error(raw, "may use '*' only as the whole leftmost label ('*.example.com')")
    try:
        canon = canonical_host(host)
    except ValueError as e:
        raise _pattern_error(raw, f"is not a valid host: {e}") from None
    if isinstance(canon, str):
        return _Rule(text, index, port, name=canon)
    return _Rule(text, index, port, net=ipaddress.ip_network(canon))


class _RuleSet:
    """Rules of one polarity, indexed for O(1) name lookups."""

    def __init__(self, patterns: Sequence[str], offset: int) -> None:
        self.rules = [_parse_pattern(p, offset + i) for i, p in enumerate(patterns)]
        self.exact: dict[str, list[_Rule]] = {}
        self.wild: dict[str, list[_Rule]] = {}
        self.nets: list[_Rule] = []
        for r in self.rules:
            if r.net is not None:
                self.nets.append(r)
            elif r.wildcard:
                self.wild.setdefault(r.name or "", []).append(r)
            else:
                self.exact.setdefault(r.name or "", []).append(r)

    def _candidates(self, host: CanonicalHost) -> list[_Rule]:
        if isinstance(host, str):
            candidates = list(self.exact.get(host, ()))
            head, dot, parent = host.partition(".")
            if dot and head:
                candidates += self.wild.get(parent, ())
            return candidates
        return [r for r in self.nets if r.net is not None and host in r.net]

    def match(self, host: CanonicalHost, port: int | None, *, deny: bool) -> _Rule | None:
        """The first rule naming ``host:port`` at connection level: every allow rule names its
        host (request rules included); only host rules deny a whole connection."""
        best: _Rule | None = None
        for r in self._candidates(host):
            if deny and r.request is not None:
                continue
            if r.port_matches(port, deny=deny) and (best is None or r.index < best.index):
                best = r
        return best

    def match_request(self, host: CanonicalHost, port: int | None, method: str, path: str, *,
                      deny: bool) -> _Rule | None:
        """The first rule matching one request (a host rule matches every request)."""
        best: _Rule | None = None
        for r in self._candidates(host):
            if not r.port_matches(port, deny=deny):
                continue
            if r.request is not None and not r.request.matches(method, path):
                continue
            if best is None or r.index < best.index:
                best = r
        return best

    def has_request_rules(self, host: CanonicalHost, port: int | None) -> bool:
        return any(r.request is not None and r.port_matches(port, deny=True) for r in self._candidates(host))

    def match_address(self, addrs: Iterable[IPAddress], port: int | None, *, deny: bool) -> _Rule | None:
        found = [r for a in addrs if (r := self.match(a, port, deny=deny)) is not None]
        return min(found, key=lambda r: r.index) if found else None

    def covers_specifically(self, addr: IPAddress, port: int | None) -> bool:
        """True when an allow IP / CIDR rule other than the whole address space covers ``addr``."""
        for r in self.nets:
            net = r.net
            if (net is not None and net.version == addr.version and net.prefixlen > 0 and addr in net
                    and r.port_matches(port, deny=False)):
                return True
        return False

    def names_within(self, addr: IPAddress, special: IPNetwork, port: int | None) -> bool:
        """True when an allow IP / CIDR rule covers ``addr`` and lies inside ``special``.

        A rule must name the special range, not merely overlap it: ``127.0.0.1`` or
        ``10.0.0.0/8`` unlock their addresses, ``0.0.0.0/0`` or ``169.254.0.0/16`` do not
        unlock loopback or 169.254.169.254.
        """
        for r in self.nets:
            net = r.net
            if (
                net is not None
                and net.version == special.version == addr.version
                and addr in net
                and net.subnet_of(special)  # type: ignore[arg-type]
                and r.port_matches(port, deny=False)
            ):
                return True
        return False


# ── the resolved-address guard's tables ─────────────────────────────────────


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(n), label) for n, label in pairs)


# Refused after DNS whatever deny_private says (most specific first, for the message).
_SPECIAL = _nets(
    ("169.254.169.254/32", "cloud metadata"),
    ("100.100.100.200/32", "cloud metadata"),
    ("fd00:ec2::254/128", "cloud metadata"),
    ("255.255.255.255/32", "broadcast"),
    ("0.0.0.0/8", "unspecified ('this network'; 0.0.0.0 reaches the local host)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("192.0.0.0/24", "reserved (IETF protocol assignments)"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "reserved (deprecated IPv4-compatible)"),
    ("100::/64", "reserved (discard-only)"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("2001:2::/48", "benchmarking"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)
# Refused only with deny_private=True.
_PRIVATE = _nets(
    ("10.0.0.0/8", "private (RFC 1918)"),
    ("172.16.0.0/12", "private (RFC 1918)"),
    ("192.168.0.0/16", "private (RFC 1918)"),
    ("100.64.0.0/10", "private (CGNAT)"),
    ("fc00::/7", "private (ULA)"),
    ("fec0::/10", "private (deprecated site-local)"),
)
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")


def embedded_ipv4(addr: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for judging it like that IPv4 address.

    IPv4-mapped ``::ffff:0:0/96``, IPv4-translated ``::ffff:0:0:0/96``, NAT64
    ``64:ff9b::/96`` and local-use ``64:ff9b:1::/48`` (last 32 bits), 6to4 ``2002::/16``
    and Teredo (the client address).
    """
    if not isinstance(addr, ipaddress.IPv6Address):
        return None
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _SIIT or any(addr in n for n in _NAT64):
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


def _classify(addr: IPAddress, deny_private: bool) -> tuple[str, IPNetwork] | None:
    """Why ``addr`` (already unwrapped to the address it reaches) is refused, and the range."""
    for net, label in _SPECIAL:
        if addr.version == net.version and addr in net:
            return label, net
    if deny_private:
        for net, label in _PRIVATE:
            if addr.version == net.version and addr in net:
                return label, net
    return None


def _parse_resolved(value: object) -> IPAddress:
    """An address from a resolver: an ``ipaddress`` object or its text (scope id ignored)."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr: IPAddress = value
    elif isinstance(value, str):
        text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            canon = canonical_host(text)  # numeric IPv4 spellings of an IP-literal target
            if isinstance(canon, str):
                raise ValueError(f"{value!r} is not an IP address") from None
            addr = canon
    else:
        raise ValueError(f"{value!r} is not an IP address")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id:
        addr = ipaddress.IPv6Address(int(addr))
    return addr


# ── the filter ──────────────────────────────────────────────────────────────


class Filter:
    """Allow and deny rules over canonical hosts; immutable once built.

    ``Filter(allow=(), deny=())``: ``allow`` may be passed positionally (the crate's
    ``patterns``). ``len(f)`` is the number of patterns given; an empty filter denies all.
    Raises ``PatternError`` naming the first bad pattern.
    """

    __slots__ = ("_allow", "_deny", "allow_patterns", "deny_patterns")

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        if isinstance(allow, str) or isinstance(deny, str):
            raise TypeError("allow and deny take an iterable of patterns, not a single str")
        self.allow_patterns: tuple[str, ...] = tuple(allow)
        self.deny_patterns: tuple[str, ...] = tuple(deny)
        self._deny = _RuleSet(self.deny_patterns, 0)
        self._allow = _RuleSet(self.allow_patterns, len(self.deny_patterns))

    def __len__(self) -> int:
        return len(self.allow_patterns) + len(self.deny_patterns)

    def __repr__(self) -> str:
        return f"Filter(allow={list(self.allow_patterns)!r}, deny={list(self.deny_patterns)!r})"

    def allows(self, host: str, port: int | None = None) -> bool:
        """True when ``host`` (``host:port``, ``[v6]:port`` or bare v6 accepted) may be reached."""
        return self.explain(host, port).allowed

    def explain(self, host: str, port: int | None = None, method: str | None = None,
                path: str | None = None) -> Decision:
        """The decision for ``host[:port]`` with the rule that made it; never raises for a str.

        With ``method`` and / or ``path`` it judges one request to that host (see
        ``explain_request``); without, the connection: admitted when any allow rule names
        the host (request rules included) and no host deny rule does."""
        if method is not None or path is not None:
            return self.explain_request(host, port, method or "GET", path or "/")
        decision, _ = self._explain(host, port)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("filter %r port=%s -> %s (%s)", host, port, decision.reason, decision.rule)
        return decision

    def explain_request(self, host: str | IPAddress, port: int | None, method: str, path: str) -> Decision:
        """One request: allowed when an allow rule matches it (a host rule matches every
        request) and no deny rule does; deny wins. ``request_denied`` for a deny request rule,
        ``request_not_allowed`` when allow rules name the host but none matches the request,
        ``bad_path`` for a path that is not plain on a host with request rules. The query
        string is never matched."""
        from .requestrules import bad_path

        try:
            canon, port = parse_target(host, port)
        except ValueError as e:
            return Decision(False, None, "bad_host", None, port, str(e))
        text = str(canon)
        if self._deny.match(canon, port, deny=True) is not None:
            rule = self._deny.match(canon, port, deny=True)
            return Decision(False, rule.text if rule else None, "denied", text, port)
        if self.has_request_rules(canon, port):
            why = bad_path(path)
            if why is not None:
                return Decision(False, None, "bad_path", text, port, why)
        rule = self._deny.match_request(canon, port, method, path, deny=True)
        if rule is not None:
            return Decision(False, rule.text, "request_denied", text, port)
        rule = self._allow.match_request(canon, port, method, path, deny=False)
        if rule is not None:
            return Decision(True, rule.text, "allowed", text, port)
        if self._allow.match(canon, port, deny=False) is not None:
            return Decision(False, None, "request_not_allowed", text, port)
        return Decision(False, None, "not_allowed", text, port)

    def has_request_rules(self, host: str | IPAddress, port: int | None = None) -> bool:
        """Whether a request rule (allow or deny) names ``host[:port]``: its requests must then
        be judged one by one (plain HTTP is; HTTPS needs inspection)."""
        try:
            canon, port = parse_target(host, port)
        except ValueError:
            return False
        return self._allow.has_request_rules(canon, port) or self._deny.has_request_rules(canon, port)

    def request_program(self, host: str | IPAddress, port: int) -> tuple[bool, list[tuple[bool, frozenset[str] | None,
                                                                                    str | None, str]]]:
        """``explain_request`` for one (host, port), compiled for the engine's inspected
        tunnels: whether its requests are judged at all, then every rule naming it as
        ``(deny, methods or None, path pattern or None, text)``, deny rules and allow rules
        each in rule order (a host rule is one with neither: it matches every request)."""
        canon, port_n = parse_target(host, port)
        if not self.has_request_rules(canon, port_n):
            return False, []
        out: list[tuple[bool, frozenset[str] | None, str | None, str]] = []
        for deny, rules in ((True, self._deny), (False, self._allow)):
            for r in sorted(rules._candidates(canon), key=lambda r: r.index):
                if r.port_matches(port_n, deny=deny):
                    req = r.request
                    out.append((deny, req.methods if req is not None else None,
                                req.path if req is not None else None, r.text))
        return True, out

    def needs_inspection(self, host: str | IPAddress, port: int | None = None) -> bool:
        """Whether a tunnel to ``host[:port]`` can only be admitted with its requests judged:
        a deny request rule names it, or request rules admit it and no host rule does."""
        try:
            canon, port = parse_target(host, port)
        except ValueError:
            return False
        if self._deny.has_request_rules(canon, port):
            return True
        if not self._allow.has_request_rules(canon, port):
            return False
        return not any(r.request is None and r.port_matches(port, deny=False) for r in self._allow._candidates(canon))

    def _explain(self, host: str | IPAddress, port: int | None) -> tuple[Decision, CanonicalHost | None]:
        try:
            canon, port = parse_target(host, port)
        except ValueError as e:
            return Decision(False, None, "bad_host", None, port, str(e)), None
        text = str(canon)
        rule = self._deny.match(canon, port, deny=True)
        if rule is not None:
            return Decision(False, rule.text, "denied", text, port), canon
        rule = self._allow.match(canon, port, deny=False)
        if rule is not None:
            return Decision(True, rule.text, "allowed", text, port), canon
        return Decision(False, None, "not_allowed", text, port), canon

    def check_resolved(
        self,
        host: str | IPAddress,
        port: int | None,
        addresses: Iterable[str | IPAddress],
        *,
        deny_private: bool = False,
    ) -> Decision:
        """Judge every address ``host`` resolved to; one refused address refuses the name.

        ``host`` is re-judged by the rules first (a refusal there is returned as is). Each
        address is unwrapped to the IPv4 it carries (mapped, NAT64, 6to4, Teredo) and then:
        a deny IP / CIDR rule covering it (raw or unwrapped) -> ``denied``; an ordinary
        public address -> fine; loopback, link-local, metadata, unspecified, multicast,
        broadcast, reserved, benchmarking, documentation (and with ``deny_private`` RFC
        1918, ULA, CGNAT) -> ``resolved_address``, unless an allow IP / CIDR rule names it (covers it and
        lies inside that range, so ``0.0.0.0/0`` unlocks nothing special) or the target is
        the name ``localhost`` allowed by a ``localhost`` rule and the address is loopback. An
        unparseable address or an empty list -> ``resolved_address``. For an IP-literal
        target pass ``[host]`` as the addresses.
        """
        if isinstance(addresses, (str, bytes)):
            raise TypeError("addresses must be a list of address strings, not a single str")
        decision, canon = self._explain(host, port)
        if not decision.allowed:
            return decision
        return self.guard_addresses(decision, canon, addresses, deny_private=deny_private)

    def guard_addresses(
        self,
        decision: Decision,
        canon: CanonicalHost | None,
        addresses: Iterable[str | IPAddress],
        *,
        deny_private: bool = False,
    ) -> Decision:
        """The address half of ``check_resolved``: judge ``addresses`` for a target already
        admitted by ``decision`` (a rule, or a decider when no rule matched); returns
        ``decision`` itself when every address passes."""
        port = decision.port
        text = decision.host

        def refuse(reason: Reason, rule: str | None, detail: str, address: IPAddress | None = None,
                   private: bool = False) -> Decision:
            log.debug("guard refuses %s: %s", text, detail)
            return Decision(False, rule, reason, text, port, detail, None if address is None else str(address), private)

        localhost_ok = canon == "localhost" and decision.rule is not None and self._is_localhost_rule(decision.rule)
        seen = 0
        for value in addresses:
            seen += 1
            try:
                addr = _parse_resolved(value)
            except ValueError:
                return refuse("resolved_address", None, f"unparseable address {value!r}")
            inner = embedded_ipv4(addr)
            forms = (addr,) if inner is None else (addr, inner)
            rule = self._deny.match_address(forms, port, deny=True)
            if rule is not None:
                return refuse("denied", rule.text, f"{addr} is covered by deny rule {rule.text!r}")
            target = inner if inner is not None else addr
            found = _classify(target, deny_private)
            if found is None and inner is not None:
                found = _classify(addr, deny_private)
                target = addr
            if found is None:
                if target not in own_addresses():
                    continue
                # an address of this host's own interfaces: any IP / CIDR rule short of the
                # whole address space that covers it admits it (0.0.0.0/0 or ::/0 do not)
                if self._allow.covers_specifically(target, port):
                    continue
                shown = f"{addr} ({inner})" if inner is not None else str(addr)
                return refuse("resolved_address", None, f"{shown} is an address of this host", target)
            why, special = found
            if self._allow.names_within(target, special, port):
                continue
            if localhost_ok and any(target.version == n.version and target in n for n in _LOOPBACK):
                continue
            shown = f"{addr} ({inner})" if inner is not None else str(addr)
            return refuse("resolved_address", None, f"{shown} is {why}", target,
                          any(special == net for net, _ in _PRIVATE))
        if not seen:
            return refuse("resolved_address", None, "no addresses to check")
        return decision

    def _is_localhost_rule(self, text: str) -> bool:
        return any(r.text == text and r.name == "localhost" and not r.wildcard for r in self._allow.rules)
