//! The store service: persists transcript, run and usage events, answers history queries.
//! SQLite is the embedded default, Postgres the backend for replicas across machines
//! (`DATABASE_URL`).
//!
//! Events arrive on the `store` consumer of `CLAW_EVT`, keyed per session so a session's
//! entries apply in order. Writes are idempotent (ids are primary keys), so a
//! redelivered event changes nothing. History queries arrive on
//! `claw.v1.store.history` (request/reply, queue group `store`); a query may ask to
//! wait until a given transcript sequence is applied (read-your-writes for the agent).

#![forbid(unsafe_code)]

mod batch;
pub mod db;
mod handler;
pub mod postgres;
mod sql;
pub mod sqlite;

pub use db::{DailyUsage, Database, RunRecord, StoreError, TranscriptStore, UsageRecord};
pub use handler::{serve, StoreService};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
