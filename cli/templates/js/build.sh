#!/usr/bin/env bash
# Build {{name}}.wasm with componentize-js (installed into node_modules here).
set -euo pipefail
cd "$(dirname "$0")"
[ -d node_modules/@bytecodealliance/componentize-js ] || npm install --no-audit --no-fund
node build.mjs
