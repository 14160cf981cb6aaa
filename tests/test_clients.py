"""Real clients (curl, urllib, requests) configured only by kodarelay's env bouquet."""

from __future__ import annotations

import os
import ssl
import subprocess
import urllib.error
import urllib.request

import pytest

from kodarelay import BuiltInProxy, BuiltInSocks5Proxy, Filter, UpstreamConfig, proxy_env_vars, socks5_env_vars

from peers import require_tool



@pytest.fixture
def http_proxy():
    with BuiltInProxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start() as h:
        yield h


def _env(pairs):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(pairs)
    return env


def test_curl_through_connect_to_https(http_proxy, https_site, ca):
    curl = require_tool("curl")
    env = _env(proxy_env_vars(http_proxy.port, ca[0], no_proxy=""))
    out = subprocess.run(
        [curl, "-sS", "--max-time", "20", https_site.url("/allowed")], env=env, capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello from /allowed\n"


def test_curl_refused_host_fails_with_403(http_proxy, ca):
    curl = require_tool("curl")
    env = _env(proxy_env_vars(http_proxy.port, ca[0], no_proxy=""))
    out = subprocess.run(
        [curl, "-sS", "--max-time", "20", "https://blocked.invalid/"], env=env, capture_output=True, timeout=30
    )
    assert out.returncode != 0
    assert b"403" in out.stderr
    assert [v.host for v in http_proxy.violations()] == ["blocked.invalid"]


def test_curl_through_socks5h(https_site, ca):
    curl = require_tool("curl")
    with BuiltInSocks5Proxy(Filter(["localhost"]), upstream=UpstreamConfig.direct()).start() as h:
        env = _env(socks5_env_vars(h.port) + [("CURL_CA_BUNDLE", str(ca[0]))])
        out = subprocess.run(
            [curl, "-sS", "--max-time", "20", https_site.url("/socks")], env=env, capture_output=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout == b"hello from /socks\n"
        refused = subprocess.run(
            [curl, "-sS", "--max-time", "20", "https://blocked.invalid/"], env=env, capture_output=True, timeout=30
        )
        assert refused.returncode != 0
        assert [v.reason for v in h.violations()] == ["not_allowed"]


def _urllib_get(url: str, env_pairs, cafile) -> bytes:
    env = dict(env_pairs)
    handler = urllib.request.ProxyHandler({"https": env["HTTPS_PROXY"], "http": env["HTTP_PROXY"]})
    ctx = ssl.create_default_context(cafile=str(cafile))
    opener = urllib.request.build_opener(handler, urllib.request.HTTPSHandler(context=ctx))
    with opener.open(url, timeout=20) as resp:
        return resp.read()


def test_urllib_through_connect(http_proxy, https_site, ca):
    pairs = proxy_env_vars(http_proxy.port, ca[0], no_proxy="")
    assert _urllib_get(https_site.url("/urllib"), pairs, ca[0]) == b"hello from /urllib\n"
    with pytest.raises(urllib.error.URLError) as err:
        _urllib_get("https://blocked.invalid/", pairs, ca[0])
    assert "403" in str(err.value)


def test_requests_with_only_the_bouquet(http_proxy, https_site, ca, monkeypatch):
    requests = pytest.importorskip("requests")
    for key in list(os.environ):
        if "proxy" in key.lower() or key in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
            monkeypatch.delenv(key)
    for key, value in proxy_env_vars(http_proxy.port, ca[0], no_proxy=""):
        monkeypatch.setenv(key, value)
    r = requests.get(https_site.url("/requests"), timeout=20)
    assert r.text == "hello from /requests\n"
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get("https://blocked.invalid/", timeout=20)
