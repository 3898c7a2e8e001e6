-- Cached prompt tokens and reasoning tokens of each run (parts of its prompt and
-- completion tokens).
ALTER TABLE usage ADD COLUMN IF NOT EXISTS cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN IF NOT EXISTS reasoning_tokens BIGINT NOT NULL DEFAULT 0;
