//! An emulator of the OpenAI Chat Completions API, for tests and benchmarks.
//!
//! Wire format as documented by OpenAI: `POST /v1/chat/completions` answers a
//! `chat.completion` JSON object, or with `"stream": true` a `text/event-stream` of
//! `data: {chat.completion.chunk}` events ending with `data: [DONE]` (usage in a last
//! chunk when `stream_options.include_usage`); errors are `{"error": {...}}` bodies with
//! the real statuses (401 bad key, 400 bad request, 429, 500). `GET /v1/models` lists
//! the one model.
//!
//! The reply is a pure function of the request: `Echo: <last user message>`, or for
//! `repeat <n> <text>` a long answer of `<text>` repeated to `n` bytes; cut at
//! `max_tokens` (4 bytes a token) with `finish_reason: "length"`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::watch;

/// Shared, scriptable state of an emulator.
#[derive(Default)]
pub struct EmulatorState {
    /// Bodies of every chat request received, in order.
    pub requests: Mutex<Vec<Value>>,
    /// Statuses to answer the next requests with, one each.
    fail_next: Mutex<VecDeque<u16>>,
    /// Requester must present this bearer key when set.
    pub api_key: Option<String>,
    /// Requests currently held.
    pub held: AtomicU64,
    /// Nanoseconds spent inside the handler, summed (benchmarks subtract it).
    pub busy_nanos: AtomicU64,
    pub served: AtomicU64,
    /// Record request bodies (tests); benchmarks turn it off to measure the suite.
    pub record: std::sync::atomic::AtomicBool,
    hold: Option<watch::Sender<bool>>,
}

/// A running emulator.
pub struct Emulator {
    pub addr: SocketAddr,
    pub state: Arc<EmulatorState>,
    hold: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// Starts on a random loopback port.
    pub async fn start(api_key: Option<&str>) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", api_key).await
    }

    pub async fn start_on(addr: &str, api_key: Option<&str>) -> anyhow::Result<Self> {
        let (hold, _) = watch::channel(false);
        let state = Arc::new(EmulatorState {
            api_key: api_key.map(str::to_owned),
            hold: Some(hold.clone()),
            record: true.into(),
            ..Default::default()
        });
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            state,
            hold,
            task,
        })
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Holds every reply (new and waiting requests) until [`Emulator::release`].
    pub fn hold(&self) {
        self.hold.send_replace(true);
    }

    pub fn release(&self) {
        self.hold.send_replace(false);
    }

    /// Answers the next requests with these HTTP statuses.
    pub fn fail_next(&self, statuses: &[u16]) {
        lock(&self.state.fail_next).extend(statuses.iter().copied());
    }

    pub fn requests(&self) -> Vec<Value> {
        lock(&self.state.requests).clone()
    }

    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The emulator's routes over a given state (the binary serves the same).
pub fn router(state: Arc<EmulatorState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .with_state(state)
}

fn error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}})),
    )
        .into_response()
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "emulator-1", "object": "model", "created": 0, "owned_by": "emulator"}]}),
    )
}

/// The reply the emulator gives to a list of messages.
pub fn reply_for(messages: &[Value]) -> String {
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or("");
    // `repeat <n> <text>`: a long answer (a model writing at length), `<text>` repeated
    // to `n` bytes (at most 4 MiB).
    if let Some((n, text)) = last_user
        .strip_prefix("repeat ")
        .and_then(|r| r.split_once(' '))
        .and_then(|(n, t)| Some((n.parse::<usize>().ok()?.min(4 << 20), t)))
        .filter(|(_, t)| !t.is_empty())
    {
        let mut long: String = text.chars().cycle().take(n).collect();
        long.truncate(n);
        return format!("Echo: {long}");
    }
    format!("Echo: {last_user}")
}

async fn chat(State(s): State<Arc<EmulatorState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    if let Some(key) = &s.api_key {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {key}"));
        if !ok {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                "Incorrect API key provided.",
            );
        }
    }
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                &format!("We could not parse the JSON body of your request. ({e})"),
            )
        }
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "'messages' is a required property",
        );
    };
    if s.record.load(Ordering::Relaxed) {
        lock(&s.requests).push(req.clone());
    }
    // Hold before failing or answering, so a test can kill a process mid-call.
    if let Some(hold) = &s.hold {
        let mut rx = hold.subscribe();
        if *rx.borrow() {
            s.held.fetch_add(1, Ordering::SeqCst);
            let _ = rx.wait_for(|h| !*h).await;
            s.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let fail = lock(&s.fail_next).pop_front();
    if let Some(status) = fail {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = if status == StatusCode::TOO_MANY_REQUESTS {
            "rate_limit_error"
        } else {
            "server_error"
        };
        return error(status, kind, None, "Emulated failure.");
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("emulator-1")
        .to_owned();
    let mut text = reply_for(&messages);
    // `max_tokens` (or `max_completion_tokens`): an answer longer than that many
    // emulator tokens (4 bytes each) is cut there, with `finish_reason: "length"`.
    let limit = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| req.get(*k).and_then(Value::as_u64));
    let mut finish = "stop";
    if let Some(max) = limit.map(|n| n.saturating_mul(4) as usize) {
        if text.len() > max {
            let mut cut = max;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            finish = "length";
        }
    }
    let prompt_tokens = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(|c| c.len() as u64 / 4 + 1)
        .sum::<u64>();
    let completion_tokens = text.len() as u64 / 4 + 1;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens});
    let id = format!("chatcmpl-emu{}", s.served.fetch_add(1, Ordering::Relaxed));
    let created = 1_700_000_000u64;
    let resp = if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let chunk = |delta: Value, finish: Option<&str>| {
            format!(
                "data: {}\n\n",
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
            )
        };
        let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        // Split after spaces, like token boundaries.
        for piece in text.split_inclusive(' ') {
            events.push(chunk(json!({"content": piece}), None));
        }
        events.push(chunk(json!({}), Some(finish)));
        if include_usage {
            events.push(format!(
                "data: {}\n\n",
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage})
            ));
        }
        events.push("data: [DONE]\n\n".to_owned());
        let stream = futures::stream::iter(
            events
                .into_iter()
                .map(|e| Ok::<_, Infallible>(Bytes::from(e))),
        );
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(stream))
            .expect("valid response")
    } else {
        Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }))
        .into_response()
    };
    s.busy_nanos
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    resp
}
