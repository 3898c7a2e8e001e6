//! The gateway: an OpenAI-compatible HTTP API in front of the bus.
//!
//! `POST /v1/chat/completions` turns the request's last user message into an inbound
//! message on `claw.v1.in.http.default` and answers from the run's reply
//! (`claw.v1.out.http.default`) — as one JSON completion, or with `stream: true` as
//! server-sent events in OpenAI's chunk format fed by live deltas. `GET /v1/models`
//! lists the agents as models (`clawbus`, `clawbus:<agentId>`).
//!
//! Every `/v1` route requires `Authorization: Bearer <token>`.

#![forbid(unsafe_code)]

mod api;
mod openai;
mod replies;
mod sse;

pub use api::{router, serve, Gateway};
