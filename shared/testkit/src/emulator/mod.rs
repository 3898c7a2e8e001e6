//! An emulator of the model providers' APIs, for tests and benchmarks, each in its
//! documented wire format:
//!
//! - OpenAI Chat Completions: `POST /v1/chat/completions` answers a `chat.completion`
//!   JSON object, or with `"stream": true` a `text/event-stream` of `data:
//!   {chat.completion.chunk}` events ending with `data: [DONE]` (usage in a last chunk
//!   when `stream_options.include_usage`); errors are `{"error": {...}}` bodies with the
//!   real statuses (401 bad key, 400 bad request, 429, 500). `GET /v1/models`.
//! - Anthropic Messages ([`anthropic`]): `POST /v1/messages`.
//! - Google Gemini ([`gemini`]): `POST /v1beta/models/<model>:streamGenerateContent`.
//!
//! The reply is a pure function of the request: `Echo: <last user message>`, or for
//! `repeat <n> <text>` a long answer of `<text>` repeated to `n` bytes, or for `count
//! <n>` the words `w0 … w<n-1>` (a long answer whose pieces can be told apart), or for
//! `code <n>` a Rust code block of `n` lines `let v<i> = *p<i>*;` between two sentences; cut at the
//! request's output token limit (4 bytes a token) with the API's "length" reason. A
//! user message `fail midstream` streams part of an answer, then the API's error event;
//! `reset midstream` streams part of it, then drops the connection; `hang` streams the
//! first event and then nothing, keeping the connection open. An API
//! key `<key>-ratelimited` is always answered 429 with `Retry-After: 1`, and
//! `<key>-billing` 402 (a billing error), so one emulator serves several profiles.
//! Streamed events are written in two pieces each, split inside the JSON, as a network
//! may deliver them. Tool use is scripted by the user's message (see [`script`]):
//! calls are streamed in each API's form (OpenAI `delta.tool_calls` fragments,
//! Anthropic `tool_use` blocks with `input_json_delta`, Gemini `functionCall` parts),
//! and a conversation whose calls and results do not pair up is refused with 400, as
//! OpenAI and Anthropic do.

pub mod anthropic;
pub mod gemini;
mod reply;
pub mod script;

pub use reply::reply_for;

use std::collections::VecDeque;
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

/// Tokens a model asked to think reports having spent on it (OpenAI, Gemini).
pub const REASONING_TOKENS: u64 = 16;

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
    /// While set, streamed answers stop halfway until released.
    hold_mid: Option<watch::Sender<bool>>,
    /// Streams stopped halfway now.
    held_mid: Arc<AtomicU64>,
}

/// A running emulator.
pub struct Emulator {
    pub addr: SocketAddr,
    pub state: Arc<EmulatorState>,
    hold: watch::Sender<bool>,
    hold_mid: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// Starts on a random loopback port.
    pub async fn start(api_key: Option<&str>) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0", api_key).await
    }

    pub async fn start_on(addr: &str, api_key: Option<&str>) -> anyhow::Result<Self> {
        let (hold, _) = watch::channel(false);
        let (hold_mid, _) = watch::channel(false);
        let state = Arc::new(EmulatorState {
            api_key: api_key.map(str::to_owned),
            hold: Some(hold.clone()),
            hold_mid: Some(hold_mid.clone()),
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
            hold_mid,
            task,
        })
    }

    /// `http://127.0.0.1:<port>/v1`: the OpenAI base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://127.0.0.1:<port>`: the Anthropic and Gemini base URL.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Holds every reply (new and waiting requests) until [`Emulator::release`].
    pub fn hold(&self) {
        self.hold.send_replace(true);
    }

    pub fn release(&self) {
        self.hold.send_replace(false);
        self.hold_mid.send_replace(false);
    }

    /// Stops every streamed answer halfway (after some deltas went out) until
    /// [`Emulator::release`].
    pub fn hold_midstream(&self) {
        self.hold_mid.send_replace(true);
    }

    /// Streams stopped halfway now.
    pub fn held_midstream(&self) -> u64 {
        self.state.held_mid.load(Ordering::SeqCst)
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
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1beta/models/{call}", post(gemini::generate))
        .with_state(state)
}

/// What every API's handler does before writing its answer: check the key, parse the
/// body, record it, hold, fail when told to, and compute the reply.
pub(crate) struct Call {
    pub req: Value,
    pub text: String,
    /// The reply was cut at the output token limit.
    pub cut: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `fail midstream`: stream part of the answer, then an error event.
    pub fail_midstream: bool,
    /// How the stream ends: `hang` streams the first event, then nothing; `reset
    /// midstream` streams half the events, then drops the connection.
    pub end: End,
    /// Functions to call instead of answering: (name, arguments as JSON text).
    pub tool_calls: Vec<(String, String)>,
    /// Stop a streamed answer halfway until this gate opens.
    pub midway: Option<Midway>,
}

/// How a streamed answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Complete,
    Hang,
    Reset,
}

/// Where a streamed answer waits halfway.
pub(crate) struct Midway {
    gate: watch::Receiver<bool>,
    held: Arc<AtomicU64>,
}

/// How an API names things in its errors.
pub(crate) trait ApiErrors: Sync {
    fn error(&self, status: StatusCode, message: &str) -> Response;

    /// Whether the API pairs calls and results by id (and refuses unpaired ones).
    fn pairs_calls(&self) -> bool {
        true
    }
}

/// Runs the common steps; `Err` is the response to send instead.
pub(crate) async fn prepare(
    s: &EmulatorState,
    api: &dyn ApiErrors,
    key_given: Option<&str>,
    body: &[u8],
    // The conversation as `{role, content}` (roles `system`, `user`, `assistant`).
    parse: fn(&Value) -> Result<Vec<Value>, String>,
    max_tokens: Option<u64>,
) -> Result<Call, Response> {
    let req: Value = serde_json::from_slice(body)
        .map_err(|e| api.error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))?;
    let messages = parse(&req).map_err(|e| api.error(StatusCode::BAD_REQUEST, &e))?;
    if s.record.load(Ordering::Relaxed) {
        lock(&s.requests).push(req.clone());
    }
    if api.pairs_calls() {
        script::check_pairs(&messages).map_err(|e| api.error(StatusCode::BAD_REQUEST, &e))?;
    }
    // Recorded before the key check: a refused key's request reached the provider.
    if let Some(key) = &s.api_key {
        let given = key_given.unwrap_or_default();
        let script = given.strip_prefix(key.as_str());
        match script {
            Some("") => {}
            Some("-ratelimited") => {
                let mut r = api.error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Rate limit reached for this key.",
                );
                r.headers_mut()
                    .insert("retry-after", axum::http::HeaderValue::from_static("1"));
                return Err(r);
            }
            Some("-billing") => {
                return Err(api.error(
                    StatusCode::PAYMENT_REQUIRED,
                    "billing: your credit balance is too low",
                ))
            }
            _ => return Err(api.error(StatusCode::UNAUTHORIZED, "invalid x-api-key")),
        }
    }
    hold(s).await;
    if let Some(status) = lock(&s.fail_next).pop_front() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(api.error(status, "Emulated failure."));
    }
    let (mut text, tool_calls) = match script::next(&messages, &script::offered(&req)) {
        script::Step::Answer => (reply_for(&messages), Vec::new()),
        script::Step::Done(t) => (t, Vec::new()),
        script::Step::Call(calls) => (String::new(), calls),
    };
    let mut cut = false;
    if let Some(max) = max_tokens.map(|n| n.saturating_mul(4) as usize) {
        if text.len() > max {
            let mut end = max;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            cut = true;
        }
    }
    let prompt_tokens = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(Value::as_str))
        .map(|c| c.len() as u64 / 4 + 1)
        .sum::<u64>();
    let fail_midstream = last_user(&messages) == "fail midstream";
    let end = match last_user(&messages) {
        "hang" => End::Hang,
        "reset midstream" => End::Reset,
        _ => End::Complete,
    };
    let midway = s.hold_mid.as_ref().filter(|h| *h.borrow()).map(|h| Midway {
        gate: h.subscribe(),
        held: s.held_mid.clone(),
    });
    Ok(Call {
        end,
        tool_calls,
        midway,
        completion_tokens: text.len() as u64 / 4 + 1,
        req,
        text,
        cut,
        prompt_tokens,
        fail_midstream,
    })
}

/// Holds before answering while the emulator is held, so a test can kill a process
/// mid-call.
async fn hold(s: &EmulatorState) {
    if let Some(hold) = &s.hold {
        let mut rx = hold.subscribe();
        if *rx.borrow() {
            s.held.fetch_add(1, Ordering::SeqCst);
            let _ = rx.wait_for(|h| !*h).await;
            s.held.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A `text/event-stream` response of these events, each written in two pieces; with
/// [`End::Hang`], only the first event, and then the connection stays open with
/// nothing; with [`End::Reset`], half the events, then the connection is dropped; with
/// a `midway` gate, half the events, then the rest once the gate opens.
pub(crate) fn sse_response(mut events: Vec<String>, end: End, midway: Option<Midway>) -> Response {
    use futures::StreamExt;
    let hang = end == End::Hang;
    if hang {
        events.truncate(1);
    }
    if end == End::Reset {
        events.truncate(events.len() / 2);
    }
    let split = |events: Vec<String>| {
        let pieces = events.into_iter().flat_map(|e| {
            let mut mid = e.len() / 2;
            while !e.is_char_boundary(mid) {
                mid -= 1;
            }
            let (a, b) = e.split_at(mid);
            [Bytes::from(a.to_owned()), Bytes::from(b.to_owned())]
        });
        futures::stream::iter(pieces.map(Ok::<_, std::io::Error>))
    };
    let mut stream = match midway {
        Some(Midway { mut gate, held }) => {
            let rest = events.split_off(events.len() / 2);
            let wait = async move {
                held.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|h| !*h).await;
                held.fetch_sub(1, Ordering::SeqCst);
                split(rest)
            };
            split(events)
                .chain(futures::stream::once(wait).flatten())
                .boxed()
        }
        None => split(events).boxed(),
    };
    if hang {
        stream = stream.chain(futures::stream::pending()).boxed();
    }
    if end == End::Reset {
        // A failing body makes the server abort the connection mid-response.
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "emulated reset");
        stream = stream
            .chain(futures::stream::once(async { Err(reset) }))
            .boxed();
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// The answer split after spaces, like token boundaries.
pub(crate) fn pieces(text: &str) -> Vec<&str> {
    text.split_inclusive(' ').collect()
}

fn last_user(messages: &[Value]) -> &str {
    messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or("")
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

struct OpenAiApi;

impl ApiErrors for OpenAiApi {
    fn error(&self, status: StatusCode, message: &str) -> Response {
        match status.as_u16() {
            401 => error(
                status,
                "invalid_request_error",
                Some("invalid_api_key"),
                "Incorrect API key provided.",
            ),
            400 => error(status, "invalid_request_error", None, message),
            429 => error(status, "rate_limit_error", None, message),
            _ => error(status, "server_error", None, message),
        }
    }
}

fn openai_messages(req: &Value) -> Result<Vec<Value>, String> {
    let msgs = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| "'messages' is a required property".to_owned())?;
    Ok(msgs
        .iter()
        .map(|m| {
            let mut n = json!({"role": m["role"], "content": m["content"].as_str().unwrap_or_default()});
            if let Some(calls) = m["tool_calls"].as_array() {
                n["tool_calls"] = calls
                    .iter()
                    .map(|c| json!({"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}))
                    .collect();
            }
            if let Some(id) = m.get("tool_call_id") {
                n["tool_call_id"] = id.clone();
            }
            n
        })
        .collect())
}

async fn chat(State(s): State<Arc<EmulatorState>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let max = |req: &Value| {
        ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| req.get(*k).and_then(Value::as_u64))
    };
    // The token limit is in the body: peek at it before the common steps.
    let limit = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| max(&v));
    let c = match prepare(&s, &OpenAiApi, bearer, &body, openai_messages, limit).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let req = &c.req;
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("emulator-1")
        .to_owned();
    let finish = if !c.tool_calls.is_empty() {
        "tool_calls"
    } else if c.cut {
        "length"
    } else {
        "stop"
    };
    let served = s.served.load(Ordering::Relaxed);
    let calls: Vec<Value> = c
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, (name, args))| {
            json!({"id": format!("call_emu{served}_{i}"), "type": "function",
                   "function": {"name": name, "arguments": args}})
        })
        .collect();
    // A reasoning model reports the tokens it spent thinking.
    let reasoning = match req.get("reasoning_effort").and_then(Value::as_str) {
        None => 0,
        Some("minimal" | "low" | "medium" | "high") => REASONING_TOKENS,
        Some(other) => {
            return OpenAiApi.error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid value for 'reasoning_effort': '{other}'."),
            )
        }
    };
    let (prompt_tokens, completion_tokens) = (c.prompt_tokens, c.completion_tokens + reasoning);
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
                       "completion_tokens_details": {"reasoning_tokens": reasoning}});
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
        for piece in pieces(&c.text) {
            events.push(chunk(json!({"content": piece}), None));
        }
        for (i, call) in calls.iter().enumerate() {
            // The id and name first, then the arguments in two fragments.
            let args = call["function"]["arguments"].as_str().unwrap_or_default();
            let mut mid = args.len() / 2;
            while !args.is_char_boundary(mid) {
                mid -= 1;
            }
            events.push(chunk(
                json!({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                        "function": {"name": call["function"]["name"], "arguments": ""}}]}),
                None,
            ));
            for part in [&args[..mid], &args[mid..]] {
                events.push(chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": part}}]}),
                    None,
                ));
            }
        }
        if c.fail_midstream {
            events.push(format!(
                "data: {}\n\n",
                json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}})
            ));
        } else {
            events.push(chunk(json!({}), Some(finish)));
            if include_usage {
                events.push(format!(
                    "data: {}\n\n",
                    json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage})
                ));
            }
            events.push("data: [DONE]\n\n".to_owned());
        }
        sse_response(events, c.end, c.midway)
    } else {
        Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": if calls.is_empty() {
                json!({"role": "assistant", "content": c.text, "refusal": null})
            } else {
                json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": calls})
            }, "logprobs": null, "finish_reason": finish}],
            "usage": usage,
        }))
        .into_response()
    };
    s.busy_nanos
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    resp
}
