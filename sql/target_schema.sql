-- The pgduplex schema on a node that receives changes (installed by `pgduplex init`,
-- removed by `pgduplex teardown`).
CREATE SCHEMA IF NOT EXISTS pgduplex;

-- Idle positions of each source, written in a transaction tagged with the replication origin
-- so that the origin's progress (and so the slot) can advance while the source has no
-- transactions for us. An empty transaction would record nothing.
CREATE TABLE IF NOT EXISTS pgduplex.heartbeat (
    source_node text PRIMARY KEY,
    lsn pg_lsn NOT NULL,
    at timestamptz NOT NULL
);

-- An initial copy into this node (`pgduplex init --copy-from`): started, and finished once every
-- table is in and the origin is at the snapshot's consistent point. An unfinished row lets a
-- re-run of init start the copy over (the tables it copied into are emptied first).
CREATE TABLE IF NOT EXISTS pgduplex.copy_state (
    source_node text PRIMARY KEY,
    started_at timestamptz NOT NULL,
    finished_at timestamptz
);
