//! OpenAI Chat Completions request and response shapes, and their errors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use clawbus_wire::{ChatMessage, FunctionCall, Role, ToolSpec};
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
    /// The caller's own functions: the model may call them, and the caller runs them.
    #[serde(default)]
    pub tools: Vec<RequestTool>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
}

/// Most functions one request may bring.
pub const MAX_TOOLS: usize = 128;

/// A chat completions request read from its body, as the handler uses it.
#[derive(Debug)]
pub struct ChatAsk {
    pub request: ChatRequest,
    pub prompt: Prompt,
    pub tools: Vec<ToolSpec>,
    pub tool_choice: Option<String>,
}

/// Reads a chat completions body: the request, its prompt, its functions and its
/// tool choice, or the error the caller is answered with (the handler's only reading
/// of a body).
pub fn parse_chat(body: &[u8]) -> Result<ChatAsk, ApiError> {
    let request: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON request body: {e}")))?;
    Ok(ChatAsk {
        prompt: prompt(&request.messages)?,
        tools: tool_specs(&request.tools)?,
        tool_choice: tool_choice(&request.tool_choice)?,
        request,
    })
}

/// A tool of a request: `{"type": "function", "function": {name, description,
/// parameters}}`.
#[derive(Debug, Deserialize)]
pub struct RequestTool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub function: Option<RequestFunction>,
}

#[derive(Debug, Deserialize)]
pub struct RequestFunction {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
}

/// A function name as every provider accepts it (and a subject token).
pub fn valid_function_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A request's functions as tool specs, checked.
pub fn tool_specs(tools: &[RequestTool]) -> Result<Vec<ToolSpec>, ApiError> {
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_TOOLS} tools per request"
        )));
    }
    tools
        .iter()
        .map(|t| {
            let f = match (t.kind.as_str(), &t.function) {
                ("function", Some(f)) => f,
                ("function", None) => {
                    return Err(ApiError::invalid("a function tool needs `function`"))
                }
                (other, _) => {
                    return Err(ApiError::invalid(format!(
                        "unsupported tool type `{}`: only `function` tools are supported",
                        other.chars().take(40).collect::<String>()
                    )))
                }
            };
            if !valid_function_name(&f.name) {
                return Err(ApiError::invalid(format!(
                    "invalid function name `{}`: letters, digits, `_` and `-`, at most 64",
                    f.name.chars().take(64).collect::<String>()
                )));
            }
            let parameters = match &f.parameters {
                None => String::new(),
                Some(p @ Value::Object(_)) => p.to_string(),
                Some(_) => {
                    return Err(ApiError::invalid(format!(
                        "the parameters of `{}` must be a JSON Schema object",
                        f.name
                    )))
                }
            };
            Ok(ToolSpec {
                name: f.name.clone(),
                description: f.description.clone().unwrap_or_default(),
                parameters,
            })
        })
        .collect()
}

/// `tool_choice` as the agent takes it: `auto`, `none`, `required`, or the JSON of a
/// named function.
pub fn tool_choice(v: &Option<Value>) -> Result<Option<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(Some(s.clone()))
        }
        Some(o @ Value::Object(_)) if o.pointer("/function/name").is_some_and(Value::is_string) => {
            Ok(Some(o.to_string()))
        }
        Some(_) => Err(ApiError::invalid(
            "`tool_choice` must be `auto`, `none`, `required` or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )),
    }
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
    /// On an assistant message: the calls the model made.
    #[serde(default)]
    pub tool_calls: Vec<RequestToolCall>,
    /// On a tool message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RequestToolCall {
    pub id: String,
    pub function: RequestCalled,
}

#[derive(Debug, Deserialize)]
pub struct RequestCalled {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
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
#[derive(Debug)]
pub struct Prompt {
    pub text: String,
    pub system: Option<String>,
    pub context: Vec<ChatMessage>,
}

/// Splits a request's messages into the new user text, system text and prior context.
/// A request may instead end with `tool` messages: the caller's results of its
/// functions' calls, carried in the context with an empty text.
pub fn prompt(messages: &[RequestMessage]) -> Result<Prompt, ApiError> {
    let Some((last, earlier)) = messages.split_last() else {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message",
        ));
    };
    let (text, earlier) = match last.role.as_str() {
        "user" => {
            let text = content_text(&last.content)?;
            if text.trim().is_empty() {
                return Err(ApiError::invalid("the last user message is empty"));
            }
            (text, earlier)
        }
        "tool" => (String::new(), messages),
        _ => {
            return Err(ApiError::invalid(
                "the last message must have role `user` (or `tool`, answering tool calls)",
            ))
        }
    };
    let mut system = Vec::new();
    let mut context = Vec::new();
    for m in earlier {
        let t = content_text(&m.content)?;
        match m.role.as_str() {
            "system" | "developer" => system.push(t),
            "user" => context.push(ChatMessage::new(Role::User, t)),
            "assistant" => context.push(ChatMessage {
                tool_calls: m
                    .tool_calls
                    .iter()
                    .map(|c| FunctionCall {
                        id: c.id.clone(),
                        name: c.function.name.clone(),
                        arguments: c.function.arguments.clone(),
                        signature: None,
                    })
                    .collect(),
                ..ChatMessage::new(Role::Assistant, t)
            }),
            "tool" => {
                let Some(id) = m.tool_call_id.clone().filter(|i| !i.is_empty()) else {
                    return Err(ApiError::invalid(
                        "a `tool` message needs the `tool_call_id` of the call it answers",
                    ));
                };
                context.push(ChatMessage {
                    tool_call_id: Some(id),
                    name: m.name.clone(),
                    ..ChatMessage::new(Role::Tool, t)
                });
            }
            "function" => {}
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
    fn a_request_may_end_with_results_of_its_calls() {
        let p = prompt(&msgs(json!([
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ])))
        .unwrap();
        assert_eq!(p.text, "");
        assert_eq!(p.context.len(), 3);
        assert_eq!(p.context[1].tool_calls[0].name, "weather");
        assert_eq!(p.context[2].tool_call_id.as_deref(), Some("call_1"));
    }

    #[test]
    fn tools_are_checked() {
        let tools: Vec<RequestTool> = serde_json::from_value(json!([
            {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
        ]))
        .unwrap();
        assert_eq!(tool_specs(&tools).unwrap()[0].name, "weather");
        for bad in [
            json!([{"type": "code_interpreter"}]),
            json!([{"type": "function"}]),
            json!([{"type": "function", "function": {"name": "a b"}}]),
            json!([{"type": "function", "function": {"name": "x".repeat(65)}}]),
            json!([{"type": "function", "function": {"name": "f", "parameters": "nope"}}]),
        ] {
            let t: Vec<RequestTool> = serde_json::from_value(bad.clone()).unwrap();
            assert!(tool_specs(&t).is_err(), "{bad}");
        }
        let many: Vec<RequestTool> = serde_json::from_value(Value::Array(
            (0..=MAX_TOOLS)
                .map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}}))
                .collect(),
        ))
        .unwrap();
        assert!(tool_specs(&many).is_err());
        assert_eq!(
            tool_choice(&Some(json!("required"))).unwrap().as_deref(),
            Some("required")
        );
        assert!(tool_choice(&Some(json!("sometimes"))).is_err());
        assert!(tool_choice(&Some(json!({"type": "function"}))).is_err());
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
            json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "no id"}]),
        ] {
            assert!(prompt(&msgs(bad.clone())).is_err(), "{bad}");
        }
    }
}
