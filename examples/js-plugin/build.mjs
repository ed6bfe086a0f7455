// Build return-refund.wasm (a WebAssembly component for stateset:webhooks@0.3.0)
// from plugin.js with componentize-js. Usage: node build.mjs (build.sh installs
// the dependency first). componentize-js wants the WIT under the working
// directory, so the frozen ../../wit/v0.3.0 is copied to ./wit on every build.
import { componentize } from '@bytecodealliance/componentize-js';
import { cp, rm, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
process.chdir(here);

// The StarlingMonkey engine's `http` feature is `fetch`, over wasi:http, which
// the host links under the manifest's [http] rules. `fetch-event` (serving
// incoming requests) has no place in a plugin. stdio (console.log/error reach
// the host's per-call output), clocks and random stay on. Add 'http',
// 'stdio', 'random' and 'clocks' to get a component that imports nothing but
// the host interfaces.
const DISABLE_FEATURES = ['fetch-event'];

await rm('wit', { recursive: true, force: true });
await cp('../../wit/v0.3.0', 'wit', { recursive: true });

const { component, imports } = await componentize({
  sourcePath: 'plugin.js',
  witPath: 'wit',
  worldName: 'plugin',
  disableFeatures: DISABLE_FEATURES,
});
await writeFile('return-refund.wasm', component);
console.log(`imports used by plugin.js: ${imports.map((i) => i.join('#')).join(', ') || 'none'}`);
console.log(`built ${here}/return-refund.wasm (${component.length} bytes)`);
