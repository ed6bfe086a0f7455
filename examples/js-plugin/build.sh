#!/usr/bin/env bash
# Build return-refund.wasm (a WebAssembly component for stateset:webhooks@0.3.0)
# from plugin.js with componentize-js. Run from anywhere: examples/js-plugin/build.sh
# Needs node (18 or newer) and npm; installs the pinned componentize-js into node_modules/ here.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

# Nothing it is built from has changed since the last build: done.
if [ -f return-refund.wasm ] && [ -z "$(find plugin.js build.mjs build.sh package.json package-lock.json ../../wit/v0.3.0 -newer return-refund.wasm -print -quit)" ]; then
    echo "up to date: $here/return-refund.wasm"
    exit 0
fi

# npm ci installs exactly package-lock.json (wiping node_modules first): skip it
# when node_modules was installed after the lock file last changed.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
fi
node build.mjs
