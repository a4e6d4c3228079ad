-- SQLite, audit.db version 2: which audit batches of each node session are written, so a
-- batch a node sends again (its answer was lost: a replica killed after the commit, a
-- timeout) is recorded once. Kept in step with ../../postgres/audit/0002_node_batches.sql.
--
-- A node session sends its batches one at a time, numbered 1, 2, 3…, and sends the next
-- only once the previous one is acknowledged, so the highest number written is all there
-- is to keep: a batch numbered at or below it is already in `audit`. The row is updated in
-- the transaction that writes the batch's events. Rows of sessions silent for a week are
-- deleted by the writer.
CREATE TABLE node_batches (
    holder TEXT PRIMARY KEY,
    last_batch INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID;
