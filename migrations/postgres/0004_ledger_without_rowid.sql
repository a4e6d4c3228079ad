-- Kept in step with ../sqlite/0004_ledger_without_rowid.sql, which stores SQLite's ledger
-- and leases once, by primary key. PostgreSQL keeps every table apart from its indexes
-- either way: nothing changes here.
SELECT 1;
