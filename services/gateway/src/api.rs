//! HTTP routes of the gateway.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clawbus_bus::service::ServiceBase;
use clawbus_bus::{subjects, Bus, TraceContext};
use clawbus_telemetry::http::{BodyError, HttpLimits};
use clawbus_telemetry::metrics::{counter_vec, gauge, histogram_vec};
use clawbus_wire::{ChatKind, ChatRef, Envelope, InboundMessage, OutboundMessage, Sender};
use prometheus::{HistogramVec, IntCounterVec, IntGauge, Registry};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::openai::ApiError;
use crate::replies::{dispatch, Registration, Replies, ReplyEvent};
use crate::sse::{reply_error, sse_response, usage_json, ReplyMeta};

const CHANNEL: &str = "http";
/// Header selecting the session (OpenClaw-style key, e.g. `agent:main:main`).
pub const SESSION_HEADER: &str = "x-clawbus-session-key";
const MAX_USER_BYTES: usize = 128;
/// How long requests in flight may take to finish after a shutdown signal.
const DRAIN_DEADLINE: Duration = Duration::from_secs(15);
/// Largest encoded inbound message: the bus limit less room for the turn request's
/// own fields.
const MAX_INBOUND_BYTES: usize = clawbus_wire::MAX_PAYLOAD_BYTES - 64 * 1024;

#[derive(Clone)]
pub(crate) struct Metrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
    pub(crate) waiting: IntGauge,
    pub(crate) slack: IntCounterVec,
}

impl Metrics {
    fn new(r: &Registry) -> Self {
        Self {
            requests: counter_vec(
                r,
                "clawbus_gateway_http_requests_total",
                "HTTP requests, by route and status",
                &["route", "status"],
            ),
            seconds: histogram_vec(
                r,
                "clawbus_gateway_http_request_duration_seconds",
                "Time to the response head, by route",
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ],
                &["route"],
            ),
            waiting: gauge(
                r,
                "clawbus_gateway_waiting_requests",
                "Requests waiting for a reply",
            ),
            slack: counter_vec(
                r,
                "clawbus_gateway_slack_events_total",
                "Slack Events API calls, by outcome (published, bad_signature, stale)",
                &["outcome"],
            ),
        }
    }
}

/// Shared state of the HTTP handlers.
pub struct Gateway {
    pub(crate) bus: Bus,
    /// This gateway's account: its inbound subject and the replies it receives.
    pub(crate) account: String,
    token: String,
    pub(crate) agents: Vec<String>,
    pub(crate) default_agent: String,
    /// The webhooks, when `[hooks] enabled`.
    pub(crate) hooks: Option<crate::hooks::Hooks>,
    /// Slack accounts whose Events API calls this gateway takes.
    pub(crate) slack: Vec<crate::slack::SlackAccount>,
    max_body: usize,
    pub(crate) timeout: Duration,
    slots: Arc<Semaphore>,
    replies: Replies,
    pub(crate) metrics: Metrics,
}

type Shared = Arc<Gateway>;

/// Builds the HTTP router (API + health; `/metrics` is on the admin port).
pub fn router(gw: Shared, readiness: clawbus_telemetry::Readiness) -> Router {
    let mut r = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/responses", post(crate::responses::responses))
        .route("/v1/models", get(models));
    if let Some(h) = &gw.hooks {
        r = r.merge(crate::hooks::routes(&h.cfg.path));
    }
    r = r.merge(crate::slack::routes(&gw.slack));
    r.fallback(not_found)
        .with_state(gw)
        .merge(clawbus_telemetry::health_router(readiness))
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found".into()),
        "no such route",
    )
}

/// Runs the gateway until shutdown.
pub async fn serve(base: &ServiceBase, token: String) -> anyhow::Result<()> {
    let cfg = &base.cfg;
    let replies = Replies::default();
    // Replies keep flowing while in-flight requests drain after a shutdown signal.
    let replies_stop = tokio_util::sync::CancellationToken::new();
    dispatch(
        &base.bus,
        &cfg.gateway.account,
        replies.clone(),
        base.readiness.clone(),
        replies_stop.clone(),
    )
    .await?;
    base.readiness.set("replies", true);
    let hooks = match (cfg.hooks.enabled, cfg.hooks.token()) {
        (true, Some(t)) if t == token => anyhow::bail!(
            "hooks.token must differ from the gateway's token: a hook caller must not get the API"
        ),
        (true, Some(t)) => Some(crate::hooks::Hooks {
            cfg: cfg.hooks.clone(),
            token: t,
        }),
        _ => None,
    };
    let gw = Arc::new(Gateway {
        hooks,
        slack: crate::slack::accounts(cfg),
        bus: base.bus.clone(),
        account: cfg.gateway.account.clone(),
        token,
        agents: cfg.router.agents.clone(),
        default_agent: cfg.router.default_agent.clone(),
        max_body: cfg.gateway.max_body_bytes,
        timeout: Duration::from_secs(cfg.gateway.request_timeout_secs),
        slots: Arc::new(Semaphore::new(cfg.gateway.max_in_flight)),
        replies,
        metrics: Metrics::new(&base.registry),
    });
    // Slack workspaces in Socket Mode: the gateway connects to Slack.
    for a in crate::slack_socket::accounts(cfg) {
        tokio::spawn(crate::slack_socket::run(
            gw.clone(),
            a,
            base.shutdown.clone(),
        ));
    }
    let listener = tokio::net::TcpListener::bind(&cfg.gateway.bind).await?;
    let addr = listener.local_addr()?;
    base.readiness.set("http", true);
    let limits = HttpLimits::from_config(&cfg.http, cfg.http.max_connections);
    tracing::info!(addr = %addr, max_connections = limits.max_connections, "Gateway listening");
    let app = router(gw, base.readiness.clone());
    let server =
        clawbus_telemetry::http::serve(listener, "gateway", app, limits, base.shutdown.clone());
    let drain_deadline = async {
        base.shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_DEADLINE).await;
    };
    let result = tokio::select! {
        () = server => Ok(()),
        _ = drain_deadline => {
            tracing::warn!("Drain deadline passed; closing requests still waiting for replies");
            Ok(())
        }
    };
    replies_stop.cancel();
    result
}

fn authorized(gw: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    crate::auth::authorized(&gw.token, headers)
}

impl Gateway {
    /// Counts what became of a Slack event call.
    pub(crate) fn count_slack(&self, outcome: &str) {
        self.metrics.slack.with_label_values(&[outcome]).inc();
    }

    /// Counts a response of `route` and gives it.
    pub(crate) fn count(&self, route: &str, r: Result<Response, ApiError>) -> Response {
        let resp = r.into_response();
        self.metrics
            .requests
            .with_label_values(&[route, resp.status().as_str()])
            .inc();
        resp
    }
}

async fn models(State(gw): State<Shared>, headers: HeaderMap) -> Response {
    let res = authorized(&gw, &headers).map(|_| {
        let mut ids = vec!["clawbus".to_owned()];
        ids.extend(gw.agents.iter().map(|a| format!("clawbus:{a}")));
        let data: Vec<Value> = ids
            .into_iter()
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "clawbus"}))
            .collect();
        Json(json!({"object": "list", "data": data}))
    });
    let resp = res.into_response();
    gw.metrics
        .requests
        .with_label_values(&["models", resp.status().as_str()])
        .inc();
    resp
}

async fn chat_completions(State(gw): State<Shared>, req: Request) -> Response {
    let started = Instant::now();
    observe(&gw, "chat_completions", started, chat(&gw, req).await)
}

/// The response of a request on `route`, counted and timed.
pub(crate) fn observe(
    gw: &Gateway,
    route: &str,
    started: Instant,
    result: Result<Response, ApiError>,
) -> Response {
    let resp = result.unwrap_or_else(IntoResponse::into_response);
    gw.metrics
        .requests
        .with_label_values(&[route, resp.status().as_str()])
        .inc();
    gw.metrics
        .seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// The agent a model name selects: `clawbus`, `clawbus:<agent>` or `agent:<agent>`.
pub(crate) fn agent_for_model(gw: &Gateway, model: &str) -> Result<String, ApiError> {
    let agent = match model {
        "clawbus" => Some(gw.default_agent.as_str()),
        m => m
            .strip_prefix("clawbus:")
            .or_else(|| m.strip_prefix("agent:")),
    };
    match agent {
        Some(a) if gw.agents.iter().any(|x| x == a) => Ok(a.to_owned()),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found".into()),
            format!(
                "the model `{}` does not exist; GET /v1/models lists the available ones",
                truncate(model, 100)
            ),
        )),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// The request body, within the size limit, after the token check.
pub(crate) async fn read_body(gw: &Gateway, req: Request) -> Result<(HeaderMap, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    authorized(gw, &parts.headers)?;
    Ok((parts.headers, body_bytes(gw, body).await?))
}

/// A request body, at most `max_body_bytes` (refused at once when its length says
/// more), whole within the listener's body timeout.
pub(crate) async fn body_bytes(gw: &Gateway, body: axum::body::Body) -> Result<Bytes, ApiError> {
    clawbus_telemetry::http::read_body(body, gw.max_body)
        .await
        .map_err(|e| {
            let (status, code) = match &e {
                BodyError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
                BodyError::TimedOut(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
                BodyError::Malformed(_) => (StatusCode::BAD_REQUEST, "invalid_body"),
            };
            ApiError::new(
                status,
                "invalid_request_error",
                Some(code.into()),
                e.to_string(),
            )
        })
}

/// What a request asks the agent, whichever API it came through.
pub(crate) struct Ask {
    pub request_id: String,
    pub agent: String,
    pub session_key: String,
    pub sender: Option<String>,
    pub prompt: crate::openai::Prompt,
    /// The caller's earlier messages serve as context (a session without history).
    pub context: bool,
    pub tools: Vec<clawbus_wire::ToolSpec>,
    pub tool_choice: Option<String>,
    pub stream: bool,
    /// A webhook's instructions (`/hooks/...`).
    pub hook: Option<clawbus_wire::Hook>,
}

/// Publishes an inbound message of this gateway's (checking it fits on the bus),
/// retried while NATS fails over.
pub(crate) async fn publish(gw: &Shared, env: Envelope<InboundMessage>) -> Result<(), ApiError> {
    // The turn request carries the whole message plus a little: leave it room on the bus.
    let encoded = clawbus_wire::encode(&env).map_err(|e| ApiError::invalid(e.to_string()))?;
    if encoded.len() > MAX_INBOUND_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large".into()),
            format!(
                "the message and its context take {} bytes on the bus; the limit is {MAX_INBOUND_BYTES}",
                encoded.len()
            ),
        ));
    }
    let b = &env.body;
    let subject = subjects::inbound_chat(&b.channel, &b.account, &b.chat.id)
        .ok_or_else(|| ApiError::invalid("invalid channel or account"))?;
    let bus_down = |e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "Inbound publish failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            Some("bus_unavailable".into()),
            "message bus unavailable; retry",
        )
    };
    // Retried while NATS fails over (a node of a cluster dies): the id dedupes.
    gw.bus
        .publish_durable_retrying::<InboundMessage>(
            subject,
            &env.id,
            encoded.into(),
            &TraceContext::root(),
            Duration::from_secs(15),
        )
        .await
        .map_err(|e| bus_down(&e))?;
    Ok(())
}

/// Publishes the inbound message of a request and registers for its reply; the
/// permit holds one of the gateway's in-flight slots.
pub(crate) async fn submit(
    gw: &Shared,
    ask: Ask,
) -> Result<(Registration, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let Ok(permit) = gw.slots.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("too_many_requests".into()),
            "too many requests in flight; retry shortly",
        ));
    };
    let p = ask.prompt;
    // A session with a history gets only the caller's results of its functions'
    // calls (the calls themselves are in the history).
    let context = if ask.context || p.text.is_empty() {
        p.context
    } else {
        Vec::new()
    };
    let request_id = ask.request_id;
    let inbound = InboundMessage {
        channel: CHANNEL.into(),
        account: gw.account.clone(),
        message_id: request_id.clone(),
        chat: ChatRef {
            id: request_id.clone(),
            kind: ChatKind::Direct,
            ..Default::default()
        },
        sender: Sender {
            id: ask.sender.unwrap_or_else(|| "http".into()),
            display_name: None,
            is_bot: false,
        },
        thread_id: None,
        reply_to: None,
        text: p.text,
        mentions_bot: true,
        session_key: Some(ask.session_key),
        agent_id: Some(ask.agent),
        stream: ask.stream,
        system: p.system,
        context,
        tools: ask.tools,
        tool_choice: ask.tool_choice,
        hook: ask.hook,
    };
    let inbound_id = format!("{CHANNEL}:{}:{request_id}", gw.account);
    let reg = gw.replies.register(&inbound_id);
    publish(
        gw,
        Envelope::new(inbound_id, clawbus_wire::now_ms(), inbound),
    )
    .await?;
    Ok((reg, permit))
}

async fn chat(gw: &Shared, req: Request) -> Result<Response, ApiError> {
    let (headers, bytes) = read_body(gw, req).await?;
    let crate::openai::ChatAsk {
        request,
        prompt,
        tools,
        tool_choice,
    } = crate::openai::parse_chat(&bytes)?;
    let agent = agent_for_model(gw, &request.model)?;
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let (session_key, context) =
        session_for(&headers, request.user.as_deref(), &agent, &request_id)?;
    let (reg, permit) = submit(
        gw,
        Ask {
            request_id: request_id.clone(),
            agent,
            session_key,
            sender: request.user.clone(),
            prompt,
            context,
            tools,
            tool_choice,
            stream: request.stream,
            hook: None,
        },
    )
    .await?;
    let completion_id = format!("chatcmpl-{request_id}");
    let created = clawbus_wire::now_ms() / 1000;
    let meta = ReplyMeta {
        id: completion_id,
        created,
        model: request.model.clone(),
    };
    if request.stream {
        let include_usage = request
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        return Ok(sse_response(gw.clone(), reg, meta, include_usage, permit));
    }
    let out = final_reply(gw, reg, permit).await?;
    Ok(Json(json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        // The model that answered (`provider/model`; a fallback shows here).
        "model": out.model.as_deref().unwrap_or(&meta.model),
        "choices": [{"index": 0, "message": message_json(&out), "logprobs": null, "finish_reason": crate::sse::finish_reason(&out)}],
        "usage": usage_json(&out),
        "system_fingerprint": null,
    }))
    .into_response())
}

/// The assistant's message of a reply: its text, and the caller's functions it calls.
fn message_json(out: &OutboundMessage) -> Value {
    if out.tool_calls.is_empty() {
        return json!({"role": "assistant", "content": out.text});
    }
    json!({
        "role": "assistant",
        "content": if out.text.is_empty() { Value::Null } else { out.text.clone().into() },
        "tool_calls": out.tool_calls.iter().map(|c| json!({
            "id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        })).collect::<Vec<_>>(),
    })
}

/// The session key and whether the request's earlier messages serve as context
/// (only for a per-request session, which has no history of its own).
pub(crate) fn session_for(
    headers: &HeaderMap,
    user: Option<&str>,
    agent: &str,
    request_id: &str,
) -> Result<(String, bool), ApiError> {
    if let Some(v) = headers.get(SESSION_HEADER) {
        let k = v
            .to_str()
            .map_err(|_| ApiError::invalid(format!("{SESSION_HEADER} must be visible ASCII")))?;
        let k = k.trim();
        let prefix = format!("agent:{agent}:");
        // A bare name (no `agent:` prefix) is a session of the requested agent.
        let k = if k.starts_with("agent:") {
            k.to_owned()
        } else {
            format!("{prefix}{k}")
        };
        if !k.starts_with(&prefix)
            || k.len() <= prefix.len()
            || k.len() > 256
            || k.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ApiError::invalid(format!(
                "{SESSION_HEADER} must be `<name>` or `{prefix}<name>` (at most 256 bytes, no spaces)"
            )));
        }
        return Ok((k, false));
    }
    if let Some(u) = user.map(str::trim).filter(|u| !u.is_empty()) {
        if u.len() > MAX_USER_BYTES || u.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ApiError::invalid(format!(
                "`user` must be at most {MAX_USER_BYTES} bytes without spaces"
            )));
        }
        return Ok((format!("agent:{agent}:openai-user:{u}"), false));
    }
    Ok((format!("agent:{agent}:openai:{request_id}"), true))
}

/// The reply of a request that waits for it whole (not streamed), holding its
/// in-flight slot meanwhile; the turn's error as an API error.
pub(crate) async fn final_reply(
    gw: &Gateway,
    reg: Registration,
    _permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<OutboundMessage, ApiError> {
    gw.metrics.waiting.inc();
    let reply = wait_final(reg, gw.timeout).await;
    gw.metrics.waiting.dec();
    let out = reply?;
    match &out.error {
        Some(err) => Err(reply_error(err)),
        None => Ok(out),
    }
}

async fn wait_final(mut reg: Registration, timeout: Duration) -> Result<OutboundMessage, ApiError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, reg.rx.recv()).await {
            Ok(Some(ReplyEvent::Final(m))) => return Ok(*m),
            Ok(Some(ReplyEvent::Delta(_))) => continue,
            Ok(None) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    None,
                    "gateway shutting down",
                ))
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "server_error",
                    Some("timeout".into()),
                    "no reply in time; the turn continues and its reply is kept in the session",
                ))
            }
        }
    }
}
