-- Seed 001's landing pages. A landing job's node events live in its JobRoom; a session's page
-- lives here (one per owner and session), its workspace (a git bundle) and preview in R2.

-- The session a landing job belongs to (`GET /v1/jobs?session_id=`), and its page.
ALTER TABLE jobs ADD COLUMN session_id TEXT;
ALTER TABLE jobs ADD COLUMN landing_page_id TEXT;
CREATE INDEX jobs_owner_session ON jobs(owner, session_id, created_ms);

-- status: pending | generating | generated | failed. business_data: the init payload as sent.
-- sections: the sections the design planner chose (JSON array).
CREATE TABLE landing_pages (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  session_id TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending',
  preview_url TEXT,
  business_data TEXT NOT NULL DEFAULT '{}',
  sections TEXT NOT NULL DEFAULT '[]',
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  UNIQUE (owner, session_id)
);
CREATE INDEX landing_pages_owner ON landing_pages(owner, created_at DESC);
