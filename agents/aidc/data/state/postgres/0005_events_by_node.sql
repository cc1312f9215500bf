-- Events by node: escalation reads a node's history for every decision, and without this index
-- that read scans every event the store holds (the SQLite store has had the same index since
-- the fleet-scale work, aidc.store).
CREATE INDEX events_node ON events(node, id);
