-- Keys revoked and not yet expired, by expiry: what the revocation filter holds, read at
-- start and, on PostgreSQL or a store shared during a graceful upgrade, in full every 10 s
-- (`Store::live_revocations`), so that a revocation committed late is never missed. Only
-- revoked rows are in it: issuing a key does not touch it. Kept in step with
-- ../postgres/0007_live_revocations.sql.
CREATE INDEX keys_live_revoked ON keys (expires_at) WHERE revoked_at IS NOT NULL;
