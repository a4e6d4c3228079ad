-- Which spend-report batches of each node session are applied, so a batch a node sends
-- again (its answer was lost: a replica killed after the commit, a timeout, the same batch
-- sent to two replicas) settles its spend once. Kept in step with
-- ../sqlite/0003_report_batches.sql, where the rule is explained.
CREATE TABLE report_batches (
    holder TEXT PRIMARY KEY,
    last_batch BIGINT NOT NULL,
    at_ms BIGINT NOT NULL
);
