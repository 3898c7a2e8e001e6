//! The agent: runs turns.
//!
//! A turn request (consumer `agent` on `CLAW_TURN`, keyed per session so a session has
//! one active run and its turns run in order) is handled as:
//! 1. redelivered? consult the run checkpoint in KV `claw_runs`: a finished run is only
//!    acked again, never re-run;
//! 2. load the session's recent transcript from the store (read-your-writes through the
//!    last transcript sequence of the session);
//! 3. call the model provider, streaming; live deltas go to `claw.v1.evt.delta.<s>` when
//!    the sender asked for them; progress acks keep the turn alive meanwhile;
//! 4. publish the transcript entries, the run event (with usage) and the reply
//!    (`claw.v1.out.<channel>.<account>`), all with deterministic ids, await their acks,
//!    write the checkpoint, then ack the turn.
//!
//! A crash anywhere before step 4 completes redelivers the turn; the deterministic ids
//! make any part already published dedupe, so the caller gets exactly one reply.

#![forbid(unsafe_code)]

mod checkpoint;
mod compaction;
mod context;
pub mod failover;
mod history_cache;
mod metrics;
pub mod providers;
mod steps;
mod tools;
mod turn;
pub mod workspace;

pub use context::build_messages;
pub use turn::{serve, AgentService};
