//! OpenAI Chat Completions over HTTP with streaming (`stream: true`, SSE), as served by
//! OpenAI and every compatible server (vLLM, llama.cpp, Ollama, LiteLLM, ...).

use clawbus_wire::{ChatMessage, FunctionCall, Role, Usage};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{CallsInProgress, Completion, Prompt, ProviderError, MAX_REPLY_BYTES};

/// A message in Chat Completions form: an assistant's calls as `tool_calls`, a tool
/// result as a `tool` message with its `tool_call_id`.
pub fn message_json(m: &ChatMessage) -> Value {
    match m.role {
        Role::Assistant if !m.tool_calls.is_empty() => json!({
            "role": "assistant",
            "content": if m.content.is_empty() { Value::Null } else { m.content.clone().into() },
            "tool_calls": m.tool_calls.iter().map(|c| json!({
                "id": c.id, "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })).collect::<Vec<_>>(),
        }),
        Role::Tool => json!({
            "role": "tool",
            "tool_call_id": m.tool_call_id.as_deref().unwrap_or_default(),
            "content": m.content,
        }),
        role => json!({"role": role.as_str(), "content": m.content}),
    }
}

/// The request body for a prompt.
pub fn body(model: &str, prompt: &Prompt<'_>, max_tokens: Option<u32>) -> Value {
    let mut body = json!({
        "model": model,
        "messages": prompt.messages.iter().filter(|m| m.role != Role::Unknown)
            .map(message_json).collect::<Vec<_>>(),
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(n) = max_tokens {
        body["max_tokens"] = n.into();
    }
    if prompt.thinking != super::Thinking::Off {
        body["reasoning_effort"] = prompt.thinking.as_str().into();
    }
    if !prompt.tools.is_empty() {
        body["tools"] = prompt
            .tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": super::schema_of(t),
                }})
            })
            .collect();
        body["tool_choice"] = match prompt.choice() {
            (_, Some(name)) => json!({"type": "function", "function": {"name": name}}),
            (mode, None) => mode.into(),
        };
    }
    body
}

/// The OpenAI Chat Completions API at an endpoint (OpenAI or a compatible server).
#[derive(Clone)]
pub struct OpenAiProvider(pub super::Endpoint);

impl OpenAiProvider {
    /// Streams a chat completion; each content delta is sent to `deltas` when given.
    pub async fn chat(
        &self,
        prompt: &Prompt<'_>,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        let body = body(&self.0.model, prompt, self.0.max_tokens);
        let resp = self
            .0
            .post(
                "/chat/completions",
                &body,
                "authorization",
                &[],
                error_message,
            )
            .await?;
        let is_sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if !is_sse {
            // Some servers ignore `stream`; accept a plain JSON completion too.
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| ProviderError::Network(e.to_string()))?;
            let c = parse_completion(&bytes, &self.0.model)?;
            if let Some(tx) = deltas {
                let _ = tx.send(c.text.clone()).await;
            }
            return Ok(c);
        }
        let mut acc = Accumulator {
            model: self.0.model.clone(),
            ..Default::default()
        };
        let mut events = self.0.events(resp);
        while let Some(data) = events.next().await? {
            if acc.event(&data, deltas).await? {
                return Ok(acc.finish());
            }
        }
        if acc.finished {
            // `[DONE]` missing but a finish_reason arrived: complete enough.
            return Ok(acc.finish());
        }
        Err(ProviderError::Network(
            "stream ended before the completion finished".into(),
        ))
    }
}

#[derive(Default)]
struct Accumulator {
    answer: super::Answer,
    calls: CallsInProgress,
    usage: Option<Usage>,
    model: String,
    finished: bool,
    /// Why the model stopped (`stop`, `length`, `content_filter`, ...).
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<OpenAiUsage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// OpenAI's usage object, with its cached and reasoning token details.
#[derive(Deserialize)]
struct OpenAiUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    #[serde(default)]
    cached_tokens: u64,
    #[serde(default)]
    reasoning_tokens: u64,
}

impl From<OpenAiUsage> for Usage {
    fn from(u: OpenAiUsage) -> Usage {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            cached_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            reasoning_tokens: u
                .completion_tokens_details
                .map_or(0, |d| d.reasoning_tokens),
        }
    }
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<CallDelta>,
}

/// A fragment of a function call: `index` says which call it continues.
#[derive(Deserialize)]
struct CallDelta {
    #[serde(default)]
    index: u64,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

impl Accumulator {
    /// Handles one SSE event; true when the stream is complete (`[DONE]`).
    async fn event(
        &mut self,
        data: &str,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<bool, ProviderError> {
        if data.trim() == "[DONE]" {
            return Ok(true);
        }
        let chunk: Chunk = serde_json::from_str(data)
            .map_err(|e| ProviderError::Protocol(format!("bad stream chunk: {e}")))?;
        if let Some(err) = chunk.error {
            return Err(ProviderError::Status {
                status: 500,
                message: error_message(&err.to_string()),
                retry_after: None,
            });
        }
        if let Some(m) = chunk.model.filter(|m| !m.is_empty()) {
            self.model = m;
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u.into());
        }
        for c in chunk.choices {
            if let Some(delta) = c.delta {
                if let Some(content) = delta.content {
                    self.answer.push(&content, deltas).await?;
                }
                for call in delta.tool_calls {
                    let (name, arguments) = call
                        .function
                        .map(|f| (f.name, f.arguments))
                        .unwrap_or_default();
                    self.calls
                        .start(call.index, call.id.as_deref(), name.as_deref());
                    if let Some(a) = arguments {
                        self.calls.arguments(call.index, &a)?;
                    }
                }
            }
            if let Some(f) = c.finish_reason.filter(|f| !f.is_empty()) {
                self.finished = true;
                self.finish_reason = Some(f);
            }
        }
        Ok(false)
    }

    fn finish(self) -> Completion {
        Completion {
            text: self.answer.text,
            tool_calls: self.calls.finish(),
            reasoning: None,
            call_usage: None,
            usage: self.usage,
            model: self.model,
            finish_reason: self.finish_reason,
        }
    }
}

fn parse_completion(bytes: &[u8], default_model: &str) -> Result<Completion, ProviderError> {
    #[derive(Deserialize)]
    struct Resp {
        #[serde(default)]
        model: Option<String>,
        choices: Vec<Choice>,
        #[serde(default)]
        usage: Option<OpenAiUsage>,
    }
    #[derive(Deserialize)]
    struct Choice {
        message: Msg,
        #[serde(default)]
        finish_reason: Option<String>,
    }
    #[derive(Deserialize)]
    struct Msg {
        #[serde(default)]
        content: Option<String>,
        #[serde(default)]
        tool_calls: Vec<Call>,
    }
    #[derive(Deserialize)]
    struct Call {
        #[serde(default)]
        id: String,
        function: Function,
    }
    #[derive(Deserialize)]
    struct Function {
        name: String,
        #[serde(default)]
        arguments: String,
    }
    let r: Resp = serde_json::from_slice(bytes)
        .map_err(|e| ProviderError::Protocol(format!("bad completion: {e}")))?;
    let (text, calls, finish_reason) = r
        .choices
        .into_iter()
        .next()
        .map(|c| {
            (
                c.message.content.unwrap_or_default(),
                c.message.tool_calls,
                c.finish_reason,
            )
        })
        .unwrap_or_default();
    let tool_calls: Vec<FunctionCall> = calls
        .into_iter()
        .map(|c| FunctionCall {
            id: c.id,
            name: c.function.name,
            arguments: c.function.arguments,
            signature: None,
        })
        .collect();
    let args: usize = tool_calls.iter().map(|c| c.arguments.len()).sum();
    if text.len() + args > MAX_REPLY_BYTES {
        return Err(ProviderError::Protocol(format!(
            "reply longer than {MAX_REPLY_BYTES} bytes"
        )));
    }
    Ok(Completion {
        text,
        tool_calls,
        reasoning: None,
        call_usage: None,
        usage: r.usage.map(Usage::from),
        model: r.model.unwrap_or_else(|| default_model.to_owned()),
        finish_reason: finish_reason.filter(|f| !f.is_empty()),
    })
}

/// The `error.message` of an OpenAI error body, else the (shortened) body itself.
fn error_message(body: &str) -> String {
    #[derive(Deserialize)]
    struct E {
        error: EI,
    }
    #[derive(Deserialize)]
    struct EI {
        message: String,
    }
    match serde_json::from_str::<E>(body) {
        Ok(e) => e.error.message,
        Err(_) => super::short_body(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_messages() {
        assert_eq!(
            error_message(r#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#),
            "bad key"
        );
        assert_eq!(error_message(""), "(empty body)");
        assert_eq!(error_message(&"x".repeat(1000)).len(), 300);
    }

    #[test]
    fn plain_completion() {
        let c = parse_completion(
            br#"{"model":"m","choices":[{"message":{"role":"assistant","content":"hi"}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
            "d",
        )
        .unwrap();
        assert_eq!(c.text, "hi");
        assert_eq!(c.usage.unwrap().total_tokens, 3);
        assert!(parse_completion(b"{}", "d").is_err());
    }

    #[tokio::test]
    async fn stream_chunks_accumulate() {
        let mut a = Accumulator::default();
        let (tx, mut rx) = mpsc::channel(8);
        assert!(!a
            .event(
                r#"{"model":"gpt","choices":[{"delta":{"role":"assistant"}}]}"#,
                Some(&tx)
            )
            .await
            .unwrap());
        assert!(!a
            .event(r#"{"choices":[{"delta":{"content":"Hel"}}]}"#, Some(&tx))
            .await
            .unwrap());
        assert!(!a
            .event(
                r#"{"choices":[{"delta":{"content":"lo"},"finish_reason":"stop"}]}"#,
                Some(&tx)
            )
            .await
            .unwrap());
        assert!(!a.event(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#, None).await.unwrap());
        assert!(a.event("[DONE]", None).await.unwrap());
        assert!(a.event("not json", None).await.is_err());
        let c = a.finish();
        assert_eq!(
            (
                c.text.as_str(),
                c.model.as_str(),
                c.usage.unwrap().total_tokens
            ),
            ("Hello", "gpt", 7)
        );
        assert_eq!(rx.recv().await.as_deref(), Some("Hel"));
    }

    #[tokio::test]
    async fn streamed_tool_calls_accumulate_by_index() {
        let mut a = Accumulator::default();
        let evs = [
            r#"{"choices":[{"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"read","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"path\":"}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"ls","arguments":""}}]}}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"a\"}"}}]}}]}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
        ];
        for e in evs {
            assert!(!a.event(e, None).await.unwrap(), "{e}");
        }
        let c = a.finish();
        let calls: Vec<(&str, &str, &str)> = c
            .tool_calls
            .iter()
            .map(|c| (c.id.as_str(), c.name.as_str(), c.arguments.as_str()))
            .collect();
        assert_eq!(
            calls,
            vec![
                ("call_a", "read", r#"{"path":"a"}"#),
                ("call_b", "ls", "{}")
            ]
        );
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn tool_messages_and_tools_are_in_chat_completions_form() {
        let call = FunctionCall {
            id: "call_a".into(),
            name: "read".into(),
            arguments: "{}".into(),
            signature: None,
        };
        let msgs = [
            ChatMessage {
                role: Role::Assistant,
                tool_calls: vec![call.clone()],
                ..Default::default()
            },
            ChatMessage::tool_result(&call, "ok"),
        ];
        let tools = [clawbus_wire::ToolSpec {
            name: "read".into(),
            description: "d".into(),
            parameters: "not json".into(),
        }];
        let b = body(
            "m",
            &Prompt {
                messages: &msgs,
                tools: &tools,
                tool_choice: Some(r#"{"type":"function","function":{"name":"read"}}"#),
                thinking: crate::providers::Thinking::Low,
                ..Default::default()
            },
            None,
        );
        assert_eq!(b["messages"][0]["content"], Value::Null);
        assert_eq!(
            b["messages"][0]["tool_calls"][0]["function"]["name"],
            "read"
        );
        assert_eq!(
            b["messages"][1],
            json!({"role": "tool", "tool_call_id": "call_a", "content": "ok"})
        );
        assert_eq!(b["tools"][0]["function"]["parameters"]["type"], "object");
        assert_eq!(b["tool_choice"]["function"]["name"], "read");
        assert_eq!(b["reasoning_effort"], "low");
    }
}
