//! Persistence behind a trait; [`crate::sqlite`] is the embedded default.

use std::future::Future;

use clawbus_wire::{HistoryEntry, RunEvent, TranscriptEvent};

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
    /// Highest transcript sequence applied for a session (0 when none).
    fn applied_seq(
        &self,
        session_key: &str,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
