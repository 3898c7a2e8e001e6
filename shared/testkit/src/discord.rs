//! An emulator of Discord for the channels service's tests, in Discord's documented
//! wire format: the REST API (`GET /api/v10/gateway/bot`, `POST
//! /api/v10/channels/{id}/messages` with `enforce_nonce`, `PATCH
//! .../messages/{message id}` (edits), `POST .../typing`; 401, 400, 404 with code 10008
//! with error code 50035, 429 with `retry_after` and `Retry-After`) and the gateway
//! WebSocket (op 10 Hello, op 2 Identify or op 6 Resume, op 0 dispatches READY,
//! RESUMED, THREAD_CREATE and MESSAGE_CREATE with sequence numbers, op 1 heartbeats answered by op 11,
//! close 4004 for a bad token, op 9 for a session it cannot resume). Tests write as
//! people (`say`), read what the bot sent (`sent`), cut the connection (`drop_link`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as Ws;

pub const BOT_ID: &str = "900000000000000001";

/// A message the bot sent: (channel, content, replied-to message id).
pub type DiscordSent = (String, String, Option<String>);

#[derive(Default)]
struct Gw {
    session: String,
    /// Dispatches of the session with their sequence numbers, for resuming.
    /// Dispatches sent, as text (a hostile one may hold what no JSON value can).
    events: Vec<(u64, String)>,
    link: Option<mpsc::Sender<Ws>>,
}

struct Inner {
    token: String,
    ws_url: Mutex<String>,
    gw: Mutex<Gw>,
    seq: AtomicU64,
    ids: AtomicU64,
    /// What the bot sent, with each message's id, as edited since.
    sent: Mutex<Vec<(String, DiscordSent)>>,
    edits: AtomicU32,
    nonces: Mutex<Vec<(String, String)>>,
    rate_limited: AtomicU32,
    identifies: AtomicU32,
    resumes: AtomicU32,
}

pub struct DiscordEmulator {
    pub rest: SocketAddr,
    /// The gateway WebSocket's address.
    pub gateway: SocketAddr,
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for DiscordEmulator {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl DiscordEmulator {
    pub async fn start(token: &str) -> anyhow::Result<DiscordEmulator> {
        let inner = Arc::new(Inner {
            token: token.to_owned(),
            ws_url: Mutex::new(String::new()),
            gw: Mutex::new(Gw::default()),
            seq: AtomicU64::new(0),
            ids: AtomicU64::new(1_000_000_000_000_000_000),
            sent: Mutex::new(Vec::new()),
            edits: AtomicU32::new(0),
            nonces: Mutex::new(Vec::new()),
            rate_limited: AtomicU32::new(0),
            identifies: AtomicU32::new(0),
            resumes: AtomicU32::new(0),
        });
        let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let ws_addr = ws.local_addr()?;
        *inner.ws_url.lock().unwrap() = format!("ws://{ws_addr}");
        let app = Router::new()
            .route("/api/v10/gateway/bot", get(gateway_bot))
            .route("/api/v10/channels/{id}/messages", post(create_message))
            .route(
                "/api/v10/channels/{id}/messages/{message}",
                axum::routing::patch(edit_message),
            )
            .route("/api/v10/channels/{id}/typing", post(typing))
            .with_state(inner.clone());
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let rest_addr = rest.local_addr()?;
        let t1 = tokio::spawn(async move {
            let _ = axum::serve(rest, app).await;
        });
        let gw_inner = inner.clone();
        let t2 = tokio::spawn(async move {
            while let Ok((tcp, _)) = ws.accept().await {
                let i = gw_inner.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = tokio_tungstenite::accept_async(tcp).await {
                        link(i, ws).await;
                    }
                });
            }
        });
        Ok(DiscordEmulator {
            rest: rest_addr,
            gateway: ws_addr,
            inner,
            tasks: vec![t1, t2],
        })
    }

    /// The gateway URL `GET /gateway/bot` gives from now on (a proxy's).
    pub fn set_gateway_url(&self, url: &str) {
        *self.inner.ws_url.lock().unwrap() = url.to_owned();
    }

    /// The REST API root (`[channels.discord] api_root`).
    pub fn api_root(&self) -> String {
        format!("http://{}/api/v10", self.rest)
    }

    fn dispatch(&self, t: &str, d: Value) {
        self.dispatch_raw(t, &d.to_string());
    }

    /// Dispatches event `t` whose `d` is the JSON text `d` as it is (it may be one the
    /// bot cannot read, such as a lone surrogate escape); its sequence number.
    pub fn dispatch_raw(&self, t: &str, d: &str) -> u64 {
        let s = self.inner.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let ev = format!(r#"{{"op":0,"t":{},"s":{s},"d":{d}}}"#, json!(t));
        let mut gw = self.inner.gw.lock().unwrap();
        gw.events.push((s, ev.clone()));
        if let Some(l) = &gw.link {
            let _ = l.try_send(Ws::text(ev));
        }
        s
    }

    /// A message from `author` in `channel` (of `guild`, or a DM), mentioning the bot
    /// when `mention`; its id.
    pub fn say(
        &self,
        channel: &str,
        guild: Option<&str>,
        author: &str,
        text: &str,
        mention: bool,
    ) -> String {
        let id = self.inner.ids.fetch_add(1, Ordering::SeqCst).to_string();
        let (content, mentions) = if mention {
            (
                format!("<@{BOT_ID}> {text}"),
                json!([{"id": BOT_ID, "username": "clawbot", "bot": true}]),
            )
        } else {
            (text.to_owned(), json!([]))
        };
        let mut d = json!({"id": id, "channel_id": channel, "content": content, "mentions": mentions,
            "author": {"id": author, "username": format!("user{author}"), "global_name": null},
            "timestamp": "2026-12-06T10:00:00.000000+00:00", "type": 0});
        if let Some(g) = guild {
            d["guild_id"] = g.into();
        }
        self.dispatch("MESSAGE_CREATE", d);
        id
    }

    /// A new public thread under `parent` (a THREAD_CREATE dispatch); its channel id.
    pub fn thread(&self, parent: &str, guild: &str, name: &str) -> String {
        let id = self.inner.ids.fetch_add(1, Ordering::SeqCst).to_string();
        self.dispatch(
            "THREAD_CREATE",
            json!({"id": id, "type": 11, "guild_id": guild, "parent_id": parent, "name": name,
                "newly_created": true, "thread_metadata": {"archived": false, "locked": false}}),
        );
        id
    }

    /// Cuts the gateway connection without a close frame (a network failure).
    pub fn drop_link(&self) {
        self.inner.gw.lock().unwrap().link = None;
    }

    /// True while a client holds the gateway.
    pub fn linked(&self) -> bool {
        self.inner.gw.lock().unwrap().link.is_some()
    }

    /// Identify and Resume calls so far.
    pub fn logins(&self) -> (u32, u32) {
        (
            self.inner.identifies.load(Ordering::SeqCst),
            self.inner.resumes.load(Ordering::SeqCst),
        )
    }

    /// What the bot sent, in order, each message as last edited.
    pub fn sent(&self) -> Vec<DiscordSent> {
        let sent = self.inner.sent.lock().unwrap();
        sent.iter().map(|(_, m)| m.clone()).collect()
    }

    /// Edits of the bot's messages so far.
    pub fn edits(&self) -> u32 {
        self.inner.edits.load(Ordering::SeqCst)
    }

    pub fn sent_to(&self, channel: &str) -> Vec<DiscordSent> {
        self.sent().into_iter().filter(|s| s.0 == channel).collect()
    }

    /// The next `n` messages get 429.
    pub fn rate_limit(&self, n: u32) {
        self.inner.rate_limited.store(n, Ordering::SeqCst);
    }
}

fn authorized(s: &Inner, h: &HeaderMap) -> bool {
    h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bot {}", s.token))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"message": "401: Unauthorized", "code": 0})),
    )
        .into_response()
}

async fn gateway_bot(State(s): State<Arc<Inner>>, h: HeaderMap) -> Response {
    if !authorized(&s, &h) {
        return unauthorized();
    }
    Json(json!({"url": *s.ws_url.lock().unwrap(), "shards": 1,
        "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}}))
    .into_response()
}

async fn typing(State(s): State<Arc<Inner>>, h: HeaderMap) -> Response {
    if !authorized(&s, &h) {
        return unauthorized();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// A 429 as Discord sends it, while the test asked for rate limits.
fn rate_limited(s: &Inner) -> Option<Response> {
    s.rate_limited
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .ok()?;
    Some((StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")],
        Json(json!({"message": "You are being rate limited.", "retry_after": 0.5, "global": false})))
        .into_response())
}

async fn create_message(
    State(s): State<Arc<Inner>>,
    Path(channel): Path<String>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&s, &h) {
        return unauthorized();
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let content = v["content"].as_str().unwrap_or_default();
    if content.is_empty()
        || content.chars().count() > 2000
        || !channel.bytes().all(|b| b.is_ascii_digit())
    {
        return (StatusCode::BAD_REQUEST, Json(json!({"message": "Invalid Form Body", "code": 50035,
            "errors": {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}}})))
            .into_response();
    }
    if let Some(r) = rate_limited(&s) {
        return r;
    }
    // enforce_nonce: the same nonce again is the same message.
    let nonce = v["nonce"]
        .as_str()
        .filter(|_| v["enforce_nonce"] == true)
        .map(str::to_owned);
    if let Some(n) = &nonce {
        if let Some((_, id)) = s.nonces.lock().unwrap().iter().find(|(x, _)| x == n) {
            return Json(json!({"id": id, "channel_id": channel, "content": content}))
                .into_response();
        }
    }
    let id = s.ids.fetch_add(1, Ordering::SeqCst).to_string();
    if let Some(n) = nonce {
        s.nonces.lock().unwrap().push((n, id.clone()));
    }
    s.sent.lock().unwrap().push((
        id.clone(),
        (
            channel.clone(),
            content.to_owned(),
            v["message_reference"]["message_id"]
                .as_str()
                .map(str::to_owned),
        ),
    ));
    Json(json!({"id": id, "channel_id": channel, "content": content, "author": {"id": BOT_ID, "bot": true}}))
        .into_response()
}

async fn edit_message(
    State(s): State<Arc<Inner>>,
    Path((channel, message)): Path<(String, String)>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&s, &h) {
        return unauthorized();
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let Some(content) = v["content"].as_str().filter(|c| c.chars().count() <= 2000) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"message": "Invalid Form Body", "code": 50035})),
        )
            .into_response();
    };
    if let Some(r) = rate_limited(&s) {
        return r;
    }
    let mut sent = s.sent.lock().unwrap();
    let Some((_, m)) = sent
        .iter_mut()
        .find(|(id, m)| *id == message && m.0 == channel)
    else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"message": "Unknown Message", "code": 10008})),
        )
            .into_response();
    };
    m.1 = content.to_owned();
    s.edits.fetch_add(1, Ordering::SeqCst);
    Json(json!({"id": message, "channel_id": channel, "content": content, "author": {"id": BOT_ID, "bot": true}}))
        .into_response()
}

/// One gateway connection.
async fn link(s: Arc<Inner>, ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) {
    let (mut tx, mut rx) = ws.split();
    let hello = json!({"op": 10, "d": {"heartbeat_interval": 1000}});
    if tx.send(Ws::text(hello.to_string())).await.is_err() {
        return;
    }
    let (out_tx, mut out_rx) = mpsc::channel::<Ws>(1024);
    let mut mine: Option<mpsc::Sender<Ws>> = None;
    loop {
        tokio::select! {
            m = rx.next() => {
                let Some(Ok(Ws::Text(t))) = m else { return };
                let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
                match v["op"].as_u64() {
                    Some(1) => { let _ = tx.send(Ws::text(json!({"op": 11}).to_string())).await; }
                    Some(2) | Some(6) if v["d"]["token"].as_str() != Some(s.token.as_str()) => {
                        let _ = tx.send(Ws::Close(Some(CloseFrame { code: CloseCode::from(4004), reason: "Authentication failed.".into() }))).await;
                        return;
                    }
                    Some(2) => {
                        s.identifies.fetch_add(1, Ordering::SeqCst);
                        let session = format!("session{}", s.ids.fetch_add(1, Ordering::SeqCst));
                        let ready = {
                            let mut gw = s.gw.lock().unwrap();
                            gw.session = session.clone();
                            gw.events.clear();
                            gw.link = Some(out_tx.clone());
                            let n = s.seq.fetch_add(1, Ordering::SeqCst) + 1;
                            json!({"op": 0, "t": "READY", "s": n, "d": {"v": 10, "session_id": session,
                                "resume_gateway_url": *s.ws_url.lock().unwrap(),
                                "user": {"id": BOT_ID, "username": "clawbot", "bot": true}, "guilds": []}})
                        };
                        mine = Some(out_tx.clone());
                        let _ = tx.send(Ws::text(ready.to_string())).await;
                    }
                    Some(6) => {
                        let (ok, missed) = {
                            let mut gw = s.gw.lock().unwrap();
                            let ok = v["d"]["session_id"].as_str() == Some(gw.session.as_str());
                            let after = v["d"]["seq"].as_u64().unwrap_or(0);
                            if ok {
                                gw.link = Some(out_tx.clone());
                            }
                            (ok, gw.events.iter().filter(|(n, _)| *n > after).map(|(_, e)| e.clone()).collect::<Vec<_>>())
                        };
                        if !ok {
                            let _ = tx.send(Ws::text(json!({"op": 9, "d": false}).to_string())).await;
                            continue;
                        }
                        s.resumes.fetch_add(1, Ordering::SeqCst);
                        mine = Some(out_tx.clone());
                        for e in missed {
                            let _ = tx.send(Ws::text(e.to_string())).await;
                        }
                        let n = s.seq.fetch_add(1, Ordering::SeqCst) + 1;
                        let _ = tx.send(Ws::text(json!({"op": 0, "t": "RESUMED", "s": n, "d": null}).to_string())).await;
                    }
                    _ => {}
                }
            }
            Some(m) = out_rx.recv() => {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        }
        // `drop_link` took this connection's place away: cut it, no close frame.
        if let Some(m) = &mine {
            let still =
                s.gw.lock()
                    .unwrap()
                    .link
                    .as_ref()
                    .is_some_and(|l| l.same_channel(m));
            if !still {
                return;
            }
        }
    }
}
