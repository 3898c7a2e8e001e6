-- Cached prompt tokens and reasoning tokens of each run (parts of its prompt and
-- completion tokens).
ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
