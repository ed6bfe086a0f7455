#!/usr/bin/env bash
# Build {{name}}.wasm, a WebAssembly component for stateset:webhooks.
set -euo pipefail
cd "$(dirname "$0")"
rustup target add wasm32-wasip2 >/dev/null
cargo build --quiet --release --target wasm32-wasip2
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/$(echo {{name}} | tr - _).wasm" {{name}}.wasm
echo "built $(pwd)/{{name}}.wasm"
# Its test cases (cases/*.json), when the stateset-hooks command is at hand.
if command -v stateset-hooks >/dev/null; then
  stateset-hooks test {{name}}.wasm cases
else
  echo "cases/ not run: stateset-hooks is not on PATH (cargo install --path cli, in its checkout)"
fi
