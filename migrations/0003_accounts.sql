-- Accounts (issue 6 item 5): refresh-token families, a display name, and the failure log that
-- rate-limits logins and registrations.

-- Every refresh token descends from one login: its family. Rotation marks the spent token
-- (`replaced_by`, the hash of its successor) instead of deleting it, so a spent token presented
-- again is recognised as reuse, and the whole family is revoked. Rows are purged once expired.
ALTER TABLE refresh_tokens ADD COLUMN family_id TEXT NOT NULL DEFAULT '';
ALTER TABLE refresh_tokens ADD COLUMN replaced_by TEXT;
-- Tokens issued before families existed: each is its own family.
UPDATE refresh_tokens SET family_id = token_hash WHERE family_id = '';
CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);
CREATE INDEX refresh_tokens_expiry ON refresh_tokens(expires_at_ms);

-- The display name given at registration (seed 000's frontend shows `name`).
ALTER TABLE users ADD COLUMN name TEXT;

-- Failed (and in-flight) logins and registrations, one row per attempt per key
-- (`email:<sha256 of the email>` or `addr:<client address>`); see edge/src/rate_limit.rs.
CREATE TABLE auth_failures (
  id TEXT PRIMARY KEY,
  key TEXT NOT NULL,
  at_ms INTEGER NOT NULL
);
CREATE INDEX auth_failures_key ON auth_failures(key, at_ms);
CREATE INDEX auth_failures_at ON auth_failures(at_ms);
