//! Google Gemini API with streaming: `POST
//! <base>/v1beta/models/<model>:streamGenerateContent?alt=sse` (`x-goog-api-key`), a
//! stream of `GenerateContentResponse` events until the connection closes. Thought
//! parts (`thought: true`) are not part of the answer.

use clawbus_wire::{FunctionCall, Usage};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{Answer, Block, Completion, Prompt, ProviderError};

pub const DEFAULT_BASE_URL: &str = "https://generativelanguage.googleapis.com";

/// The Gemini API at an endpoint.
#[derive(Clone)]
pub struct GeminiProvider(pub super::Endpoint);

impl GeminiProvider {
    /// The request body for a prompt.
    pub fn body(&self, prompt: &Prompt<'_>) -> Value {
        let contents: Vec<Value> = super::alternating(prompt.messages)
            .into_iter()
            .map(|(user, blocks)| {
                let parts: Vec<Value> = blocks.iter().filter_map(part_json).collect();
                json!({"role": if user { "user" } else { "model" }, "parts": parts})
            })
            .collect();
        let mut body = json!({"contents": contents});
        if !prompt.tools.is_empty() {
            let decls: Vec<Value> = prompt
                .tools
                .iter()
                .map(|t| {
                    json!({"name": t.name, "description": t.description,
                           "parametersJsonSchema": super::schema_of(t)})
                })
                .collect();
            body["tools"] = json!([{"functionDeclarations": decls}]);
            let mut config = match prompt.choice() {
                ("none", _) => json!({"mode": "NONE"}),
                ("required", _) => json!({"mode": "ANY"}),
                _ => json!({"mode": "AUTO"}),
            };
            if let (_, Some(name)) = prompt.choice() {
                config["allowedFunctionNames"] = json!([name]);
            }
            body["toolConfig"] = json!({"functionCallingConfig": config});
        }
        let system = super::system_text(prompt.messages);
        if !system.is_empty() {
            body["systemInstruction"] = json!({"parts": [{"text": system}]});
        }
        if let Some(n) = self.0.max_tokens {
            body["generationConfig"]["maxOutputTokens"] = n.into();
        }
        if let Some(budget) = prompt.thinking.budget() {
            body["generationConfig"]["thinkingConfig"] = json!({"thinkingBudget": budget});
        }
        body
    }

    pub async fn chat(
        &self,
        prompt: &Prompt<'_>,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        // The model is a path segment: it may not carry path syntax.
        if self.0.model.is_empty() || self.0.model.contains(['/', '?', '#', ':']) {
            return Err(ProviderError::Protocol(format!(
                "`{}` is not a Gemini model name",
                self.0.model
            )));
        }
        let path = format!(
            "/v1beta/models/{}:streamGenerateContent?alt=sse",
            self.0.model
        );
        let body = self.body(prompt);
        let resp = self
            .0
            .post(&path, &body, "x-goog-api-key", &[], error_message)
            .await?;
        let mut s = Stream {
            model: self.0.model.clone(),
            ..Default::default()
        };
        let mut events = self.0.events(resp);
        while let Some(data) = events.next().await? {
            s.event(&data, deltas).await?;
        }
        if s.finish_reason.is_none() {
            return Err(ProviderError::Network(
                "stream ended before a finishReason".into(),
            ));
        }
        Ok(s.finish())
    }
}

/// A block as a Gemini part: a function's result answers by the function's name.
fn part_json(b: &Block<'_>) -> Option<Value> {
    Some(match b {
        Block::Reasoning(_) => return None,
        Block::Text(t) => json!({"text": t}),
        Block::Call(c) => {
            let mut p =
                json!({"functionCall": {"name": c.name, "args": super::arguments_object(c)}});
            if let Some(sig) = &c.signature {
                p["thoughtSignature"] = sig.clone().into();
            }
            p
        }
        Block::Result(_, name, content) => {
            json!({"functionResponse": {"name": name, "response": {"content": content}}})
        }
    })
}

#[derive(Default)]
struct Stream {
    answer: Answer,
    tool_calls: Vec<FunctionCall>,
    call_bytes: usize,
    model: String,
    usage: Option<Usage>,
    finish_reason: Option<String>,
}

impl Stream {
    /// Handles one event (the stream ends when the connection closes).
    async fn event(
        &mut self,
        data: &str,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<(), ProviderError> {
        let ev: Value = serde_json::from_str(data)
            .map_err(|e| ProviderError::Protocol(format!("bad stream event: {e}")))?;
        if ev.get("error").is_some() {
            let e = &ev["error"];
            return Err(ProviderError::Status {
                status: e["code"].as_u64().unwrap_or(500) as u16,
                message: e["message"].as_str().unwrap_or("stream error").to_owned(),
                retry_after: None,
            });
        }
        if let Some(m) = ev["modelVersion"].as_str().filter(|m| !m.is_empty()) {
            self.model = m.to_owned();
        }
        let candidate = &ev["candidates"][0];
        if let Some(parts) = candidate["content"]["parts"].as_array() {
            for p in parts.iter().filter(|p| p["thought"] != true) {
                if let Some(call) = p.get("functionCall") {
                    // Whole calls, never fragments; ids only from newer models.
                    let arguments = call["args"].to_string();
                    self.call_bytes += arguments.len();
                    if self.call_bytes > super::MAX_REPLY_BYTES {
                        return Err(ProviderError::Protocol(
                            "function call arguments too long".into(),
                        ));
                    }
                    self.tool_calls.push(FunctionCall {
                        id: call["id"].as_str().unwrap_or_default().to_owned(),
                        name: call["name"].as_str().unwrap_or_default().to_owned(),
                        arguments: if call["args"].is_object() {
                            arguments
                        } else {
                            "{}".into()
                        },
                        signature: p["thoughtSignature"].as_str().map(str::to_owned),
                    });
                    continue;
                }
                self.answer
                    .push(p["text"].as_str().unwrap_or_default(), deltas)
                    .await?;
            }
        }
        if let Some(r) = candidate["finishReason"].as_str() {
            self.finish_reason = Some(finish_reason(r));
        }
        let u = &ev["usageMetadata"];
        if u.is_object() {
            let prompt = u["promptTokenCount"].as_u64().unwrap_or(0);
            let thoughts = u["thoughtsTokenCount"].as_u64().unwrap_or(0);
            let completion = u["candidatesTokenCount"].as_u64().unwrap_or(0) + thoughts;
            self.usage = Some(Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: u["totalTokenCount"].as_u64().unwrap_or(prompt + completion),
                cached_tokens: u["cachedContentTokenCount"].as_u64().unwrap_or(0),
                reasoning_tokens: thoughts,
            });
        }
        Ok(())
    }

    fn finish(self) -> Completion {
        Completion {
            text: self.answer.text,
            tool_calls: self.tool_calls,
            reasoning: None,
            call_usage: None,
            usage: self.usage,
            model: self.model,
            finish_reason: self.finish_reason,
        }
    }
}

/// Gemini's `finishReason` in OpenAI's terms.
pub fn finish_reason(r: &str) -> String {
    match r {
        "STOP" => "stop".to_owned(),
        "MAX_TOKENS" => "length".to_owned(),
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => {
            "content_filter".to_owned()
        }
        other => other.to_ascii_lowercase(),
    }
}

/// The `error.message` of a Google error body, else the (shortened) body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| super::short_body(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawbus_wire::{ChatMessage, Role};
    use std::time::Duration;

    #[test]
    fn the_body_uses_model_roles_and_a_system_instruction() {
        let mut p = GeminiProvider(
            super::super::Endpoint::new(
                "http://x",
                None,
                "gemini-2.5-flash",
                Duration::from_secs(1),
            )
            .unwrap(),
        );
        p.0.max_tokens = Some(100);
        let m = |role, c: &str| ChatMessage::new(role, c);
        let b = p.body(&Prompt::new(&[
            m(Role::System, "sys"),
            m(Role::User, "hi"),
            m(Role::Assistant, "yo"),
        ]));
        assert_eq!(b["contents"][1]["role"], "model");
        assert_eq!(b["systemInstruction"]["parts"][0]["text"], "sys");
        assert_eq!(b["generationConfig"]["maxOutputTokens"], 100);
    }

    #[tokio::test]
    async fn a_stream_accumulates_without_thoughts() {
        let mut s = Stream::default();
        let evs = [
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"plan","thought":true},{"text":"Hel"}]}}],"modelVersion":"gemini-2.5-flash-001"}"#,
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"lo"}]},"finishReason":"MAX_TOKENS"}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":2,"thoughtsTokenCount":1,"totalTokenCount":6}}"#,
        ];
        for e in evs {
            s.event(e, None).await.unwrap();
        }
        let c = s.finish();
        assert_eq!(c.text, "Hello");
        assert_eq!(c.model, "gemini-2.5-flash-001");
        assert_eq!(c.finish_reason.as_deref(), Some("length"));
        assert_eq!(c.usage.unwrap().completion_tokens, 3);
        let mut s = Stream::default();
        let e = s
            .event(
                r#"{"error":{"code":503,"message":"overloaded","status":"UNAVAILABLE"}}"#,
                None,
            )
            .await
            .unwrap_err();
        assert!(e.is_retryable());
    }

    #[tokio::test]
    async fn model_names_cannot_escape_the_path() {
        let p = GeminiProvider(
            super::super::Endpoint::new("http://127.0.0.1:1", None, "../x", Duration::from_secs(1))
                .unwrap(),
        );
        assert!(matches!(
            p.chat(&Prompt::default(), None).await,
            Err(ProviderError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn function_calls_are_whole_parts_with_their_signature() {
        let mut s = Stream::default();
        s.event(
            r#"{"candidates":[{"content":{"role":"model","parts":[{"functionCall":{"name":"read","args":{"path":"a"}},"thoughtSignature":"c2ln"}]},"finishReason":"STOP"}]}"#,
            None,
        )
        .await
        .unwrap();
        let c = s.finish();
        assert_eq!(c.tool_calls.len(), 1);
        assert_eq!(c.tool_calls[0].arguments, r#"{"path":"a"}"#);
        assert_eq!(c.tool_calls[0].signature.as_deref(), Some("c2ln"));
        let p = GeminiProvider(
            super::super::Endpoint::new("http://x", None, "g", Duration::from_secs(1)).unwrap(),
        );
        let msgs = [
            ChatMessage::new(Role::User, "go"),
            ChatMessage {
                role: Role::Assistant,
                tool_calls: c.tool_calls.clone(),
                ..Default::default()
            },
            ChatMessage::tool_result(&c.tool_calls[0], "text"),
        ];
        let b = p.body(&Prompt::new(&msgs));
        assert_eq!(b["contents"][1]["parts"][0]["thoughtSignature"], "c2ln");
        assert_eq!(
            b["contents"][2]["parts"][0]["functionResponse"],
            json!({"name": "read", "response": {"content": "text"}})
        );
    }
}
