-- The failover event store (aidc.store.Store's tables, on PostgreSQL): events by idempotency key,
-- node states, remediation history, small settings. Applied once, in one transaction, by
-- aidc.state.postgres.migrate; never edited after release (add 0002_... instead).
CREATE TABLE events (
    id BIGSERIAL PRIMARY KEY,
    node TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    handled_at DOUBLE PRECISION,
    outcome TEXT,
    key TEXT NOT NULL UNIQUE,      -- <node>:<store id>:<event id>
    forwarded_at DOUBLE PRECISION  -- when a controller's store is known to hold the event
);
CREATE INDEX events_pending ON events(handled_at, id);
CREATE INDEX events_outbox ON events(forwarded_at, node, id);
CREATE TABLE node_state (
    node TEXT PRIMARY KEY,
    state TEXT NOT NULL,           -- in_service | quarantining | quarantined
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE remediations (
    id BIGSERIAL PRIMARY KEY,
    node TEXT NOT NULL,
    action TEXT NOT NULL,
    source TEXT NOT NULL,          -- failover | runbook
    ref TEXT NOT NULL,             -- event <id> | run <id>
    at DOUBLE PRECISION NOT NULL,
    UNIQUE(source, ref)
);
CREATE INDEX remediations_at ON remediations(at, node);
CREATE TABLE kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
