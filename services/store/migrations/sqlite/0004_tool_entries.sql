-- Transcript entries of turns with tools: an assistant entry's function calls (a JSON
-- array of {id, name, arguments}), and a tool entry's call id and function name.
ALTER TABLE transcript ADD COLUMN tool_calls TEXT;
ALTER TABLE transcript ADD COLUMN tool_call_id TEXT;
ALTER TABLE transcript ADD COLUMN tool_name TEXT;
