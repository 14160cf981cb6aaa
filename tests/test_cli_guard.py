"""The resolved-address guard as the ``kodarelay`` command applies it (issue 10).

The command runs as a subprocess through a small wrapper that hands the built-in proxies a
resolver pinning test names to guarded addresses (the public ``resolver=`` option), so
nothing here asks DNS. Every address a name maps to is one the guard must refuse before
dialling, so nothing is sent beyond loopback; a defect that dialled anyway would see a
502 (or a timeout) instead of the 403 asserted here. TEST-NET-1 (192.0.2.0/24) and
fd00::/64 are left to the filter tests: on the CI machine they are the host's own on-link
subnets (its gateway is 192.0.2.1), so a defect would reach a real neighbour.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peers import DEADLINE, http_connect, require_tool, socks5_connect, status_of
from test_cli import RUN_TIMEOUT, Lines, clean_env

WRAPPER = textwrap.dedent(
    """
    import json, os, sys

    import kodarelay.builtin as builtin

    HOSTS = json.loads(os.environ["KR_TEST_HOSTS"])

    async def resolve(host, port):
        if host not in HOSTS:
            raise OSError(f"no such host {host}")
        return HOSTS[host]

    for cls in (builtin.BuiltInProxy, builtin.BuiltInSocks5Proxy):
        def init(self, *args, _orig=cls.__init__, **kw):
            kw.setdefault("resolver", resolve)
            if os.environ.get("KR_TEST_OPTIONS"):
                with open(os.environ["KR_TEST_OPTIONS"], "a") as f:
                    f.write(json.dumps({"deny_private": kw.get("deny_private")}) + "\\n")
            _orig(self, *args, **kw)
        cls.__init__ = init

    from kodarelay.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)

# name -> addresses; every one of them must be refused by the command's default guard.
GUARDED = {
    "doc2.test": ["198.51.100.10"],
    "doc3.test": ["203.0.113.10"],
    "doc6.test": ["2001:db8::10"],
    "bench.test": ["198.18.0.10"],
    "reserved.test": ["240.0.0.10"],
    "thisnet.test": ["0.0.0.10"],
    "loop.test": ["127.0.0.1"],
    "meta.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:198.51.100.10"],
    "nat64.test": ["64:ff9b::cb00:710a"],  # 203.0.113.10
    "mixed.test": ["203.0.113.11", "198.51.100.11"],
    # private ranges: refused by the command unless --allow-private
    "rfc1918.test": ["10.255.255.10"],
    "cgnat.test": ["100.64.0.10"],
    "ula.test": ["fd12:3456::10"],
}
PRIVATE = {"rfc1918.test", "cgnat.test", "ula.test"}


def _command(tmp_path: Path, *args: str) -> list[str]:
    wrapper = tmp_path / "kodarelay_pinned.py"
    wrapper.write_text(WRAPPER)
    return [sys.executable, str(wrapper), *args]


def _env() -> dict[str, str]:
    return clean_env(KR_TEST_HOSTS=json.dumps(GUARDED))


@pytest.fixture
def served(tmp_path):  # type: ignore[no-untyped-def]
    """``kodarelay serve --allow '*.test' --allow 0.0.0.0/0 --allow ::/0`` with the pinned resolver."""
    proc = subprocess.Popen(
        _command(tmp_path, "serve", "--allow", "*.test,0.0.0.0/0,::/0", "--upstream", "direct"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        err = Lines(proc.stderr)
        status = err.readline()
        assert status.startswith("kodarelay: serving on 127.0.0.1:"), status
        port = int(re.search(r"127\.0\.0\.1:(\d+)", status)[1])  # type: ignore[index]
        yield port, err
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_serve_refuses_names_resolving_to_guarded_addresses(served, name):
    port, err = served
    sock, head = http_connect(port, f"{name}:443")
    sock.close()
    assert status_of(head) == 403, head
    assert b"X-Proxy-Error: resolved_address" in head, head
    assert f"refused http {name}:443 (resolved_address: " in err.readline()


@pytest.mark.parametrize("name", ["doc2.test", "rfc1918.test", "doc6.test"])
def test_serve_socks5_refuses_names_resolving_to_guarded_addresses(served, name):
    port, err = served
    sock, reply = socks5_connect(port, name.encode(), 443)
    sock.close()
    assert reply[:2] == b"\x05\x02", reply  # connection not allowed by ruleset
    assert f"refused socks5 {name}:443 (resolved_address: " in err.readline()


@pytest.mark.parametrize("literal", ["203.0.113.10:443", "198.18.0.10:443", "[2001:db8::10]:443", "10.255.255.10:443"])
def test_serve_refuses_guarded_literals_a_broad_rule_allows(served, literal):
    """0.0.0.0/0 and ::/0 allow any literal, but name no guarded range: the guard still refuses."""
    port, err = served
    sock, head = http_connect(port, literal)
    sock.close()
    assert status_of(head) == 403, head
    assert b"X-Proxy-Error: resolved_address" in head, head
    assert "(resolved_address: " in err.readline()


def test_run_refuses_private_by_default_and_says_how_to_admit(tmp_path):
    curl = require_tool("curl")
    out = subprocess.run(
        _command(tmp_path, "run", "--allow", "*.test", "--upstream", "direct", "--", "sh", "-c",
                 f"{curl} -s --max-time 20 https://rfc1918.test/; {curl} -s --max-time 20 https://doc3.test/; exit 0"),
        env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert out.returncode == 0, out.stderr
    assert "refused 2 connections" in out.stderr
    assert "1x rfc1918.test:443  resolved_address" in out.stderr
    assert "1x doc3.test:443  resolved_address" in out.stderr
    assert "--allow-private" in out.stderr


@pytest.mark.parametrize(("flags", "deny_private"), [([], True), (["--allow-private"], False)])
@pytest.mark.parametrize("sub", ["run", "serve"])
def test_command_passes_deny_private_to_every_proxy(tmp_path, sub, flags, deny_private):
    """What --allow-private changes cannot be shown by dialling a private address here, so
    the wrapper records the option each built-in proxy was given."""
    record = tmp_path / "options.jsonl"
    env = {**_env(), "KR_TEST_OPTIONS": str(record)}
    if sub == "run":
        out = subprocess.run(_command(tmp_path, "run", *flags, "--", "true"), env=env, capture_output=True, text=True,
                             timeout=RUN_TIMEOUT)
        assert out.returncode == 0, out.stderr
    else:
        proc = subprocess.Popen(_command(tmp_path, "serve", *flags, "--socks5-port", "0", "--upstream", "direct"),
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert Lines(proc.stderr).readline().startswith("kodarelay: serving on")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(DEADLINE) == 0
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert seen and all(o == {"deny_private": deny_private} for o in seen), seen
    assert len(seen) == (1 if sub == "run" else 2)  # serve --socks5-port: the mux port and the SOCKS5 port


def test_wrapper_pins_names_and_nothing_else(tmp_path):
    """The wrapper's resolver is what the proxy uses: an unpinned name fails to resolve (502)."""
    proc = subprocess.Popen(
        _command(tmp_path, "serve", "--allow", "*.test", "--upstream", "direct"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        err = Lines(proc.stderr)
        port = int(re.search(r"127\.0\.0\.1:(\d+)", err.readline())[1])  # type: ignore[index]
        sock, head = http_connect(port, "unpinned.test:443")
        sock.close()
        assert status_of(head) == 502, head
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
