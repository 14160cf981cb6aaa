#!/usr/bin/env bash
# The engine under AddressSanitizer + UndefinedBehaviorSanitizer (issue 14): build the compiled
# relay with KODARELAY_SANITIZE=1 into a venv of its own (.venv-asan, the normal .venv is
# untouched) and run the engine and server tests with the ASan runtime preloaded into Python.
# Any ASan / UBSan report fails the run (halt_on_error, and the log is checked after).
#   bash scripts/sanitize.sh [extra pytest args]
#   bash scripts/sanitize.sh tests/test_handshake_bound.py [-k ...]   # only the tests named
#   KODARELAY_SANITIZE=thread bash scripts/sanitize.sh   # ThreadSanitizer (see the README)
#
# Leak detection is off (detect_leaks=0): CPython's own allocations at exit (interned
# objects, arenas it never frees) drown LeakSanitizer's report; the fd / refcount leak tests
# cover the engine's own leaks instead.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${KODARELAY_SANITIZE:-1}
if [ "$MODE" = thread ]; then
    VENV=$PWD/.venv-tsan
    RUNTIME=$(gcc -print-file-name=libtsan.so)
    # fork tests deselected: TSan cannot start threads in a child forked from a threaded process
    TESTS=(tests/test_relay.py tests/test_engine_faults.py tests/test_fleet.py tests/test_inspect_engine.py -k "not fork")
else
    VENV=$PWD/.venv-asan
    RUNTIME=$(gcc -print-file-name=libasan.so)
    TESTS=(tests/test_relay.py tests/test_engine_faults.py tests/test_native_frontend.py
           tests/test_engine_plans.py tests/test_engine_policy.py tests/test_http_server.py
           tests/test_socks5.py tests/test_hostile.py tests/test_handshake_bound.py tests/test_fleet.py
           tests/test_inspect_engine.py)
fi
# test paths among the arguments (tests/..., with or without ::name) replace the default list
ARGS=()
PICKED=()
for a in "$@"; do
    case "$a" in tests/*) PICKED+=("$a") ;; *) ARGS+=("$a") ;; esac
done
if [ ${#PICKED[@]} -gt 0 ]; then
    TESTS=("${PICKED[@]}")
fi
[ -f "$RUNTIME" ] || { echo "sanitize.sh: no sanitizer runtime ($RUNTIME): apt-get install gcc" >&2; exit 2; }

PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Built from a copy of the tree, installed (not editable) into $VENV: the normal build's
# objects in build/ and its kodarelay/_relay*.so in the tree stay out of it, and it of them.
src=$(mktemp -d)
logdir=$(mktemp -d)
trap 'rm -rf "$src" "$logdir"' EXIT
tar --exclude='./.venv*' --exclude=./build --exclude='./kodarelay/_relay*.so' --exclude=./kodarelay/_relay.c \
    --exclude='*.egg-info' -cf - . | tar -xf - -C "$src"
KODARELAY_SANITIZE=$MODE "$VENV/bin/python" -m pip install -q "$src[test]"     # the test extras
KODARELAY_SANITIZE=$MODE "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$src"
so=$(cd / && "$VENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("kodarelay._relay").origin)')
case "$so" in "$VENV"/*) ;; *) echo "sanitize.sh: imported $so, not $VENV's build" >&2; exit 2 ;; esac
# (the symbol list is read whole: grep -q stopping early would SIGPIPE nm, a failure under pipefail)
syms=$(nm -D "$so")
if [ "$MODE" = thread ]; then
    grep -q __tsan_init <<<"$syms" || { echo "sanitize.sh: $so is not instrumented" >&2; exit 2; }
else
    grep -q __asan_init <<<"$syms" || { echo "sanitize.sh: $so is not instrumented" >&2; exit 2; }
fi

status=0
# --capture=sys: a report the runtime writes to fd 2 (UBSan's under the combined runtime does,
# whatever log_path says) reaches this script's stderr, not a capture file lost with the process
LD_PRELOAD=$RUNTIME \
ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$logdir/asan" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$logdir/ubsan" \
TSAN_OPTIONS="halt_on_error=0:log_path=$logdir/tsan:second_deadlock_stack=1:suppressions=$PWD/scripts/tsan.supp" \
KODARELAY_REQUIRE_EXTENSION=1 KODARELAY_REQUIRE_PEERS=${KODARELAY_REQUIRE_PEERS:-0} \
    "$VENV/bin/pytest" -q -p no:cacheprovider --capture=sys ${ARGS[@]+"${ARGS[@]}"} "${TESTS[@]}" || status=$?
if compgen -G "$logdir/*" >/dev/null; then
    echo "== sanitizer reports" >&2
    cat "$logdir"/* >&2
    status=1
fi
exit $status
