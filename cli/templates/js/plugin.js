// {{name}}: a stateset-hooks plugin. Handles `{{event}}` (see `{{name}}.toml`).
import { log } from 'stateset:webhooks/host@0.3.0';

// Returning is `ok`; throwing a string records the delivery as failed (it is retried).
export function onEvent(eventType, payload) {
  let event;
  try {
    event = JSON.parse(payload);
  } catch (e) {
    throw `invalid event JSON: ${e.message}`;
  }
  const id = (event.data && event.data.id) || '(no id)';
  log('info', `{{name}} handled ${eventType} for ${id}`);
}
