//! SQLite through sqlx, the embedded default.

use std::str::FromStr;
use std::time::Duration;

use clawbus_wire::{HistoryEntry, Role, RunEvent, TranscriptEvent};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use crate::batch::{Rows, WriteOp, ROWS_PER_STATEMENT};
use crate::db::{StoreError, TranscriptStore};

/// Most writes committed in one transaction (group commit).
const MAX_BATCH: usize = 512;

/// SQLite through sqlx, in WAL mode: one writer connection that commits concurrent
/// writes in batches (SQLite serialises writers anyway; batching turns N commits into
/// one), and a pool of readers that WAL lets run beside it.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: mpsc::Sender<WriteReq>,
}

struct WriteReq {
    op: WriteOp,
    done: oneshot::Sender<Result<(), String>>,
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

    async fn write(&self, op: WriteOp) -> Result<(), StoreError> {
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
    ) -> Result<(), StoreError> {
        self.write(WriteOp::Transcript(ev.clone(), seq, ts)).await
    }

    async fn apply_run(&self, ev: &RunEvent, seq: u64, ts: i64) -> Result<(), StoreError> {
        self.write(WriteOp::Run(ev.clone(), seq, ts)).await
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
        let ok = commit(&mut conn, &Rows::of(batch.iter().map(|r| &r.op))).await;
        if ok.is_ok() {
            for req in batch.drain(..) {
                let _ = req.done.send(Ok(()));
            }
            continue;
        }
        for req in batch.drain(..) {
            let r = commit(&mut conn, &Rows::of([&req.op])).await;
            let _ = req.done.send(r.map_err(|e| e.to_string()));
        }
    }
}

/// Writes a batch's rows in one transaction, one multi-row statement per table.
async fn commit(conn: &mut SqliteConnection, rows: &Rows<'_>) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    for chunk in rows.runs.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO runs (run_id, session_key, agent_id, status, model, error_code, \
             error_message, attempt, duration_ms, seq, ts) ",
        );
        q.push_values(chunk, |mut b, r| {
            let ev = r.ev;
            b.push_bind(ev.run_id.as_str())
                .push_bind(ev.session_key.as_str())
                .push_bind(ev.agent_id.as_str())
                .push_bind(ev.status.as_str())
                .push_bind(ev.model.as_deref())
                .push_bind(ev.error.as_ref().map(|e| e.code.as_str()))
                .push_bind(ev.error.as_ref().map(|e| e.message.as_str()))
                .push_bind(i64::from(ev.attempt))
                .push_bind(ev.duration_ms as i64)
                .push_bind(r.seq as i64)
                .push_bind(r.ts);
        });
        // An older state never overwrites a newer one.
        q.push(
            " ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, model = excluded.model, \
             error_code = excluded.error_code, error_message = excluded.error_message, \
             attempt = excluded.attempt, duration_ms = excluded.duration_ms, seq = excluded.seq, \
             ts = excluded.ts WHERE excluded.seq > runs.seq",
        );
        q.build().execute(&mut *tx).await?;
    }
    for chunk in rows.usage.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO usage (run_id, session_key, model, prompt_tokens, completion_tokens, \
             total_tokens, ts) ",
        );
        q.push_values(chunk, |mut b, r| {
            let u = r.ev.usage.unwrap_or_default();
            b.push_bind(r.ev.run_id.as_str())
                .push_bind(r.ev.session_key.as_str())
                .push_bind(r.ev.model.as_deref())
                .push_bind(u.prompt_tokens as i64)
                .push_bind(u.completion_tokens as i64)
                .push_bind(u.total_tokens as i64)
                .push_bind(r.ts);
        });
        q.push(" ON CONFLICT (run_id) DO NOTHING");
        q.build().execute(&mut *tx).await?;
    }
    for chunk in rows.entries.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO transcript (entry_id, session_key, run_id, role, content, seq, idx, ts) ",
        );
        q.push_values(chunk, |mut b, e| {
            b.push_bind(e.entry_id)
                .push_bind(e.session_key)
                .push_bind(e.run_id)
                .push_bind(e.role.as_str())
                .push_bind(e.content)
                .push_bind(e.seq as i64)
                .push_bind(e.idx as i64)
                .push_bind(e.ts);
        });
        q.push(" ON CONFLICT (entry_id) DO NOTHING");
        q.build().execute(&mut *tx).await?;
    }
    for chunk in rows.sessions.chunks(ROWS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO sessions (session_key, agent_id, created_at, updated_at, last_seq) ",
        );
        q.push_values(chunk, |mut b, s| {
            b.push_bind(s.session_key)
                .push_bind(s.agent_id)
                .push_bind(s.first_ts)
                .push_bind(s.last_ts)
                .push_bind(s.seq as i64);
        });
        // The applied sequence only moves forward.
        q.push(
            " ON CONFLICT (session_key) DO UPDATE SET \
             updated_at = MAX(updated_at, excluded.updated_at), \
             last_seq = MAX(last_seq, excluded.last_seq)",
        );
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await
}
