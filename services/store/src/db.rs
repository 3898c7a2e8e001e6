//! Persistence behind a trait: [`crate::sqlite`] is the embedded default,
//! [`crate::postgres`] the backend for replicas on several machines. [`Database`]
//! picks one by URL.

use std::future::Future;

use clawbus_wire::{HistoryEntry, RunEvent, TranscriptEvent};

use crate::postgres::PgStore;
use crate::sqlite::SqliteStore;

/// Storage errors. Database errors are retryable (locked, I/O); bad URLs are not.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL `{0}` (use sqlite://<path> or postgres://…)")]
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
    /// Records a transcript entry at stream sequence `seq` (once: a repeat is a no-op).
    fn apply_transcript(
        &self,
        ev: &TranscriptEvent,
        seq: u64,
        ts: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
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
    /// The runs of a session, in the order their last state arrived.
    fn runs(
        &self,
        session_key: &str,
    ) -> impl Future<Output = Result<Vec<RunRecord>, StoreError>> + Send;
    /// The token usage of a session's runs, oldest first.
    fn usage(
        &self,
        session_key: &str,
    ) -> impl Future<Output = Result<Vec<UsageRecord>, StoreError>> + Send;
    /// Token usage summed per UTC day and model since `since_ms` (Unix ms), of one
    /// session or (`None`) of all, oldest day first.
    fn usage_by_day(
        &self,
        session_key: Option<&str>,
        since_ms: i64,
    ) -> impl Future<Output = Result<Vec<DailyUsage>, StoreError>> + Send;
    /// Sessions whose keys start with `prefix`, active since `since_ms`, the most
    /// recently active first.
    fn sessions(
        &self,
        prefix: &str,
        since_ms: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<clawbus_wire::SessionInfo>, StoreError>> + Send;
    /// Highest transcript sequence applied for a session (0 when none).
    fn applied_seq(
        &self,
        session_key: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub run_id: String,
    pub agent_id: String,
    /// `started`, `completed` or `failed`.
    pub status: String,
    pub model: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub attempt: u32,
    pub duration_ms: u64,
    /// Stream sequence of the event that set this state.
    pub seq: u64,
    pub ts: i64,
}

/// Token usage of one UTC day and model.
#[derive(Debug, Clone, PartialEq)]
pub struct DailyUsage {
    /// Unix milliseconds of the day's start (UTC).
    pub day_ms: i64,
    pub model: Option<String>,
    pub runs: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    /// Cost in US dollars as recorded by the runs (at their time's prices); `None`
    /// when none was priced.
    pub cost_usd: Option<f64>,
}

/// Token usage of one run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub run_id: String,
    pub model: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Part of `prompt_tokens` served from the provider's cache.
    pub cached_tokens: u64,
    /// Part of `completion_tokens` spent reasoning.
    pub reasoning_tokens: u64,
    pub cost_usd: Option<f64>,
    pub ts: i64,
}

/// The configured database: SQLite (`sqlite://…`, the default) or Postgres
/// (`postgres://…` / `postgresql://…`).
#[derive(Clone)]
pub enum Database {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

impl Database {
    /// Opens (creating if missing, for SQLite) and migrates the database at `url`,
    /// trying again for up to 30 s: store replicas starting at once contend for a new
    /// SQLite file (its WAL switch, its migrations), and a database server may still be
    /// starting.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if !is_postgres(url) && !url.starts_with("sqlite:") {
            return Err(StoreError::UnsupportedUrl(url.to_owned()));
        }
        clawbus_bus::service::patiently("database", || async {
            if is_postgres(url) {
                PgStore::open(url).await.map(Self::Postgres)
            } else {
                SqliteStore::open(url).await.map(Self::Sqlite)
            }
        })
        .await
    }

    /// Opens the database at `url` for queries only: no migration, writes refused.
    pub async fn open_reader(url: &str) -> Result<Self, StoreError> {
        if is_postgres(url) {
            Ok(Self::Postgres(PgStore::open_reader(url).await?))
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(SqliteStore::open_reader(url).await?))
        } else {
            Err(StoreError::UnsupportedUrl(url.to_owned()))
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }
}

/// Forwards a trait method to the backend in use.
macro_rules! delegate {
    ($self:ident, $db:ident => $call:expr) => {
        match $self {
            Database::Sqlite($db) => $call.await,
            Database::Postgres($db) => $call.await,
        }
    };
}

impl TranscriptStore for Database {
    async fn apply_transcript(
        &self,
        ev: &TranscriptEvent,
        seq: u64,
        ts: i64,
    ) -> Result<(), StoreError> {
        delegate!(self, db => db.apply_transcript(ev, seq, ts))
    }

    async fn apply_run(&self, ev: &RunEvent, seq: u64, ts: i64) -> Result<(), StoreError> {
        delegate!(self, db => db.apply_run(ev, seq, ts))
    }

    async fn history(
        &self,
        session_key: &str,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>, StoreError> {
        delegate!(self, db => db.history(session_key, limit))
    }

    async fn runs(&self, session_key: &str) -> Result<Vec<RunRecord>, StoreError> {
        delegate!(self, db => db.runs(session_key))
    }

    async fn usage(&self, session_key: &str) -> Result<Vec<UsageRecord>, StoreError> {
        delegate!(self, db => db.usage(session_key))
    }

    async fn usage_by_day(
        &self,
        session_key: Option<&str>,
        since_ms: i64,
    ) -> Result<Vec<DailyUsage>, StoreError> {
        delegate!(self, db => db.usage_by_day(session_key, since_ms))
    }

    async fn sessions(
        &self,
        prefix: &str,
        since_ms: i64,
        limit: u32,
    ) -> Result<Vec<clawbus_wire::SessionInfo>, StoreError> {
        delegate!(self, db => db.sessions(prefix, since_ms, limit))
    }

    async fn applied_seq(&self, session_key: &str) -> Result<u64, StoreError> {
        delegate!(self, db => db.applied_seq(session_key))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        delegate!(self, db => db.ping())
    }
}

/// Runs a migration, again if it fails: several store replicas may start at once on one
/// database, and a migration that lost the race rolled back; the next attempt finds it
/// applied.
pub(crate) async fn migrate<F, Fut>(run: F) -> Result<(), StoreError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), sqlx::migrate::MigrateError>>,
{
    let mut attempt = 0;
    while let Err(e) = run().await {
        attempt += 1;
        if attempt >= 5 {
            return Err(e.into());
        }
        tracing::warn!(error = %e, attempt, "Migration failed; retrying");
        tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
    }
    Ok(())
}
