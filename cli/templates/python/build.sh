#!/usr/bin/env bash
# Build {{name}}.wasm with componentize-py (installed into .venv here).
set -euo pipefail
cd "$(dirname "$0")"
unset VIRTUAL_ENV   # componentize-py would bundle whatever venv this names
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/componentize-py --version 2>/dev/null | grep -q 0.25.1 \
  || .venv/bin/pip install --quiet --disable-pip-version-check componentize-py==0.25.1
.venv/bin/componentize-py -d wit -w plugin componentize app -p . -o {{name}}.wasm
echo "built $(pwd)/{{name}}.wasm"
# Its test cases (cases/*.json), when the stateset-hooks command is at hand.
if command -v stateset-hooks >/dev/null; then
  stateset-hooks test {{name}}.wasm cases
else
  echo "cases/ not run: stateset-hooks is not on PATH (cargo install --path cli, in its checkout)"
fi
