//! Postgres through sqlx: the backend for store replicas on several machines. Writes
//! are group-committed like SQLite's (one writer task per store process, a pooled
//! connection per batch, so a lost connection is replaced); several processes may
//! write at once: every write is idempotent and rows are locked in one order.
//!
//! PostgreSQL's `text` cannot hold the NUL character: it is stored as U+FFFD.

use std::borrow::Cow;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Postgres;

use crate::batch::{Committer, Rows, Writer};
use crate::db::{StoreError, TranscriptStore};
use crate::sql::{store_methods, write_rows};

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    writer: Writer,
}

async fn connect(url: &str, max: u32) -> Result<PgPool, StoreError> {
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await?)
}

impl PgStore {
    /// Connects to the database at `url` and migrates it.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let pool = connect(url, 8).await?;
        crate::db::migrate(|| sqlx::migrate!("./migrations/postgres").run(&pool)).await?;
        Ok(Self {
            writer: Writer::start(Pooled(pool.clone())),
            pool,
        })
    }

    /// Connects for queries only (no migration, writes refused).
    pub async fn open_reader(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            pool: connect(url, 2).await?,
            writer: Writer::closed(),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// A string as Postgres can store it: NUL replaced by U+FFFD.
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Each batch on a connection from the pool.
struct Pooled(PgPool);

impl Committer for Pooled {
    async fn commit(&mut self, rows: &Rows<'_>) -> Result<(), sqlx::Error> {
        let mut tx = self.0.begin().await?;
        write_rows!(Postgres, tx, rows, "GREATEST", pg_text);
        tx.commit().await
    }
}

impl TranscriptStore for PgStore {
    store_methods!();
}
