//! The router: turns inbound messages into turn requests for the right agent and session.
//!
//! For each inbound message (consumer `router` on `CLAW_IN`, keyed per chat so a chat's
//! messages route in arrival order) it validates the message, resolves the agent and the
//! OpenClaw-style session key (`agent:<agentId>:main` for direct chats), and publishes a
//! [`TurnRequest`] on the session's partition `claw.v1.turn.<p>.<session_token>` with a
//! deterministic id, so a redelivered or republished inbound message yields one turn.
//!
//! The turn stream is the per-session queue: the agent runs one turn per session at a
//! time, in stream order, and later messages wait there.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::Duration;

use clawbus_bus::consumer::{self, Delivery, Handler, Outcome};
use clawbus_bus::ownership::{self, Member, SharedConsumers};
use clawbus_bus::service::ServiceBase;
use clawbus_bus::{subjects, topology, Bus};
use clawbus_config::RouterConfig;
use clawbus_wire::{ChatKind, Envelope, ErrorInfo, InboundMessage, OutboundMessage, TurnRequest};

pub use clawbus_wire::MAX_TEXT_BYTES;
/// Longest accepted session key (bytes).
pub const MAX_SESSION_KEY_BYTES: usize = 256;

/// A message the router refuses, with the reason told to the sender.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    #[error("unknown agent `{0}`")]
    UnknownAgent(String),
    #[error("invalid session key: {0}")]
    InvalidSessionKey(String),
    #[error("message text is empty")]
    EmptyText,
    #[error("message text of {0} bytes exceeds the limit of {MAX_TEXT_BYTES} bytes")]
    TextTooLong(usize),
}

/// The routing decision for one inbound message.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub agent_id: String,
    pub session_key: String,
    pub partition: u32,
}

/// Resolves agent and session key of an inbound message (pure: no I/O).
pub fn resolve(cfg: &RouterConfig, m: &InboundMessage) -> Result<Route, RouteError> {
    // A message without text is only a caller answering its functions' calls.
    if m.text.trim().is_empty() && m.caller_results().is_empty() {
        return Err(RouteError::EmptyText);
    }
    if m.text.len() > MAX_TEXT_BYTES {
        return Err(RouteError::TextTooLong(m.text.len()));
    }
    let agent_id = match &m.agent_id {
        Some(a) if cfg.agents.iter().any(|x| x == a) => a.clone(),
        Some(a) => return Err(RouteError::UnknownAgent(a.clone())),
        None => cfg.default_agent.clone(),
    };
    let session_key = match &m.session_key {
        Some(k) => {
            validate_session_key(k)?;
            let prefix = format!("agent:{agent_id}:");
            if !k.starts_with(&prefix) {
                return Err(RouteError::InvalidSessionKey(format!(
                    "must start with `{prefix}`"
                )));
            }
            k.clone()
        }
        None => match m.chat.kind {
            ChatKind::Direct | ChatKind::Unknown => format!("agent:{agent_id}:main"),
            ChatKind::Group | ChatKind::Channel => {
                format!("agent:{agent_id}:{}:group:{}", m.channel, m.chat.id)
            }
        },
    };
    let partition = subjects::partition(&session_key, topology::PARTITIONS);
    Ok(Route {
        agent_id,
        session_key,
        partition,
    })
}

fn validate_session_key(k: &str) -> Result<(), RouteError> {
    if k.is_empty() || k.len() > MAX_SESSION_KEY_BYTES {
        return Err(RouteError::InvalidSessionKey(format!(
            "must be 1-{MAX_SESSION_KEY_BYTES} bytes"
        )));
    }
    if k.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(RouteError::InvalidSessionKey(
            "must not contain whitespace or control characters".into(),
        ));
    }
    Ok(())
}

/// The router's inbound handler.
pub struct RouterService {
    pub bus: Bus,
    pub cfg: RouterConfig,
}

impl Handler for RouterService {
    type Msg = Envelope<InboundMessage>;

    fn decode(&self, d: &Delivery) -> Result<Self::Msg, String> {
        consumer::decode_envelope(d)
    }

    /// One lane per chat: a chat's messages route in arrival order.
    fn key(&self, d: &Delivery, m: &Self::Msg) -> Option<String> {
        Some(format!("{}|{}", d.subject, m.body.chat.id))
    }

    async fn handle(&self, d: Delivery, env: Self::Msg) -> Outcome {
        let m = &env.body;
        // The subject is what NATS permissions protect: a body must not claim another
        // channel, account or chat.
        if !subjects::inbound_matches(
            &d.subject,
            &m.channel,
            &m.account,
            &m.chat.id,
            topology::ROUTER_CHAT_PARTITIONS,
        ) {
            return Outcome::reject(format!(
                "channel/account/chat `{}/{}/{}` do not match subject {}",
                m.channel, m.account, m.chat.id, d.subject
            ));
        }
        if m.message_id.is_empty() || m.chat.id.is_empty() || env.id.is_empty() {
            return Outcome::reject("message_id, chat.id and envelope id are required");
        }
        let route = match resolve(&self.cfg, m) {
            Ok(r) => r,
            Err(e) => return self.refuse(&env, e, &d).await,
        };
        let turn = TurnRequest {
            run_id: format!("run:{}", env.id),
            session_key: route.session_key.clone(),
            agent_id: route.agent_id,
            inbound_id: env.id.clone(),
            inbound: env.body.clone(),
        };
        let out = Envelope::new(format!("turn:{}", env.id), clawbus_wire::now_ms(), turn);
        match self
            .bus
            .publish_durable(
                subjects::turn(route.partition, &route.session_key),
                &out,
                &d.trace,
            )
            .await
        {
            Ok(_) => Outcome::Ack,
            Err(e) => Outcome::retry(Duration::from_secs(1), e.to_string()),
        }
    }
}

impl RouterService {
    /// Tells the sender why their message was refused (an outbound error), then acks.
    async fn refuse(
        &self,
        env: &Envelope<InboundMessage>,
        err: RouteError,
        d: &Delivery,
    ) -> Outcome {
        let m = &env.body;
        tracing::info!(inbound_id = %env.id, error = %err, "Message refused");
        let Some(subject) = subjects::outbound(&m.channel, &m.account) else {
            return Outcome::reject(err.to_string());
        };
        let code = match err {
            RouteError::UnknownAgent(_) => "unknown_agent",
            RouteError::InvalidSessionKey(_) => "invalid_session_key",
            RouteError::EmptyText => "empty_message",
            RouteError::TextTooLong(_) => "message_too_long",
        };
        let reply = OutboundMessage {
            run_id: format!("run:{}", env.id),
            session_key: String::new(),
            channel: m.channel.clone(),
            account: m.account.clone(),
            chat_id: m.chat.id.clone(),
            thread_id: m.thread_id.clone(),
            reply_to_message_id: Some(m.message_id.clone()),
            inbound_id: env.id.clone(),
            chunk: 0,
            last: true,
            text: format!("Message not accepted: {err}."),
            error: Some(ErrorInfo {
                code: code.into(),
                message: err.to_string(),
            }),
            usage: None,
            model: None,
            finish_reason: None,
            tool_calls: Vec::new(),
        };
        let out = Envelope::new(
            format!("run:{}:out:0", env.id),
            clawbus_wire::now_ms(),
            reply,
        );
        match self.bus.publish_durable(subject, &out, &d.trace).await {
            Ok(_) => Outcome::Ack,
            Err(e) => Outcome::retry(Duration::from_secs(1), e.to_string()),
        }
    }
}

/// Runs the router until shutdown. Router replicas share the chat partitions (and the
/// one for inbound messages without a chat token): each partition's consumer is worked
/// by its owner, so a chat's messages route in order on one replica at a time.
pub async fn serve(base: &ServiceBase) -> anyhow::Result<()> {
    let cfg = base.cfg.router.clone();
    let decls: Vec<_> = (0..topology::ROUTER_PARTITIONS)
        .map(|p| topology::ConsumerDecl::router(p, cfg.concurrency))
        .collect();
    tracing::info!(partitions = topology::ROUTER_PARTITIONS, "Router ready");
    let me = Member {
        group: topology::CONSUMER_ROUTER,
        replica: base.cfg.replica_id(),
        partitions: topology::ROUTER_PARTITIONS,
    };
    let work = Arc::new(SharedConsumers {
        bus: base.bus.clone(),
        decls: decls.clone(),
        readiness: Some(base.readiness.clone()),
        // The concurrency is the process's, shared by the partitions it owns.
        permits: Some(Arc::new(tokio::sync::Semaphore::new(
            cfg.concurrency.max(1),
        ))),
        concurrency: cfg.concurrency,
        drain_deadline: Duration::from_secs(10),
        handler: Arc::new(RouterService {
            bus: base.bus.clone(),
            cfg,
        }),
    });
    ownership::serve_shared(base, me, &decls, work).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
