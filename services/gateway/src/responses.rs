//! The OpenAI Responses API: `POST /v1/responses` with text and function calls,
//! plain or streamed with the Responses event types (`response.created`,
//! `response.output_text.delta`, `response.function_call_arguments.delta`,
//! `response.completed`, ...). A response belongs to a session: `previous_response_id`
//! continues it (the history is the agent's, not resent by the client); without one a
//! request opens a session of its own, or uses `x-clawbus-session-key` or `user` as the
//! chat completions do.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use clawbus_wire::{ChatMessage, FunctionCall, OutboundMessage, Role, ToolSpec};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{
    agent_for_model, final_reply, read_body, session_for, submit, Ask, Gateway, SESSION_HEADER,
};
use crate::openai::{valid_function_name, ApiError, Prompt, MAX_TOOLS};
use crate::replies::{Registration, ReplyEvent};
use crate::sse::{Continuation, Diverged};

/// The part of a Responses request the gateway uses; other fields are accepted and
/// ignored.
#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    pub model: String,
    pub input: Input,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Vec<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Input {
    Text(String),
    Items(Vec<Value>),
}

/// The text of an item's `content`: a string, or its text parts.
fn text_of(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p["type"].as_str(), p["text"].as_str()) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => out.push_str(t),
                    (t, _) => {
                        return Err(ApiError::invalid(format!(
                            "unsupported content part type `{}`: only text is supported",
                            t.unwrap_or("?").chars().take(40).collect::<String>()
                        )))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(
            "content must be a string or an array of text parts",
        )),
    }
}

/// The input as the agent's prompt: the new user text (empty when the input ends with
/// the caller's function results), system text and earlier conversation.
pub fn prompt(req: &ResponsesRequest) -> Result<Prompt, ApiError> {
    let mut system: Vec<String> = req.instructions.iter().cloned().collect();
    let items = match &req.input {
        Input::Text(t) if t.trim().is_empty() => return Err(ApiError::invalid("`input` is empty")),
        Input::Text(t) => {
            return Ok(Prompt {
                text: t.clone(),
                system: (!system.is_empty()).then(|| system.join("\n\n")),
                context: Vec::new(),
            })
        }
        Input::Items(items) if items.is_empty() => {
            return Err(ApiError::invalid("`input` is empty"))
        }
        Input::Items(items) => items,
    };
    let mut context: Vec<ChatMessage> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let kind = item["type"]
            .as_str()
            .unwrap_or(if item.get("role").is_some() {
                "message"
            } else {
                ""
            });
        match kind {
            "message" => {
                let text = text_of(&item["content"])?;
                match item["role"].as_str().unwrap_or_default() {
                    "system" | "developer" => system.push(text),
                    "user" => context.push(ChatMessage::new(Role::User, text)),
                    "assistant" => context.push(ChatMessage::new(Role::Assistant, text)),
                    other => {
                        return Err(ApiError::invalid(format!(
                            "input[{i}]: unknown role `{}`",
                            other.chars().take(40).collect::<String>()
                        )))
                    }
                }
            }
            "function_call" => {
                let call = FunctionCall {
                    id: field(item, "call_id", i)?,
                    name: field(item, "name", i)?,
                    arguments: item["arguments"].as_str().unwrap_or("{}").to_owned(),
                    signature: None,
                };
                // Calls made together belong to one assistant message.
                match context.last_mut() {
                    Some(m) if m.role == Role::Assistant => m.tool_calls.push(call),
                    _ => context.push(ChatMessage {
                        tool_calls: vec![call],
                        ..ChatMessage::new(Role::Assistant, "")
                    }),
                }
            }
            "function_call_output" => {
                let output = match &item["output"] {
                    Value::String(s) => s.clone(),
                    other => text_of(other)?,
                };
                context.push(ChatMessage {
                    tool_call_id: Some(field(item, "call_id", i)?),
                    ..ChatMessage::new(Role::Tool, output)
                });
            }
            "reasoning" => {}
            other => {
                return Err(ApiError::invalid(format!(
                    "input[{i}]: unsupported item type `{}`",
                    other.chars().take(40).collect::<String>()
                )))
            }
        }
    }
    let text = match context.last() {
        Some(m) if m.role == Role::User => {
            let t = context.pop().map(|m| m.content).unwrap_or_default();
            if t.trim().is_empty() {
                return Err(ApiError::invalid("the last user message is empty"));
            }
            t
        }
        Some(m) if m.role == Role::Tool => String::new(),
        _ => {
            return Err(ApiError::invalid(
                "the input must end with a user message or function call outputs",
            ))
        }
    };
    Ok(Prompt {
        text,
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        context,
    })
}

fn field(item: &Value, name: &str, i: usize) -> Result<String, ApiError> {
    item[name]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ApiError::invalid(format!("input[{i}]: `{name}` is required")))
}

/// The request's function tools (Responses form: `{type, name, description,
/// parameters}`).
pub fn tools(req: &ResponsesRequest) -> Result<Vec<ToolSpec>, ApiError> {
    if req.tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_TOOLS} tools per request"
        )));
    }
    req.tools
        .iter()
        .map(|t| {
            if t["type"] != "function" {
                return Err(ApiError::invalid(format!(
                    "unsupported tool type `{}`: only `function` tools are supported",
                    t["type"]
                        .as_str()
                        .unwrap_or("?")
                        .chars()
                        .take(40)
                        .collect::<String>()
                )));
            }
            let name = t["name"].as_str().unwrap_or_default();
            if !valid_function_name(name) {
                return Err(ApiError::invalid(format!(
                    "invalid function name `{}`: letters, digits, `_` and `-`, at most 64",
                    name.chars().take(64).collect::<String>()
                )));
            }
            let parameters = match &t["parameters"] {
                Value::Null => String::new(),
                p @ Value::Object(_) => p.to_string(),
                _ => {
                    return Err(ApiError::invalid(format!(
                        "the parameters of `{name}` must be a JSON Schema object"
                    )))
                }
            };
            Ok(ToolSpec {
                name: name.to_owned(),
                description: t["description"].as_str().unwrap_or_default().to_owned(),
                parameters,
            })
        })
        .collect()
}

/// `tool_choice` in the agent's (chat completions) form.
fn tool_choice(v: &Option<Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(Some(s.clone()))
        }
        Some(o) if o["type"] == "function" && o["name"].is_string() => Ok(Some(
            json!({"type": "function", "function": {"name": o["name"]}}).to_string(),
        )),
        Some(_) => Err(ApiError::invalid(
            "`tool_choice` must be `auto`, `none`, `required` or {\"type\": \"function\", \"name\": ...}",
        )),
    }
}

/// A response id names its session, so that `previous_response_id` continues it:
/// `resp_<hex of the session key>_<request id>`.
pub fn response_id(session_key: &str, request_id: &str) -> String {
    let hex: String = session_key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("resp_{hex}_{request_id}")
}

/// The session a response id belongs to, when it is one of this agent's.
pub fn session_of(id: &str, agent: &str) -> Option<String> {
    let (hex, _) = id.strip_prefix("resp_")?.rsplit_once('_')?;
    if hex.len() % 2 != 0 || hex.len() > 1024 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    let key = String::from_utf8(bytes?).ok()?;
    key.starts_with(&format!("agent:{agent}:")).then_some(key)
}

/// A Responses request read from its body, as the handler uses it.
#[derive(Debug)]
pub struct ResponsesAsk {
    pub request: ResponsesRequest,
    pub prompt: Prompt,
    pub tools: Vec<ToolSpec>,
    pub tool_choice: Option<String>,
}

/// Reads a Responses body: the request, its prompt, its functions and its tool
/// choice, or the error the caller is answered with (the handler's only reading of a
/// body).
pub fn parse_responses(body: &[u8]) -> Result<ResponsesAsk, ApiError> {
    let request: ResponsesRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON request body: {e}")))?;
    Ok(ResponsesAsk {
        prompt: prompt(&request)?,
        tools: tools(&request)?,
        tool_choice: tool_choice(&request.tool_choice)?,
        request,
    })
}

pub(crate) async fn responses(State(gw): State<std::sync::Arc<Gateway>>, req: Request) -> Response {
    let started = std::time::Instant::now();
    crate::api::observe(&gw, "responses", started, respond(&gw, req).await)
}

async fn respond(gw: &std::sync::Arc<Gateway>, req: Request) -> Result<Response, ApiError> {
    let (headers, bytes) = read_body(gw, req).await?;
    let ResponsesAsk {
        request,
        prompt,
        tools,
        tool_choice,
    } = parse_responses(&bytes)?;
    let agent = agent_for_model(gw, &request.model)?;
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let (session_key, context) = match &request.previous_response_id {
        Some(prev) => match session_of(prev, &agent) {
            Some(k) if !headers.contains_key(SESSION_HEADER) => (k, false),
            Some(_) => {
                return Err(ApiError::invalid(format!(
                    "give either previous_response_id or {SESSION_HEADER}, not both"
                )))
            }
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    Some("previous_response_not_found".into()),
                    format!(
                        "previous response `{}` not found",
                        prev.chars().take(100).collect::<String>()
                    ),
                ))
            }
        },
        None => session_for(&headers, request.user.as_deref(), &agent, &request_id)?,
    };
    let id = response_id(&session_key, &request_id);
    let meta = Meta {
        id,
        created_at: clawbus_wire::now_ms() / 1000,
        model: request.model.clone(),
        previous: request.previous_response_id.clone(),
        instructions: request.instructions.clone(),
        tools: request.tools.clone(),
    };
    let (reg, permit) = submit(
        gw,
        Ask {
            request_id,
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
    if request.stream {
        let body = Body::from_stream(event_stream(gw.clone(), reg, meta, permit));
        return Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .header("x-accel-buffering", "no")
            .body(body)
            .expect("valid response"));
    }
    let out = final_reply(gw, reg, permit).await?;
    Ok(Json(meta.response(&out, &output(&meta.id, &out))).into_response())
}

/// What a response says of itself besides its output.
struct Meta {
    id: String,
    created_at: i64,
    model: String,
    previous: Option<String>,
    instructions: Option<String>,
    tools: Vec<Value>,
}

impl Meta {
    /// The response object: `in_progress` without a reply yet.
    fn response(&self, out: &OutboundMessage, output: &[Value]) -> Value {
        let (status, incomplete) = match out.finish_reason.as_deref() {
            Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
            _ => ("completed", Value::Null),
        };
        let mut r = self.skeleton(status);
        r["output"] = output.into();
        r["incomplete_details"] = incomplete;
        r["model"] = out.model.as_deref().unwrap_or(&self.model).into();
        let u = out.usage.unwrap_or_default();
        r["usage"] = json!({
            "input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens,
        });
        r
    }

    fn skeleton(&self, status: &str) -> Value {
        json!({
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "error": null, "incomplete_details": null,
            "instructions": self.instructions, "model": self.model, "output": [],
            "parallel_tool_calls": true, "previous_response_id": self.previous,
            "tool_choice": "auto", "tools": self.tools, "text": {"format": {"type": "text"}},
            "truncation": "disabled", "metadata": {}, "usage": null,
        })
    }
}

fn message_id(response_id: &str) -> String {
    format!("msg_{}", response_id.rsplit('_').next().unwrap_or_default())
}

fn message_item(response_id: &str, text: &str, status: &str) -> Value {
    let content: Vec<Value> = if status == "completed" {
        vec![json!({"type": "output_text", "text": text, "annotations": []})]
    } else {
        Vec::new()
    };
    json!({"type": "message", "id": message_id(response_id), "status": status,
           "role": "assistant", "content": content})
}

fn call_item(c: &FunctionCall, status: &str, arguments: &str) -> Value {
    json!({"type": "function_call", "id": format!("fc_{}", c.id), "call_id": c.id,
           "name": c.name, "arguments": arguments, "status": status})
}

/// The output items of a reply: its text as a message, then its function calls.
fn output(response_id: &str, out: &OutboundMessage) -> Vec<Value> {
    let mut items = Vec::new();
    if !out.text.is_empty() || out.tool_calls.is_empty() {
        items.push(message_item(response_id, &out.text, "completed"));
    }
    items.extend(
        out.tool_calls
            .iter()
            .map(|c| call_item(c, "completed", &c.arguments)),
    );
    items
}

/// Writes the Responses events of one reply, numbered.
struct Events {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    seq: u64,
}

impl Events {
    async fn send(&mut self, mut ev: Value) -> bool {
        ev["sequence_number"] = self.seq.into();
        self.seq += 1;
        let kind = ev["type"].as_str().unwrap_or("error").to_owned();
        self.tx
            .send(Bytes::from(format!("event: {kind}\ndata: {ev}\n\n")))
            .await
            .is_ok()
    }
}

fn event_stream(
    gw: std::sync::Arc<Gateway>,
    mut reg: Registration,
    meta: Meta,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let _permit = permit;
        gw.metrics.waiting.inc();
        let mut ev = Events { tx, seq: 0 };
        let item_id = message_id(&meta.id);
        ev.send(json!({"type": "response.created", "response": meta.skeleton("in_progress")}))
            .await;
        ev.send(json!({"type": "response.in_progress", "response": meta.skeleton("in_progress")}))
            .await;
        let mut text = Continuation::default();
        let mut started = false;
        let deadline = tokio::time::Instant::now() + gw.timeout;
        let failed = |code: &str, message: &str| {
            let mut r = meta.skeleton("failed");
            r["error"] = json!({"code": code, "message": message});
            json!({"type": "response.failed", "response": r})
        };
        loop {
            let piece = match tokio::time::timeout_at(deadline, reg.rx.recv()).await {
                Ok(Some(ReplyEvent::Delta(d))) => text.delta(d.attempt, d.offset, &d.text),
                Ok(Some(ReplyEvent::Final(out))) => {
                    if let Some(err) = &out.error {
                        ev.send(failed(&err.code, &err.message)).await;
                        break;
                    }
                    let rest = match text.finish(&out.text) {
                        Ok(rest) => rest,
                        Err(Diverged) => {
                            ev.send(failed("reply_restarted", "the turn was interrupted and its retry produced a different reply; the complete reply is kept in the session history")).await;
                            break;
                        }
                    };
                    if !rest.is_empty() || (!started && out.tool_calls.is_empty()) {
                        start_message(&mut ev, &item_id, &mut started).await;
                        if !rest.is_empty() {
                            text_delta(&mut ev, &item_id, &rest).await;
                        }
                    }
                    if started {
                        let part =
                            json!({"type": "output_text", "text": out.text, "annotations": []});
                        ev.send(json!({"type": "response.output_text.done", "item_id": item_id, "output_index": 0, "content_index": 0, "text": out.text})).await;
                        ev.send(json!({"type": "response.content_part.done", "item_id": item_id, "output_index": 0, "content_index": 0, "part": part})).await;
                        ev.send(json!({"type": "response.output_item.done", "output_index": 0, "item": message_item(&meta.id, &out.text, "completed")})).await;
                    }
                    let first = usize::from(started);
                    for (i, c) in out.tool_calls.iter().enumerate() {
                        let (index, item) = (first + i, format!("fc_{}", c.id));
                        ev.send(json!({"type": "response.output_item.added", "output_index": index, "item": call_item(c, "in_progress", "")})).await;
                        ev.send(json!({"type": "response.function_call_arguments.delta", "item_id": item, "output_index": index, "delta": c.arguments})).await;
                        ev.send(json!({"type": "response.function_call_arguments.done", "item_id": item, "output_index": index, "arguments": c.arguments})).await;
                        ev.send(json!({"type": "response.output_item.done", "output_index": index, "item": call_item(c, "completed", &c.arguments)})).await;
                    }
                    let done = meta.response(&out, &output(&meta.id, &out));
                    let kind = if done["status"] == "incomplete" {
                        "response.incomplete"
                    } else {
                        "response.completed"
                    };
                    ev.send(json!({"type": kind, "response": done})).await;
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    ev.send(failed("timeout", "no reply in time")).await;
                    break;
                }
            };
            match piece {
                Ok(Some(p)) => {
                    start_message(&mut ev, &item_id, &mut started).await;
                    if !text_delta(&mut ev, &item_id, &p).await {
                        break;
                    }
                }
                Ok(None) => {}
                Err(Diverged) => {
                    ev.send(failed("reply_restarted", "the turn was interrupted and its retry produced a different reply; the complete reply is kept in the session history")).await;
                    break;
                }
            }
        }
        gw.metrics.waiting.dec();
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|b| b.map(Ok)))
}

async fn start_message(ev: &mut Events, item_id: &str, started: &mut bool) {
    if std::mem::replace(started, true) {
        return;
    }
    ev.send(json!({"type": "response.output_item.added", "output_index": 0,
                   "item": {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": []}}))
        .await;
    ev.send(json!({"type": "response.content_part.added", "item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": []}}))
        .await;
}

async fn text_delta(ev: &mut Events, item_id: &str, delta: &str) -> bool {
    ev.send(json!({"type": "response.output_text.delta", "item_id": item_id, "output_index": 0, "content_index": 0, "delta": delta}))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: Value) -> ResponsesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn response_ids_name_their_session() {
        let id = response_id("agent:main:responses:abc", "r1");
        assert_eq!(
            session_of(&id, "main").as_deref(),
            Some("agent:main:responses:abc")
        );
        assert_eq!(session_of(&id, "other"), None, "another agent's session");
        for bad in ["resp_zz_1", "resp_abc_1", "nope", "resp_", "resp_6_1"] {
            assert_eq!(session_of(bad, "main"), None, "{bad}");
        }
    }

    #[test]
    fn input_items_become_a_prompt() {
        let p = prompt(&req(json!({"model": "clawbus", "instructions": "be brief", "input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "c2", "output": "noon"},
        ]})))
        .unwrap();
        assert_eq!(p.text, "");
        assert_eq!(p.system.as_deref(), Some("be brief"));
        assert_eq!(p.context.len(), 4);
        assert_eq!(p.context[1].tool_calls.len(), 2, "calls made together");
        let p = prompt(&req(json!({"model": "m", "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]})))
        .unwrap();
        assert_eq!(p.text, "hi");
    }

    #[test]
    fn bad_inputs_are_refused() {
        for bad in [
            json!({"model": "m", "input": ""}),
            json!({"model": "m", "input": []}),
            json!({"model": "m", "input": [{"role": "wizard", "content": "x"}]}),
            json!({"model": "m", "input": [{"role": "assistant", "content": "x"}]}),
            json!({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}),
            json!({"model": "m", "input": [{"type": "input_image", "image_url": "x"}]}),
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
        ] {
            assert!(prompt(&req(bad.clone())).is_err(), "{bad}");
        }
        for bad in [
            json!([{"type": "web_search"}]),
            json!([{"type": "function", "name": "a b"}]),
            json!([{"type": "function", "name": "f", "parameters": 3}]),
        ] {
            let r = req(json!({"model": "m", "input": "x", "tools": bad}));
            assert!(tools(&r).is_err(), "{bad}");
        }
        assert!(tool_choice(&Some(json!({"type": "function", "name": "f"}))).is_ok());
        assert!(tool_choice(&Some(json!("maybe"))).is_err());
    }
}
