-- Kiln's D1 schema: everything queried across jobs. Each job's event log lives in its JobRoom
-- Durable Object; queue state lives in the Queue Durable Object.

CREATE TABLE users (
  id TEXT PRIMARY KEY,
  email TEXT NOT NULL UNIQUE,
  username TEXT,
  password_hash TEXT NOT NULL,
  created_at TEXT NOT NULL
);

-- Refresh tokens are single use: refreshing deletes the row and inserts a new one.
CREATE TABLE refresh_tokens (
  token_hash TEXT PRIMARY KEY,
  user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  expires_at_ms INTEGER NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX refresh_tokens_user ON refresh_tokens(user_id);

CREATE TABLE clients (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  name TEXT NOT NULL,
  created_at TEXT NOT NULL
);
CREATE INDEX clients_owner ON clients(owner, created_at);

CREATE TABLE repositories (
  id TEXT PRIMARY KEY,
  client_id TEXT NOT NULL REFERENCES clients(id) ON DELETE CASCADE,
  owner TEXT NOT NULL,
  owner_name TEXT NOT NULL,
  repo_name TEXT NOT NULL,
  default_branch TEXT NOT NULL DEFAULT 'main',
  created_at TEXT NOT NULL,
  UNIQUE (client_id, owner_name, repo_name)
);
CREATE INDEX repositories_owner ON repositories(owner);

-- The job index: one row per job with its current status. The JobRoom object of the job is the
-- single writer of status and result fields after creation.
CREATE TABLE jobs (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  job_type TEXT NOT NULL,
  status TEXT NOT NULL,
  queue TEXT NOT NULL DEFAULT 'default',
  prompt TEXT NOT NULL,
  title TEXT,
  branch_name TEXT NOT NULL,
  client_id TEXT,
  feature_id TEXT,
  repository_id TEXT,
  github_org TEXT NOT NULL,
  github_repo TEXT NOT NULL,
  base_branch TEXT,
  created_by_team_member_id TEXT,
  params TEXT NOT NULL DEFAULT '{}',
  priority INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  pr_url TEXT,
  completion_reason TEXT,
  total_iterations INTEGER,
  error_message TEXT,
  original_job_id TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  started_at TEXT,
  completed_at TEXT,
  created_ms INTEGER NOT NULL,
  -- seq of the jobStatus event last written here, so a late write never overwrites a newer one.
  status_seq INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_owner_created ON jobs(owner, created_ms DESC);
CREATE INDEX jobs_owner_status ON jobs(owner, status);

CREATE TABLE runners (
  id TEXT PRIMARY KEY,
  name TEXT NOT NULL,
  token_hash TEXT NOT NULL UNIQUE,
  created_at TEXT NOT NULL,
  last_seen_at TEXT
);
