-- What each numbered lease batch of a node session granted, so a batch whose answer the
-- node never got (a replica killed after its commit, a timeout) can be given back whole:
-- the node names it in its next spend report (`lost_leases`, docs/api.md), and the
-- ledger takes back exactly what it granted and committed, since no call was forwarded
-- on it. Kept in step with ../postgres/0006_lease_batches.sql.
--
-- One row per round of a batch that granted something (`round` ≥ 0; a batch has more than
-- one round only when it asks for one key twice), `grants` a JSON array of
-- [key_id, day, granted, committed]. A batch named lost is marked with a row of round -1
-- (its grants' rows deleted): a copy of it that reaches the ledger later grants nothing.
-- Rows older than the retention (`Store::prune_lease_batches`) are deleted. A rowid table,
-- not WITHOUT ROWID: a row holds up to 200 keys' grants (kilobytes), appended in rowid
-- order, with its key in a small index (`benches/ledger_sqlite.rs`: a third cheaper).
CREATE TABLE lease_batches (
    holder TEXT NOT NULL,
    batch INTEGER NOT NULL,
    round INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    grants TEXT NOT NULL,
    PRIMARY KEY (holder, batch, round)
);
CREATE INDEX lease_batches_at ON lease_batches (at_ms);
