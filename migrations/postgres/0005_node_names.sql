-- A node's name names one live node (`POST /v1/nodes` answers 409 `name_taken` for a name
-- in use; deleting the node frees it). Nodes created twice under one name before this
-- version: the first created keeps the name; the others get their id appended to it.
-- Kept in step with the other backend's 0005_node_names.sql.
UPDATE nodes SET name = name || '-' || id
 WHERE EXISTS (SELECT 1 FROM nodes older
                WHERE older.name = nodes.name
                  AND (older.created_at < nodes.created_at
                       OR (older.created_at = nodes.created_at AND older.id < nodes.id)));
CREATE UNIQUE INDEX nodes_name ON nodes (name);
