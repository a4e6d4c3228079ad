-- SQLite, audit.db version 1: the audit trail and its spans. Kept in step with
-- ../../postgres/audit/0001_audit.sql (same `audit` columns and meaning; PostgreSQL needs
-- no spans). IF NOT EXISTS: audit.db files made before versions were recorded hold these
-- tables already. A shipped migration is never edited: a change is a new file.
--
-- `seq` orders the trail and is the cursor of
-- `list`. Rows are never deleted, so SQLite's rowid (largest + 1) only grows; without
-- AUTOINCREMENT an insert does not also update `sqlite_sequence`. `model` and the token
-- counts are those of LLM calls (NULL for other calls).
--
-- No per-row index: a key's (and a tenant's) events are found through spans, one row per
-- key (and per tenant) per written batch: `[first_seq, last_seq]` holds every event of
-- that key in the batch, mixed with other keys' events of the same batch. A batch is a
-- contiguous `seq` range (one IMMEDIATE transaction), so one owner's spans never overlap.
-- Two index entries per event made up most of the writer's work (each insert a B-tree
-- descent with string compares and a dirtied page per key); one span per key per batch
-- costs a fraction.
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    tenant_id TEXT,
    key_id TEXT,
    label TEXT,
    vendor TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    decision TEXT NOT NULL,
    spend INTEGER NOT NULL,
    vendor_request_id TEXT,
    duration_ms INTEGER NOT NULL,
    model TEXT,
    input_tokens INTEGER,
    cached_input_tokens INTEGER,
    cache_write_tokens INTEGER,
    output_tokens INTEGER
);
CREATE TABLE IF NOT EXISTS tenant_spans (
    tenant_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    max_ts_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, last_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_spans (
    tenant_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    max_ts_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, key_id, last_seq)
) WITHOUT ROWID;
