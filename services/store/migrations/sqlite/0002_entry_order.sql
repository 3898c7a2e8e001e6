-- A run event carries all of its turn's transcript entries: they share its stream
-- sequence, and `idx` keeps their order within it.
ALTER TABLE transcript ADD COLUMN idx INTEGER NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS transcript_session_seq;
CREATE INDEX IF NOT EXISTS transcript_session_order ON transcript (session_key, seq, idx);
