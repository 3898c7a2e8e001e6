//! OpenAI Chat Completions request and response shapes, and their errors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use clawbus_wire::{ChatMessage, Role};
use serde::Deserialize;
use serde_json::{json, Value};

/// The subset of a Chat Completions request the gateway uses; other fields are accepted
/// and ignored, as OpenAI-compatible servers do.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<RequestMessage>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<Option<String>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Text of a message's `content`: a string, or an array of `{"type":"text"}` parts.
pub fn content_text(content: &Option<Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (t, _) => {
                        return Err(ApiError::invalid(format!(
                            "unsupported content part type `{}`: only text is supported",
                            t.unwrap_or("?")
                        )))
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid(
            "message content must be a string or an array of text parts",
        )),
    }
}

/// The new user message, the system instructions and the earlier conversation.
pub struct Prompt {
    pub text: String,
    pub system: Option<String>,
    pub context: Vec<ChatMessage>,
}

/// Splits a request's messages into the new user text, system text and prior context.
pub fn prompt(messages: &[RequestMessage]) -> Result<Prompt, ApiError> {
    let Some((last, earlier)) = messages.split_last() else {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message",
        ));
    };
    if last.role != "user" {
        return Err(ApiError::invalid("the last message must have role `user`"));
    }
    let text = content_text(&last.content)?;
    if text.trim().is_empty() {
        return Err(ApiError::invalid("the last user message is empty"));
    }
    let mut system = Vec::new();
    let mut context = Vec::new();
    for m in earlier {
        let t = content_text(&m.content)?;
        match m.role.as_str() {
            "system" | "developer" => system.push(t),
            "user" => context.push(ChatMessage {
                role: Role::User,
                content: t,
            }),
            "assistant" => context.push(ChatMessage {
                role: Role::Assistant,
                content: t,
            }),
            "tool" | "function" => {}
            other => return Err(ApiError::invalid(format!("unknown message role `{other}`"))),
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    Ok(Prompt {
        text,
        system,
        context,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: Value) -> Vec<RequestMessage> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn splits_prompt() {
        let p = prompt(&msgs(json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
        ])))
        .unwrap();
        assert_eq!(p.text, "cd");
        assert_eq!(p.system.as_deref(), Some("be brief"));
        assert_eq!(p.context.len(), 2);
    }

    #[test]
    fn rejects_bad_prompts() {
        for bad in [
            json!([]),
            json!([{"role": "assistant", "content": "x"}]),
            json!([{"role": "user", "content": "  "}]),
            json!([{"role": "user", "content": 5}]),
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            json!([{"role": "wizard", "content": "x"}, {"role": "user", "content": "x"}]),
        ] {
            assert!(prompt(&msgs(bad.clone())).is_err(), "{bad}");
        }
    }
}
