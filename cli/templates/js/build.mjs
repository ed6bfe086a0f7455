// Build {{name}}.wasm with componentize-js. The engine's `http` feature is
// `fetch` (over wasi:http, which the host allows per the manifest's [http]);
// `fetch-event` (serving incoming requests) has no place in a plugin.
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';

const { component } = await componentize({
  sourcePath: 'plugin.js',
  witPath: 'wit',
  worldName: 'plugin',
  disableFeatures: ['fetch-event'],
});
await writeFile('{{name}}.wasm', component);
console.log(`built {{name}}.wasm (${component.length} bytes)`);
