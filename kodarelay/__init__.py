"""kodarelay: the allowlisting egress proxy of an AI-agent sandbox.

Every public name is importable from here; modules load on first use (PEP 562) so that
``import kodarelay`` stays cheap inside other people's runtimes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    # env
    "proxy_env_vars": "env",
    "socks5_env_vars": "env",
    "ca_bundle_for_policy": "env",
    "DEFAULT_NO_PROXY": "env",
    "PROXY_PORT_ENV_KEY": "env",
    "NetPolicy": "env",
    "MitmConfig": "env",
    # filter
    "Filter": "filter",
    "Decision": "filter",
    "DEFAULT_DEV_ALLOWLIST": "filter",
    "PatternError": "filter",
    # lifecycle
    "ExternalProxy": "external",
    "ProxySpawnError": "external",
    "ProxyHandle": "handle",
    "pick_ephemeral_port": "ports",
    "wait_for_bind": "ports",
    # servers
    "Server": "server",
    "Socks5Server": "socks5",
    "Violation": "violations",
    "Request": "events",
    "Event": "events",
    "BuiltInProxy": "builtin",
    "BuiltInSocks5Proxy": "builtin",
    # inspection
    "CertificateAuthority": "ca",
    "InspectionUnavailable": "ca",
    "Secret": "secrets",
    "secret_env": "secrets",
    "ClientPolicy": "clients",
    # upstream
    "UpstreamConfig": "upstream",
    "parse_proxy_url": "upstream",
    "parse_no_proxy": "upstream",
    "bypasses_proxy": "upstream",
    "connect_upstream": "upstream",
    # relay
    "relay_with_timeouts": "relay",
    "DEFAULT_IDLE_TIMEOUT": "relay",
    "DEFAULT_TOTAL_TIMEOUT": "relay",
    "IMPLEMENTATION": "relay",
    "raise_open_files_limit": "limits",
    # bridge
    "spawn_uds_bridge": "bridge",
    "proxy_uds_path": "bridge",
    "cleanup_uds_path": "bridge",
    "rewrite_proxy_url_port": "bridge",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kodarelay' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .bridge import cleanup_uds_path, proxy_uds_path, rewrite_proxy_url_port, spawn_uds_bridge
    from .builtin import BuiltInProxy, BuiltInSocks5Proxy
    from .events import Event, Request
    from .env import (
        DEFAULT_NO_PROXY,
        PROXY_PORT_ENV_KEY,
        MitmConfig,
        NetPolicy,
        ca_bundle_for_policy,
        proxy_env_vars,
        socks5_env_vars,
    )
    from .external import ExternalProxy, ProxySpawnError
    from .filter import DEFAULT_DEV_ALLOWLIST, Decision, Filter, PatternError
    from .handle import ProxyHandle
    from .ports import pick_ephemeral_port, wait_for_bind
    from .relay import (
        DEFAULT_IDLE_TIMEOUT,
        DEFAULT_TOTAL_TIMEOUT,
        IMPLEMENTATION,
        relay_with_timeouts,
    )
    from .limits import raise_open_files_limit
    from .server import Server
    from .socks5 import Socks5Server
    from .upstream import UpstreamConfig, bypasses_proxy, connect_upstream, parse_no_proxy, parse_proxy_url
    from .violations import Violation
