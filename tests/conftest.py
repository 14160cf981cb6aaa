"""Shared fixtures: both relay / parser implementations, and helpers for real peers."""

from __future__ import annotations

import pytest

from kodarelay import _relay_py
from kodarelay.relay import env_flag


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--c-extensions",
        action=argparse_bool(),
        default=not env_flag("KODARELAY_NO_EXTENSIONS"),
        help="run the compiled-implementation parameters (default: on unless KODARELAY_NO_EXTENSIONS)",
    )


def argparse_bool():  # type: ignore[no-untyped-def]
    import argparse

    return argparse.BooleanOptionalAction


def _compiled_module():  # type: ignore[no-untyped-def]
    from kodarelay import _relay

    return _relay


@pytest.fixture(
    scope="session",
    params=[pytest.param("cython", marks=pytest.mark.c_extension), "python"],
)
def impl(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """The module under test: compiled ``kodarelay._relay`` or the pure-Python twin.

    With ``--c-extensions`` (the default) a missing compiled module is an error, not a skip.
    """
    if request.param == "python":
        return _relay_py
    if not request.config.getoption("--c-extensions"):
        pytest.skip("compiled parameter disabled (--no-c-extensions / KODARELAY_NO_EXTENSIONS)")
    return _compiled_module()


@pytest.fixture
def echo():  # type: ignore[no-untyped-def]
    """A threaded TCP echo server on 127.0.0.1:0."""
    from peers import EchoServer

    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def ca(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A test CA (trustme) and a server context for ``localhost`` / 127.0.0.1: (bundle path, context)."""
    import ssl

    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    cert = authority.issue_cert("localhost", "127.0.0.1")
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return bundle, ctx


@pytest.fixture
def https_site(ca):  # type: ignore[no-untyped-def]
    """A threaded HTTPS server on 127.0.0.1:0 with a certificate from ``ca``."""
    from peers import WebServer

    site = WebServer(tls=ca[1])
    yield site
    site.close()


@pytest.fixture(scope="session")
def run_ca():  # type: ignore[no-untyped-def]
    """The proxy's inspection CA (``kodarelay.CertificateAuthority``), one per test session."""
    pytest.importorskip("cryptography")
    from kodarelay import CertificateAuthority

    return CertificateAuthority.generate("kodarelay-test")


@pytest.fixture
def origin(ca):  # type: ignore[no-untyped-def]
    """An HTTPS origin on 127.0.0.1:0 that answers JSON of what it received (inspect_peers.py);
    modules with a plain-HTTP origin of their own override it."""
    from inspect_peers import Origin

    site = Origin(ca[1])
    yield site
    site.close()


@pytest.fixture
def bundle(run_ca, tmp_path):  # type: ignore[no-untyped-def]
    """A CA bundle clients of an inspecting proxy trust: the system's roots and ``run_ca``."""
    return str(run_ca.write_bundle(tmp_path / "bundle.pem"))


@pytest.fixture
def start_proxy():  # type: ignore[no-untyped-def]
    """Start built-in proxies on background loops (direct upstream unless told); all stop at teardown."""
    from kodarelay import BuiltInProxy, Filter, UpstreamConfig

    handles = []

    def start(patterns=("localhost",), cls=BuiltInProxy, **options):  # type: ignore[no-untyped-def]
        options.setdefault("upstream", UpstreamConfig.direct())
        h = cls(Filter(list(patterns)), **options).start()
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.shutdown()
