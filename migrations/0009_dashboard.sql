-- Seed 002's agent dashboard. Tasks, learning cycles, round tables and 3D pipelines are jobs
-- (kinds agent_task, agent_learn, round_table, pipeline_3d) with their events in their rooms;
-- what is listed, filtered or aggregated across jobs lives here, written by the jobs' rooms.

-- The agent a task or learning cycle belongs to (`GET /api/v1/tasks?agent_type=`, agent stats).
ALTER TABLE jobs ADD COLUMN agent_type TEXT;
CREATE INDEX jobs_owner_agent ON jobs(owner, agent_type, created_ms);
-- The last progress a running step reported (0-100), copied by the room.
ALTER TABLE jobs ADD COLUMN progress REAL NOT NULL DEFAULT 0;
-- What a job produced (the finished `result`), copied by the room at the end.
ALTER TABLE jobs ADD COLUMN result TEXT;

-- An owner's agent definitions (seeded with defaults on first use). `stopped` refuses work;
-- `instructions` change with learning cycles (`learning_cycles` counts them).
CREATE TABLE agents (
  owner TEXT NOT NULL,
  type TEXT NOT NULL,
  name TEXT NOT NULL,
  description TEXT NOT NULL,
  capabilities TEXT NOT NULL DEFAULT '[]',
  tools TEXT NOT NULL DEFAULT '[]',
  ml_models TEXT NOT NULL DEFAULT '[]',
  model TEXT NOT NULL,
  technique TEXT NOT NULL,
  instructions TEXT NOT NULL,
  stopped INTEGER NOT NULL DEFAULT 0,
  learning_cycles INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  PRIMARY KEY (owner, type)
);

-- A round table (its job's id), with its full result (a CompetitionView) once it ends, and one row
-- per pairwise result for the providers' ratings.
CREATE TABLE competitions (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  task_id TEXT,
  prompt TEXT NOT NULL,
  stage TEXT NOT NULL,
  result TEXT,
  created_at TEXT NOT NULL,
  completed_at TEXT,
  created_ms INTEGER NOT NULL
);
CREATE INDEX competitions_owner ON competitions(owner, created_ms DESC);

CREATE TABLE competition_pairs (
  competition_id TEXT NOT NULL,
  owner TEXT NOT NULL,
  a TEXT NOT NULL,
  b TEXT NOT NULL,
  -- 1: a won, 0.5: a tie, 0: b won.
  score_a REAL NOT NULL,
  created_ms INTEGER NOT NULL
);
CREATE INDEX competition_pairs_owner ON competition_pairs(owner, created_ms);

-- A 3D pipeline (its job's id): stage, progress, the validation report and where the asset went.
CREATE TABLE pipelines_3d (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  prompt TEXT NOT NULL,
  format TEXT NOT NULL,
  max_faces INTEGER NOT NULL,
  max_texture_size INTEGER NOT NULL,
  stage TEXT NOT NULL,
  progress REAL NOT NULL DEFAULT 0,
  report TEXT,
  asset_key TEXT,
  wordpress_media_id INTEGER,
  wordpress_url TEXT,
  error TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  created_ms INTEGER NOT NULL
);
CREATE INDEX pipelines_3d_owner ON pipelines_3d(owner, created_ms DESC);
