//! Webhooks (`[hooks]`, OpenClaw's endpoints): `POST <path>/agent` runs a turn and
//! may deliver its answer to a chat; `POST <path>/wake` is a system event for the
//! default agent's main session, run now as a heartbeat or kept for the next one.
//! Authenticated with the hooks' own token (`Authorization: Bearer`, or
//! `x-openclaw-token`), never the gateway's; a token in the query string is refused.
//! Both answer 202 once the message is on the bus.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clawbus_config::HooksConfig;
use clawbus_wire::{ChatKind, ChatRef, Envelope, Hook, InboundMessage, Sender};
use serde::Deserialize;
use serde_json::json;

use crate::api::{body_bytes, publish, Gateway};
use crate::openai::ApiError;

/// The hooks' settings, with their token.
pub struct Hooks {
    pub cfg: HooksConfig,
    pub token: String,
}

/// The webhook routes under `[hooks] path`.
pub fn routes(path: &str) -> Router<Arc<Gateway>> {
    Router::new()
        .route(&format!("{path}/agent"), post(agent))
        .route(&format!("{path}/wake"), post(wake))
}

fn authorized(hooks: &Hooks, req_headers: &HeaderMap, query: Option<&str>) -> Result<(), ApiError> {
    if query.is_some_and(|q| q.split('&').any(|kv| kv.starts_with("token="))) {
        return Err(ApiError::invalid(
            "a token in the query string is refused: send it as Authorization: Bearer <hooks token>",
        ));
    }
    let given = crate::auth::bearer(req_headers)
        .or_else(|| req_headers.get("x-openclaw-token").map(|v| v.as_bytes()));
    match given {
        Some(t) if clawbus_config::secret_matches(t, hooks.token.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_hook_token".into()),
            "missing or invalid hooks token (Authorization: Bearer <hooks token>)",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AgentHook {
    message: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(default)]
    session_key: Option<String>,
    /// Accepted for OpenClaw's payloads; a run always starts at once here.
    #[serde(default)]
    #[allow(dead_code)]
    wake_mode: Option<String>,
    #[serde(default)]
    deliver: Option<bool>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    /// The most seconds the run may take (the agent's turn timeout when shorter).
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WakeHook {
    text: String,
    #[serde(default)]
    mode: Option<String>,
}

/// The request's headers and JSON body, once authorized.
async fn parse<T: serde::de::DeserializeOwned>(
    gw: &Arc<Gateway>,
    req: Request,
) -> Result<T, ApiError> {
    let hooks = gw.hooks.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("not_found".into()),
            "no such route",
        )
    })?;
    let (parts, body) = req.into_parts();
    authorized(hooks, &parts.headers, parts.uri.query())?;
    let bytes = body_bytes(gw, body).await?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

fn token_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A message from a hook, as the gateway's own inbound messages are.
fn inbound(
    gw: &Gateway,
    id: &str,
    text: String,
    agent: &str,
    session_key: String,
    hook: Hook,
) -> Envelope<InboundMessage> {
    let m = InboundMessage {
        channel: "http".into(),
        account: gw.account.clone(),
        message_id: id.to_owned(),
        chat: ChatRef {
            id: id.to_owned(),
            kind: ChatKind::Direct,
            ..Default::default()
        },
        sender: Sender {
            id: "hook".into(),
            ..Default::default()
        },
        text,
        mentions_bot: true,
        session_key: Some(session_key),
        agent_id: Some(agent.to_owned()),
        hook: Some(hook),
        ..Default::default()
    };
    Envelope::new(
        format!("http:{}:{id}", gw.account),
        clawbus_wire::now_ms(),
        m,
    )
}

async fn agent(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let r = run_agent(&gw, req).await;
    gw.count("hooks_agent", r)
}

async fn run_agent(gw: &Arc<Gateway>, req: Request) -> Result<Response, ApiError> {
    let h: AgentHook = parse(gw, req).await?;
    let hooks = gw.hooks.as_ref().expect("checked by parse");
    if h.message.trim().is_empty() {
        return Err(ApiError::invalid("`message` is required"));
    }
    if h.message.len() > clawbus_wire::MAX_TEXT_BYTES {
        return Err(ApiError::invalid("`message` is too long"));
    }
    let agent = match &h.agent_id {
        Some(a) if !gw.agents.contains(a) => {
            return Err(ApiError::invalid(format!(
                "unknown agent `{}`",
                a.chars().take(64).collect::<String>()
            )))
        }
        Some(a) if !hooks.cfg.allows_agent(a) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                Some("agent_not_allowed".into()),
                format!("hooks may not run agent `{a}` (hooks.allowed_agent_ids)"),
            ))
        }
        Some(a) => a.clone(),
        None => gw.default_agent.clone(),
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let session_key = match &h.session_key {
        Some(_) if !hooks.cfg.allow_request_session_key => {
            return Err(ApiError::invalid(
                "`sessionKey` is refused unless hooks.allow_request_session_key is set",
            ))
        }
        Some(k) => {
            let k = if k.starts_with("agent:") {
                k.clone()
            } else {
                format!("agent:{agent}:{k}")
            };
            if !k.starts_with(&format!("agent:{agent}:"))
                || k.len() > 256
                || k.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(ApiError::invalid(format!(
                    "`sessionKey` must be `<name>` or `agent:{agent}:<name>` (no spaces)"
                )));
            }
            k
        }
        None => format!("agent:{agent}:hook:{id}"),
    };
    for (field, v) in [("channel", &h.channel), ("account", &h.account)] {
        if v.as_deref().is_some_and(|v| !token_like(v)) {
            return Err(ApiError::invalid(format!(
                "`{field}` is letters, digits, `_` and `-`"
            )));
        }
    }
    if h.to
        .as_deref()
        .is_some_and(|t| t.is_empty() || t.len() > 256)
    {
        return Err(ApiError::invalid("`to` is 1-256 characters"));
    }
    let timeout_seconds = match h.timeout_seconds {
        Some(t @ 1..=86_400) => Some(t as u32),
        Some(_) => return Err(ApiError::invalid("`timeoutSeconds` is 1-86400")),
        None => None,
    };
    let deliver = h.deliver.unwrap_or(true);
    if deliver && h.channel.as_deref().is_some_and(|c| c != "last") && h.to.is_none() {
        return Err(ApiError::invalid("delivering to a channel needs `to`"));
    }
    let text = match h.name.as_deref().map(str::trim).filter(|n| !n.is_empty()) {
        Some(n) => format!("[{}] {}", n.chars().take(64).collect::<String>(), h.message),
        None => h.message,
    };
    let hook = Hook {
        kind: "agent".into(),
        deliver,
        channel: h.channel,
        account: h.account,
        to: h.to,
        model: h.model,
        thinking: h.thinking,
        timeout_seconds,
        ..Default::default()
    };
    let env = inbound(gw, &id, text, &agent, session_key.clone(), hook);
    let run_id = format!("run:{}", env.id);
    publish(gw, env).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"ok": true, "runId": run_id, "sessionKey": session_key})),
    )
        .into_response())
}

async fn wake(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let r = run_wake(&gw, req).await;
    gw.count("hooks_wake", r)
}

async fn run_wake(gw: &Arc<Gateway>, req: Request) -> Result<Response, ApiError> {
    let h: WakeHook = parse(gw, req).await?;
    if h.text.trim().is_empty() || h.text.len() > 16 * 1024 {
        return Err(ApiError::invalid("`text` is required, at most 16 KiB"));
    }
    let mode = h.mode.unwrap_or_else(|| "now".into());
    if mode != "now" && mode != "next-heartbeat" {
        return Err(ApiError::invalid("`mode` is now or next-heartbeat"));
    }
    let agent = gw.default_agent.clone();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let hook = Hook {
        kind: "wake".into(),
        mode: Some(mode),
        ..Default::default()
    };
    // The router puts it in the main session (its configured name).
    let env = inbound(
        gw,
        &id,
        h.text,
        &agent,
        format!("agent:{agent}:hook:{id}"),
        hook,
    );
    publish(gw, env).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"ok": true}))).into_response())
}
