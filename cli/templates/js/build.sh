#!/usr/bin/env bash
# Build {{name}}.wasm with componentize-js (installed into node_modules here).
set -euo pipefail
cd "$(dirname "$0")"
[ -d node_modules/@bytecodealliance/componentize-js ] || npm install --no-audit --no-fund
node build.mjs
# Its test cases (cases/*.json), when the stateset-hooks command is at hand.
if command -v stateset-hooks >/dev/null; then
  stateset-hooks test {{name}}.wasm cases
else
  echo "cases/ not run: stateset-hooks is not on PATH (cargo install --path cli, in its checkout)"
fi
