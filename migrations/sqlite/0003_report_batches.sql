-- Which spend-report batches of each node session are applied (docs/api.md,
-- `/v1/sync/reports`), so a batch a node sends again (its answer was lost: a replica killed
-- after the commit, a timeout) settles its spend once. Kept in step with
-- ../postgres/0003_report_batches.sql.
--
-- A node session sends its report batches one at a time, numbered 1, 2, 3…, and sends the
-- next only once the previous one is answered, so the highest number applied is all there
-- is to keep: a batch numbered at or below it is already in the ledger. The row is moved
-- up in the transaction that applies the batch (`Store::lease_report_many`). Rows of
-- sessions silent for a week are deleted (`Store::prune_report_batches`).
CREATE TABLE report_batches (
    holder TEXT PRIMARY KEY,
    last_batch INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID;
