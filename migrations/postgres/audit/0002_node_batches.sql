-- PostgreSQL, audit version 2: which audit batches of each node session are written, so a
-- batch a node sends again (its answer was lost: a replica killed after the commit, a
-- timeout, the same batch sent to two replicas) is recorded once. Kept in step with
-- ../../sqlite/audit/0002_node_batches.sql, where the rule is explained.
CREATE TABLE node_batches (
    holder TEXT PRIMARY KEY,
    last_batch BIGINT NOT NULL,
    at_ms BIGINT NOT NULL
);
