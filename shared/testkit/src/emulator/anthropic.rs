//! Anthropic Messages API: `POST /v1/messages` with `x-api-key` and
//! `anthropic-version` headers; `system` (a string or text blocks), `messages` (content a
//! string or content blocks), `max_tokens` (required). Answers a `message` object, or
//! with `"stream": true` the event stream `message_start`, `content_block_start`,
//! `ping`, `content_block_delta` (`text_delta`) …, `content_block_stop`, `message_delta`
//! (`stop_reason`, output usage), `message_stop`; an error mid-stream is an `error`
//! event. Errors are `{"type": "error", "error": {"type", "message"}}` with the real
//! statuses (401 `authentication_error`, 429 `rate_limit_error`, 529
//! `overloaded_error`, ...).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{pieces, prepare, sse_response, ApiErrors, EmulatorState};

struct Anthropic;

impl ApiErrors for Anthropic {
    fn error(&self, status: StatusCode, message: &str) -> Response {
        let kind = match status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        let mut r = (
            status,
            Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
        )
            .into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        r
    }
}

/// Text of a content field: a string, or the `text` of its text blocks.
fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => Some(
            blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

fn conversation(req: &Value) -> Result<Vec<Value>, String> {
    let Some(max_tokens) = req.get("max_tokens").and_then(Value::as_u64) else {
        return Err("max_tokens: Field required".into());
    };
    let msgs = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("messages: Field required")?;
    if req["thinking"]["type"] == "enabled" {
        let budget = req["thinking"]["budget_tokens"].as_u64().unwrap_or(0);
        if budget < 1024 || max_tokens <= budget {
            return Err(format!(
                "thinking.budget_tokens: must be at least 1024 and less than max_tokens ({max_tokens})"
            ));
        }
        // While thinking, the assistant message whose tool use the conversation goes
        // on from must start with its thinking block, as it came.
        if let Some((i, last)) = msgs
            .iter()
            .enumerate()
            .rev()
            .find(|(_, m)| m["role"] == "assistant")
        {
            let blocks = last["content"].as_array().cloned().unwrap_or_default();
            let uses_tools = blocks.iter().any(|b| b["type"] == "tool_use");
            let first = blocks
                .first()
                .and_then(|b| b["type"].as_str())
                .unwrap_or("text");
            if uses_tools && !matches!(first, "thinking" | "redacted_thinking") {
                return Err(format!(
                    "messages.{i}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{first}`. When `thinking` is enabled, a final `assistant` message must start with a thinking block"
                ));
            }
            if let Some(b) = blocks.iter().find(|b| b["type"] == "thinking") {
                if b["signature"].as_str().is_none_or(str::is_empty) {
                    return Err(format!(
                        "messages.{i}: a thinking block lacks its signature"
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Some(system) = req.get("system").and_then(text_of) {
        out.push(json!({"role": "system", "content": system}));
    }
    for (i, m) in msgs.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or_default();
        if !matches!(role, "user" | "assistant") {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        if i == 0 && role != "user" {
            return Err("messages: first message must use the \"user\" role".into());
        }
        let content =
            text_of(&m["content"]).ok_or(format!("messages.{i}.content: Field required"))?;
        let blocks = m["content"].as_array().cloned().unwrap_or_default();
        // Tool results speak first, as their own messages of the common form.
        for (j, b) in blocks.iter().enumerate() {
            if b["type"] == "tool_result" {
                if j > 0 && blocks[j - 1]["type"] != "tool_result" {
                    return Err(format!(
                        "messages.{i}.content.{j}: tool_result blocks must come first"
                    ));
                }
                out.push(json!({"role": "tool", "tool_call_id": b["tool_use_id"],
                                "content": text_of(&b["content"]).unwrap_or_default()}));
            }
        }
        let calls: Vec<Value> = blocks
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .map(|b| json!({"id": b["id"], "name": b["name"], "arguments": b["input"].to_string()}))
            .collect();
        if role == "assistant" || !content.is_empty() || blocks.is_empty() {
            let mut n = json!({"role": role, "content": content});
            if !calls.is_empty() {
                n["tool_calls"] = calls.into();
            }
            out.push(n);
        }
    }
    Ok(out)
}

pub(crate) async fn messages(
    State(s): State<Arc<EmulatorState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if headers.get("anthropic-version").is_none() {
        return Anthropic.error(
            StatusCode::BAD_REQUEST,
            "anthropic-version: header is required",
        );
    }
    let limit = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("max_tokens").and_then(Value::as_u64));
    let c = match prepare(&s, &Anthropic, key, &body, conversation, limit).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let model = c.req["model"].as_str().unwrap_or("emulator-1").to_owned();
    let id = format!("msg_emu{}", s.served.fetch_add(1, Ordering::Relaxed));
    // A system block marked for caching is "read from the cache".
    let cached = c
        .req
        .pointer("/system/0")
        .filter(|b| b.get("cache_control").is_some())
        .and_then(|b| b["text"].as_str())
        .map_or(0, |t| t.len() as u64 / 4 + 1)
        .min(c.prompt_tokens);
    let input_tokens = c.prompt_tokens - cached;
    let stop = if !c.tool_calls.is_empty() {
        "tool_use"
    } else if c.cut {
        "max_tokens"
    } else {
        "end_turn"
    };
    let served = s.served.load(Ordering::Relaxed);
    let tool_id = |i: usize| format!("toolu_emu{served}_{i}");
    // With thinking on, a thinking block (with its signature) comes first.
    let thinking = c.req["thinking"]["type"] == "enabled";
    let base = usize::from(thinking);
    let resp = if c.req.get("stream").and_then(Value::as_bool) == Some(true) {
        let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
        let mut events = vec![ev(
            "message_start",
            json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}}}),
        )];
        if thinking {
            for e in [
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me think."}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "ZW11bGF0ZWQ="}}),
                json!({"type": "content_block_stop", "index": 0}),
            ] {
                let name = e["type"].as_str().unwrap_or_default().to_owned();
                events.push(ev(&name, e));
            }
        }
        events.push(ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": base, "content_block": {"type": "text", "text": ""}}),
        ));
        events.push(ev("ping", json!({"type": "ping"})));
        for p in pieces(&c.text) {
            events.push(ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": base, "delta": {"type": "text_delta", "text": p}}),
            ));
        }
        if c.fail_midstream {
            events.push(ev(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ));
        } else {
            events.push(ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": base}),
            ));
            for (i, (name, args)) in c.tool_calls.iter().enumerate() {
                let index = base + i + 1;
                events.push(ev(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": index,
                           "content_block": {"type": "tool_use", "id": tool_id(i), "name": name, "input": {}}}),
                ));
                let mut mid = args.len() / 2;
                while !args.is_char_boundary(mid) {
                    mid -= 1;
                }
                for part in [&args[..mid], &args[mid..]] {
                    events.push(ev(
                        "content_block_delta",
                        json!({"type": "content_block_delta", "index": index,
                               "delta": {"type": "input_json_delta", "partial_json": part}}),
                    ));
                }
                events.push(ev(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": index}),
                ));
            }
            events.push(ev(
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                       "usage": {"output_tokens": c.completion_tokens}}),
            ));
            events.push(ev("message_stop", json!({"type": "message_stop"})));
        }
        sse_response(events, c.end, c.midway)
    } else {
        let mut content = Vec::new();
        if thinking {
            content.push(json!({"type": "thinking", "thinking": "Let me think.", "signature": "ZW11bGF0ZWQ="}));
        }
        content.push(json!({"type": "text", "text": c.text}));
        for (i, (name, args)) in c.tool_calls.iter().enumerate() {
            let input: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
            content
                .push(json!({"type": "tool_use", "id": tool_id(i), "name": name, "input": input}));
        }
        Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": content,
            "stop_reason": stop, "stop_sequence": null,
            "usage": {"input_tokens": input_tokens, "output_tokens": c.completion_tokens, "cache_read_input_tokens": cached},
        }))
        .into_response()
    };
    s.busy_nanos
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_requires_the_thinking_block_back_with_tool_use() {
        let req = |first: Value| {
            json!({"max_tokens": 8192, "thinking": {"type": "enabled", "budget_tokens": 2048},
                   "messages": [
                       {"role": "user", "content": "go"},
                       {"role": "assistant", "content": [first, {"type": "tool_use", "id": "t", "name": "x", "input": {}}]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r"}]}]})
        };
        let text = json!({"type": "text", "text": "hm"});
        assert!(conversation(&req(text))
            .unwrap_err()
            .contains("Expected `thinking`"));
        let unsigned = json!({"type": "thinking", "thinking": "hm"});
        assert!(conversation(&req(unsigned))
            .unwrap_err()
            .contains("signature"));
        let signed = json!({"type": "thinking", "thinking": "hm", "signature": "s"});
        assert!(conversation(&req(signed)).is_ok());
        let small = json!({"max_tokens": 1000, "thinking": {"type": "enabled", "budget_tokens": 2048}, "messages": []});
        assert!(conversation(&small).is_err());
    }
}
