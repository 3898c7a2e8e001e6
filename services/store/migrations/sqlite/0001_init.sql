-- Sessions, transcripts, runs and usage. Every write is idempotent: ids are primary
-- keys derived from deterministic message ids, and replays never rewind a row.
CREATE TABLE IF NOT EXISTS sessions (
    session_key TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    -- highest transcript stream sequence applied for this session
    last_seq    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS transcript (
    entry_id    TEXT PRIMARY KEY,
    session_key TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    role        TEXT NOT NULL,
    content     TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    ts          INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS transcript_session_seq ON transcript (session_key, seq);

CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    session_key   TEXT NOT NULL,
    agent_id      TEXT NOT NULL,
    status        TEXT NOT NULL,
    model         TEXT,
    error_code    TEXT,
    error_message TEXT,
    attempt       INTEGER NOT NULL,
    duration_ms   INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    ts            INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_session ON runs (session_key);

CREATE TABLE IF NOT EXISTS usage (
    run_id            TEXT PRIMARY KEY,
    session_key       TEXT NOT NULL,
    model             TEXT,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens      INTEGER NOT NULL,
    ts                INTEGER NOT NULL
);
