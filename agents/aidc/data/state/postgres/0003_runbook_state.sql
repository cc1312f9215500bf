-- The runbook engine's durable run state (aidc.runbook.state) on PostgreSQL: runs, their steps,
-- per-node locks, alerts seen, approvals. Applied once by aidc.state.postgres.migrate; never
-- edited after release.
CREATE TABLE runs (
    id BIGSERIAL PRIMARY KEY,
    runbook TEXT NOT NULL,
    node TEXT NOT NULL,
    status TEXT NOT NULL,            -- pending | running | awaiting_approval | done | failed
    trigger TEXT NOT NULL,           -- JSON: who/what started it
    owner TEXT,                      -- host:pid:start-ticks of the process executing it
    error TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,  -- also the executor's lease
    finished_at DOUBLE PRECISION
);
CREATE INDEX runs_active ON runs(status);
CREATE TABLE steps (
    run_id BIGINT NOT NULL REFERENCES runs(id),
    idx INTEGER NOT NULL,
    step_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    phase TEXT NOT NULL,             -- main | on_failure
    status TEXT NOT NULL,            -- pending | running | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    result TEXT,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE node_locks (
    node TEXT PRIMARY KEY,
    run_id BIGINT NOT NULL,
    acquired_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE alerts_seen (
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    run_id BIGINT,
    first_seen DOUBLE PRECISION NOT NULL,
    repeats INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (fingerprint, starts_at)
);
CREATE TABLE approvals (
    run_id BIGINT NOT NULL,
    idx INTEGER NOT NULL,
    approved_by TEXT NOT NULL,
    approved_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, idx)
);
