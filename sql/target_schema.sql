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

-- Schema drift (DESIGN §6b): a source table whose columns this node does not have (ALTER TABLE
-- on the source only, so far). Its changes are held here, as the pgoutput messages they came
-- in, in the same transactions that advance the origin past them; the rest of the stream goes
-- on. Once this node has the columns (the same ALTER here), they are replayed in order and the
-- table resumes.
CREATE TABLE IF NOT EXISTS pgduplex.paused_tables (
    source_node text NOT NULL,
    table_name text NOT NULL,
    since timestamptz NOT NULL DEFAULT now(),
    error text NOT NULL,
    -- The source's latest Relation message for the table (what the target must match).
    relation bytea NOT NULL,
    PRIMARY KEY (source_node, table_name)
);
CREATE TABLE IF NOT EXISTS pgduplex.paused_changes (
    id bigserial PRIMARY KEY,
    source_node text NOT NULL,
    table_name text NOT NULL,
    -- The source transaction (its commit LSN): replay groups a transaction's changes again.
    commit_lsn pg_lsn NOT NULL,
    relation bytea NOT NULL,
    message bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS paused_changes_table ON pgduplex.paused_changes (source_node, table_name, id);

-- Tables added to an established direction (`init --copy-from` again, DESIGN §7: their own
-- temporary slot and snapshot). While `lsn` is NULL the table is being copied: `run` holds its
-- changes (in pgduplex.paused_changes). Once set to the snapshot's consistent point, the held
-- changes and the stream's changes of transactions that committed before it are skipped (the
-- copy has them), the others applied; the row goes once the origin is past it.
CREATE TABLE IF NOT EXISTS pgduplex.table_sync (
    source_node text NOT NULL,
    table_name text NOT NULL,
    lsn pg_lsn,
    PRIMARY KEY (source_node, table_name)
);
