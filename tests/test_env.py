"""The env-var bouquet: exact keys and values, order, CA keys, the wider tools bouquet."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

import kodarelay
from kodarelay.env import (
    DEFAULT_NO_PROXY,
    PROXY_PORT_ENV_KEY,
    MitmConfig,
    NetPolicy,
    ca_bundle_for_policy,
    proxy_env_vars,
    socks5_env_vars,
)

CA_KEYS = {"SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
TOOL_CA_KEYS = {
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "HTTPLIB2_CA_CERTS",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "CARGO_HTTP_CAINFO",
    "DENO_CERT",
    "NIX_SSL_CERT_FILE",
    "BUNDLE_SSL_CA_CERT",
    "npm_config_cafile",
}
TOOL_PROXY_KEYS = {
    "npm_config_proxy",
    "npm_config_https_proxy",
    "YARN_HTTP_PROXY",
    "YARN_HTTPS_PROXY",
    "GRPC_PROXY",
    "DOCKER_HTTP_PROXY",
    "DOCKER_HTTPS_PROXY",
    "WS_PROXY",
    "WSS_PROXY",
}


def test_constants() -> None:
    assert DEFAULT_NO_PROXY == "localhost,127.0.0.1,::1,169.254.0.0/16,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"
    assert PROXY_PORT_ENV_KEY == "KODA_PROXY_PORT"


def test_proxy_env_vars_exact() -> None:
    url = "http://127.0.0.1:3128"
    assert proxy_env_vars(3128) == [
        ("HTTPS_PROXY", url),
        ("HTTP_PROXY", url),
        ("NO_PROXY", DEFAULT_NO_PROXY),
        ("http_proxy", url),
        ("https_proxy", url),
        ("no_proxy", DEFAULT_NO_PROXY),
    ]


def test_proxy_env_vars_with_ca_bundle() -> None:
    env = proxy_env_vars(8080, "/etc/ca.pem")
    assert env == sorted(env)
    d = dict(env)
    assert len(d) == len(env) == 10
    for key in CA_KEYS:
        assert d[key] == "/etc/ca.pem"
    assert d["HTTPS_PROXY"] == "http://127.0.0.1:8080"
    assert not TOOL_CA_KEYS & d.keys()


def test_ca_bundle_accepts_pathlike() -> None:
    d = dict(proxy_env_vars(8080, Path("/tmp/x ca.pem")))
    assert d["SSL_CERT_FILE"] == "/tmp/x ca.pem"

    class P(os.PathLike):  # type: ignore[type-arg]
        def __fspath__(self) -> str:
            return "/p.pem"

    assert dict(proxy_env_vars(8080, P()))["CURL_CA_BUNDLE"] == "/p.pem"


def test_no_ca_keys_without_bundle() -> None:
    keys = {k for k, _ in proxy_env_vars(1, tools=True)}
    assert not (CA_KEYS | TOOL_CA_KEYS) & keys


def test_custom_no_proxy() -> None:
    d = dict(proxy_env_vars(8080, no_proxy="localhost"))
    assert d["NO_PROXY"] == d["no_proxy"] == "localhost"
    assert dict(proxy_env_vars(8080, no_proxy=""))["no_proxy"] == ""


def test_tools_bouquet() -> None:
    env = proxy_env_vars(9000, "/ca.pem", tools=True)
    assert env == sorted(env)
    d = dict(env)
    assert len(d) == len(env)
    base = {"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"}
    assert set(d) == base | CA_KEYS | TOOL_CA_KEYS | TOOL_PROXY_KEYS
    for key in TOOL_PROXY_KEYS:
        assert d[key] == "http://127.0.0.1:9000", key
    for key in TOOL_CA_KEYS | CA_KEYS:
        assert d[key] == "/ca.pem", key
    assert d["GRPC_PROXY"].startswith("http://")  # gRPC rejects socks5h


def test_tools_keys_documented() -> None:
    doc = proxy_env_vars.__doc__ or ""
    for key in TOOL_CA_KEYS | TOOL_PROXY_KEYS:
        assert key in doc, key


@pytest.mark.parametrize("port", [0, -1, 65536, True, 8080.0, "8080", None])
def test_bad_port(port: object) -> None:
    with pytest.raises(ValueError, match=repr(port).replace(".", r"\.")):
        proxy_env_vars(port)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        socks5_env_vars(port)  # type: ignore[arg-type]


def test_port_bounds_accepted() -> None:
    assert dict(proxy_env_vars(1))["HTTP_PROXY"] == "http://127.0.0.1:1"
    assert dict(proxy_env_vars(65535))["HTTP_PROXY"] == "http://127.0.0.1:65535"


@pytest.mark.parametrize("path", ["", "/a\x00b"])
def test_bad_ca_bundle(path: str) -> None:
    with pytest.raises(ValueError):
        proxy_env_vars(8080, path)


def test_bytes_ca_bundle_rejected() -> None:
    with pytest.raises(TypeError):
        proxy_env_vars(8080, b"/ca.pem")  # type: ignore[arg-type]


def test_socks5_env_vars() -> None:
    url = "socks5h://127.0.0.1:1080"
    assert socks5_env_vars(1080) == [("ALL_PROXY", url), ("all_proxy", url)]
    assert socks5_env_vars(1080, scheme="http") == [("ALL_PROXY", "http://127.0.0.1:1080"), ("all_proxy", "http://127.0.0.1:1080")]
    with pytest.raises(ValueError, match="socks5"):
        socks5_env_vars(1080, scheme="socks5")


def test_policy_dataclasses() -> None:
    assert NetPolicy().mitm is None
    assert ca_bundle_for_policy(NetPolicy()) is None
    assert ca_bundle_for_policy(None) is None
    policy = NetPolicy(mitm=MitmConfig(ca_bundle=Path("/ca.pem")))
    assert ca_bundle_for_policy(policy) == Path("/ca.pem")
    assert MitmConfig("/x.pem").ca_bundle == Path("/x.pem")  # str is coerced
    assert isinstance(MitmConfig("/x.pem").ca_bundle, Path)
    assert NetPolicy() == NetPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.mitm = None  # type: ignore[misc]


def test_bundle_feeds_env() -> None:
    bundle = ca_bundle_for_policy(NetPolicy(MitmConfig(Path("/ca.pem"))))
    assert dict(proxy_env_vars(8080, bundle))["NODE_EXTRA_CA_CERTS"] == "/ca.pem"


def test_reexported() -> None:
    assert kodarelay.proxy_env_vars is proxy_env_vars
    assert kodarelay.socks5_env_vars is socks5_env_vars
    assert kodarelay.ca_bundle_for_policy is ca_bundle_for_policy
    assert kodarelay.NetPolicy is NetPolicy
    assert kodarelay.MitmConfig is MitmConfig
    assert kodarelay.DEFAULT_NO_PROXY == DEFAULT_NO_PROXY
    assert kodarelay.PROXY_PORT_ENV_KEY == PROXY_PORT_ENV_KEY


def test_client_and_token_go_into_every_proxy_url_percent_encoded():
    from kodarelay import proxy_env_vars, socks5_env_vars

    env = dict(proxy_env_vars(3128, client="job 7", token="s3cr/t:@", tools=True))
    assert env["HTTPS_PROXY"] == "http://job%207:s3cr%2Ft%3A%40@127.0.0.1:3128"
    assert env["npm_config_proxy"] == env["HTTPS_PROXY"] and env["GIT_HTTP_PROXY_AUTHMETHOD"] == "basic"
    assert dict(socks5_env_vars(1080, client="job", token="t"))["ALL_PROXY"] == "socks5h://job:t@127.0.0.1:1080"
    with pytest.raises(ValueError, match="needs a client"):
        proxy_env_vars(3128, token="t")
    with pytest.raises(ValueError) as info:
        proxy_env_vars(3128, client="job", token="bad\ntoken")
    assert "bad" not in str(info.value)               # a token is never echoed


def test_curl_sends_the_client_and_its_token(tmp_path):
    """A real client reads the URL and sends ``Proxy-Authorization: Basic`` with both."""
    import base64
    import subprocess

    from kodarelay import proxy_env_vars
    from peers import CannedProxy, require_tool

    curl = require_tool("curl")
    upstream = CannedProxy(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    try:
        env = {"PATH": "/usr/bin:/bin", **dict(proxy_env_vars(upstream.port, client="job-7", token="tok/en", no_proxy=""))}
        subprocess.run([curl, "-s", "-o", "/dev/null", "--max-time", "10", "https://pkg.test/"], env=env, timeout=20)
        (head,) = upstream.requests
        expected = base64.b64encode(b"job-7:tok/en")
        assert b"Proxy-Authorization: Basic " + expected in head, head
    finally:
        upstream.close()
