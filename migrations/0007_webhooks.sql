-- Inbound webhooks (issue 12): hooks that start jobs from GitHub events or any signed POST.
-- `secret` is the hook's HMAC secret encrypted at rest (AES-256-GCM under a key derived from the
-- Worker secret WEBHOOK_SECRET_KEY, the hook's id as associated data): it must verify signatures,
-- so it cannot be a one-way hash, and it is never answered after create or rotate.
CREATE TABLE webhooks (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  kind TEXT NOT NULL,
  name TEXT NOT NULL,
  rules TEXT NOT NULL,
  template TEXT,
  secret TEXT NOT NULL,
  created_at TEXT NOT NULL,
  created_ms INTEGER NOT NULL,
  secret_rotated_at TEXT
);
CREATE INDEX webhooks_owner ON webhooks(owner, created_ms);

-- Deliveries that started a job, per hook, by delivery id (X-GitHub-Delivery, Kiln-Delivery or
-- Idempotency-Key, else the signature itself): the same delivery never starts two jobs, and a
-- redelivery is answered what the first one was. A row is claimed (`job_id` NULL) before the job is
-- submitted and removed again when the submit fails; a delivery refused or unmapped stores nothing.
CREATE TABLE inbound_deliveries (
  hook_id TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
  delivery_id TEXT NOT NULL,
  event TEXT NOT NULL,
  job_id TEXT,
  created_ms INTEGER NOT NULL,
  PRIMARY KEY (hook_id, delivery_id)
);
CREATE INDEX inbound_deliveries_created ON inbound_deliveries(created_ms);
