"""The allowlist: crate parity, host canonicalisation, deny / port / IP rules, the
resolved-address guard. Addresses here are data fed to the filter; nothing is dialled."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kodarelay
from kodarelay.filter import (
    DEFAULT_DEV_ALLOWLIST,
    Decision,
    Filter,
    PatternError,
    canonical_host,
    embedded_ipv4,
    format_host,
    is_ip_literal,
    parse_ipv4,
    parse_target,
    split_pattern_target,
)

def allowed(rule: str) -> Decision:
    return Decision(True, rule, "allowed")


NOT_ALLOWED = Decision(False, None, "not_allowed")
BAD_HOST = Decision(False, None, "bad_host")


# ── crate parity ────────────────────────────────────────────────────────────


def test_exact_match() -> None:
    f = Filter(["github.com"])
    assert f.allows("github.com")
    assert not f.allows("gitlab.com")
    assert not f.allows("api.github.com")
    assert not f.allows("evilgithub.com")


def test_positional_patterns_and_keyword_allow() -> None:
    assert Filter(["github.com"]).allows("github.com")
    assert Filter(allow=["github.com"]).allows("github.com")


def test_wildcard_matches_exactly_one_label() -> None:
    f = Filter(["*.npmjs.org"])
    assert f.allows("registry.npmjs.org")
    assert not f.allows("npmjs.org"), "the apex is not covered by the wildcard"
    assert not f.allows("a.b.npmjs.org"), "two extra labels"
    assert not f.allows("evil.npmjs.org.attacker.com")
    assert not f.allows("evilnpmjs.org")
    assert not f.allows(".npmjs.org")


def test_case_insensitive_hosts_and_patterns() -> None:
    f = Filter(["GitHub.COM", "  *.NpmJS.org  "])
    assert f.allows("github.com")
    assert f.allows("GITHUB.com")
    assert f.allows("Registry.NPMJS.org")


def test_port_is_stripped_before_matching() -> None:
    f = Filter(["github.com"])
    assert f.allows("github.com:443")
    assert f.allows("GITHUB.COM:22")
    assert f.allows("github.com", 443)


def test_empty_filter_denies_everything() -> None:
    f = Filter()
    assert len(f) == 0
    for host in ("github.com", "localhost", "127.0.0.1", "::1", "a.b"):
        assert f.explain(host) == NOT_ALLOWED


def test_len_counts_patterns_given() -> None:
    assert len(Filter(["a.com", "b.com", "a.com"])) == 3
    assert len(Filter(["a.com"], deny=["b.com", "c.com"])) == 3
    assert len(Filter(DEFAULT_DEV_ALLOWLIST)) == 15


@pytest.mark.parametrize(
    ("pattern", "phrase"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("\t\n", "must not be empty"),
        ("*.", "at least one label"),
        ("foo.*.com", "leftmost label"),
        ("foo.*", "leftmost label"),
        ("*.*.com", "leftmost label"),
        ("*foo.com", "leftmost label"),
        ("*", "leftmost label"),
        ("f*o.com", "leftmost label"),
        ("github.com:0", "invalid port"),
        ("github.com:65536", "invalid port"),
        ("github.com:https", "invalid port"),
        ("github.com:+443", "invalid port"),
        ("github.com:", "invalid port"),
        ("[::1]:x", "invalid port"),
        ("*.npmjs.org:99999", "invalid port"),
    ],
)
def test_pattern_errors_name_the_pattern(pattern: str, phrase: str) -> None:
    with pytest.raises(PatternError) as info:
        Filter([pattern])
    assert phrase in str(info.value)
    assert repr(pattern) in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "pattern",
    [
        "bücher.de",  # IDN must be punycode
        "user@github.com",
        "github..com",
        ".github.com",
        "git hub.com",
        "a" * 64 + ".com",
        "1.2.3.4.5",
        "999.1.1.1",
        "10.0.0.0/33",
        "fe80::1%eth0",
        "[::1",
        "[github.com]",
        "[10.0.0.1]",
        "::1]",
        "*.10.0.0.1",
        "*.example.123",
        ":443",
        "gith%75b.com",
        "github.com\x00",
    ],
)
def test_other_bad_patterns_raise(pattern: str) -> None:
    with pytest.raises(PatternError) as info:
        Filter(allow=["ok.com"], deny=[pattern])
    assert repr(pattern) in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "what", "suggestion"),
    [
        ("https://pypi.org", "is a URL", "pypi.org"),
        ("https://pypi.org/simple/requests/", "is a URL", "pypi.org"),
        ("HTTPS://PyPI.org:8443/simple", "is a URL", "pypi.org:8443"),  # the port the URL writes is kept
        ("http://user:secret@github.com/x", "is a URL", "github.com"),  # userinfo dropped
        ("http://[::1]:8080/", "is a URL", "[::1]:8080"),
        ("https://*.npmjs.org/", "is a URL", "*.npmjs.org"),
        ("socks5h://10.0.0.1:1080", "is a URL", "10.0.0.1:1080"),
        ("pypi.org?x=1", "has a path", "pypi.org"),
        ("git@github.com:psf/requests.git", "has a path", "github.com"),
        ("file:///etc/passwd", "is a URL", None),
        ("http://", "is a URL", None),
    ],
)
def test_url_given_as_pattern_says_what_a_pattern_is(pattern: str, what: str, suggestion: str | None) -> None:
    """Issue 13: ``--allow https://pypi.org`` said ``invalid port '//pypi.org'``."""
    with pytest.raises(PatternError) as info:
        Filter([pattern])
    message = str(info.value)
    assert repr(pattern) in message
    assert what in message and "host[:port]" in message, message
    assert "invalid port" not in message and "CIDR" not in message, message
    if suggestion is None:
        assert "did you mean" not in message
    else:
        assert message.endswith(f"(did you mean {suggestion!r}?)"), message
        Filter([suggestion])  # the suggestion is itself a valid pattern


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("htps:/[]@?#*.0123456789abfpypi-_ ") + ["\u0456", "\x00"]), max_size=40))
def test_url_hint_never_raises_and_suggests_only_valid_patterns(text: str) -> None:
    from kodarelay.filter import url_hint

    hint = url_hint(text)
    if hint is not None and hint[1] is not None:
        Filter([hint[1]])


@pytest.mark.parametrize(
    ("pattern", "inside", "outside"),
    [
        ("10.0.0.0/8", "10.9.8.7", "11.0.0.1"),
        ("10.0.0.0/8:443", "10.9.8.7:443", "10.9.8.7:80"),
        ("[::1]/128", "[::1]:80", "[::2]:80"),
        ("[fd00::]/8:443", "[fd12::1]:443", "[fd12::1]:80"),
        ("[fd00::/8]:443", "[fd12::1]:443", "[fd12::1]:80"),
        ("fd00::/8", "fd12::1", "fe80::1"),
        ("::ffff:10.0.0.0/104", "10.1.2.3", "11.1.2.3"),
    ],
)
def test_cidr_patterns_are_not_mistaken_for_urls(pattern: str, inside: str, outside: str) -> None:
    f = Filter([pattern])
    assert f.allows(inside)
    assert not f.allows(outside)


def test_patterns_must_be_an_iterable_of_str() -> None:
    with pytest.raises(TypeError):
        Filter("github.com")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Filter([b"github.com"])  # type: ignore[list-item]


def test_default_dev_allowlist_contents_parse_and_match() -> None:
    assert DEFAULT_DEV_ALLOWLIST == (
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
    f = Filter(DEFAULT_DEV_ALLOWLIST)
    for host in (
        "github.com",
        "raw.githubusercontent.com",
        "objects.githubusercontent.com",
        "api.github.com",
        "codeload.github.com",
        "registry.npmjs.org",
        "pypi.org",
        "upload.pypi.org",
        "files.pythonhosted.org",
        "crates.io",
        "static.crates.io",
        "index.crates.io",
        "registry-1.docker.io",
        "auth.docker.io",
        "hub.docker.io",
    ):
        assert f.allows(host), host
        assert f.allows(f"{host}:443"), host
    for host in (
        "gist.github.com",
        "githubusercontent.com",
        "evil.com",
        "docker.io",
        "pythonhosted.org",
        "production.cloudflare.docker.io",  # two labels under *.docker.io
    ):
        assert not f.allows(host), host


def test_public_names_reexported() -> None:
    assert kodarelay.Filter is Filter
    assert kodarelay.PatternError is PatternError
    assert kodarelay.Decision is Decision
    assert kodarelay.DEFAULT_DEV_ALLOWLIST is DEFAULT_DEV_ALLOWLIST


# ── hostile hosts ───────────────────────────────────────────────────────────

HOSTILE_FILTER = Filter(
    ["github.com", "*.npmjs.org", "127.0.0.1", "10.0.0.0/8:22"],
    deny=["evil.npmjs.org"],
)

HOSTILE: list[tuple[str, str]] = [
    # trailing dots and empty labels
    ("github.com.", "allowed"),
    ("GitHub.COM.", "allowed"),
    ("github.com..", "bad_host"),
    ("github.com...", "bad_host"),
    (".github.com", "bad_host"),
    ("github..com", "bad_host"),
    (".", "bad_host"),
    ("", "bad_host"),
    # userinfo, fragments, paths, escapes
    ("github.com@evil.com", "bad_host"),
    ("evil.com@github.com", "bad_host"),
    ("user:pass@github.com", "bad_host"),
    ("evil.com#github.com", "bad_host"),
    ("evil.com?github.com", "bad_host"),
    ("github.com/evil", "bad_host"),
    ("evil.com\\github.com", "bad_host"),
    ("github.com\\", "bad_host"),
    ("github%2ecom", "bad_host"),
    ("github.com%00", "bad_host"),
    ("%67ithub.com", "bad_host"),
    # control bytes and whitespace
    ("github.com\x00", "bad_host"),
    ("github.com\x00.evil.com", "bad_host"),
    ("github.com\r\n", "bad_host"),
    ("github.com\r\nHost: evil.com", "bad_host"),
    ("github.com\t", "bad_host"),
    (" github.com", "bad_host"),
    ("github.com ", "bad_host"),
    ("git hub.com", "bad_host"),
    ("github.com\x7f", "bad_host"),
    ("github.com\x0b", "bad_host"),
    # wildcards are patterns, not hosts
    ("*.npmjs.org", "bad_host"),
    ("*", "bad_host"),
    # ports
    ("github.com:443", "allowed"),
    ("github.com:", "bad_host"),
    ("github.com:0", "bad_host"),
    ("github.com:65536", "bad_host"),
    ("github.com:+443", "bad_host"),
    ("github.com:-1", "bad_host"),
    ("github.com: 443", "bad_host"),
    ("github.com:443 ", "bad_host"),
    ("github.com:0x1bb", "bad_host"),
    ("github.com:0443", "bad_host"),
    ("github.com:1e3", "bad_host"),
    ("github.com:\u0664\u0664\u0663", "bad_host"),  # Arabic-Indic digits
    ("github.com:443:443", "bad_host"),
    (":443", "bad_host"),
    # brackets and stray colons (the crate's rsplit(':') defect)
    ("[github.com]", "bad_host"),
    ("[github.com]:443", "bad_host"),
    ("[127.0.0.1]:443", "bad_host"),
    ("[::1", "bad_host"),
    ("::1]", "bad_host"),
    ("[::1]443", "bad_host"),
    ("[::1]:", "bad_host"),
    ("[]", "bad_host"),
    ("[]:443", "bad_host"),
    ("github.com]:443", "bad_host"),
    ("github.com:evil.com", "bad_host"),
    ("github.com:443:evil.com", "bad_host"),
    ("fe80::1%eth0", "bad_host"),
    ("[fe80::1%25eth0]:443", "bad_host"),
    ("::1", "not_allowed"),
    ("[::1]:443", "not_allowed"),
    # over-long labels and names
    ("a" * 63 + ".github.com", "not_allowed"),
    ("a" * 64 + ".github.com", "bad_host"),
    (".".join(["a" * 63] * 4), "bad_host"),  # 255 bytes
    (".".join(["a" * 49] * 5) + ".com", "not_allowed"),  # 253 bytes: the limit
    (".".join(["a" * 49] * 5) + ".com.", "not_allowed"),  # 253 + the trailing dot
    (".".join(["a" * 49] * 5) + ".coms", "bad_host"),  # 254 bytes
    ("a" * 100000, "bad_host"),
    # non-ASCII, IDN homoglyphs (must arrive as punycode)
    ("g\u0456thub.com", "bad_host"),  # Cyrillic i
    ("github.c\u043em", "bad_host"),  # Cyrillic o
    ("github\u3002com", "bad_host"),  # ideographic full stop
    ("github\uff0ecom", "bad_host"),  # fullwidth full stop
    ("\u212aernel.npmjs.org", "bad_host"),  # Kelvin sign lowercases to ASCII 'k'
    ("github.com\u200b", "bad_host"),  # zero-width space
    ("xn--gthub-n4a.com", "not_allowed"),  # punycode is a name, judged as such
    # deny and wildcard depth
    ("evil.npmjs.org", "denied"),
    ("EVIL.npmjs.org.", "denied"),
    ("evil.npmjs.org:443", "denied"),
    ("registry.npmjs.org", "allowed"),
    ("a.registry.npmjs.org", "not_allowed"),
    ("npmjs.org", "not_allowed"),
    ("evil.npmjs.org.attacker.com", "not_allowed"),
    ("github.com.evil.com", "not_allowed"),
    # numeric IPv4 spellings: canonicalised, then judged by IP rules only
    ("127.0.0.1", "allowed"),
    ("2130706433", "allowed"),
    ("0x7f.1", "allowed"),
    ("0177.0.0.1", "allowed"),
    ("127.1", "allowed"),
    ("0x7f000001", "allowed"),
    ("0X7F.0.0.1", "allowed"),
    ("127.0.0.1.", "allowed"),
    ("127.0.0.2", "not_allowed"),
    ("1.2.3.4.5", "bad_host"),
    ("999.1.1.1", "bad_host"),
    ("127.0.0.09", "bad_host"),  # 09 is not octal
    ("127.0.0.256", "bad_host"),
    ("4294967296", "bad_host"),
    ("0x", "bad_host"),
    ("0x1g.0.0.1", "bad_host"),
    ("github.com.1", "bad_host"),  # numeric last label: an IPv4 attempt, never a name
    ("github.0x1", "bad_host"),
    ("127.0.0.1.github.com", "not_allowed"),  # last label is a name: a name
    # IPv6 forms of 127.0.0.1
    ("::ffff:127.0.0.1", "allowed"),
    ("[::ffff:7f00:1]:443", "allowed"),
    ("::FFFF:7F00:1", "allowed"),
    ("64:ff9b::7f00:1", "not_allowed"),  # a distinct IPv6 literal; the guard judges what it carries
    ("::127.0.0.1", "not_allowed"),
    # a port-limited CIDR rule
    ("10.1.2.3:22", "allowed"),
    ("10.1.2.3:23", "not_allowed"),
    ("10.1.2.3", "not_allowed"),
    ("012.1.2.3:22", "allowed"),  # octal 012 == 10
]


def test_hostile_table_is_big_enough() -> None:
    assert len(HOSTILE) >= 40


@pytest.mark.parametrize(("host", "reason"), HOSTILE, ids=[repr(h)[:40] for h, _ in HOSTILE])
def test_hostile_hosts(host: str, reason: str) -> None:
    d = HOSTILE_FILTER.explain(host)
    assert d.reason == reason, d
    assert d.allowed == (reason == "allowed")
    assert bool(d) == d.allowed
    assert HOSTILE_FILTER.allows(host) == d.allowed
    if reason in ("bad_host", "not_allowed"):
        assert d.rule is None
    else:
        assert d.rule is not None


def test_bad_host_carries_a_detail() -> None:
    d = HOSTILE_FILTER.explain("github.com\x00")
    assert d.detail
    assert "control" in d.detail


def test_port_argument_conflicts_and_range() -> None:
    f = Filter(["github.com"])
    assert f.explain("github.com:443", 443) == allowed("github.com")
    assert f.explain("github.com:443", 80) == BAD_HOST
    assert f.explain("github.com", 0) == BAD_HOST
    assert f.explain("github.com", 65536) == BAD_HOST
    assert f.explain("github.com", -1) == BAD_HOST
    with pytest.raises(TypeError):
        f.explain("github.com", "443")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        f.explain("github.com", True)  # type: ignore[arg-type]


def test_decision_fields() -> None:
    d = Filter(["github.com:443"]).explain("GitHub.com.", 443)
    assert d == Decision(True, "github.com:443", "allowed")
    assert d.host == "github.com"
    assert d.port == 443
    d6 = Filter(["::1"]).explain("[::1]:8080")
    assert d6.host == "::1" and d6.port == 8080
    with pytest.raises(AttributeError):
        d.allowed = False  # type: ignore[misc]


# ── deny, port and IP rules ─────────────────────────────────────────────────


def test_deny_wins_over_allow_in_any_order() -> None:
    f = Filter(["*.example.com", "bad.example.com"], deny=["bad.example.com"])
    assert f.explain("bad.example.com") == Decision(False, "bad.example.com", "denied")
    assert f.explain("good.example.com") == allowed("*.example.com")


def test_deny_wildcard_and_first_rule_reported() -> None:
    f = Filter(["github.com", "x.evil.com"], deny=["*.evil.com", "x.evil.com"])
    assert f.explain("x.evil.com") == Decision(False, "*.evil.com", "denied")
    assert f.explain("github.com") == allowed("github.com")


def test_first_matching_allow_rule_is_reported() -> None:
    f = Filter(["*.npmjs.org", "registry.npmjs.org"])
    assert f.explain("registry.npmjs.org").rule == "*.npmjs.org"
    f = Filter(["registry.npmjs.org", "*.npmjs.org"])
    assert f.explain("registry.npmjs.org").rule == "registry.npmjs.org"


def test_port_limited_allow() -> None:
    f = Filter(["github.com:443", "*.npmjs.org:443"])
    assert f.explain("github.com:443") == allowed("github.com:443")
    assert f.explain("github.com", 443) == allowed("github.com:443")
    assert f.explain("github.com:22") == NOT_ALLOWED
    assert f.explain("github.com") == NOT_ALLOWED, "unknown port: port-limited allow does not match"
    assert f.allows("registry.npmjs.org:443")
    assert not f.allows("registry.npmjs.org:80")


def test_port_limited_deny_fails_closed() -> None:
    f = Filter(["github.com"], deny=["github.com:22"])
    assert f.explain("github.com:22") == Decision(False, "github.com:22", "denied")
    assert f.explain("github.com:443") == allowed("github.com")
    assert f.explain("github.com") == Decision(False, "github.com:22", "denied"), "unknown port fails closed"


def test_unlimited_rule_allows_every_port() -> None:
    f = Filter(["github.com"])
    for port in (1, 22, 80, 443, 65535):
        assert f.allows("github.com", port)


def test_ip_and_cidr_rules() -> None:
    f = Filter(["10.1.2.3", "192.168.0.0/16", "[::1]", "fd00::/8", "[fe80::1]:8080", "10.9.9.9:22"])
    assert f.allows("10.1.2.3")
    assert f.allows("0xa.1.2.3")
    assert f.allows("167838211")  # 10.1.2.3
    assert not f.allows("10.1.2.4")
    assert f.allows("192.168.77.1:80")
    assert not f.allows("192.169.0.1")
    assert f.allows("::1")
    assert f.allows("[::1]:443")
    assert f.allows("[0:0:0:0:0:0:0:1]")
    assert f.allows("fd12:3456::1")
    assert not f.allows("fe00::1")
    assert f.allows("[fe80::1]:8080")
    assert not f.allows("[fe80::1]:8081")
    assert not f.allows("fe80::1")
    assert f.allows("10.9.9.9:22")
    assert not f.allows("10.9.9.9")


def test_ipv4_rule_matches_ipv4_mapped_literal_and_vice_versa() -> None:
    assert Filter(["127.0.0.1"]).allows("::ffff:127.0.0.1")
    assert Filter(["::ffff:127.0.0.1"]).allows("127.0.0.1")
    assert Filter(["::ffff:10.0.0.0/104"]).allows("10.20.30.40")
    assert not Filter(["127.0.0.1"]).allows("::1")
    assert not Filter(["::1"]).allows("127.0.0.1")


def test_ip_rule_never_admits_a_name_and_name_rule_never_admits_an_ip() -> None:
    f = Filter(["127.0.0.0/8", "0.0.0.0/0", "::/0"])
    for name in ("localhost", "github.com", "127.0.0.1.nip.io", "1.2.3.4.example"):
        assert f.explain(name) == NOT_ALLOWED, name
    g = Filter(["localhost", "github.com", "*.com"])
    for literal in ("127.0.0.1", "::1", "140.82.112.3", "2130706433"):
        assert g.explain(literal) == NOT_ALLOWED, literal


def test_deny_ip_rule_refuses_literal() -> None:
    f = Filter(["0.0.0.0/0"], deny=["10.0.0.0/8"])
    assert f.explain("10.1.1.1") == Decision(False, "10.0.0.0/8", "denied")
    assert f.explain("012.1.1.1") == Decision(False, "10.0.0.0/8", "denied")
    assert f.explain("::ffff:10.1.1.1") == Decision(False, "10.0.0.0/8", "denied")
    assert f.allows("11.1.1.1")


def test_pattern_normalisation() -> None:
    f = Filter(["  GitHub.com.  ", "*.Example.ORG.", "10.1.2.3/8", "[::1]:8080"])
    assert f.allows("github.com")
    assert f.allows("www.example.org")
    assert f.allows("10.200.0.1")  # non-strict network: host bits dropped
    assert f.explain("github.com").rule == "github.com."  # trimmed, lowercased, as written otherwise
    assert f.explain("[::1]:8080").rule == "[::1]:8080"
    assert f.allow_patterns == ("  GitHub.com.  ", "*.Example.ORG.", "10.1.2.3/8", "[::1]:8080")


def test_underscore_names() -> None:
    f = Filter(["_dmarc.example.com", "*.svc_internal"])
    assert f.allows("_dmarc.example.com")
    assert f.allows("a_b.svc_internal")


def test_repr_lists_patterns() -> None:
    assert "github.com" in repr(Filter(["github.com"], deny=["x.com"]))


# ── canonicalisation helpers ────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("github.com", ("github.com", None)),
        ("github.com:443", ("github.com", 443)),
        ("[::1]", ("[::1]", None)),
        ("[::1]:443", ("[::1]", 443)),
        ("::1", ("::1", None)),
        ("1.2.3.4:80", ("1.2.3.4", 80)),
        ("[github.com]:1", ("[github.com]", 1)),  # kept bracketed: canonical_host refuses it
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int | None]) -> None:
    assert split_pattern_target(text) == expected


@pytest.mark.parametrize("text", ["a:", "a:0", "a:b", "[::1", "[::1]x", "a]", "a[b", "[::1]:99999"])
def test_split_host_port_errors(text: str) -> None:
    with pytest.raises(ValueError):
        split_pattern_target(text)


def test_canonical_host_types() -> None:
    assert canonical_host("GitHub.com.") == "github.com"
    assert canonical_host("0x7f.1") == ipaddress.IPv4Address("127.0.0.1")
    assert canonical_host("[::1]") == ipaddress.IPv6Address("::1")
    assert canonical_host("::FFFF:10.0.0.1") == ipaddress.IPv4Address("10.0.0.1")
    assert canonical_host(ipaddress.IPv6Address("::ffff:1.2.3.4")) == ipaddress.IPv4Address("1.2.3.4")
    with pytest.raises(ValueError, match="punycode"):
        canonical_host("bücher.de")
    with pytest.raises(ValueError, match="userinfo"):
        canonical_host("a@b.com")
    with pytest.raises(ValueError):
        canonical_host("github.com:443")
    with pytest.raises(TypeError):
        canonical_host(b"github.com")  # type: ignore[arg-type]


def test_parse_target_and_is_ip_literal_and_format_host() -> None:
    assert parse_target("[::1]:443") == (ipaddress.IPv6Address("::1"), 443)
    assert parse_target("example.com", 80) == ("example.com", 80)
    assert is_ip_literal("127.1")
    assert is_ip_literal("[::1]:443")
    assert is_ip_literal("::ffff:1.2.3.4")
    assert not is_ip_literal("github.com")
    assert not is_ip_literal("1.2.3.4.5")
    assert not is_ip_literal("")
    assert format_host(ipaddress.IPv6Address("::1"), 443) == "[::1]:443"
    assert format_host(ipaddress.IPv6Address("::1")) == "::1"
    assert format_host(ipaddress.IPv4Address("1.2.3.4"), 80) == "1.2.3.4:80"
    assert format_host("github.com", 443) == "github.com:443"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.0x0.0x0.0x1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("1.2.65535", "1.2.255.255"),
        ("0x00000000007f.1", "127.0.0.1"),
    ],
)
def test_parse_ipv4_forms(text: str, expected: str) -> None:
    assert parse_ipv4(text) == ipaddress.IPv4Address(expected)


@pytest.mark.parametrize(
    "text",
    ["1.2.3.4.5", "256.0.0.1", "1.2.65536", "1.16777216", "4294967296", "0x", "08", "1..2", "1.2.3.", "-1", "1.2.3.4x"],
)
def test_parse_ipv4_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ipv4(text)


# ── resolved-address guard ──────────────────────────────────────────────────

GUARD_FILTER = Filter(["github.com", "localhost", "*.localhost", "internal.corp", "pinned.test"], deny=[])

GUARD: list[tuple[list[str], bool, str]] = [
    # (addresses for github.com:443, deny_private, expected reason)
    (["93.184.216.34"], False, "allowed"),
    (["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"], False, "allowed"),
    (["127.0.0.1"], False, "resolved_address"),
    (["127.255.255.254"], False, "resolved_address"),
    (["::1"], False, "resolved_address"),
    (["169.254.169.254"], False, "resolved_address"),
    (["169.254.1.1"], False, "resolved_address"),
    (["100.100.100.200"], False, "resolved_address"),
    (["fd00:ec2::254"], False, "resolved_address"),
    (["fe80::1"], False, "resolved_address"),
    (["fe80::1%eth0"], False, "resolved_address"),
    (["::ffff:127.0.0.1"], False, "resolved_address"),
    (["::ffff:169.254.169.254"], False, "resolved_address"),
    (["64:ff9b::7f00:1"], False, "resolved_address"),
    (["64:ff9b::a9fe:a9fe"], False, "resolved_address"),  # NAT64 of 169.254.169.254
    (["2002:7f00:1::"], False, "resolved_address"),  # 6to4 of 127.0.0.1
    (["2002:a9fe:a9fe::1"], False, "resolved_address"),
    (["::7f00:1"], False, "resolved_address"),  # deprecated IPv4-compatible
    (["::"], False, "resolved_address"),
    (["0.0.0.0"], False, "resolved_address"),
    (["0.1.2.3"], False, "resolved_address"),
    (["224.0.0.1"], False, "resolved_address"),
    (["239.255.255.250"], False, "resolved_address"),
    (["ff02::1"], False, "resolved_address"),
    (["255.255.255.255"], False, "resolved_address"),
    (["240.0.0.1"], False, "resolved_address"),
    (["192.0.0.8"], False, "resolved_address"),
    (["100::1"], False, "resolved_address"),
    # documentation, benchmarking and reserved ranges (issue 10): refused whatever deny_private says
    (["192.0.2.1"], False, "resolved_address"),
    (["198.51.100.7"], False, "resolved_address"),
    (["203.0.113.255"], False, "resolved_address"),
    (["2001:db8::1"], False, "resolved_address"),
    (["2001:db8:ffff::1"], False, "resolved_address"),
    (["3fff::1"], False, "resolved_address"),
    (["198.18.0.1"], False, "resolved_address"),
    (["198.19.255.254"], False, "resolved_address"),
    (["2001:2::1"], False, "resolved_address"),
    (["255.255.255.254"], False, "resolved_address"),
    (["0.255.255.255"], False, "resolved_address"),
    (["::ffff:192.0.2.1"], False, "resolved_address"),
    (["64:ff9b::c612:1"], False, "resolved_address"),  # NAT64 of 198.18.0.1
    (["2002:cb00:7101::"], False, "resolved_address"),  # 6to4 of 203.0.113.1
    (["198.17.255.255"], True, "allowed"),  # just outside benchmarking
    (["198.20.0.1"], True, "allowed"),
    (["192.0.3.1"], True, "allowed"),
    (["2001:db9::1"], True, "allowed"),
    (["10.0.0.1"], False, "allowed"),
    (["10.0.0.1"], True, "resolved_address"),
    (["172.16.5.4"], True, "resolved_address"),
    (["172.32.0.1"], True, "allowed"),
    (["192.168.1.1"], True, "resolved_address"),
    (["100.64.1.1"], False, "allowed"),
    (["100.64.1.1"], True, "resolved_address"),
    (["fd12::1"], False, "allowed"),
    (["fd12::1"], True, "resolved_address"),
    (["::ffff:10.0.0.1"], True, "resolved_address"),
    (["64:ff9b::a00:1"], True, "resolved_address"),  # NAT64 of 10.0.0.1
    (["64:ff9b::5db8:d822"], True, "allowed"),  # NAT64 of 93.184.216.34
    (["2002:5db8:d822::1"], False, "allowed"),  # 6to4 of 93.184.216.34
    (["93.184.216.34"], True, "allowed"),
    (["93.184.216.34", "127.0.0.1"], False, "resolved_address"),  # one bad address refuses
    (["127.0.0.1", "93.184.216.34"], False, "resolved_address"),
    (["93.184.216.34", "10.0.0.1"], True, "resolved_address"),
    (["not-an-ip"], False, "resolved_address"),
    (["93.184.216.34", ""], False, "resolved_address"),
    (["93.184.216.34", "93.184.216.34 "], False, "resolved_address"),
    ([], False, "resolved_address"),
]


@pytest.mark.parametrize(("addresses", "deny_private", "reason"), GUARD, ids=[f"{a}-{p}" for a, p, _ in GUARD])
def test_resolved_address_guard(addresses: list[str], deny_private: bool, reason: str) -> None:
    d = GUARD_FILTER.check_resolved("github.com", 443, addresses, deny_private=deny_private)
    assert d.reason == reason, d
    assert d.allowed == (reason == "allowed")
    if reason == "allowed":
        assert d.rule == "github.com"
    else:
        assert d.detail


def test_guard_wants_a_list() -> None:
    with pytest.raises(TypeError):
        GUARD_FILTER.check_resolved("github.com", 443, "93.184.216.34")  # type: ignore[arg-type]


def test_guard_rejudges_the_name() -> None:
    assert GUARD_FILTER.check_resolved("evil.com", 443, ["93.184.216.34"]) == NOT_ALLOWED
    assert GUARD_FILTER.check_resolved("github.com\x00", 443, ["93.184.216.34"]) == BAD_HOST


def test_guard_localhost_exemption_is_for_the_name_localhost_only() -> None:
    f = GUARD_FILTER
    assert f.check_resolved("localhost", 8080, ["127.0.0.1", "::1"]).allowed
    assert f.check_resolved("LOCALHOST.", 8080, ["127.0.0.1"]).allowed
    assert f.check_resolved("localhost", 8080, ["::ffff:127.0.0.1"]).allowed
    # only loopback is exempt, even for localhost
    assert f.check_resolved("localhost", 80, ["169.254.169.254"]).reason == "resolved_address"
    assert f.check_resolved("localhost", 80, ["0.0.0.0"]).reason == "resolved_address"
    # *.localhost and other names get no exemption
    assert f.check_resolved("app.localhost", 80, ["127.0.0.1"]).reason == "resolved_address"
    assert f.check_resolved("internal.corp", 80, ["127.0.0.1"]).reason == "resolved_address"
    # a localhost rule limited to a port exempts only that port (the name is not allowed elsewhere)
    g = Filter(["localhost:8080"])
    assert g.check_resolved("localhost", 8080, ["127.0.0.1"]).allowed
    assert g.check_resolved("localhost", 9090, ["127.0.0.1"]).reason == "not_allowed"


# Every range SPEC's "Resolved-address guard" lists, with one address inside it.
SPEC_GUARDED = [
    ("127.0.0.0/8", "127.3.2.1"),
    ("::1/128", "::1"),
    ("169.254.0.0/16", "169.254.7.7"),
    ("fe80::/10", "fe80::7"),
    ("169.254.169.254/32", "169.254.169.254"),
    ("100.100.100.200/32", "100.100.100.200"),
    ("fd00:ec2::254/128", "fd00:ec2::254"),
    ("::/128", "::"),
    ("224.0.0.0/4", "233.1.2.3"),
    ("ff00::/8", "ff0e::1"),
    ("255.255.255.255/32", "255.255.255.255"),
    ("0.0.0.0/8", "0.1.2.3"),
    ("240.0.0.0/4", "250.1.2.3"),
    ("198.18.0.0/15", "198.19.1.2"),
    ("192.0.2.0/24", "192.0.2.99"),
    ("198.51.100.0/24", "198.51.100.99"),
    ("203.0.113.0/24", "203.0.113.99"),
    ("2001:db8::/32", "2001:db8:1::99"),
]


@pytest.mark.parametrize(("net", "addr"), SPEC_GUARDED, ids=[n for n, _ in SPEC_GUARDED])
def test_guard_refuses_every_range_spec_lists(net: str, addr: str) -> None:
    f = Filter(["pinned.test", "0.0.0.0/0", "::/0"])
    for deny_private in (False, True):
        d = f.check_resolved("pinned.test", 443, [addr], deny_private=deny_private)
        assert d.reason == "resolved_address" and addr in d.detail, d
        # the literal itself, admitted by a rule that covers everything, is still refused
        assert f.check_resolved(addr, 443, [addr], deny_private=deny_private).reason == "resolved_address"
    # an IP / CIDR rule that names the range (or the address) unlocks it
    rule = f"[{net}]" if ":" in net else net
    for unlock in (rule, f"[{addr}]" if ":" in addr else addr):
        assert Filter(["pinned.test", unlock]).check_resolved("pinned.test", 443, [addr], deny_private=True).allowed, unlock


@pytest.mark.parametrize(
    "addr", ["10.1.2.3", "172.20.0.1", "192.168.9.9", "100.64.0.1", "fd12:3456::1", "::ffff:10.1.2.3"]
)
def test_guard_private_ranges_are_opt_in_and_named_rules_override(addr: str) -> None:
    f = Filter(["pinned.test"])
    assert f.check_resolved("pinned.test", 443, [addr]).allowed  # the library's default: deny_private=False
    assert f.check_resolved("pinned.test", 443, [addr], deny_private=True).reason == "resolved_address"
    inner = ipaddress.ip_address(addr)
    inner = getattr(inner, "ipv4_mapped", None) or inner
    named = Filter(["pinned.test", f"[{inner}]" if inner.version == 6 else str(inner)])
    assert named.check_resolved("pinned.test", 443, [addr], deny_private=True).allowed


def test_guard_ip_allow_rule_exempts_the_address() -> None:
    f = Filter(["pinned.test", "127.0.0.1", "10.0.0.0/8", "fd00::/8", "[::1]:8080"])
    assert f.check_resolved("pinned.test", 80, ["127.0.0.1"]).allowed
    assert f.check_resolved("pinned.test", 80, ["::ffff:127.0.0.1"]).allowed
    assert f.check_resolved("pinned.test", 80, ["127.0.0.2"]).reason == "resolved_address"
    assert f.check_resolved("pinned.test", 80, ["10.2.3.4"], deny_private=True).allowed
    assert f.check_resolved("pinned.test", 80, ["fd12::1"], deny_private=True).allowed
    assert f.check_resolved("pinned.test", 8080, ["::1"]).allowed
    assert f.check_resolved("pinned.test", 8081, ["::1"]).reason == "resolved_address"
    assert f.check_resolved("pinned.test", None, ["::1"]).reason == "resolved_address"
    assert f.check_resolved("pinned.test", 80, ["192.168.1.1"], deny_private=True).reason == "resolved_address"


def test_guard_broad_allow_rule_does_not_unlock_special_ranges() -> None:
    f = Filter(["pinned.test", "0.0.0.0/0", "::/0", "169.254.0.0/16", "100.64.0.0/10", "10.0.0.0/7"])
    for addr in ("127.0.0.1", "::1", "169.254.169.254", "100.100.100.200", "0.0.0.0", "224.0.0.1", "::ffff:127.0.0.1"):
        assert f.check_resolved("pinned.test", 80, [addr]).reason == "resolved_address", addr
    assert f.check_resolved("pinned.test", 80, ["169.254.1.1"]).allowed  # the rule names link-local
    assert f.check_resolved("pinned.test", 80, ["100.64.1.1"], deny_private=True).allowed
    assert f.check_resolved("pinned.test", 80, ["10.1.1.1"], deny_private=True).reason == "resolved_address"
    # literal targets: "any IPv4" at the rule level, but still not loopback after the guard
    assert f.explain("127.0.0.1").allowed
    assert f.check_resolved("127.0.0.1", 80, ["127.0.0.1"]).reason == "resolved_address"
    assert f.check_resolved("93.184.216.34", 80, ["93.184.216.34"]).allowed


def test_guard_deny_ip_rule_refuses_a_name_resolving_into_it() -> None:
    f = Filter(["github.com", "10.0.0.0/8"], deny=["140.82.0.0/16", "10.0.0.0/8:22", "[2001:db8::/32]"])
    d = f.check_resolved("github.com", 443, ["93.184.216.34", "140.82.112.3"])
    assert d == Decision(False, "140.82.0.0/16", "denied")
    assert f.check_resolved("github.com", 443, ["::ffff:140.82.112.3"]).rule == "140.82.0.0/16"
    assert f.check_resolved("github.com", 22, ["10.1.1.1"]) == Decision(False, "10.0.0.0/8:22", "denied")
    assert f.check_resolved("github.com", None, ["10.1.1.1"]).reason == "denied", "unknown port fails closed"
    assert f.check_resolved("github.com", 443, ["10.1.1.1"], deny_private=True).allowed
    assert f.check_resolved("github.com", 443, ["2001:db8::1"]).reason == "denied"


def test_guard_for_ip_literal_targets() -> None:
    f = Filter(["127.0.0.1", "::1", "10.0.0.0/8"])
    assert f.check_resolved("127.0.0.1", 80, ["127.0.0.1"]).allowed
    assert f.check_resolved("0x7f.1", 80, ["0x7f.1"]).allowed
    assert f.check_resolved("[::1]", 80, ["::1"]).allowed
    assert f.check_resolved("::1", 80, ["[::1]"]).allowed
    assert f.check_resolved(ipaddress.IPv6Address("::1"), 80, ["::1"]).allowed
    assert f.check_resolved(ipaddress.IPv4Address("10.1.1.1"), 80, ["10.1.1.1"], deny_private=True).allowed
    assert f.check_resolved("10.1.1.1", 80, [ipaddress.IPv4Address("10.1.1.1")], deny_private=True).allowed


def test_embedded_ipv4() -> None:
    v4 = ipaddress.IPv4Address
    v6 = ipaddress.IPv6Address
    assert embedded_ipv4(v6("::ffff:1.2.3.4")) == v4("1.2.3.4")
    assert embedded_ipv4(v6("64:ff9b::102:304")) == v4("1.2.3.4")
    assert embedded_ipv4(v6("64:ff9b:1::102:304")) == v4("1.2.3.4")
    assert embedded_ipv4(v6("2002:102:304::")) == v4("1.2.3.4")
    assert embedded_ipv4(v6("::ffff:0:102:304")) == v4("1.2.3.4")
    assert embedded_ipv4(v6("2001:0:4136:e378:8000:63bf:3fff:fdd2")) == v4("192.0.2.45")  # Teredo client
    assert embedded_ipv4(v6("2606:4700::1")) is None
    assert embedded_ipv4(v4("1.2.3.4")) is None


# ── properties ──────────────────────────────────────────────────────────────

PROP_FILTER = Filter(
    ["github.com", "*.npmjs.org", "127.0.0.1", "10.0.0.0/8", "::1", "localhost:8080"],
    deny=["bad.npmjs.org", "10.6.6.0/24"],
)
_host_alphabet = st.sampled_from(list("abgithu.com0x179:[]@%\\/#? \t\x00\r\n-_*") + ["\u0456", "\u212a", "\u3002"])


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=60), st.text(alphabet=_host_alphabet, max_size=40)))
def test_explain_never_raises_and_bad_host_is_never_allowed(host: str) -> None:
    d = PROP_FILTER.explain(host)
    assert d.reason in ("allowed", "not_allowed", "denied", "bad_host")
    assert d.allowed == (d.reason == "allowed")
    if d.reason == "bad_host":
        assert d.rule is None and not d.allowed
    if d.allowed:
        # whatever was allowed is a clean canonical host that round-trips
        canon, _port = parse_target(host)
        assert canonical_host(str(canon)) == canon
    r = PROP_FILTER.check_resolved(host, 443, ["93.184.216.34"])
    assert d.allowed or not r.allowed


def _spell_ipv4(value: int, parts: int, bases: list[int], zeros: list[int]) -> str:
    sizes = [1] * (parts - 1) + [5 - parts]
    out = []
    shift = 32
    for size, base, pad in zip(sizes, bases, zeros):
        shift -= 8 * size
        n = (value >> shift) & ((1 << (8 * size)) - 1)
        if base == 16:
            out.append("0x" + "0" * pad + format(n, "x"))
        elif base == 8:
            out.append("0" + "0" * pad + format(n, "o"))
        else:
            out.append(str(n))
    return ".".join(out)


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(st.just(0x7F000001), st.integers(0, 2**32 - 1)),
    parts=st.integers(1, 4),
    bases=st.lists(st.sampled_from([8, 10, 16]), min_size=4, max_size=4),
    zeros=st.lists(st.integers(0, 3), min_size=4, max_size=4),
)
def test_every_numeric_ipv4_spelling_canonicalises_equal(
    value: int, parts: int, bases: list[int], zeros: list[int]
) -> None:
    text = _spell_ipv4(value, parts, bases, zeros)
    expected = ipaddress.IPv4Address(value)
    assert canonical_host(text) == expected
    assert canonical_host(text.upper()) == expected
    assert canonical_host(text + ".") == expected
    if value == 0x7F000001:
        assert Filter(["127.0.0.1"]).allows(text)
        assert not Filter(["localhost", "127.0.0.2"]).allows(text)


@pytest.mark.skipif(not hasattr(socket, "inet_aton"), reason="no inet_aton")
@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789abcdefx.", min_size=1, max_size=24))
def test_parse_ipv4_agrees_with_inet_aton_where_it_accepts(text: str) -> None:
    """Differential: whatever the strict parser accepts, libc reads as the same address."""
    try:
        mine = parse_ipv4(text)
    except ValueError:
        return
    assert socket.inet_aton(text) == mine.packed


@settings(max_examples=200, deadline=None)
@given(
    labels=st.lists(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), min_size=0, max_size=4),
)
def test_wildcard_matches_exactly_one_label_property(labels: list[str]) -> None:
    f = Filter(["*.example.com"])
    host = ".".join([*labels, "example", "com"])
    assert f.allows(host) == (len(labels) == 1)
