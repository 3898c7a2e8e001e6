//! The store service: persists transcript, run and usage events, answers history queries.
//! SQLite is the embedded default, Postgres the backend for replicas across machines
//! (`DATABASE_URL`).
//!
//! `CLAW_EVT` stores each session's events under one of 16 event partitions; store
//! replicas share the partitions by lease (`clawbus_bus::ownership`), and the owner of a
//! partition works its consumer, keyed per session so a session's entries apply in
//! order, and answers its history queries (`claw.v1.store.history.<partition>`), so the
//! replica answering is the one applying (a query may wait until a given transcript
//! sequence is applied: read-your-writes for the agent). Writes are idempotent (ids are
//! primary keys), so a redelivered event changes nothing. Sessions and usage queries
//! (`claw.v1.store.sessions`, `claw.v1.store.usage`) are answered by any replica.

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
