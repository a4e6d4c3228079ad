-- Version 4 is empty: a withdrawn, never released commit (21a949d) applied a version 4 to
-- some development SQLite stores, so no change may rely on a store at version 4 having
-- run this file. Kept in step with the other backend's 0004_withdrawn.sql.
SELECT 1;
