-- Seed 000's app builder. A job's chat, dialogue and ticket events live in its JobRoom; what is
-- queried across jobs or by id lives here, written by the job's room.

-- The idea as the user wrote it (PATCHable while collecting), the gatherer's summary, whether the
-- pipeline is paused between steps, and where a running app build's pipeline is (`AppPhase`).
ALTER TABLE jobs ADD COLUMN initial_prompt TEXT;
ALTER TABLE jobs ADD COLUMN requirements_summary TEXT;
ALTER TABLE jobs ADD COLUMN is_paused INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN phase TEXT;

-- The App of a job: its PRD and structured spec (one per job; a continuation run replaces it).
CREATE TABLE apps (
  id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL UNIQUE,
  owner TEXT NOT NULL,
  spec TEXT NOT NULL,
  prd_markdown TEXT NOT NULL,
  prd_generated_at TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX apps_owner ON apps(owner, created_at DESC);

-- A job's backlog: epics, stories and tasks with parents and dependencies (a JSON array of ids).
-- `ordinal` keeps the backlog's order.
CREATE TABLE tickets (
  id TEXT PRIMARY KEY,
  job_id TEXT NOT NULL,
  owner TEXT NOT NULL,
  parent_id TEXT,
  type TEXT NOT NULL,
  title TEXT NOT NULL,
  description TEXT NOT NULL DEFAULT '',
  status TEXT NOT NULL,
  assigned_to TEXT NOT NULL DEFAULT '',
  dependencies TEXT NOT NULL DEFAULT '[]',
  ordinal INTEGER NOT NULL,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX tickets_job ON tickets(job_id, ordinal);
