-- A node's name names one live node (`POST /v1/nodes` answers 409 `name_taken` for a name
-- in use; deleting the node frees it). Nodes created twice under one name before this
-- version keep the oldest under the name; the others get their id appended to it.
-- Kept in step with the other backend's 0005_node_names.sql.
UPDATE nodes SET name = name || '-' || id
 WHERE id NOT IN (SELECT MIN(id) FROM nodes GROUP BY name);
CREATE UNIQUE INDEX nodes_name ON nodes (name);
