-- Outbound webhooks (issue 12 §2): subscriptions to an owner's job events, one delivery per
-- matching event and subscription, and each delivery's attempts (the delivery log).

CREATE TABLE webhook_subscriptions (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  url TEXT NOT NULL,
  -- JSON array of event kinds (`job.created`, `job.status`, `job.pr_opened`, `job.finished`).
  events TEXT NOT NULL,
  -- JSON array of job types; NULL: every kind.
  job_types TEXT,
  -- The signing secret, encrypted at rest (never answered after creation).
  secret TEXT NOT NULL,
  enabled INTEGER NOT NULL DEFAULT 1,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX webhook_subscriptions_owner ON webhook_subscriptions (owner, created_at);

CREATE TABLE webhook_deliveries (
  id TEXT PRIMARY KEY,
  subscription_id TEXT NOT NULL,
  owner TEXT NOT NULL,
  event TEXT NOT NULL,
  job_id TEXT NOT NULL,
  -- The body every attempt sends (fixed at the event: a retry or redelivery sends the same).
  payload TEXT NOT NULL,
  -- pending | delivered | failed
  status TEXT NOT NULL DEFAULT 'pending',
  attempts INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  created_ms INTEGER NOT NULL,
  -- Retries stop WEBHOOK_RETRY_WINDOW_SECS after this (the event, or the last redeliver).
  window_start_ms INTEGER NOT NULL,
  -- When the next attempt is due; while one runs, when it counts as lost (the sweep sends
  -- pending deliveries far past it again).
  next_attempt_at TEXT,
  delivered_at TEXT
);
CREATE INDEX webhook_deliveries_subscription ON webhook_deliveries (subscription_id, created_ms);
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id);
-- The sweep: pending deliveries whose message was lost.
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (status, next_attempt_at);

CREATE TABLE webhook_attempts (
  delivery_id TEXT NOT NULL,
  n INTEGER NOT NULL,
  at TEXT NOT NULL,
  -- The receiver's HTTP status; NULL when none came (timeout, connection error).
  response_code INTEGER,
  latency_ms INTEGER NOT NULL,
  error TEXT,
  PRIMARY KEY (delivery_id, n)
);
