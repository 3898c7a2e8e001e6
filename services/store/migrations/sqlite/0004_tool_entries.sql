-- Transcript entries of turns with tools: an assistant entry's function calls (a JSON
-- array of {id, name, arguments}), and a tool entry's call id and function name; and
-- compaction summaries ({"first_kept_seq": n}: the entry stands for every older one);
-- the usage of the model call that wrote an assistant entry (JSON); and each run's cost
-- in US dollars at the prices of its time.
ALTER TABLE transcript ADD COLUMN tool_calls TEXT;
ALTER TABLE transcript ADD COLUMN tool_call_id TEXT;
ALTER TABLE transcript ADD COLUMN tool_name TEXT;
ALTER TABLE transcript ADD COLUMN summary TEXT;
ALTER TABLE transcript ADD COLUMN usage TEXT;
CREATE INDEX IF NOT EXISTS transcript_summaries ON transcript (session_key, seq)
    WHERE summary IS NOT NULL;
ALTER TABLE usage ADD COLUMN cost_usd REAL;
