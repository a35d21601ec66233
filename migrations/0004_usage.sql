-- A job's usage so far (tokens and cost its agent runs and LLM steps reported): a JSON
-- UsageTotals written by the job's room with each status change.
ALTER TABLE jobs ADD COLUMN usage TEXT;
