//! SQLite through sqlx, the embedded default: WAL mode, one writer connection that
//! commits concurrent writes in batches (SQLite serialises writers anyway; batching
//! turns N commits into one), and a pool of readers that WAL lets run beside it.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, Sqlite, SqliteConnection, SqlitePool};

use crate::batch::{Committer, Rows, Writer};
use crate::db::{StoreError, TranscriptStore};
use crate::sql::{store_methods, write_rows};

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: Writer,
}

fn options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    Ok(SqliteConnectOptions::from_str(url)?
        .journal_mode(SqliteJournalMode::Wal)
        // WAL + NORMAL: a commit survives a crash of the process; see README for
        // the OS-crash caveat shared with JetStream's own fsync interval.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5))
        // 1 MiB page cache per connection instead of 2: the history queries touch
        // few pages, and five connections' caches add up in resident memory.
        .pragma("cache_size", "-1024"))
}

impl SqliteStore {
    /// Opens (creating if missing) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let opts = options(url)?.create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(3)
            .connect_with(opts.clone())
            .await?;
        crate::db::migrate(|| sqlx::migrate!("./migrations/sqlite").run(&pool)).await?;
        let conn = SqliteConnection::connect_with(&opts).await?;
        Ok(Self {
            pool,
            writer: Writer::start(OneConnection(conn)),
        })
    }

    /// Opens an existing database read-only (queries only, writes refused).
    pub async fn open_reader(url: &str) -> Result<Self, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options(url)?.read_only(true))
            .await?;
        Ok(Self {
            pool,
            writer: Writer::closed(),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// SQLite stores any string as it is.
fn verbatim(s: &str) -> Cow<'_, str> {
    Cow::Borrowed(s)
}

/// The writer's own connection (a file database does not drop it).
struct OneConnection(SqliteConnection);

impl Committer for OneConnection {
    async fn commit(&mut self, rows: &Rows<'_>) -> Result<(), sqlx::Error> {
        let mut tx = self.0.begin().await?;
        write_rows!(Sqlite, tx, rows, "MAX", verbatim);
        tx.commit().await
    }
}

impl TranscriptStore for SqliteStore {
    store_methods!();
}
