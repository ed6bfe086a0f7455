// Build {{name}}.wasm with componentize-js. The host offers no wasi:http, so
// the engine's http and fetch-event features are turned off.
import { componentize } from '@bytecodealliance/componentize-js';
import { writeFile } from 'node:fs/promises';

const { component } = await componentize({
  sourcePath: 'plugin.js',
  witPath: 'wit',
  worldName: 'plugin',
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile('{{name}}.wasm', component);
console.log(`built {{name}}.wasm (${component.length} bytes)`);
