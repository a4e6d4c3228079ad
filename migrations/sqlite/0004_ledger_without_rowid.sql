-- The ledger and the leases are read and written by their primary key only, several rows
-- per fresh key (its first lease, spend reports, the return of what it did not spend). As
-- rowid tables each row lived twice: in the table and in the primary key's index, so every
-- insert, update by key and delete walked and wrote two B-trees. WITHOUT ROWID keeps each
-- row once, in the primary key's order. Same columns; the rows are copied over. Kept in
-- step with ../postgres/0004_ledger_without_rowid.sql (which changes nothing).
CREATE TABLE ledger_by_key (
    key_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0,
    held INTEGER NOT NULL DEFAULT 0,
    last_grant INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, day)
) WITHOUT ROWID;
INSERT INTO ledger_by_key (key_id, day, settled, held, last_grant)
    SELECT key_id, day, settled, held, last_grant FROM ledger;
DROP TABLE ledger;
ALTER TABLE ledger_by_key RENAME TO ledger;

CREATE TABLE leases_by_key (
    holder TEXT NOT NULL,
    key_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    held INTEGER NOT NULL,
    committed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (holder, key_id, day)
) WITHOUT ROWID;
INSERT INTO leases_by_key (holder, key_id, day, held, committed)
    SELECT holder, key_id, day, held, committed FROM leases;
DROP TABLE leases;
ALTER TABLE leases_by_key RENAME TO leases;
