-- What each numbered lease batch of a node session granted, so a batch whose answer was
-- lost can be given back whole. Kept in step with ../sqlite/0006_lease_batches.sql, where
-- the rule is explained.
CREATE TABLE lease_batches (
    holder TEXT NOT NULL,
    batch BIGINT NOT NULL,
    round BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    grants TEXT NOT NULL,
    PRIMARY KEY (holder, batch, round)
);
CREATE INDEX lease_batches_at ON lease_batches (at_ms);
