#!/usr/bin/env bash
# Every test: the Rust suite (cargo test), then the Python package's: ./python is built and
# installed into a virtual environment (.venv, or $MIDCALL_VENV) with the pinned test
# requirements, and pytest runs against real local servers and inside the real Pipecat and
# LiveKit Agents. Needs the Rust toolchain, Python >= 3.11 with venv (Pipecat 1.14 requires it;
# the module is an abi3 wheel for 3.9+, tested on 3.11), and the package index.
set -euo pipefail
cd "$(dirname "$0")"

echo "== cargo test"
cargo test

VENV="${MIDCALL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "== python3 -m venv $VENV"
  python3 -m venv "$VENV"
fi
# maturin (the build backend, from the requirements) is run by pip as a command: put the
# venv's bin first on PATH.
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"
echo "== pip install -r python/requirements-test.txt"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r python/requirements-test.txt
echo "== pip install ./python (maturin builds the extension, release profile)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./python

echo "== pytest python/tests"
"$VENV/bin/python" -m pytest -q python/tests
