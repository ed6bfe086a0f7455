-- stateset-hooks store, schema version 7 (2: plugin limits and counters as JSON; 3: replay counts;
-- 4: plugins' key-value state; 5: its usage per plugin, kept by triggers, and an expiry index;
-- 6: each delivery's last log lines and each event's trace context; 7: its last call's fuel and time,
-- shadow runs and each plugin's shadow status), as
-- `SCHEMA_VERSION` in sqlite.rs says; older files are migrated at open, newer ones refused. Open it with `sqlite3 stateset-hooks.db`.
-- Times are Unix milliseconds (UTC); `datetime(received_at / 1000, 'unixepoch')` shows them.

-- Every event acknowledged with 200, exactly as it was signed.
CREATE TABLE IF NOT EXISTS events (
    key         TEXT PRIMARY KEY,       -- the envelope's `id`, or 'sha256:<hex>' of the body
    event_type  TEXT NOT NULL,          -- the envelope's `type`
    received_at INTEGER NOT NULL,
    body        BLOB NOT NULL,          -- the raw body, byte for byte
    traceparent TEXT                    -- W3C trace context its deliveries' calls join
);

-- One row per (event, plugin subscribed when it arrived).
CREATE TABLE IF NOT EXISTS deliveries (
    id                   INTEGER PRIMARY KEY,
    event_key            TEXT NOT NULL REFERENCES events (key) ON DELETE CASCADE,
    plugin               TEXT NOT NULL,
    -- pending: not yet attempted (or replayed); failed: last attempt failed,
    -- retry at next_attempt_at; succeeded; dead: out of attempts (the DLQ).
    status               TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'dead')),
    attempts             INTEGER NOT NULL DEFAULT 0,
    next_attempt_at      INTEGER NOT NULL,
    last_failure_kind    TEXT,          -- out-of-fuel, timeout, out-of-memory, stack-overflow, trap, plugin-error, load-error, host-error
    last_failure_message TEXT,
    plugin_version       TEXT,          -- short SHA-256 of the component that ran the last attempt
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    -- times replayed: an attempt that began before a replay is not recorded
    -- over it, so the replay runs after the attempt.
    replays              INTEGER NOT NULL DEFAULT 0,
    last_logs            TEXT,          -- the last attempt's log lines, a JSON array of strings
    last_fuel            INTEGER,       -- the last attempt's fuel consumed (NULL: not run)
    last_duration_us     INTEGER,       -- the last attempt's call time, microseconds
    UNIQUE (event_key, plugin)
);

CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);


-- What the running server has loaded, rewritten every second by the server
-- for `stateset-hooks plugins list` (the types are in host/src/status.rs).
-- `limits` is JSON (fuel, memory_mib, timeout_ms, output_kib) or null;
-- `counters` is JSON: succeeded, and failures by kind.
CREATE TABLE IF NOT EXISTS plugins (
    name          TEXT PRIMARY KEY,
    version       TEXT,                 -- NULL when the file failed to load
    state         TEXT NOT NULL CHECK (state IN ('active', 'quarantined', 'loading', 'failed')),
    reason        TEXT,                 -- why it failed to load
    subscriptions TEXT NOT NULL,
    limits        TEXT NOT NULL,        -- JSON; 'null' until loaded
    counters      TEXT NOT NULL,
    updated_at    INTEGER NOT NULL,
    shadow        TEXT                  -- JSON of the candidate shadowing it (NAME.shadow.wasm), or NULL
);

-- Each run of a shadow candidate beside its live plugin's first attempt on
-- a new event: apart from deliveries, never acted on. The newest 10,000
-- per plugin are kept.
CREATE TABLE IF NOT EXISTS shadow_runs (
    id                INTEGER PRIMARY KEY,
    plugin            TEXT NOT NULL,    -- the live plugin it shadows
    event_key         TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    live_version      TEXT NOT NULL,
    candidate_version TEXT NOT NULL,
    live_error        TEXT,             -- NULL: succeeded; else `failed (kind): message`
    candidate_error   TEXT,
    live_fuel         INTEGER NOT NULL,
    live_duration_us  INTEGER NOT NULL,
    candidate_fuel    INTEGER NOT NULL,
    candidate_duration_us INTEGER NOT NULL,
    candidate_logs    TEXT NOT NULL,    -- JSON array of strings
    requests          TEXT NOT NULL,    -- JSON array: the requests it made, none sent
    created_at        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS shadow_runs_plugin ON shadow_runs (plugin, id);

-- Each plugin's key-value state (WIT `kv`, 0.3.0). Written only with the
-- record of a delivery that succeeded, in the same transaction.
CREATE TABLE IF NOT EXISTS plugin_kv (
    plugin     TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      BLOB NOT NULL,
    expires_at INTEGER,                 -- unix ms after which it is gone; NULL never
    PRIMARY KEY (plugin, key)
);

-- The keys with a TTL, for deleting a plugin's expired keys when it next
-- writes (and the hourly sweep) without reading the others.
CREATE INDEX IF NOT EXISTS plugin_kv_expiry ON plugin_kv (plugin, expires_at)
    WHERE expires_at IS NOT NULL;

-- Bytes of each plugin's keys and values (expired ones too, until deleted),
-- for its quota: kept by the triggers below, so every write path agrees.
CREATE TABLE IF NOT EXISTS plugin_kv_usage (
    plugin TEXT PRIMARY KEY,
    bytes  INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS plugin_kv_added AFTER INSERT ON plugin_kv BEGIN
    INSERT OR IGNORE INTO plugin_kv_usage (plugin, bytes) VALUES (NEW.plugin, 0);
    UPDATE plugin_kv_usage SET bytes = bytes + length(CAST(NEW.key AS BLOB)) + length(NEW.value)
        WHERE plugin = NEW.plugin;
END;
CREATE TRIGGER IF NOT EXISTS plugin_kv_changed AFTER UPDATE OF value ON plugin_kv BEGIN
    UPDATE plugin_kv_usage SET bytes = bytes - length(OLD.value) + length(NEW.value)
        WHERE plugin = NEW.plugin;
END;
CREATE TRIGGER IF NOT EXISTS plugin_kv_removed AFTER DELETE ON plugin_kv BEGIN
    UPDATE plugin_kv_usage SET bytes = bytes - length(CAST(OLD.key AS BLOB)) - length(OLD.value)
        WHERE plugin = OLD.plugin;
END;

-- `PRAGMA user_version` is set to SCHEMA_VERSION once the columns added since are in.
