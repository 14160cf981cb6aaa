"""The environment a sandboxed process gets so that its traffic goes through the proxy.

Every value points at the proxy on ``127.0.0.1`` (and, with a MITM CA, at its bundle); the
lists are sorted by key so the bouquet is byte-for-byte reproducible.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

log = logging.getLogger(__name__)

#: The crate's NO_PROXY: loopback, link-local and the RFC 1918 ranges. Clients connect to
#: these directly, so the proxy never judges or records them; pass ``no_proxy=""`` to
#: ``proxy_env_vars`` to fence them too (the ``kodarelay`` command always does).
DEFAULT_NO_PROXY = "localhost,127.0.0.1,::1,169.254.0.0/16,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16"
PROXY_PORT_ENV_KEY = "KODA_PROXY_PORT"

StrPath = Union[str, "os.PathLike[str]"]

# Always set when a CA bundle is given (the crate's four).
_CA_KEYS = ("SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
# tools=True: the same bundle under the names other tools read.
_TOOL_CA_KEYS = (
    "PIP_CERT",  # pip: --cert (pip ignores SSL_CERT_FILE when it uses its vendored certifi)
    "GIT_SSL_CAINFO",  # git: http.sslCAInfo
    "AWS_CA_BUNDLE",  # AWS CLI, boto3 / botocore
    "CARGO_HTTP_CAINFO",  # cargo: http.cainfo
    "DENO_CERT",  # deno: --cert
    "NIX_SSL_CERT_FILE",  # nix: fetchers and substituters
    "BUNDLE_SSL_CA_CERT",  # Ruby bundler: ssl_ca_cert
    "npm_config_cafile",  # npm: cafile
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",  # gRPC core (C, Python, Ruby...): its own roots
    "HTTPLIB2_CA_CERTS",  # httplib2 (google-api-python-client and friends)
)
# tools=True: the same proxy under the names other tools read.
_TOOL_PROXY_KEYS = (
    "npm_config_proxy",  # npm: proxy (npm ignores HTTP_PROXY for some requests)
    "npm_config_https_proxy",  # npm: https-proxy
    "YARN_HTTP_PROXY",  # Yarn 2+: httpProxy
    "YARN_HTTPS_PROXY",  # Yarn 2+: httpsProxy
    "GRPC_PROXY",  # gRPC core (C, Python, Ruby...): http:// only, it rejects socks5h://
    "DOCKER_HTTP_PROXY",  # container build tooling that forwards it into builds
    "DOCKER_HTTPS_PROXY",  # idem, for https
    "WS_PROXY",  # ws:// clients reading <scheme>_proxy (Python websockets via urllib)
    "WSS_PROXY",  # wss:// clients, idem
)
_SOCKS_SCHEMES = ("socks5h", "http")


@dataclass(frozen=True)
class MitmConfig:
    """TLS interception settings; only the CA bundle matters to the environment."""

    ca_bundle: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "ca_bundle", Path(_check_path(self.ca_bundle)))


@dataclass(frozen=True)
class NetPolicy:
    """The network policy of a sandbox, as far as the proxy layer needs it."""

    mitm: MitmConfig | None = None


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"proxy port must be an int in 1..65535, got {port!r}")
    return port


def _check_path(path: StrPath) -> str:
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"CA bundle path must be str or os.PathLike[str], got {path!r}")
    if not text or "\x00" in text:
        raise ValueError(f"CA bundle path must be non-empty and free of NUL bytes, got {path!r}")
    return text


def proxy_env_vars(
    port: int,
    ca_bundle: StrPath | None = None,
    *,
    no_proxy: str = DEFAULT_NO_PROXY,
    tools: bool = False,
    client: str | None = None,
    token: str | None = None,
) -> list[tuple[str, str]]:
    """The HTTP(S) proxy bouquet for a proxy on ``127.0.0.1:port``, sorted by key.

    ``HTTPS_PROXY`` / ``HTTP_PROXY`` in both cases (tools disagree on which case they
    read), ``NO_PROXY`` / ``no_proxy``, and with ``ca_bundle`` the four CA variables
    ``SSL_CERT_FILE`` (OpenSSL, Python ssl, Go), ``NODE_EXTRA_CA_CERTS`` (Node),
    ``REQUESTS_CA_BUNDLE`` (requests) and ``CURL_CA_BUNDLE`` (curl).

    ``no_proxy`` defaults to ``DEFAULT_NO_PROXY`` (the crate's value, kept for drop-in use):
    localhost, 127.0.0.1, ::1, 169.254.0.0/16 and the private ranges bypass the proxy, so a
    sandboxed process reaches them unjudged and no violation is recorded. Pass
    ``no_proxy=""`` to send everything through the policy.

    ``tools=True`` adds the same proxy as ``npm_config_proxy`` / ``npm_config_https_proxy``
    (npm), ``YARN_HTTP_PROXY`` / ``YARN_HTTPS_PROXY`` (Yarn 2+), ``GRPC_PROXY`` (gRPC core,
    which rejects ``socks5h://``), ``DOCKER_HTTP_PROXY`` / ``DOCKER_HTTPS_PROXY`` (container
    build tooling that forwards them), ``WS_PROXY`` / ``WSS_PROXY`` (WebSocket clients
    such as Python ``websockets``); and with a bundle ``PIP_CERT`` (pip), ``GIT_SSL_CAINFO``
    (git), ``AWS_CA_BUNDLE`` (AWS CLI / botocore), ``CARGO_HTTP_CAINFO`` (cargo),
    ``DENO_CERT`` (Deno), ``NIX_SSL_CERT_FILE`` (Nix), ``BUNDLE_SSL_CA_CERT`` (Bundler),
    ``npm_config_cafile`` (npm), ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` (gRPC core) and
    ``HTTPLIB2_CA_CERTS`` (httplib2). Raises ``ValueError`` naming a bad port or path.

    ``client="job-7"`` puts ``job-7:@`` in every proxy URL: clients send it as the user of
    ``Proxy-Authorization: Basic``, and the proxy attributes each request to it. The empty
    password is deliberate: requests (and pip) drop a proxy user that has no password, and
    git prompts for one. With a client, ``GIT_HTTP_PROXY_AUTHMETHOD=basic`` is set too: git
    (libcurl's "anyauth") otherwise waits for a 407 challenge before it sends the user.
    ``token="..."`` is the client's password (``NAME:TOKEN@``, percent-encoded), for a proxy
    that checks one; a token without a client is a ``ValueError``.
    """
    url = f"http://{_userinfo(client, token)}127.0.0.1:{_check_port(port)}"
    if not isinstance(no_proxy, str) or "\x00" in no_proxy:
        raise ValueError(f"no_proxy must be a str without NUL bytes, got {no_proxy!r}")
    proxy_keys = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"]
    ca_keys: list[str] = list(_CA_KEYS)
    if tools:
        proxy_keys += _TOOL_PROXY_KEYS
        ca_keys += _TOOL_CA_KEYS
    env = {key: url for key in proxy_keys}
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    if client is not None:
        env["GIT_HTTP_PROXY_AUTHMETHOD"] = "basic"
    if ca_bundle is not None:
        path = _check_path(ca_bundle)
        env.update((key, path) for key in ca_keys)
    return sorted(env.items())


def _userinfo(client: str | None, token: str | None = None) -> str:
    """``client:token@`` for a proxy URL (each percent-encoded; the token empty when not
    given), or nothing."""
    if client is None:
        if token is not None:
            raise ValueError("a token needs a client name (client=...)")
        return ""
    for what, value in (("client", client), ("token", token)):
        if value is None:
            continue
        if not isinstance(value, str) or not value or any(c < " " or c == "\x7f" for c in value):
            raise ValueError(f"{what} must be a non-empty printable str")     # (never echo a token)
    from urllib.parse import quote

    return quote(client, safe="") + ":" + quote(token or "", safe="") + "@"


def socks5_env_vars(port: int, *, scheme: str = "socks5h", client: str | None = None,
                    token: str | None = None) -> list[tuple[str, str]]:
    """``ALL_PROXY`` / ``all_proxy`` for a proxy on ``127.0.0.1:port``, sorted by key.

    The default ``socks5h://`` makes the client send the hostname, not an address it
    resolved itself (the allowlist judges names). ``scheme="http"`` is for a port that
    serves both protocols, since httpx and gRPC reject ``socks5h://``. ``socks5://`` is
    refused on purpose. ``client`` as in ``proxy_env_vars`` (SOCKS5 clients send it as the
    RFC 1929 username).
    """
    if scheme not in _SOCKS_SCHEMES:
        raise ValueError(f"scheme must be one of {_SOCKS_SCHEMES}, got {scheme!r}")
    url = f"{scheme}://{_userinfo(client, token)}127.0.0.1:{_check_port(port)}"
    return sorted([("ALL_PROXY", url), ("all_proxy", url)])


def ca_bundle_for_policy(net: NetPolicy | None) -> Path | None:
    """The MITM CA bundle the sandboxed process must trust, or None without MITM."""
    if net is None or net.mitm is None:
        return None
    return net.mitm.ca_bundle
