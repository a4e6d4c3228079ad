-- keybrake.db, version 1: the whole control-plane schema, one CREATE per table. Kept in
-- step with ../postgres/0001_schema.sql (same tables, columns and meaning). A shipped
-- migration is never edited: a change is a new file in both directories.
CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE credentials (
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    vendor TEXT NOT NULL,
    sealed BLOB NOT NULL,
    last4 TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, vendor)
);
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    sealed_private BLOB NOT NULL,
    public_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    retired_at INTEGER
);
CREATE TABLE keys (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants(id),
    kid TEXT NOT NULL,
    vendor TEXT NOT NULL,
    label TEXT NOT NULL,
    allowed_endpoints TEXT NOT NULL,
    daily_cap INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    stripe_accounts TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX keys_by_tenant ON keys (tenant_id, seq);
CREATE INDEX keys_by_kid ON keys (kid, expires_at);
CREATE INDEX keys_by_revoked_at ON keys (revoked_at) WHERE revoked_at IS NOT NULL;
-- `held` is the sum of the key's leases for the day (see `leases`). `last_grant` carries
-- a grant out of the one conditional statement that makes it.
CREATE TABLE ledger (
    key_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    last_grant INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
);
-- Processes serving the ledger to their proxy, so that a dead holder's leases can be
-- given back.
CREATE TABLE holders (
    id TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL,
    alive_until INTEGER NOT NULL
);
CREATE TABLE leases (
    holder TEXT NOT NULL,
    key_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    held INTEGER NOT NULL,
    PRIMARY KEY (holder, key_id, day)
);
