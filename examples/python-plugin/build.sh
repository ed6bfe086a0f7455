#!/usr/bin/env bash
# Build shipment-review.wasm (a WebAssembly component for stateset:webhooks@0.3.0)
# from app.py with componentize-py. Run from anywhere: examples/python-plugin/build.sh
# Needs python3 (3.10 or newer) with venv; installs componentize-py into .venv/ here.
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
# wit/ is the plugin world (WIT 0.3.0) plus wasi:http; the frozen WIT 0.3.0 is
# copied into wit/deps on every build, so the repository keeps one copy.
mkdir -p wit/deps/stateset-webhooks-0.3.0
cp -p ../../wit/v0.3.0/world.wit wit/deps/stateset-webhooks-0.3.0/world.wit

# Nothing it is built from has changed since the last build: done.
if [ -f shipment-review.wasm ] && [ -z "$(find app.py build.sh wit ../../wit/v0.3.0 -newer shipment-review.wasm -print -quit)" ]; then
    echo "up to date: $here/shipment-review.wasm"
    exit 0
fi
unset VIRTUAL_ENV   # componentize-py would bundle whatever venv this names

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ "$(.venv/bin/componentize-py --version 2>/dev/null)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
    .venv/bin/pip install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

# componentize generates the wit_world bindings itself. For editor stubs, run
#   .venv/bin/componentize-py -d wit -w plugin bindings bindings
# (bindings/ is ignored by git and not needed for the build).

# -p . : app.py lives here (the venv's site-packages is added by componentize-py
# only through VIRTUAL_ENV, which we do not set: app.py needs nothing outside the stdlib).
.venv/bin/componentize-py -d wit -w plugin componentize app -p . -o shipment-review.wasm
echo "built $here/shipment-review.wasm ($(wc -c < shipment-review.wasm) bytes)"
