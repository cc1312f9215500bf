-- The controller lease on PostgreSQL (aidc.failover.pg_lease): one row per lease name. `token`
-- grows by one at every acquisition and is the fencing token: the transaction that records an
-- action's intent checks it, so a controller that lost the lease cannot act. Expiry is judged
-- on this server's clock only (renewed_at + ttl_s), never by comparing controllers' clocks.
CREATE TABLE controller_lease (
    name TEXT PRIMARY KEY,
    holder TEXT,                                   -- NULL: released, free to take at once
    token BIGINT NOT NULL CHECK (token > 0),
    renewed_at TIMESTAMPTZ NOT NULL,
    ttl_s DOUBLE PRECISION CHECK (ttl_s > 0 AND ttl_s <= 600),  -- NULL: no expiry here (another elector's token)
    acquired_at TIMESTAMPTZ NOT NULL
);
