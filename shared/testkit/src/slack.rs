//! An emulator of the Slack Web API methods the channels service calls
//! (`auth.test`, `chat.postMessage`, `chat.update`: `{"ok": true, …}`, or `{"ok": false, "error": …}`
//! as Slack answers — `invalid_auth` with HTTP 200, `ratelimited` with 429 and
//! `Retry-After`), and Slack's side of the Events API: events signed as Slack signs
//! them (`X-Slack-Signature`, `X-Slack-Request-Timestamp`), posted to the gateway;
//! and Socket Mode: `apps.connections.open` (with the app-level token [`APP_TOKEN`])
//! gives a WebSocket URL where the emulator says `hello`, sends events as
//! `events_api` envelopes, sends every unacknowledged one again on a new connection,
//! and can ask the client to reconnect (`disconnect`).

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

/// The app-level token Socket Mode accepts.
pub const APP_TOKEN: &str = "xapp-1-test-app-token";

/// A message the bot posted: (channel, text, thread_ts).
pub type Posted = (String, String, Option<String>);

struct Inner {
    token: String,
    /// What the bot posted, with each message's `ts`, as updated since.
    posted: Mutex<Vec<(String, Posted)>>,
    updates: AtomicU32,
    rate_limited: AtomicU32,
    clock: AtomicI64,
    ws_url: Mutex<String>,
    /// Socket Mode envelopes: (id, frame as sent, acknowledged).
    envelopes: Mutex<Vec<(String, String, bool)>>,
    link: Mutex<Option<tokio::sync::mpsc::Sender<String>>>,
    connections: AtomicU32,
    /// Posts wait once this many were made (negative: never), until released.
    hold_after: AtomicI64,
    hold: tokio::sync::watch::Sender<bool>,
    held: AtomicU32,
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
            updates: AtomicU32::new(0),
            rate_limited: AtomicU32::new(0),
            clock: AtomicI64::new(1_700_000_000),
            ws_url: Mutex::new(String::new()),
            envelopes: Mutex::new(Vec::new()),
            link: Mutex::new(None),
            connections: AtomicU32::new(0),
            hold_after: AtomicI64::new(-1),
            hold: tokio::sync::watch::channel(false).0,
            held: AtomicU32::new(0),
        });
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        *inner.ws_url.lock().unwrap() = format!("ws://{}/link/?ticket=test", ws.local_addr()?);
        let ws_inner = inner.clone();
        let ws_task = tokio::spawn(async move {
            while let Ok((tcp, _)) = ws.accept().await {
                let i = ws_inner.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                        socket(i, ws).await;
                    }
                });
            }
        });
        let app = Router::new()
            .route("/api/{method}", post(api))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
            ws_task.abort();
        });
        Ok(SlackEmulator { addr, inner, task })
    }

    /// The Web API root (`[channels.slack] api_root`).
    pub fn api_root(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// Everything the bot posted.
    pub fn posted(&self) -> Vec<Posted> {
        let posted = self.inner.posted.lock().unwrap();
        posted.iter().map(|(_, p)| p.clone()).collect()
    }

    /// `chat.update` calls that changed a message.
    pub fn updates(&self) -> u32 {
        self.inner.updates.load(Ordering::SeqCst)
    }

    /// Posted to `channel`.
    pub fn posted_to(&self, channel: &str) -> Vec<Posted> {
        self.posted()
            .into_iter()
            .filter(|p| p.0 == channel)
            .collect()
    }

    /// Sends an event over Socket Mode (kept until acknowledged); its envelope id.
    pub fn push_event(&self, payload: Value) -> String {
        self.push_raw_event(&payload.to_string())
    }

    /// Sends an `events_api` envelope whose payload is `payload` as it is (JSON that
    /// may be broken or hostile); its envelope id.
    pub fn push_raw_event(&self, payload: &str) -> String {
        let id = format!("env-{}", self.inner.clock.fetch_add(1, Ordering::SeqCst));
        let frame = format!(
            r#"{{"envelope_id":"{id}","type":"events_api","payload":{payload},"accepts_response_payload":false,"retry_attempt":0,"retry_reason":""}}"#
        );
        self.inner
            .envelopes
            .lock()
            .unwrap()
            .push((id.clone(), frame.clone(), false));
        if let Some(l) = self.inner.link.lock().unwrap().as_ref() {
            let _ = l.try_send(frame);
        }
        id
    }

    /// True once the client acknowledged envelope `id`.
    pub fn acked(&self, id: &str) -> bool {
        self.inner
            .envelopes
            .lock()
            .unwrap()
            .iter()
            .any(|(i, _, a)| i == id && *a)
    }

    /// Socket Mode connections opened so far.
    pub fn socket_connections(&self) -> u32 {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Asks the connected client to reconnect, as Slack does every few hours.
    pub fn ask_reconnect(&self) {
        if let Some(l) = self.inner.link.lock().unwrap().as_ref() {
            let _ = l
                .try_send(json!({"type": "disconnect", "reason": "refresh_requested"}).to_string());
        }
    }

    /// Once `n` messages were posted in all, further posts wait until
    /// [`Self::release_failing`].
    pub fn hold_posts_after(&self, n: usize) {
        self.inner.hold_after.store(n as i64, Ordering::SeqCst);
        self.inner.hold.send_replace(true);
    }

    /// Posts waiting at the hold.
    pub fn held(&self) -> u32 {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Ends the hold; the posts that waited fail (Slack never took them).
    pub fn release_failing(&self) {
        self.inner.hold_after.store(-1, Ordering::SeqCst);
        self.inner.hold.send_replace(false);
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
    if method == "apps.connections.open" {
        return if bearer == Some(APP_TOKEN) {
            Json(json!({"ok": true, "url": *s.ws_url.lock().unwrap()})).into_response()
        } else {
            Json(json!({"ok": false, "error": "invalid_auth"})).into_response()
        };
    }
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
            let after = s.hold_after.load(Ordering::SeqCst);
            if after >= 0 && s.posted.lock().unwrap().len() as i64 >= after {
                let mut rx = s.hold.subscribe();
                s.held.fetch_add(1, Ordering::SeqCst);
                let _ = rx.wait_for(|h| !h).await;
                s.held.fetch_sub(1, Ordering::SeqCst);
                return (StatusCode::BAD_GATEWAY, "upstream connect error").into_response();
            }
            if !channel.starts_with(['C', 'D', 'G']) {
                return Json(json!({"ok": false, "error": "channel_not_found"})).into_response();
            }
            if text.chars().count() > 40_000 {
                return Json(json!({"ok": false, "error": "msg_too_long"})).into_response();
            }
            let ts = format!("{}.000100", s.clock.fetch_add(1, Ordering::SeqCst));
            s.posted.lock().unwrap().push((
                ts.clone(),
                (
                    channel.to_owned(),
                    text.to_owned(),
                    req["thread_ts"].as_str().map(str::to_owned),
                ),
            ));
            Json(json!({"ok": true, "channel": channel, "ts": ts,
                "message": {"text": text, "user": "UBOT", "ts": ts}}))
            .into_response()
        }
        "chat.update" => {
            let (Some(channel), Some(ts), Some(text)) = (
                req["channel"].as_str(),
                req["ts"].as_str(),
                req["text"].as_str(),
            ) else {
                return Json(json!({"ok": false, "error": "invalid_arguments"})).into_response();
            };
            if text.chars().count() > 40_000 {
                return Json(json!({"ok": false, "error": "msg_too_long"})).into_response();
            }
            let mut posted = s.posted.lock().unwrap();
            let Some((_, p)) = posted.iter_mut().find(|(t, p)| t == ts && p.0 == channel) else {
                return Json(json!({"ok": false, "error": "message_not_found"})).into_response();
            };
            p.1 = text.to_owned();
            s.updates.fetch_add(1, Ordering::SeqCst);
            Json(json!({"ok": true, "channel": channel, "ts": ts, "text": text})).into_response()
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

/// One Socket Mode connection: hello, the unacknowledged envelopes, then new ones;
/// acknowledgements recorded.
async fn socket(s: Arc<Inner>, ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;
    let (mut tx, mut rx) = ws.split();
    s.connections.fetch_add(1, Ordering::SeqCst);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<String>(1024);
    let hello = json!({"type": "hello", "num_connections": 1,
        "connection_info": {"app_id": "A1"}, "debug_info": {"host": "emulator"}});
    if tx.send(Ws::text(hello.to_string())).await.is_err() {
        return;
    }
    let pending: Vec<String> = s
        .envelopes
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, a)| !a)
        .map(|(_, f, _)| f.clone())
        .collect();
    *s.link.lock().unwrap() = Some(out_tx);
    for f in pending {
        if tx.send(Ws::text(f)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            m = rx.next() => {
                let Some(Ok(Ws::Text(t))) = m else { return };
                let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                if let Some(id) = v["envelope_id"].as_str() {
                    for e in s.envelopes.lock().unwrap().iter_mut() {
                        if e.0 == id {
                            e.2 = true;
                        }
                    }
                }
            }
            Some(f) = out_rx.recv() => {
                let disconnect = f.contains("\"disconnect\"");
                if tx.send(Ws::text(f)).await.is_err() {
                    return;
                }
                if disconnect {
                    // Slack closes its end a little later; the client should already
                    // be on its way to a new connection.
                    return;
                }
            }
        }
    }
}
