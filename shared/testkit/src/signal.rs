//! An emulator of signal-cli's HTTP daemon (`signal-cli -a +NUMBER daemon --http`), the
//! documented interface the channels service's Signal adapter uses:
//! `POST /api/v1/rpc` (JSON-RPC 2.0: `send`, with `editTimestamp` an edit of the message
//! sent at that timestamp — applied as Signal apps do, at most ten times —,
//! `sendTyping`; a body that is not
//! `application/json` gets 415, an unknown method error -32601, bad params -32602),
//! `GET /api/v1/events` (Server-Sent Events `id:`/`event:receive`/`data:` with the JSON
//! of `{envelope, account}`; the last 1000 events are kept and replayed after a
//! reconnecting client's `Last-Event-ID`), `GET /api/v1/check`. Events are written as
//! bytes, so a test can send what a hostile or broken daemon would
//! ([`SignalEmulator::emit_raw`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// What the bot sent: (recipient or `group:<id>`, text, quoted timestamp).
pub type SignalSent = (String, String, Option<i64>);

struct Inner {
    number: String,
    events: Mutex<Vec<(i64, Vec<u8>)>>,
    next_id: AtomicI64,
    live: broadcast::Sender<(i64, Vec<u8>)>,
    /// What the bot sent: (timestamp, message as last edited, edits applied).
    sent: Mutex<Vec<(i64, SignalSent, u32)>>,
    /// Edits of no message the bot sent, or beyond the tenth: apps ignore them.
    ignored_edits: AtomicI64,
    clock: AtomicI64,
    /// Sends wait once this many were made (negative: never), until released.
    hold_after: AtomicI64,
    hold: tokio::sync::watch::Sender<bool>,
    held: AtomicI64,
}

pub struct SignalEmulator {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SignalEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SignalEmulator {
    /// A daemon for the account `number`.
    pub async fn start(number: &str) -> anyhow::Result<SignalEmulator> {
        let (live, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            number: number.to_owned(),
            events: Mutex::new(Vec::new()),
            next_id: AtomicI64::new(1),
            live,
            sent: Mutex::new(Vec::new()),
            ignored_edits: AtomicI64::new(0),
            clock: AtomicI64::new(1_700_000_000_000),
            hold_after: AtomicI64::new(-1),
            hold: tokio::sync::watch::channel(false).0,
            held: AtomicI64::new(0),
        });
        let app = Router::new()
            .route("/api/v1/rpc", post(rpc))
            .route("/api/v1/events", get(events))
            .route("/api/v1/check", get(|| async { StatusCode::OK }))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(SignalEmulator { addr, inner, task })
    }

    /// The daemon's URL (`[channels.signal] http_url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn emit(&self, envelope: Value) {
        let data = json!({"envelope": envelope, "account": self.inner.number}).to_string();
        self.emit_raw(data.as_bytes());
    }

    /// A `receive` event whose data is `data` as it is (one `data:` line per line of
    /// it, bytes that are not UTF-8 or not JSON included); its event id.
    pub fn emit_raw(&self, data: &[u8]) -> i64 {
        let id = self.inner.next_id.fetch_add(1, Ordering::SeqCst);
        let mut evs = self.inner.events.lock().unwrap();
        evs.push((id, data.to_vec()));
        if evs.len() > 1000 {
            evs.remove(0);
        }
        let _ = self.inner.live.send((id, data.to_vec()));
        id
    }

    /// A message from `from` to the bot; its timestamp.
    pub fn dm(&self, from: &str, text: &str) -> i64 {
        self.message(from, text, json!(null), json!([]))
    }

    /// A message in group `group`, mentioning the bot when `mention`.
    pub fn group(&self, group: &str, from: &str, text: &str, mention: bool) -> i64 {
        let mentions = if mention {
            json!([{"name": self.inner.number, "number": self.inner.number, "uuid": "bot-uuid", "start": 0, "length": 1}])
        } else {
            json!([])
        };
        let text = if mention {
            format!("\u{fffc} {text}")
        } else {
            text.to_owned()
        };
        self.message(
            from,
            &text,
            json!({"groupId": group, "type": "DELIVER"}),
            mentions,
        )
    }

    fn message(&self, from: &str, text: &str, group: Value, mentions: Value) -> i64 {
        let ts = self.inner.clock.fetch_add(1, Ordering::SeqCst);
        let mut dm = json!({"timestamp": ts, "message": text, "expiresInSeconds": 0,
            "viewOnce": false, "mentions": mentions, "attachments": []});
        if !group.is_null() {
            dm["groupInfo"] = group;
        }
        // A receipt and a typing notice around it, as the real stream has.
        self.emit(json!({"source": from, "sourceNumber": from, "sourceUuid": format!("uuid-{from}"),
            "sourceDevice": 1, "timestamp": ts, "typingMessage": {"action": "STARTED", "timestamp": ts}}));
        self.emit(json!({"source": from, "sourceNumber": from, "sourceUuid": format!("uuid-{from}"),
            "sourceName": format!("Person {from}"), "sourceDevice": 1, "timestamp": ts, "dataMessage": dm}));
        ts
    }

    /// Once `n` messages were sent in all, further sends wait until
    /// [`Self::release_failing`].
    pub fn hold_sends_after(&self, n: usize) {
        self.inner.hold_after.store(n as i64, Ordering::SeqCst);
        self.inner.hold.send_replace(true);
    }

    /// Sends waiting at the hold.
    pub fn held(&self) -> i64 {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Ends the hold; the sends that waited fail (signal-cli never sent them).
    pub fn release_failing(&self) {
        self.inner.hold_after.store(-1, Ordering::SeqCst);
        self.inner.hold.send_replace(false);
    }

    /// Everything the bot sent.
    pub fn sent(&self) -> Vec<SignalSent> {
        let sent = self.inner.sent.lock().unwrap();
        sent.iter().map(|(_, m, _)| m.clone()).collect()
    }

    /// Edits applied, and edits ignored (of no message of the bot's, or past ten).
    pub fn edits(&self) -> (u32, i64) {
        let applied = self.inner.sent.lock().unwrap().iter().map(|e| e.2).sum();
        (applied, self.inner.ignored_edits.load(Ordering::SeqCst))
    }

    /// What the bot sent to `chat` (a number or `group:<id>`).
    pub fn sent_to(&self, chat: &str) -> Vec<SignalSent> {
        self.sent().into_iter().filter(|s| s.0 == chat).collect()
    }
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Response {
    Json(json!({"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": null}, "id": id}))
        .into_response()
}

async fn rpc(State(s): State<Arc<Inner>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let json_body = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return rpc_error(&Value::Null, -32700, "Parse error");
    };
    let id = req["id"].clone();
    let p = &req["params"];
    match req["method"].as_str() {
        None => rpc_error(&id, -32600, "method field must be set"),
        Some("send") => {
            let chat = match (p["recipient"].as_array(), p["groupId"].as_str()) {
                (Some(r), None)
                    if r.len() == 1 && r[0].as_str().is_some_and(|n| n.starts_with('+')) =>
                {
                    r[0].as_str().unwrap_or_default().to_owned()
                }
                (None, Some(g)) if !g.is_empty() => format!("group:{g}"),
                _ => return rpc_error(&id, -32602, "Invalid recipient"),
            };
            let Some(text) = p["message"].as_str() else {
                return rpc_error(&id, -32602, "Missing message");
            };
            let after = s.hold_after.load(Ordering::SeqCst);
            if after >= 0 && s.sent.lock().unwrap().len() as i64 >= after {
                let mut rx = s.hold.subscribe();
                s.held.fetch_add(1, Ordering::SeqCst);
                let _ = rx.wait_for(|h| !h).await;
                s.held.fetch_sub(1, Ordering::SeqCst);
                return rpc_error(&id, -32603, "Failed to send message");
            }
            let ts = s.clock.fetch_add(1, Ordering::SeqCst);
            let mut sent = s.sent.lock().unwrap();
            match p["editTimestamp"].as_i64() {
                Some(target) => {
                    match sent
                        .iter_mut()
                        .find(|(t, m, _)| *t == target && m.0 == chat)
                    {
                        Some((_, m, edits)) if *edits < 10 => {
                            m.1 = text.to_owned();
                            *edits += 1;
                        }
                        _ => {
                            s.ignored_edits.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                None => sent.push((ts, (chat, text.to_owned(), p["quoteTimestamp"].as_i64()), 0)),
            }
            drop(sent);
            Json(json!({"jsonrpc": "2.0", "result": {"timestamp": ts, "results": [{"type": "SUCCESS"}]}, "id": id}))
                .into_response()
        }
        Some("sendTyping") => {
            Json(json!({"jsonrpc": "2.0", "result": {}, "id": id})).into_response()
        }
        Some(_) => rpc_error(&id, -32601, "Method not implemented"),
    }
}

/// One event as the daemon writes it on the stream.
fn frame(id: i64, data: &[u8]) -> bytes::Bytes {
    let mut out = format!("id:{id}\nevent:receive\n").into_bytes();
    for line in data.split(|b| *b == b'\n') {
        out.extend_from_slice(b"data:");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
    out.into()
}

async fn events(State(s): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    let after: Option<i64> = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let rx = s.live.subscribe();
    let known = after.is_some_and(|a| s.events.lock().unwrap().iter().any(|(i, _)| *i == a));
    // Replay what the client missed (everything kept when its id is unknown).
    let backlog: Vec<(i64, Vec<u8>)> = match after {
        Some(a) if known => s
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|(i, _)| *i > a)
            .cloned()
            .collect(),
        Some(_) => s.events.lock().unwrap().clone(),
        None => Vec::new(),
    };
    let last_replayed = backlog
        .last()
        .map(|(i, _)| *i)
        .unwrap_or(after.unwrap_or(0));
    let stream = futures::stream::unfold(
        (backlog.into_iter(), last_replayed, rx),
        |(mut backlog, last, mut rx)| async move {
            if let Some((i, d)) = backlog.next() {
                let f = frame(i, &d);
                return Some((
                    Ok::<_, std::convert::Infallible>(f),
                    (backlog, i.max(last), rx),
                ));
            }
            loop {
                let next = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await;
                match next {
                    // A keep-alive comment, as the real daemon sends.
                    Err(_) => {
                        return Some((Ok(bytes::Bytes::from_static(b":\n\n")), (backlog, last, rx)))
                    }
                    Ok(Ok((i, d))) if i > last => {
                        return Some((Ok(frame(i, &d)), (backlog, i, rx)));
                    }
                    Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    Ok(Err(_)) => return None,
                }
            }
        },
    );
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}
