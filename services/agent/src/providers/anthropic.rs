//! Anthropic Messages API with streaming: `POST <base>/v1/messages` (`x-api-key`,
//! `anthropic-version`), the event stream `message_start` … `content_block_delta` …
//! `message_delta`, `message_stop`, and `error` events mid-stream. Thinking blocks are
//! not part of the answer. The system prompt is sent as one text block marked for
//! prompt caching (`cache_control: ephemeral`): the workspace context repeats on every
//! turn, so the provider serves it from its cache.

use clawbus_wire::Usage;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Answer, Block, CallsInProgress, Completion, Prompt, ProviderError};

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
pub const API_VERSION: &str = "2023-06-01";
/// `max_tokens` is required by the API; this when `agent.max_tokens` is unset.
pub const DEFAULT_MAX_TOKENS: u32 = 8192;

/// The Anthropic Messages API at an endpoint.
#[derive(Clone)]
pub struct AnthropicProvider(pub super::Endpoint);

impl AnthropicProvider {
    /// The request body for a prompt.
    pub fn body(&self, prompt: &Prompt<'_>) -> Value {
        let thinking = prompt.thinking.budget().is_some();
        let msgs: Vec<Value> = super::alternating(prompt.messages)
            .into_iter()
            .map(|(user, blocks)| {
                let content = match blocks.as_slice() {
                    [Block::Text(t)] => Value::String(t.clone()),
                    _ => blocks
                        .iter()
                        .flat_map(|b| match b {
                            // Thinking blocks go back only while thinking is on.
                            Block::Reasoning(r) if thinking => {
                                serde_json::from_str::<Vec<Value>>(r).unwrap_or_default()
                            }
                            Block::Reasoning(_) => Vec::new(),
                            b => vec![block_json(b)],
                        })
                        .collect(),
                };
                json!({"role": if user { "user" } else { "assistant" }, "content": content})
            })
            .collect();
        let mut body = json!({
            "model": self.0.model,
            "max_tokens": self.0.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            "messages": msgs,
            "stream": true,
        });
        if let Some(budget) = prompt.thinking.budget() {
            // The answer's room comes on top of the thinking budget.
            let max = self
                .0
                .max_tokens
                .unwrap_or(DEFAULT_MAX_TOKENS)
                .max(budget + 4096);
            body["max_tokens"] = max.into();
            body["thinking"] = json!({"type": "enabled", "budget_tokens": budget});
        }
        let system = super::system_text(prompt.messages);
        if !system.is_empty() {
            body["system"] =
                json!([{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]);
        }
        if !prompt.tools.is_empty() {
            body["tools"] = prompt
                .tools
                .iter()
                .map(|t| {
                    json!({"name": t.name, "description": t.description,
                           "input_schema": super::schema_of(t)})
                })
                .collect();
            body["tool_choice"] = match prompt.choice() {
                (_, Some(name)) => json!({"type": "tool", "name": name}),
                ("none", _) => json!({"type": "none"}),
                ("required", _) => json!({"type": "any"}),
                _ => json!({"type": "auto"}),
            };
        }
        body
    }

    pub async fn chat(
        &self,
        prompt: &Prompt<'_>,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        let resp = self
            .0
            .post(
                "/v1/messages",
                &self.body(prompt),
                "x-api-key",
                &[("anthropic-version", API_VERSION)],
                error_message,
            )
            .await?;
        let mut s = Stream {
            model: self.0.model.clone(),
            ..Default::default()
        };
        let mut events = self.0.events(resp);
        while let Some(data) = events.next().await? {
            if s.event(&data, deltas).await? {
                return Ok(s.finish());
            }
        }
        Err(ProviderError::Network(
            "stream ended before message_stop".into(),
        ))
    }
}

/// Anthropic ids match `^[a-zA-Z0-9_-]+$`; ids from another API (after a fallback)
/// are mapped into that alphabet, the same way for a call and its result.
fn tool_id(id: &str) -> String {
    let s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "call".into()
    } else {
        s
    }
}

/// A block in Messages API form.
fn block_json(b: &Block<'_>) -> Value {
    match b {
        Block::Reasoning(_) => Value::Null,
        Block::Text(t) => json!({"type": "text", "text": t}),
        Block::Call(c) => json!({"type": "tool_use", "id": tool_id(&c.id), "name": c.name,
                                 "input": super::arguments_object(c)}),
        Block::Result(id, _, content) => {
            json!({"type": "tool_result", "tool_use_id": tool_id(id), "content": content})
        }
    }
}

#[derive(Default)]
struct Stream {
    answer: Answer,
    calls: CallsInProgress,
    /// Thinking blocks with their signatures, by index, to send back with tool calls.
    thinking: std::collections::BTreeMap<u64, Value>,
    model: String,
    input_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
    stop_reason: Option<String>,
}

impl Stream {
    /// Handles one event; true at `message_stop`.
    async fn event(
        &mut self,
        data: &str,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<bool, ProviderError> {
        let ev: Value = serde_json::from_str(data)
            .map_err(|e| ProviderError::Protocol(format!("bad stream event: {e}")))?;
        match ev["type"].as_str().unwrap_or_default() {
            "message_start" => {
                let m = &ev["message"];
                if let Some(model) = m["model"].as_str().filter(|m| !m.is_empty()) {
                    self.model = model.to_owned();
                }
                let u = &m["usage"];
                self.input_tokens = [
                    "input_tokens",
                    "cache_read_input_tokens",
                    "cache_creation_input_tokens",
                ]
                .iter()
                .filter_map(|k| u[*k].as_u64())
                .sum();
                self.cached_tokens = u["cache_read_input_tokens"].as_u64().unwrap_or(0);
                self.output_tokens = u["output_tokens"].as_u64().unwrap_or(0);
            }
            "content_block_start"
                if matches!(
                    ev["content_block"]["type"].as_str(),
                    Some("thinking" | "redacted_thinking")
                ) =>
            {
                let index = ev["index"].as_u64().unwrap_or_default();
                self.thinking.insert(index, ev["content_block"].clone());
            }
            "content_block_delta" if ev["delta"]["type"] == "thinking_delta" => {
                let index = ev["index"].as_u64().unwrap_or_default();
                if let Some(b) = self.thinking.get_mut(&index) {
                    let more = ev["delta"]["thinking"].as_str().unwrap_or_default();
                    let text = format!("{}{more}", b["thinking"].as_str().unwrap_or_default());
                    b["thinking"] = text.into();
                }
            }
            "content_block_delta" if ev["delta"]["type"] == "signature_delta" => {
                let index = ev["index"].as_u64().unwrap_or_default();
                if let Some(b) = self.thinking.get_mut(&index) {
                    b["signature"] = ev["delta"]["signature"].clone();
                }
            }
            "content_block_start" if ev["content_block"]["type"] == "tool_use" => {
                let b = &ev["content_block"];
                let index = ev["index"].as_u64().unwrap_or_default();
                self.calls
                    .start(index, b["id"].as_str(), b["name"].as_str());
            }
            "content_block_delta" if ev["delta"]["type"] == "text_delta" => {
                let text = ev["delta"]["text"].as_str().unwrap_or_default();
                self.answer.push(text, deltas).await?;
            }
            "content_block_delta" if ev["delta"]["type"] == "input_json_delta" => {
                let index = ev["index"].as_u64().unwrap_or_default();
                let part = ev["delta"]["partial_json"].as_str().unwrap_or_default();
                self.calls.arguments(index, part)?;
            }
            "message_delta" => {
                if let Some(r) = ev["delta"]["stop_reason"].as_str() {
                    self.stop_reason = Some(r.to_owned());
                }
                if let Some(n) = ev["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = n;
                }
            }
            "message_stop" => return Ok(true),
            "error" => return Err(stream_error(&ev["error"])),
            _ => {} // ping, content_block_start, content_block_stop, future events
        }
        Ok(false)
    }

    fn finish(self) -> Completion {
        let tool_calls = self.calls.finish();
        // Thinking is sent back only with tool calls: a final answer's is not needed.
        let reasoning = (!tool_calls.is_empty() && !self.thinking.is_empty())
            .then(|| Value::Array(self.thinking.into_values().collect()).to_string());
        Completion {
            text: self.answer.text,
            tool_calls,
            reasoning,
            call_usage: None,
            usage: Some(Usage {
                prompt_tokens: self.input_tokens,
                completion_tokens: self.output_tokens,
                total_tokens: self.input_tokens + self.output_tokens,
                cached_tokens: self.cached_tokens,
                reasoning_tokens: 0,
            }),
            model: self.model,
            finish_reason: self.stop_reason.map(|r| finish_reason(&r)),
        }
    }
}

/// Anthropic's `stop_reason` in OpenAI's terms.
pub fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" | "pause_turn" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
    .to_owned()
}

/// An `error` event as the HTTP status the same error gets as a response.
fn stream_error(e: &Value) -> ProviderError {
    let status = match e["type"].as_str().unwrap_or_default() {
        "invalid_request_error" => 400,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        _ => 500,
    };
    ProviderError::Status {
        status,
        message: e["message"].as_str().unwrap_or("stream error").to_owned(),
        retry_after: None,
    }
}

/// The `error.message` of an Anthropic error body, else the (shortened) body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| super::short_body(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawbus_wire::{ChatMessage, FunctionCall, Role, ToolSpec};
    use std::time::Duration;

    fn msg(role: Role, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    #[test]
    fn the_body_alternates_roles_and_caches_the_system_prompt() {
        let p = AnthropicProvider(
            super::super::Endpoint::new("http://x", None, "claude", Duration::from_secs(1))
                .unwrap(),
        );
        let b = p.body(&Prompt::new(&[
            msg(Role::System, "be kind"),
            msg(Role::Assistant, "orphan"),
            msg(Role::User, "a"),
            msg(Role::User, "b"),
            msg(Role::Assistant, ""),
            msg(Role::Assistant, "c"),
        ]));
        assert_eq!(
            b["messages"],
            json!([{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}])
        );
        assert_eq!(b["system"][0]["cache_control"]["type"], "ephemeral");
        assert_eq!(b["max_tokens"], DEFAULT_MAX_TOKENS);
    }

    #[tokio::test]
    async fn a_stream_accumulates_and_errors_mid_stream_are_errors() {
        let mut s = Stream::default();
        let events = [
            r#"{"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":7}}"#,
        ];
        for e in events {
            assert!(!s.event(e, None).await.unwrap());
        }
        assert!(s.event(r#"{"type":"message_stop"}"#, None).await.unwrap());
        let c = s.finish();
        assert_eq!((c.text.as_str(), c.model.as_str()), ("Hi", "claude-x"));
        assert_eq!(c.finish_reason.as_deref(), Some("length"));
        assert_eq!(c.usage.unwrap().total_tokens, 22);
        let mut s = Stream::default();
        let e = s
            .event(
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
                None,
            )
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(s.event("{not json", None).await.is_err());
    }

    #[test]
    fn tools_calls_and_results_are_blocks() {
        let p = AnthropicProvider(
            super::super::Endpoint::new("http://x", None, "claude", Duration::from_secs(1))
                .unwrap(),
        );
        let call = FunctionCall {
            id: "call:1".into(),
            name: "read".into(),
            arguments: r#"{"path":"a.txt"}"#.into(),
            signature: None,
        };
        let msgs = [
            msg(Role::User, "read a.txt"),
            ChatMessage {
                role: Role::Assistant,
                content: "Reading.".into(),
                tool_calls: vec![call.clone()],
                ..Default::default()
            },
            ChatMessage::tool_result(&call, "hello"),
        ];
        let tools = [ToolSpec {
            name: "read".into(),
            description: "Read a file".into(),
            parameters: r#"{"type":"object","properties":{"path":{"type":"string"}}}"#.into(),
        }];
        let b = p.body(&Prompt {
            messages: &msgs,
            tools: &tools,
            tool_choice: Some("required"),
            ..Default::default()
        });
        assert_eq!(
            b["messages"][1]["content"],
            json!([{"type": "text", "text": "Reading."},
                   {"type": "tool_use", "id": "call_1", "name": "read", "input": {"path": "a.txt"}}])
        );
        assert_eq!(
            b["messages"][2],
            json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "hello"}]})
        );
        assert_eq!(
            b["tools"][0]["input_schema"]["properties"]["path"]["type"],
            "string"
        );
        assert_eq!(b["tool_choice"], json!({"type": "any"}));
    }

    #[tokio::test]
    async fn streamed_tool_use_accumulates_its_json() {
        let mut s = Stream::default();
        let events = [
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Let me see."}}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"read","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"pa"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"th\": \"a\"}"}}"#,
            r#"{"type":"content_block_stop","index":1}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
        ];
        for e in events {
            assert!(!s.event(e, None).await.unwrap(), "{e}");
        }
        let c = s.finish();
        assert_eq!(c.text, "Let me see.");
        assert_eq!(c.tool_calls.len(), 1);
        assert_eq!(
            (
                c.tool_calls[0].id.as_str(),
                c.tool_calls[0].name.as_str(),
                c.tool_calls[0].arguments.as_str()
            ),
            ("toolu_1", "read", r#"{"path": "a"}"#)
        );
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[tokio::test]
    async fn thinking_blocks_go_back_with_the_calls_they_led_to() {
        let mut s = Stream::default();
        let events = [
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"I should "}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"read it."}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"sig=="}}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"read","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#,
        ];
        for e in events {
            s.event(e, None).await.unwrap();
        }
        let c = s.finish();
        assert_eq!(c.text, "", "thinking is not the answer");
        let blocks: Value = serde_json::from_str(c.reasoning.as_deref().unwrap()).unwrap();
        assert_eq!(
            blocks,
            json!([{"type": "thinking", "thinking": "I should read it.", "signature": "sig=="}])
        );
        let mut p = AnthropicProvider(
            super::super::Endpoint::new("http://x", None, "claude", Duration::from_secs(1))
                .unwrap(),
        );
        p.0.max_tokens = Some(1000);
        let msgs = [
            msg(Role::User, "read it"),
            ChatMessage {
                role: Role::Assistant,
                tool_calls: c.tool_calls.clone(),
                reasoning: c.reasoning.clone(),
                ..Default::default()
            },
            ChatMessage::tool_result(&c.tool_calls[0], "text"),
        ];
        let mut prompt = Prompt::new(&msgs);
        prompt.thinking = crate::providers::Thinking::High;
        let b = p.body(&prompt);
        assert_eq!(
            b["thinking"],
            json!({"type": "enabled", "budget_tokens": 16384})
        );
        assert_eq!(b["max_tokens"], 16384 + 4096, "room for the answer on top");
        assert_eq!(b["messages"][1]["content"][0]["type"], "thinking");
        assert_eq!(b["messages"][1]["content"][1]["type"], "tool_use");
        prompt.thinking = crate::providers::Thinking::Off;
        let b = p.body(&prompt);
        assert!(b.get("thinking").is_none());
        assert_eq!(b["messages"][1]["content"][0]["type"], "tool_use");
    }
}
