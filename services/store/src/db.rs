//! Persistence behind a trait, with SQLite (sqlx) as the embedded default.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use clawbus_wire::{HistoryEntry, Role, RunEvent, TranscriptEvent};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Row, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

/// Most writes committed in one transaction (group commit).
const MAX_BATCH: usize = 512;

/// Storage errors. Database errors are retryable (locked, I/O); bad URLs are not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL `{0}` (sqlite:// is supported; Postgres is planned)")]
    UnsupportedUrl(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database writer stopped")]
    WriterGone,
    #[error("write failed: {0}")]
    Write(String),
}

/// What the store service needs from a database.
pub trait TranscriptStore: Send + Sync + 'static {
    /// Records a transcript entry at stream sequence `seq`; false when already present.
    fn apply_transcript(
        &self,
        ev: &TranscriptEvent,
        seq: u64,
        ts: i64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Records a run's state (and its usage) and the transcript entries it carries, in
    /// one transaction; an older sequence never overwrites a newer run state.
    fn apply_run(
        &self,
        ev: &RunEvent,
        seq: u64,
        ts: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The last `limit` entries of a session, oldest first.
    fn history(
        &self,
        session_key: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<HistoryEntry>, StoreError>> + Send;
    /// Highest transcript sequence applied for a session (0 when none).
    fn applied_seq(
        &self,
        session_key: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// SQLite through sqlx, in WAL mode: one writer connection that commits concurrent
/// writes in batches (SQLite serialises writers anyway; batching turns N commits into
/// one), and a pool of readers that WAL lets run beside it.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: mpsc::Sender<WriteReq>,
}

enum WriteOp {
    Transcript(TranscriptEvent, u64, i64),
    Run(RunEvent, u64, i64),
}

struct WriteReq {
    op: WriteOp,
    done: oneshot::Sender<Result<bool, String>>,
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if !url.starts_with("sqlite:") {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        }
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + NORMAL: a commit survives a crash of the process; see README for
            // the OS-crash caveat shared with JetStream's own fsync interval.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            // 1 MiB page cache per connection instead of 2: the history queries touch
            // few pages, and five connections' caches add up in resident memory.
            .pragma("cache_size", "-1024");
        let pool = SqlitePoolOptions::new()
            .max_connections(3)
            .connect_with(opts.clone())
            .await?;
        // Several store replicas may start at once on one database: a migration that
        // lost the race rolled back; the next attempt finds it applied.
        let mut attempt = 0;
        while let Err(e) = sqlx::migrate!("./migrations").run(&pool).await {
            attempt += 1;
            if attempt >= 5 {
                return Err(e.into());
            }
            tracing::warn!(error = %e, attempt, "Migration failed; retrying");
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        let conn = SqliteConnection::connect_with(&opts).await?;
        let (writer, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(write_loop(conn, rx));
        Ok(Self { pool, writer })
    }

    async fn write(&self, op: WriteOp) -> Result<bool, StoreError> {
        let (done, rx) = oneshot::channel();
        self.writer
            .send(WriteReq { op, done })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(StoreError::Write)
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

impl TranscriptStore for SqliteStore {
    async fn apply_transcript(
        &self,
        ev: &TranscriptEvent,
        seq: u64,
        ts: i64,
    ) -> Result<bool, StoreError> {
        self.write(WriteOp::Transcript(ev.clone(), seq, ts)).await
    }

    async fn apply_run(&self, ev: &RunEvent, seq: u64, ts: i64) -> Result<(), StoreError> {
        self.write(WriteOp::Run(ev.clone(), seq, ts))
            .await
            .map(|_| ())
    }

    async fn history(
        &self,
        session_key: &str,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT entry_id, run_id, role, content, seq, ts FROM
               (SELECT * FROM transcript WHERE session_key = ? ORDER BY seq DESC, idx DESC LIMIT ?)
             ORDER BY seq ASC, idx ASC",
        )
        .bind(session_key)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(HistoryEntry {
                    entry_id: r.try_get("entry_id")?,
                    run_id: r.try_get("run_id")?,
                    role: Role::parse(r.try_get::<&str, _>("role")?),
                    content: r.try_get("content")?,
                    seq: r.try_get::<i64, _>("seq")? as u64,
                    ts: r.try_get("ts")?,
                })
            })
            .collect()
    }

    async fn applied_seq(&self, session_key: &str) -> Result<u64, StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT last_seq FROM sessions WHERE session_key = ?")
                .bind(session_key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(v.unwrap_or(0) as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Commits queued writes in batches. A batch that fails is retried one write per
/// transaction, so one bad write fails alone.
async fn write_loop(mut conn: SqliteConnection, mut rx: mpsc::Receiver<WriteReq>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match commit_batch(&mut conn, &batch).await {
            Ok(results) => {
                for (req, r) in batch.drain(..).zip(results) {
                    let _ = req.done.send(Ok(r));
                }
            }
            Err(_) => {
                for req in batch.drain(..) {
                    let r = commit_batch(&mut conn, std::slice::from_ref(&req)).await;
                    let _ = req.done.send(r.map(|v| v[0]).map_err(|e| e.to_string()));
                }
            }
        }
    }
}

async fn commit_batch(
    conn: &mut SqliteConnection,
    batch: &[WriteReq],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = conn.begin().await?;
    let mut results = Vec::with_capacity(batch.len());
    for req in batch {
        let r = match &req.op {
            WriteOp::Transcript(ev, seq, ts) => apply_transcript(&mut tx, ev, *seq, *ts).await?,
            WriteOp::Run(ev, seq, ts) => apply_run(&mut tx, ev, *seq, *ts).await?,
        };
        results.push(r);
    }
    tx.commit().await?;
    Ok(results)
}

/// One transcript row to write.
struct Entry<'a> {
    session_key: &'a str,
    run_id: &'a str,
    entry_id: &'a str,
    role: Role,
    content: &'a str,
    /// Stream sequence of the carrying event, and the position in it.
    seq: u64,
    idx: usize,
}

async fn apply_transcript(
    tx: &mut SqliteConnection,
    ev: &TranscriptEvent,
    seq: u64,
    ts: i64,
) -> Result<bool, sqlx::Error> {
    let e = Entry {
        session_key: &ev.session_key,
        run_id: &ev.run_id,
        entry_id: &ev.entry_id,
        role: ev.role,
        content: &ev.content,
        seq,
        idx: 0,
    };
    let inserted = insert_entry(tx, &e, ts).await?;
    touch_session(tx, ev.session_key.as_str(), ev.agent_id.as_str(), seq, ts).await?;
    Ok(inserted)
}

/// Writes a transcript row once (its id is the key); false when it was there already.
async fn insert_entry(
    tx: &mut SqliteConnection,
    e: &Entry<'_>,
    ts: i64,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO transcript (entry_id, session_key, run_id, role, content, seq, idx, ts)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (entry_id) DO NOTHING",
    )
    .bind(e.entry_id)
    .bind(e.session_key)
    .bind(e.run_id)
    .bind(e.role.as_str())
    .bind(e.content)
    .bind(e.seq as i64)
    .bind(e.idx as i64)
    .bind(ts)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1)
}

/// Creates the session row or moves its applied sequence forward (never back).
async fn touch_session(
    tx: &mut SqliteConnection,
    session_key: &str,
    agent_id: &str,
    seq: u64,
    ts: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO sessions (session_key, agent_id, created_at, updated_at, last_seq) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (session_key) DO UPDATE SET updated_at = MAX(updated_at, excluded.updated_at),
             last_seq = MAX(last_seq, excluded.last_seq)",
    )
    .bind(session_key)
    .bind(agent_id)
    .bind(ts)
    .bind(ts)
    .bind(seq as i64)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn apply_run(
    tx: &mut SqliteConnection,
    ev: &RunEvent,
    seq: u64,
    ts: i64,
) -> Result<bool, sqlx::Error> {
    sqlx::query(
        "INSERT INTO runs (run_id, session_key, agent_id, status, model, error_code, error_message, attempt, duration_ms, seq, ts)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, model = excluded.model,
             error_code = excluded.error_code, error_message = excluded.error_message,
             attempt = excluded.attempt, duration_ms = excluded.duration_ms, seq = excluded.seq, ts = excluded.ts
         WHERE excluded.seq > runs.seq",
    )
    .bind(&ev.run_id)
    .bind(&ev.session_key)
    .bind(&ev.agent_id)
    .bind(ev.status.as_str())
    .bind(&ev.model)
    .bind(ev.error.as_ref().map(|e| e.code.as_str()))
    .bind(ev.error.as_ref().map(|e| e.message.as_str()))
    .bind(i64::from(ev.attempt))
    .bind(ev.duration_ms as i64)
    .bind(seq as i64)
    .bind(ts)
    .execute(&mut *tx)
    .await?;
    if let Some(u) = ev.usage {
        sqlx::query(
            "INSERT INTO usage (run_id, session_key, model, prompt_tokens, completion_tokens, total_tokens, ts)
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO NOTHING",
        )
        .bind(&ev.run_id)
        .bind(&ev.session_key)
        .bind(&ev.model)
        .bind(u.prompt_tokens as i64)
        .bind(u.completion_tokens as i64)
        .bind(u.total_tokens as i64)
        .bind(ts)
        .execute(&mut *tx)
        .await?;
    }
    for (idx, e) in ev.entries.iter().enumerate() {
        let entry = Entry {
            session_key: &ev.session_key,
            run_id: &ev.run_id,
            entry_id: &e.entry_id,
            role: e.role,
            content: &e.content,
            seq,
            idx,
        };
        insert_entry(tx, &entry, ts).await?;
    }
    if !ev.entries.is_empty() {
        touch_session(tx, &ev.session_key, &ev.agent_id, seq, ts).await?;
    }
    Ok(true)
}
