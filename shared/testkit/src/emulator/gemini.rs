//! Google Gemini API: `POST /v1beta/models/<model>:generateContent` and
//! `:streamGenerateContent?alt=sse`, key in `x-goog-api-key` (or `?key=`); `contents`
//! (`role` `user` or `model`, `parts` with `text`), `systemInstruction`,
//! `generationConfig.maxOutputTokens`. Answers `GenerateContentResponse` objects
//! (`candidates[0].content.parts`, `finishReason` `STOP` / `MAX_TOKENS`,
//! `usageMetadata`), streamed as `data:` events until the connection closes. Errors are
//! `{"error": {"code", "message", "status"}}` (`UNAUTHENTICATED`, `RESOURCE_EXHAUSTED`,
//! `UNAVAILABLE`, ...).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{pieces, prepare, sse_response, ApiErrors, EmulatorState};

struct Gemini;

impl ApiErrors for Gemini {
    fn error(&self, status: StatusCode, message: &str) -> Response {
        let grpc = match status.as_u16() {
            400 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            429 => "RESOURCE_EXHAUSTED",
            503 => "UNAVAILABLE",
            504 => "DEADLINE_EXCEEDED",
            _ => "INTERNAL",
        };
        (
            status,
            Json(json!({"error": {"code": status.as_u16(), "message": message, "status": grpc}})),
        )
            .into_response()
    }

    /// Gemini pairs a function's response with its call by name and position.
    fn pairs_calls(&self) -> bool {
        false
    }
}

fn text_of(parts: &Value) -> String {
    parts
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

fn conversation(req: &Value) -> Result<Vec<Value>, String> {
    let contents = req
        .get("contents")
        .and_then(Value::as_array)
        .ok_or("* GenerateContentRequest.contents: contents is not specified")?;
    let mut out = Vec::new();
    if let Some(sys) = req.get("systemInstruction") {
        out.push(json!({"role": "system", "content": text_of(&sys["parts"])}));
    }
    for (i, c) in contents.iter().enumerate() {
        let role = match c["role"].as_str().unwrap_or("user") {
            "user" => "user",
            "model" => "assistant",
            other => return Err(format!("contents[{i}].role: unknown role `{other}`")),
        };
        let parts = c["parts"].as_array().cloned().unwrap_or_default();
        for p in parts.iter().filter_map(|p| p.get("functionResponse")) {
            let content = match &p["response"]["content"] {
                Value::String(s) => s.clone(),
                _ => p["response"].to_string(),
            };
            out.push(
                json!({"role": "tool", "tool_call_id": "", "name": p["name"], "content": content}),
            );
        }
        let calls: Vec<Value> = parts
            .iter()
            .filter_map(|p| p.get("functionCall"))
            .map(|f| json!({"id": "", "name": f["name"], "arguments": f["args"].to_string()}))
            .collect();
        let text = text_of(&c["parts"]);
        if role == "assistant" || !text.is_empty() || parts.is_empty() {
            let mut n = json!({"role": role, "content": text});
            if !calls.is_empty() {
                n["tool_calls"] = calls.into();
            }
            out.push(n);
        }
    }
    Ok(out)
}

pub(crate) async fn generate(
    State(s): State<Arc<EmulatorState>>,
    Path(call): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let Some((model, method)) = call.split_once(':') else {
        return Gemini.error(StatusCode::NOT_FOUND, "unknown method");
    };
    let stream = match method {
        "streamGenerateContent" => true,
        "generateContent" => false,
        _ => return Gemini.error(StatusCode::NOT_FOUND, "unknown method"),
    };
    let key = headers
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok())
        .or(query.get("key").map(String::as_str));
    let limit = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.pointer("/generationConfig/maxOutputTokens")
            .and_then(Value::as_u64)
    });
    let c = match prepare(&s, &Gemini, key, &body, conversation, limit).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    s.served.fetch_add(1, Ordering::Relaxed);
    let finish = if c.cut { "MAX_TOKENS" } else { "STOP" };
    let thoughts = if c
        .req
        .pointer("/generationConfig/thinkingConfig/thinkingBudget")
        .is_some()
    {
        super::REASONING_TOKENS
    } else {
        0
    };
    let usage = json!({"promptTokenCount": c.prompt_tokens, "candidatesTokenCount": c.completion_tokens,
                       "thoughtsTokenCount": thoughts,
                       "totalTokenCount": c.prompt_tokens + c.completion_tokens + thoughts});
    let response = |text: &str, finish: Option<&str>, usage: Option<&Value>| {
        let mut candidate =
            json!({"content": {"role": "model", "parts": [{"text": text}]}, "index": 0});
        if let Some(f) = finish {
            candidate["finishReason"] = f.into();
        }
        let mut r = json!({"candidates": [candidate], "modelVersion": model});
        if let Some(u) = usage {
            r["usageMetadata"] = u.clone();
        }
        r
    };
    let calls = |r: &mut Value| {
        if c.tool_calls.is_empty() {
            return;
        }
        let parts: Vec<Value> = c
            .tool_calls
            .iter()
            .map(|(name, args)| {
                let args: Value = serde_json::from_str(args).unwrap_or_else(|_| json!({}));
                json!({"functionCall": {"name": name, "args": args}, "thoughtSignature": "ZW11bGF0b3I="})
            })
            .collect();
        r["candidates"][0]["content"]["parts"] = parts.into();
    };
    let resp = if stream && query.get("alt").map(String::as_str) == Some("sse") {
        let mut events: Vec<String> = pieces(&c.text)
            .into_iter()
            .map(|p| format!("data: {}\r\n\r\n", response(p, None, None)))
            .collect();
        if !c.tool_calls.is_empty() {
            // Whole calls in one event, never fragments.
            let mut r = response("", None, None);
            calls(&mut r);
            events.push(format!("data: {r}\r\n\r\n"));
        }
        if c.fail_midstream {
            events.push(format!(
                "data: {}\r\n\r\n",
                json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})
            ));
        } else {
            events.push(format!(
                "data: {}\r\n\r\n",
                response("", Some(finish), Some(&usage))
            ));
        }
        sse_response(events, c.end, c.midway)
    } else {
        let mut r = response(&c.text, Some(finish), Some(&usage));
        calls(&mut r);
        if stream {
            // Without `alt=sse` the stream is one JSON array of responses.
            Json(json!([r])).into_response()
        } else {
            Json(r).into_response()
        }
    };
    s.busy_nanos
        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    resp
}
