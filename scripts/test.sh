#!/usr/bin/env bash
# Install everything and run the whole test suite: compiled relay, then the pure-Python twin.
#   bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests talk to (Debian packages).
missing=()
for tool in curl tinyproxy git unshare wget node npm; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
pkgs=()
for tool in "${missing[@]}"; do
    case "$tool" in unshare) pkgs+=(util-linux) ;; node) pkgs+=(nodejs) ;; *) pkgs+=("$tool") ;; esac
done
# OpenSSL's headers: the engine's inspected tunnels are built against them (without, the
# build leaves them out and inspection runs on the asyncio path)
[ -f /usr/include/openssl/ssl.h ] || pkgs+=(libssl-dev)
if ((${#pkgs[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

echo "== type check (mypy)"
.venv/bin/python -m mypy

export KODARELAY_REQUIRE_PEERS=1
echo "== compiled relay (KODARELAY_REQUIRE_EXTENSION=1)"
KODARELAY_REQUIRE_EXTENSION=1 .venv/bin/python -m pytest -q "$@"
echo "== compiled relay, handshakes on the asyncio loop (KODARELAY_NO_NATIVE_FRONTEND=1): server tests"
KODARELAY_REQUIRE_EXTENSION=1 KODARELAY_NO_NATIVE_FRONTEND=1 .venv/bin/python -m pytest -q "$@" \
    tests/test_http_server.py tests/test_socks5.py tests/test_upstream.py tests/test_hostile.py \
    tests/test_builtin.py tests/test_accept_errors.py tests/test_clients.py tests/test_policy.py tests/test_hooks.py tests/test_handshake_bound.py \
    tests/test_forward.py tests/test_forward_tools.py tests/test_inspect.py tests/test_secrets.py tests/test_fleet.py \
    tests/test_engine_policy.py tests/test_cli_guard.py tests/test_engine_faults.py
echo "== pure-Python relay (KODARELAY_NO_EXTENSIONS=1)"
KODARELAY_NO_EXTENSIONS=1 .venv/bin/python -m pytest -q "$@"
