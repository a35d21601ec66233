-- Repository grants: a user's jobs, clients and repository work may name only the repositories an
-- operator granted to that user (by id or email) or to everyone (owner '*'). `repository` is
-- `org/repo` or `org/*`, lowercase; matching is done by kiln_schemas::grants.
CREATE TABLE grants (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  repository TEXT NOT NULL,
  created_at TEXT NOT NULL,
  UNIQUE (owner, repository)
);
CREATE INDEX grants_owner ON grants(owner);
