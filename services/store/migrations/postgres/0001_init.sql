-- Sessions, transcripts, runs and usage (the same tables as SQLite's migrations).
-- Every write is idempotent: ids are primary keys derived from deterministic message
-- ids, and replays never rewind a row. Sequences and times are BIGINT (stream
-- sequences and milliseconds since the epoch).
CREATE TABLE IF NOT EXISTS sessions (
    session_key TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    -- highest transcript-bearing stream sequence applied for this session
    last_seq    BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS transcript (
    entry_id    TEXT PRIMARY KEY,
    session_key TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    role        TEXT NOT NULL,
    content     TEXT NOT NULL,
    -- stream sequence of the carrying event, and the position within it
    seq         BIGINT NOT NULL,
    idx         BIGINT NOT NULL DEFAULT 0,
    ts          BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS transcript_session_order ON transcript (session_key, seq, idx);

CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    session_key   TEXT NOT NULL,
    agent_id      TEXT NOT NULL,
    status        TEXT NOT NULL,
    model         TEXT,
    error_code    TEXT,
    error_message TEXT,
    attempt       BIGINT NOT NULL,
    duration_ms   BIGINT NOT NULL,
    seq           BIGINT NOT NULL,
    ts            BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_session ON runs (session_key);

CREATE TABLE IF NOT EXISTS usage (
    run_id            TEXT PRIMARY KEY,
    session_key       TEXT NOT NULL,
    model             TEXT,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    ts                BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_session ON usage (session_key);
