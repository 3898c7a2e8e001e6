//! An emulator of the Slack Web API methods the channels service calls
//! (`auth.test`, `chat.postMessage`: `{"ok": true, …}`, or `{"ok": false, "error": …}`
//! as Slack answers — `invalid_auth` with HTTP 200, `ratelimited` with 429 and
//! `Retry-After`), and Slack's side of the Events API: events signed as Slack signs
//! them (`X-Slack-Signature`, `X-Slack-Request-Timestamp`), posted to the gateway.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// A message the bot posted: (channel, text, thread_ts).
pub type Posted = (String, String, Option<String>);

struct Inner {
    token: String,
    posted: Mutex<Vec<Posted>>,
    rate_limited: AtomicU32,
    clock: AtomicI64,
}

pub struct SlackEmulator {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlackEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlackEmulator {
    /// A workspace whose bot token is `token`.
    pub async fn start(token: &str) -> anyhow::Result<SlackEmulator> {
        let inner = Arc::new(Inner {
            token: token.to_owned(),
            posted: Mutex::new(Vec::new()),
            rate_limited: AtomicU32::new(0),
            clock: AtomicI64::new(1_700_000_000),
        });
        let app = Router::new()
            .route("/api/{method}", post(api))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(SlackEmulator { addr, inner, task })
    }

    /// The Web API root (`[channels.slack] api_root`).
    pub fn api_root(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// Everything the bot posted.
    pub fn posted(&self) -> Vec<Posted> {
        self.inner.posted.lock().unwrap().clone()
    }

    /// Posted to `channel`.
    pub fn posted_to(&self, channel: &str) -> Vec<Posted> {
        self.posted()
            .into_iter()
            .filter(|p| p.0 == channel)
            .collect()
    }

    /// The next `n` posts get 429 with `Retry-After: 1`.
    pub fn rate_limit_posts(&self, n: u32) {
        self.inner.rate_limited.store(n, Ordering::SeqCst);
    }
}

async fn api(
    State(s): State<Arc<Inner>>,
    axum::extract::Path(method): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(s.token.as_str()) {
        return Json(json!({"ok": false, "error": "invalid_auth"})).into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    match method.as_str() {
        "auth.test" => Json(
            json!({"ok": true, "url": "https://test.slack.invalid/", "team": "Test",
            "user": "clawbot", "team_id": "T1", "user_id": "UBOT", "bot_id": "B1"}),
        )
        .into_response(),
        "chat.postMessage" => {
            if s.rate_limited
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    Json(json!({"ok": false, "error": "ratelimited"})),
                )
                    .into_response();
            }
            let (Some(channel), Some(text)) = (req["channel"].as_str(), req["text"].as_str())
            else {
                return Json(json!({"ok": false, "error": "no_text"})).into_response();
            };
            if !channel.starts_with(['C', 'D', 'G']) {
                return Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
            }
            if text.chars().count() > 40_000 {
                return Json(json!({"ok": false, "error": "msg_too_long"})).into_response();
            }
            s.posted.lock().unwrap().push((
                channel.to_owned(),
                text.to_owned(),
                req["thread_ts"].as_str().map(str::to_owned),
            ));
            let ts = format!("{}.000100", s.clock.fetch_add(1, Ordering::SeqCst));
            Json(json!({"ok": true, "channel": channel, "ts": ts,
                "message": {"text": text, "user": "UBOT", "ts": ts}}))
            .into_response()
        }
        _ => Json(json!({"ok": false, "error": "unknown_method"})).into_response(),
    }
}

/// Slack's signature of `body` at `ts` with the app's `secret`: `v0=<hex>`.
pub fn sign(secret: &str, ts: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("v0:{ts}:{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v0={hex}")
}

/// An `event_callback` of a message: in a direct message (`D…` channels) or a channel,
/// mentioning the bot (`<@UBOT>`, as an `app_mention`) when `mention`.
pub fn message_event(channel: &str, user: &str, text: &str, ts: &str, mention: bool) -> Value {
    let direct = channel.starts_with('D');
    let (kind, text) = if mention {
        ("app_mention", format!("<@UBOT> {text}"))
    } else {
        ("message", text.to_owned())
    };
    json!({"token": "legacy", "team_id": "T1", "api_app_id": "A1", "type": "event_callback",
        "event_id": format!("Ev{}", ts.replace('.', "")), "event_time": 1_700_000_000,
        "authorizations": [{"team_id": "T1", "user_id": "UBOT", "is_bot": true}],
        "event": {"type": kind, "user": user, "text": text, "ts": ts, "channel": channel,
            "channel_type": if direct { "im" } else { "channel" }, "event_ts": ts}})
}
