-- Write-ahead of reservations (src/control/ledger_batch.rs): the part of a lease that
-- calls which may have reached the vendor took, not yet reported spent or unreserved.
-- Settled as spent when its holder dies; a report returning budget never takes it.
ALTER TABLE leases ADD COLUMN committed BIGINT NOT NULL DEFAULT 0;
