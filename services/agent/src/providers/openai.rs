//! OpenAI Chat Completions over HTTP with streaming (`stream: true`, SSE), as served by
//! OpenAI and every compatible server (vLLM, llama.cpp, Ollama, LiteLLM, ...).

use clawbus_wire::{ChatMessage, Role, Usage};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::{Completion, ProviderError, MAX_REPLY_BYTES};

/// The OpenAI Chat Completions API at an endpoint (OpenAI or a compatible server).
#[derive(Clone)]
pub struct OpenAiProvider(pub super::Endpoint);

impl OpenAiProvider {
    /// Streams a chat completion; each content delta is sent to `deltas` when given.
    pub async fn chat(
        &self,
        messages: &[ChatMessage],
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        let body = json!({
            "model": self.0.model,
            "messages": messages.iter().filter(|m| m.role != Role::Unknown).map(|m| json!({
                "role": m.role.as_str(), "content": m.content,
            })).collect::<Vec<_>>(),
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let mut body = body;
        if let Some(n) = self.0.max_tokens {
            body["max_tokens"] = n.into();
        }
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
            if let Some(content) = c.delta.and_then(|d| d.content) {
                self.answer.push(&content, deltas).await?;
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
    }
    let r: Resp = serde_json::from_slice(bytes)
        .map_err(|e| ProviderError::Protocol(format!("bad completion: {e}")))?;
    let (text, finish_reason) = r
        .choices
        .into_iter()
        .next()
        .map(|c| (c.message.content.unwrap_or_default(), c.finish_reason))
        .unwrap_or_default();
    if text.len() > MAX_REPLY_BYTES {
        return Err(ProviderError::Protocol(format!(
            "reply longer than {MAX_REPLY_BYTES} bytes"
        )));
    }
    Ok(Completion {
        text,
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
}
