"""``kodarelay run --ca-bundle``: one bundle (the system's roots and the given CA) for every
client, wget and apt included. ``--ca-bundle`` used to replace the system store."""

from __future__ import annotations

import os
import shutil

import pytest

from kodarelay.cabundle import system_bundle
from peers import require_tool
from test_cli import kr


def _first_cert(path: str) -> str:
    text = open(path, encoding="ascii", errors="replace").read()
    start = text.index("-----BEGIN CERTIFICATE-----")
    return text[start:text.index("-----END CERTIFICATE-----", start)]


def test_the_bundle_holds_the_system_roots_and_the_given_ca(ca, https_site):
    base = system_bundle()
    if base is None:
        pytest.skip("no system trust store here")
    curl = require_tool("curl")
    script = f"""
        for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE PIP_CERT GIT_SSL_CAINFO GRPC_DEFAULT_SSL_ROOTS_FILE_PATH HTTPLIB2_CA_CERTS NODE_EXTRA_CA_CERTS; do
            eval "echo $v=\\$$v"
        done
        cat "$SSL_CERT_FILE" >&2
        {curl} -sS {https_site.url('/through')}
    """
    out = kr("run", "--allow", "localhost", "--upstream", "direct", "--ca-bundle", str(ca[0]), "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    paths = set(values.values())
    assert len(paths) == 1, values                                     # one file for every variable
    (bundle,) = paths
    assert bundle != str(ca[0])
    assert "hello from /through" in out.stdout
    assert _first_cert(base) in out.stderr                             # the system's roots...
    assert _first_cert(str(ca[0])) in out.stderr                       # ...and the given CA
    assert not os.path.exists(os.path.dirname(bundle))                 # the run's files are gone


def test_wget_and_apt_are_pointed_at_the_bundle(ca, https_site):
    wget = shutil.which("wget")
    if wget is None:
        pytest.skip("wget is not installed")
    script = f"""
        {wget} -q -O - {https_site.url('/wget')}
        cat "$APT_CONFIG"
    """
    out = kr("run", "--allow", "localhost", "--upstream", "direct", "--ca-bundle", str(ca[0]), "--", "sh", "-c", script)
    assert out.returncode == 0, out.stderr
    assert "hello from /wget" in out.stdout
    assert 'Acquire::https::CAInfo "' in out.stdout


def test_without_the_flag_wget_rejects_the_private_ca(ca, https_site):
    """The check above can fail: without --ca-bundle, wget refuses the test CA."""
    wget = shutil.which("wget")
    if wget is None:
        pytest.skip("wget is not installed")
    out = kr("run", "--allow", "localhost", "--upstream", "direct", "--", wget, "-q", "-O", "-", https_site.url("/x"))
    assert out.returncode != 0 and "hello" not in out.stdout
