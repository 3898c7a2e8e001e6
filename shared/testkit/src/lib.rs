//! Test helpers that talk to real things.
//!
//! - [`NatsServer`]: a real nats-server with JetStream on a random port and a temporary
//!   store directory, killed and cleaned up on drop.
//! - [`Emulator`]: an emulator of the OpenAI Chat Completions, Anthropic Messages and
//!   Gemini APIs, each in its real wire format (JSON and SSE streaming, the API's error
//!   bodies and statuses), scriptable: hold replies, fail the next requests with a
//!   status, record every request.
//! - [`outage::Outage`]: a proxy in front of a platform that can cut it off.
//! - [`Suite`]: every clawbus service as its own OS process against those two, with
//!   kill -9 and restart.

#![forbid(unsafe_code)]

pub mod discord;
pub mod emulator;
pub mod irc;
pub mod matrix;
mod nats;
pub mod outage;
pub mod postgres;
pub mod signal;
pub mod slack;
mod suite;
pub mod telegram;
pub mod tools;

pub use emulator::Emulator;
pub use nats::{nats_server_binary, NatsServer};
pub use postgres::{postgres_bin_dir, PostgresServer};
pub use suite::{bin_dir, cpu_of, free_port, rss_of, Replica, Service, Suite, SuiteOpts, SERVICES};
pub use telegram::TelegramEmulator;
pub use tools::ToolResponder;

/// Waits for `cond` to hold, polling every 20 ms, up to `timeout`.
pub async fn wait_for<F, Fut>(timeout: std::time::Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
