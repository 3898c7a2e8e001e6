//! The gateway: an OpenAI-compatible HTTP API in front of the bus.
//!
//! `POST /v1/chat/completions` turns the request's last user message into an inbound
//! message on `claw.v1.in.http.default` and answers from the run's reply
//! (`claw.v1.out.http.default`) — as one JSON completion, or with `stream: true` as
//! server-sent events in OpenAI's chunk format fed by live deltas. A request's own
//! `tools` are offered to the model and its calls come back as `tool_calls` for the
//! caller to run. `POST /v1/responses` is the Responses API over the same turns (text,
//! function calls, streamed events, `previous_response_id`). `GET /v1/models` lists
//! the agents as models (`clawbus`, `clawbus:<agentId>`).
//!
//! Every `/v1` route requires `Authorization: Bearer <token>` (the scheme in any case). With `[hooks] enabled`,
//! `POST /hooks/agent` and `POST /hooks/wake` take webhooks with their own token.
//! Every credential is checked from the headers, before a byte of the body is read;
//! bodies then have a size limit and a deadline (`clawbus_telemetry::http`).

#![forbid(unsafe_code)]

mod api;
mod auth;
mod hooks;
pub mod openai;
mod replies;
pub mod responses;
pub mod slack;
pub mod slack_socket;
mod sse;

pub use api::{router, serve, Gateway};
