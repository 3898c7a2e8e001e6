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

//! The router: decides who may talk to which agent, in which session, and turns
//! inbound messages into turn requests.
//!
//! For each inbound message (consumer `router` on `CLAW_IN`, keyed per chat so a chat's
//! messages route in arrival order) it validates the message, picks the agent
//! (`[[bindings]]`), applies the channel's access policy ([`access`]: pairing,
//! allowlists, mention gating), answers commands ([`commands`]), resolves the
//! OpenClaw-style session key ([`resolve`]) and the session's state ([`state`]:
//! resets, `/model`, `/think`, group context), and publishes a [`TurnRequest`] on the
//! session's partition `claw.v1.turn.<p>.<session_token>` with a deterministic id, so a
//! redelivered or republished inbound message yields one turn.
//!
//! The turn stream is the per-session queue: the agent runs one turn per session at a
//! time, in stream order, and later messages wait there.

#![forbid(unsafe_code)]

pub mod access;
pub mod commands;
pub mod resolve;
pub mod schedule;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use clawbus_bus::consumer::{self, Delivery, Handler, Outcome};
use clawbus_bus::ownership::{self, Member, SharedConsumers};
use clawbus_bus::service::{self, ServiceBase};
use clawbus_bus::{pairing, subjects, topology, Bus};
use clawbus_config::Config;
use clawbus_wire::{
    ApprovalState, ChatKind, Envelope, ErrorInfo, InboundMessage, OutboundMessage, TurnRequest,
};

use access::{Access, Policies};
pub use resolve::{resolve, Route, MAX_SESSION_KEY_BYTES, MAX_TEXT_BYTES};
use state::{ContextLine, States};

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

/// The router's inbound handler.
pub struct RouterService {
    pub bus: Bus,
    pub cfg: Config,
    pub policies: Policies,
    pub states: States,
    pub pairing: kv::Store,
    pub approvals: kv::Store,
    pub metrics: RouterMetrics,
}

/// The router's own metrics.
#[derive(Clone)]
pub struct RouterMetrics {
    /// Messages by what became of them: `turn`, `command`, `context`, `pairing`,
    /// `dropped`, `refused`.
    pub messages: prometheus::IntCounterVec,
    /// Time from a message's delivery to its turn being ready to queue: the routing
    /// decision (route, access, session state, commands), without the publish.
    pub decision: prometheus::Histogram,
}

impl RouterMetrics {
    pub fn new(registry: &prometheus::Registry) -> Self {
        let messages = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "clawbus_router_messages_total",
                "Inbound messages by what the router made of them",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(messages.clone()));
        for o in [
            "turn", "command", "context", "pairing", "dropped", "refused",
        ] {
            messages.with_label_values(&[o]);
        }
        let decision = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "clawbus_router_decision_duration_seconds",
                "Time to route a message to a turn, without publishing it",
            )
            .buckets(vec![
                0.00001, 0.00002, 0.00003, 0.00005, 0.0001, 0.00015, 0.0002, 0.0003, 0.0005,
                0.00075, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
            ]),
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(decision.clone()));
        Self { messages, decision }
    }
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
        let started = std::time::Instant::now();
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
        // A webhook's text is a message, never a command.
        let command = if m.hook.is_some() {
            None
        } else {
            commands::parse(&m.text)
        };
        if let Some(hook) = &m.hook {
            if m.channel != "http" {
                return Outcome::reject("hooks come only through the gateway");
            }
            if hook.kind == "wake" {
                return self.wake(&env, &route, &d).await;
            }
        }
        match self.access(m, command.is_some()).await {
            Ok(Access::Allow) => {}
            Ok(Access::Drop(reason)) => {
                self.count("dropped");
                tracing::info!(inbound_id = %env.id, channel = %m.channel, sender = %m.sender.id, reason, "Message dropped");
                return Outcome::Ack;
            }
            Ok(Access::Pair) => return self.pair(&env, &d).await,
            Ok(Access::Context) => {
                let line = ContextLine {
                    sender: sender_name(m),
                    text: m.text.clone(),
                    ts: env.ts,
                };
                let limit = self.policies.history_limit(&m.channel);
                return match self.states.remember(&route.session_key, line, limit).await {
                    Ok(()) => {
                        self.count("context");
                        Outcome::Ack
                    }
                    Err(e) => Outcome::retry(Duration::from_secs(1), e),
                };
            }
            Err(e) => return Outcome::retry(Duration::from_secs(1), e),
        }
        let (mut st, _) = match self.states.load(&route.session_key).await {
            Ok(s) => s,
            Err(e) => return Outcome::retry(Duration::from_secs(1), e),
        };
        let mut text = m.text.clone();
        let mut reset = false;
        if let Some((name, args)) = &command {
            let owner = access::is_owner(&self.cfg, m);
            let ctx = commands::Context {
                cfg: &self.cfg,
                state: &st,
                agent: &route.agent_id,
                session_key: &route.session_key,
                channel: &m.channel,
                owner,
                text: &m.text,
            };
            let outcome = commands::run(&ctx, name, args);
            match outcome {
                commands::Outcome::Turn { text: t, reset: r } => {
                    text = t;
                    reset = r;
                }
                commands::Outcome::Reply { text, error } => {
                    return self.answer(&env, &route, &text, error, &d).await;
                }
                commands::Outcome::Set { state, text } => {
                    if let Err(e) = self.states.save(&route.session_key, &state).await {
                        return Outcome::retry(Duration::from_secs(1), e);
                    }
                    return self.answer(&env, &route, &text, false, &d).await;
                }
                commands::Outcome::Usage => {
                    let (text, error) = self.usage(&route.session_key).await;
                    return self.answer(&env, &route, &text, error, &d).await;
                }
                commands::Outcome::Stop => {
                    if let Err(e) = self
                        .control(&route.session_key, None, "stopped by /stop")
                        .await
                    {
                        return Outcome::retry(Duration::from_secs(1), e);
                    }
                    return self
                        .answer(
                            &env,
                            &route,
                            "Stopping the run in progress, if any.",
                            false,
                            &d,
                        )
                        .await;
                }
                commands::Outcome::Approve { id, decision } => {
                    let state = match decision.as_str() {
                        "allow-always" => ApprovalState::AllowedAlways,
                        "deny" => ApprovalState::Denied,
                        _ => ApprovalState::AllowedOnce,
                    };
                    let (text, error) =
                        match clawbus_bus::approvals::decide(&self.approvals, &id, state).await {
                            Ok(a) => (
                                format!(
                                    "{id}: {}: {}",
                                    clawbus_bus::approvals::said(state),
                                    a.command
                                ),
                                false,
                            ),
                            Err(e) => (e, true),
                        };
                    return self.answer(&env, &route, &text, error, &d).await;
                }
            }
        }
        let now = clawbus_wire::now_ms();
        let policy = self.cfg.session.reset_for(&m.channel, route.chat_type);
        reset |= state::reset_due(policy, st.last_active_ms, now);
        // Unmentioned group messages since the last reply come along as context.
        let mut had_context = false;
        if matches!(m.chat.kind, ChatKind::Group | ChatKind::Channel) && m.channel != "http" {
            match self.states.context(&route.session_key).await {
                Ok(lines) if !lines.is_empty() => {
                    text = state::with_context(&lines, &sender_name(m), &text);
                    had_context = true;
                }
                Ok(_) => {}
                Err(e) => return Outcome::retry(Duration::from_secs(1), e),
            }
        }
        let mut inbound = env.body.clone();
        inbound.text = text;
        // A webhook's run may choose its model and thinking level (for itself only).
        let (mut model, mut thinking) = (st.model.clone(), st.thinking.clone());
        if let Some(hook) = &m.hook {
            match self.hook_run(hook, &route, &mut inbound).await {
                Ok((mo, th)) => {
                    model = mo.or(model);
                    thinking = th.or(thinking);
                }
                Err(HookError::Refused(e)) => {
                    return self.answer(&env, &route, &e, true, &d).await;
                }
                Err(HookError::Bus(e)) => return Outcome::retry(Duration::from_secs(1), e),
            }
        }
        // The gateway's requests (and hooks) each wait for their own answer: followup.
        let queue = (m.channel != "http").then(|| {
            st.queue
                .clone()
                .unwrap_or_else(|| self.cfg.messages.queue.mode_for(&m.channel).to_owned())
        });
        let run_id = format!("run:{}", env.id);
        if queue.as_deref() == Some("interrupt") {
            // The run in progress (an older message's) stops; this one runs next.
            if let Err(e) = self
                .control(
                    &route.session_key,
                    Some(&run_id),
                    "interrupted by a newer message",
                )
                .await
            {
                return Outcome::retry(Duration::from_secs(1), e);
            }
        }
        let turn = TurnRequest {
            run_id,
            session_key: route.session_key.clone(),
            agent_id: route.agent_id.clone(),
            inbound_id: env.id.clone(),
            inbound,
            reset,
            model,
            thinking,
            heartbeat: false,
            queue_options: queue
                .is_some()
                .then(|| st.queue_options(&self.cfg.messages.queue)),
            queue,
        };
        let out = Envelope::new(format!("turn:{}", env.id), clawbus_wire::now_ms(), turn);
        self.metrics
            .decision
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = self
            .bus
            .publish_durable(
                subjects::turn(route.partition, &route.session_key),
                &out,
                &d.trace,
            )
            .await
        {
            return Outcome::retry(Duration::from_secs(1), e.to_string());
        }
        // After the turn is queued (a redelivery republishes it, deduplicated).
        if had_context {
            if let Err(e) = self.states.clear_context(&route.session_key).await {
                tracing::warn!(session_key = %route.session_key, error = %e, "Group context not cleared");
            }
        }
        // Written when it changed in a way that matters: a reset, a new chat to answer
        // in, or activity a reset policy counts (an idle policy needs every message; a
        // daily one, the minute).
        let previous = st.last_active_ms;
        st.last_active_ms = now;
        if reset {
            st.started_ms = now;
        }
        let mut changed =
            reset || previous == 0 || policy.mode == "idle" || now - previous >= 60_000;
        // A chat app's chat can be written to later (the gateway's requests cannot).
        if m.channel != "http" {
            let here = state::LastRoute {
                channel: m.channel.clone(),
                account: m.account.clone(),
                chat_id: m.chat.id.clone(),
            };
            changed |= st.last_route.as_ref() != Some(&here);
            st.last_route = Some(here);
        }
        if changed {
            if let Err(e) = self.states.save(&route.session_key, &st).await {
                tracing::warn!(session_key = %route.session_key, error = %e, "Session state not saved");
            }
        }
        self.count(if command.is_some() { "command" } else { "turn" });
        Outcome::Ack
    }
}

enum HookError {
    Refused(String),
    Bus(String),
}

impl RouterService {
    /// A webhook's run: its model and thinking level, and where its answer goes (a
    /// chat, or where the agent's main session last heard from its owner).
    async fn hook_run(
        &self,
        hook: &clawbus_wire::Hook,
        route: &Route,
        inbound: &mut InboundMessage,
    ) -> Result<(Option<String>, Option<String>), HookError> {
        if let Some(model) = &hook.model {
            if !commands::models(&self.cfg).contains(model) {
                return Err(HookError::Refused(format!("unknown model `{model}`")));
            }
        }
        if let Some(t) = &hook.thinking {
            if !clawbus_config::THINKING_LEVELS.contains(&t.as_str()) {
                return Err(HookError::Refused(format!("unknown thinking level `{t}`")));
            }
        }
        let overrides = (hook.model.clone(), hook.thinking.clone());
        if !hook.deliver {
            return Ok(overrides);
        }
        let target = match (hook.channel.as_deref(), &hook.to) {
            (Some(c), Some(to)) if c != "last" => Some(state::LastRoute {
                channel: c.to_owned(),
                account: hook.account.clone().unwrap_or_else(|| "default".into()),
                chat_id: to.clone(),
            }),
            _ => {
                let main = format!("agent:{}:{}", route.agent_id, self.cfg.session.main_key);
                self.states
                    .load(&main)
                    .await
                    .map_err(HookError::Bus)?
                    .0
                    .last_route
            }
        };
        match target {
            Some(t) => {
                inbound.channel = t.channel;
                inbound.account = t.account;
                inbound.chat.id = t.chat_id;
                inbound.thread_id = None;
            }
            None => {
                tracing::warn!(session_key = %route.session_key, "Hook asks for delivery to the last chat, and there is none yet")
            }
        }
        Ok(overrides)
    }

    /// `/hooks/wake`: a system event for the agent's main session, run now as a
    /// heartbeat (answered where its owner last wrote, `HEARTBEAT_OK` kept quiet) or
    /// kept for the next heartbeat.
    async fn wake(&self, env: &Envelope<InboundMessage>, route: &Route, d: &Delivery) -> Outcome {
        let m = &env.body;
        let main = format!("agent:{}:{}", route.agent_id, self.cfg.session.main_key);
        let (mut st, _) = match self.states.load(&main).await {
            Ok(s) => s,
            Err(e) => return Outcome::retry(Duration::from_secs(1), e),
        };
        let mode = m
            .hook
            .as_ref()
            .and_then(|h| h.mode.as_deref())
            .unwrap_or("now");
        if mode == "next-heartbeat" {
            st.events.push(m.text.chars().take(2000).collect());
            let drop = st.events.len().saturating_sub(state::MAX_EVENTS);
            st.events.drain(..drop);
            return match self.states.save(&main, &st).await {
                Ok(()) => {
                    self.count("turn");
                    Outcome::Ack
                }
                Err(e) => Outcome::retry(Duration::from_secs(1), e),
            };
        }
        let mut inbound = m.clone();
        inbound.text = format!("System event: {}", m.text);
        inbound.session_key = Some(main.clone());
        if let Some(t) = st.last_route.clone() {
            inbound.channel = t.channel;
            inbound.account = t.account;
            inbound.chat.id = t.chat_id;
        }
        let turn = TurnRequest {
            run_id: format!("run:{}", env.id),
            session_key: main.clone(),
            agent_id: route.agent_id.clone(),
            inbound_id: env.id.clone(),
            inbound,
            model: st.model.clone(),
            thinking: st.thinking.clone(),
            heartbeat: true,
            ..Default::default()
        };
        let partition = subjects::partition(&main, topology::PARTITIONS);
        let out = Envelope::new(format!("turn:{}", env.id), clawbus_wire::now_ms(), turn);
        match self
            .bus
            .publish_durable(subjects::turn(partition, &main), &out, &d.trace)
            .await
        {
            Ok(_) => {
                self.count("turn");
                Outcome::Ack
            }
            Err(e) => Outcome::retry(Duration::from_secs(1), e.to_string()),
        }
    }
}

/// How a sender is named in group context.
fn sender_name(m: &InboundMessage) -> String {
    m.sender
        .display_name
        .clone()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| m.sender.id.clone())
}

impl RouterService {
    fn count(&self, outcome: &str) {
        self.metrics.messages.with_label_values(&[outcome]).inc();
    }

    /// The channel's policy for `m`, with its pairing approval looked up only when
    /// the policy alone would not let the sender in.
    async fn access(&self, m: &InboundMessage, command: bool) -> Result<Access, String> {
        let a = self.policies.decide(m, false, command);
        if !matches!(
            a,
            Access::Pair | Access::Drop("sender not on the allowlist")
        ) {
            return Ok(a);
        }
        if pairing::is_approved(&self.pairing, &m.channel, &m.account, &m.sender.id).await? {
            Ok(self.policies.decide(m, true, command))
        } else {
            Ok(a)
        }
    }

    /// `/usage`: the session's runs, tokens and cost, as the store sums them.
    async fn usage(&self, session_key: &str) -> (String, bool) {
        let req = Envelope::new(
            format!("usage:{session_key}:{}", clawbus_wire::now_ms()),
            clawbus_wire::now_ms(),
            clawbus_wire::UsageRequest {
                session_key: session_key.to_owned(),
            },
        );
        let resp = self
            .bus
            .request::<clawbus_wire::UsageRequest, clawbus_wire::UsageResponse>(
                subjects::STORE_USAGE.to_owned(),
                &req,
                &clawbus_bus::TraceContext::root(),
                Duration::from_secs(5),
            )
            .await;
        match resp {
            Ok(r) if r.body.error.is_none() => {
                let u = r.body;
                let cost = u
                    .cost_usd
                    .map_or_else(|| "not priced".to_owned(), |c| format!("${c:.4}"));
                (
                    format!(
                        "Usage of this session: {} runs, {} prompt + {} completion = {} tokens, cost {cost}",
                        u.runs, u.prompt_tokens, u.completion_tokens, u.total_tokens
                    ),
                    false,
                )
            }
            Ok(r) => (
                format!(
                    "Usage is not available: {}",
                    r.body.error.map(|e| e.message).unwrap_or_default()
                ),
                true,
            ),
            Err(e) => (format!("Usage is not available: {e}"), true),
        }
    }

    /// Tells the agent running `session_key`'s turn to cancel it (core NATS: only a
    /// run in progress listens; with none, nothing happens).
    async fn control(
        &self,
        session_key: &str,
        except: Option<&str>,
        reason: &str,
    ) -> Result<(), String> {
        let ctl = clawbus_wire::RunControl {
            session_key: session_key.to_owned(),
            action: "cancel".into(),
            except_run_id: except.map(str::to_owned),
            reason: reason.to_owned(),
        };
        let env = Envelope::new(
            format!("ctl:{session_key}:{}", clawbus_wire::now_ms()),
            clawbus_wire::now_ms(),
            ctl,
        );
        let bytes = clawbus_wire::encode(&env).map_err(|e| e.to_string())?;
        self.bus
            .client
            .publish(subjects::control(session_key), bytes.into())
            .await
            .map_err(|e| e.to_string())?;
        self.bus.client.flush().await.map_err(|e| e.to_string())
    }

    /// An unknown sender under pairing: a code for the owner to approve, told to the
    /// sender; nothing reaches the agent.
    async fn pair(&self, env: &Envelope<InboundMessage>, d: &Delivery) -> Outcome {
        let m = &env.body;
        let req = pairing::Request {
            code: String::new(),
            channel: m.channel.clone(),
            account: m.account.clone(),
            sender_id: m.sender.id.clone(),
            sender_name: m.sender.display_name.clone(),
            chat_id: m.chat.id.clone(),
            created_ms: clawbus_wire::now_ms(),
        };
        let code = match pairing::ask(&self.pairing, req).await {
            Ok(pairing::Asked::New(c) | pairing::Asked::Pending(c)) => c,
            Ok(pairing::Asked::Full) => {
                // No code while the account's requests are all pending: silence, as
                // for any unknown sender.
                self.count("dropped");
                tracing::info!(channel = %m.channel, account = %m.account, sender = %m.sender.id, "Pairing requests full; message dropped");
                return Outcome::Ack;
            }
            Err(e) => return Outcome::retry(Duration::from_secs(1), e),
        };
        self.count("pairing");
        tracing::info!(channel = %m.channel, account = %m.account, sender = %m.sender.id, code = %code, "Pairing requested");
        let text = format!(
            "This assistant does not know you yet.\nYour pairing code: {code}\n\
             Ask its owner to approve it with:\nclawbus pairing approve {} {code}",
            m.channel
        );
        self.send(env, String::new(), text, None, d).await
    }

    /// Answers a command.
    async fn answer(
        &self,
        env: &Envelope<InboundMessage>,
        route: &Route,
        text: &str,
        error: bool,
        d: &Delivery,
    ) -> Outcome {
        self.count(if error { "refused" } else { "command" });
        let info = error.then(|| ErrorInfo {
            code: "command_refused".into(),
            message: text.to_owned(),
        });
        self.send(env, route.session_key.clone(), text.to_owned(), info, d)
            .await
    }

    /// Tells the sender why their message was refused (an outbound error), then acks.
    async fn refuse(
        &self,
        env: &Envelope<InboundMessage>,
        err: RouteError,
        d: &Delivery,
    ) -> Outcome {
        tracing::info!(inbound_id = %env.id, error = %err, "Message refused");
        self.count("refused");
        let code = match err {
            RouteError::UnknownAgent(_) => "unknown_agent",
            RouteError::InvalidSessionKey(_) => "invalid_session_key",
            RouteError::EmptyText => "empty_message",
            RouteError::TextTooLong(_) => "message_too_long",
        };
        let info = ErrorInfo {
            code: code.into(),
            message: err.to_string(),
        };
        self.send(
            env,
            String::new(),
            format!("Message not accepted: {err}."),
            Some(info),
            d,
        )
        .await
    }

    /// Sends the router's own answer to a message (one chunk, id `run:<inbound>:out:0`
    /// as a turn's first chunk would have), then acks.
    async fn send(
        &self,
        env: &Envelope<InboundMessage>,
        session_key: String,
        text: String,
        error: Option<ErrorInfo>,
        d: &Delivery,
    ) -> Outcome {
        let m = &env.body;
        let Some(subject) = subjects::outbound(&m.channel, &m.account) else {
            return Outcome::reject(text);
        };
        let reply = OutboundMessage {
            run_id: format!("run:{}", env.id),
            session_key,
            channel: m.channel.clone(),
            account: m.account.clone(),
            chat_id: m.chat.id.clone(),
            thread_id: m.thread_id.clone(),
            reply_to_message_id: Some(m.message_id.clone()),
            inbound_id: env.id.clone(),
            chunk: 0,
            last: true,
            text,
            error,
            usage: None,
            model: None,
            finish_reason: Some("stop".into()),
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
    let js = &base.bus.js;
    let sessions =
        service::patiently("session state", || js.get_key_value(topology::KV_SESSIONS)).await?;
    let pairing = service::patiently("pairing", || js.get_key_value(topology::KV_PAIRING)).await?;
    let approvals =
        service::patiently("approvals", || js.get_key_value(topology::KV_APPROVALS)).await?;
    let cron_jobs = service::patiently("cron jobs", || js.get_key_value(topology::KV_CRON)).await?;
    let states = States::new(sessions);
    tokio::spawn(states.clone().follow(base.shutdown.clone()));
    // Every replica schedules; a slot's turn is kept once (see `schedule`).
    let scheduler = schedule::Scheduler {
        bus: base.bus.clone(),
        cfg: base.cfg.clone(),
        cron: cron_jobs,
        states: states.clone(),
    };
    tokio::spawn(scheduler.run(base.shutdown.clone()));
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
            cfg: base.cfg.clone(),
            policies: Policies::new(&base.cfg),
            states,
            pairing,
            approvals,
            metrics: RouterMetrics::new(&base.registry),
        }),
    });
    ownership::serve_shared(base, me, &decls, work).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
