//! The agent: runs turns.
//!
//! A turn request (its partition's consumer on `CLAW_TURN`, keyed per session so a
//! session has one active run and its turns run in order) is handled as:
//! 1. read the run's checkpoint (KV `claw_runs`) and the session's recent transcript
//!    (read-your-writes through the session's last transcript sequence) together: a
//!    finished run is only acked again; one in progress resumes from its last step;
//! 2. build the prompt from the agent's workspace files and the history, compacting
//!    the history first when it nears the model's window (module `compaction`);
//! 3. the steps (module `steps`): call the model (streaming deltas to
//!    `claw.v1.evt.delta.<s>` when asked, failing over between keys and models), run
//!    the tools it calls on the sandbox over request/reply, feed the results back,
//!    until it answers or a limit is hit; each step checkpointed, so a call that may
//!    have run is never sent again;
//! 4. publish the run event (the turn's transcript entries, usage) and the reply
//!    (`claw.v1.out.<channel>.<account>`), all with deterministic ids, await their
//!    acks, mark the run finished, then ack the turn.
//!
//! Queue modes (module `queue`): a `steer` run takes the session's waiting messages at
//! its next model call, a `collect` run takes them all at its start; `/stop` and the
//! `interrupt` mode cancel a run through `claw.v1.ctl.<session>`. Before a queued run
//! starts (module `backlog`) it waits for the session's debounce and applies its cap.
//!
//! A crash anywhere before step 4 completes redelivers the turn; the deterministic ids
//! make any part already published dedupe, so the caller gets exactly one reply.

#![forbid(unsafe_code)]

mod backlog;
mod checkpoint;
mod compaction;
mod context;
pub mod failover;
mod history_cache;
mod metrics;
pub mod providers;
mod queue;
mod serve;
mod steps;
mod tools;
mod turn;
pub mod workspace;

pub use context::build_messages;
pub use serve::serve;
pub use turn::AgentService;
