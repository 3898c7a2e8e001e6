//! The store service: persists transcript, run and usage events, answers history queries.
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
pub mod sqlite;

pub use db::{StoreError, TranscriptStore};
pub use handler::{serve, StoreService};
pub use sqlite::SqliteStore;
