//! Replies as OpenAI responses: error mapping, usage, and the server-sent event stream
//! of `chat.completion.chunk`s.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use clawbus_wire::OutboundMessage;
use futures::Stream;
use serde_json::{json, Value};

use crate::api::Gateway;
use crate::openai::ApiError;
use crate::replies::{Registration, ReplyEvent};

pub(crate) fn reply_error(err: &clawbus_wire::ErrorInfo) -> ApiError {
    let status = match err.code.as_str() {
        "provider_not_configured" | "history_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
        c if c.starts_with("provider_") => StatusCode::BAD_GATEWAY,
        // The turn ran and stopped at one of its limits: not the caller's fault.
        c if c.starts_with("tool_") || c == "turn_timeout" || c == "checkpoint_unavailable" => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        _ => StatusCode::BAD_REQUEST,
    };
    let kind = if status == StatusCode::BAD_REQUEST {
        "invalid_request_error"
    } else {
        "server_error"
    };
    ApiError::new(status, kind, Some(err.code.clone()), err.message.clone())
}

/// The caller's function calls of a reply as `delta.tool_calls` fragments, as
/// OpenAI streams them: the id and name first, then the arguments.
fn tool_call_chunks(out: &OutboundMessage) -> Vec<Value> {
    out.tool_calls
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            [
                json!({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": ""}}]}),
                json!({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]}),
            ]
        })
        .collect()
}

/// The model's reason for ending its answer; `stop` when the provider gave none.
pub(crate) fn finish_reason(out: &OutboundMessage) -> &str {
    out.finish_reason.as_deref().unwrap_or("stop")
}

pub(crate) fn usage_json(out: &OutboundMessage) -> Value {
    let u = out.usage.unwrap_or_default();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens,
           "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
           "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens}})
}

pub(crate) struct ReplyMeta {
    pub id: String,
    pub created: i64,
    pub model: String,
}

impl ReplyMeta {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        sse(&json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        }))
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Streams the reply as OpenAI `chat.completion.chunk` events, then `data: [DONE]`.
pub(crate) fn sse_response(
    gw: Arc<Gateway>,
    reg: Registration,
    meta: ReplyMeta,
    include_usage: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response {
    let stream = reply_stream(gw, reg, meta, include_usage, permit);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

fn reply_stream(
    gw: Arc<Gateway>,
    mut reg: Registration,
    meta: ReplyMeta,
    include_usage: bool,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    async_stream(move |tx| async move {
        let _permit = permit;
        gw.metrics.waiting.inc();
        let _ = tx
            .send(meta.chunk(json!({"role": "assistant", "content": ""}), None))
            .await;
        // What the client has so far; a retried attempt may only continue it exactly.
        let mut text = Continuation::default();
        let deadline = tokio::time::Instant::now() + gw.timeout;
        loop {
            match tokio::time::timeout_at(deadline, reg.rx.recv()).await {
                Ok(Some(ReplyEvent::Delta(d))) => match text.delta(d.attempt, d.offset, &d.text) {
                    Ok(None) => {}
                    Ok(Some(piece)) => {
                        if tx
                            .send(meta.chunk(json!({"content": piece}), None))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Err(Diverged) => {
                        send_restarted(&tx).await;
                        break;
                    }
                },
                Ok(Some(ReplyEvent::Final(out))) => {
                    if let Some(err) = &out.error {
                        let _ = tx.send(sse(&reply_error(err).body())).await;
                    } else {
                        match text.finish(&out.text) {
                            Err(Diverged) => {
                                send_restarted(&tx).await;
                                break;
                            }
                            Ok(rest) => {
                                if !rest.is_empty() {
                                    let _ =
                                        tx.send(meta.chunk(json!({"content": rest}), None)).await;
                                }
                            }
                        }
                        for chunk in tool_call_chunks(&out) {
                            let _ = tx.send(meta.chunk(chunk, None)).await;
                        }
                        let _ = tx
                            .send(meta.chunk(json!({}), Some(finish_reason(&out))))
                            .await;
                        if include_usage {
                            let _ = tx.send(sse(&json!({
                                "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                                "model": meta.model, "choices": [], "usage": usage_json(&out),
                            }))).await;
                        }
                    }
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    let e = ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "server_error",
                        Some("timeout".into()),
                        "no reply in time",
                    );
                    let _ = tx.send(sse(&e.body())).await;
                    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    break;
                }
            }
        }
        gw.metrics.waiting.dec();
    })
}

/// Tells the client its reply was regenerated differently, then ends the stream.
async fn send_restarted(tx: &tokio::sync::mpsc::Sender<Bytes>) {
    let e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        Some("reply_restarted".into()),
        "the turn was interrupted and its retry produced a different reply; the complete reply is kept in the session history",
    );
    let _ = tx.send(sse(&e.body())).await;
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}

/// A retried attempt's text does not continue what the client already has.
#[derive(Debug, PartialEq)]
pub(crate) struct Diverged;

/// The text a streaming client has received, and the attempt producing it. Deltas of
/// one attempt extend it; when a turn is retried (a crash, a failover) the new
/// attempt's text is held back until it is known to continue the client's text
/// exactly, so the client never sees two attempts spliced together.
#[derive(Debug, Default)]
pub(crate) struct Continuation {
    /// What the client has.
    sent: String,
    /// The newest attempt seen, and its text so far (contiguous from offset 0).
    attempt: Option<u32>,
    attempt_text: String,
    /// A delta of this attempt was lost (slow reader): wait for the final reply.
    gap: bool,
}

impl Continuation {
    /// A delta: returns the text to send now, if any.
    pub(crate) fn delta(
        &mut self,
        attempt: u32,
        offset: u64,
        text: &str,
    ) -> Result<Option<String>, Diverged> {
        match self.attempt {
            Some(a) if attempt < a => return Ok(None), // a stale attempt
            Some(a) if attempt == a => {}
            _ => {
                self.attempt = Some(attempt);
                self.attempt_text.clear();
                self.gap = false;
            }
        }
        let (start, len) = (offset as usize, self.attempt_text.len());
        if self.gap || start + text.len() <= len {
            return Ok(None);
        }
        if start > len || !text.is_char_boundary(len - start) {
            self.gap = true;
            return Ok(None);
        }
        self.attempt_text.push_str(&text[len - start..]);
        self.advance()
    }

    fn advance(&mut self) -> Result<Option<String>, Diverged> {
        let (new, sent) = (&self.attempt_text, &self.sent);
        if new.len() <= sent.len() {
            return if sent.starts_with(new.as_str()) {
                Ok(None)
            } else {
                Err(Diverged)
            };
        }
        if !new.starts_with(sent.as_str()) {
            return Err(Diverged);
        }
        let piece = new[sent.len()..].to_owned();
        self.sent.clone_from(new);
        Ok(Some(piece))
    }

    /// The final reply: returns what the client still lacks.
    pub(crate) fn finish(&mut self, full: &str) -> Result<String, Diverged> {
        if !full.starts_with(self.sent.as_str()) {
            return Err(Diverged);
        }
        let rest = full[self.sent.len()..].to_owned();
        self.sent = full.to_owned();
        Ok(rest)
    }
}

/// A stream fed by a task through a bounded channel; dropping the stream (client gone)
/// ends the task at its next send.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Bytes, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(f(tx));
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_attempt_streams_as_it_comes() {
        let mut c = Continuation::default();
        assert_eq!(c.delta(1, 0, "Hel"), Ok(Some("Hel".into())));
        assert_eq!(c.delta(1, 3, "lo"), Ok(Some("lo".into())));
        assert_eq!(c.delta(1, 3, "lo"), Ok(None), "a duplicate is ignored");
        assert_eq!(c.finish("Hello!"), Ok("!".into()));
    }

    #[test]
    fn a_retry_that_continues_exactly_is_spliced_seamlessly() {
        let mut c = Continuation::default();
        c.delta(1, 0, "Hello wor").unwrap();
        // Attempt 2 regenerates the same text: held back until it goes further.
        assert_eq!(c.delta(2, 0, "Hello"), Ok(None));
        assert_eq!(c.delta(2, 5, " world"), Ok(Some("ld".into())));
        assert_eq!(c.delta(1, 9, "ld??"), Ok(None), "the old attempt is stale");
        assert_eq!(c.finish("Hello world."), Ok(".".into()));
    }

    #[test]
    fn a_retry_with_other_text_is_an_error_never_a_mixture() {
        let mut c = Continuation::default();
        c.delta(1, 0, "Hello wor").unwrap();
        assert_eq!(c.delta(2, 0, "Hi"), Err(Diverged));
        let mut c = Continuation::default();
        c.delta(1, 0, "Hello wor").unwrap();
        assert_eq!(c.delta(2, 0, "Hello"), Ok(None));
        assert_eq!(c.finish("Hello there"), Err(Diverged));
    }

    #[test]
    fn a_gap_waits_for_the_final_reply() {
        let mut c = Continuation::default();
        c.delta(1, 0, "ab").unwrap();
        assert_eq!(c.delta(1, 5, "fg"), Ok(None));
        assert_eq!(c.delta(1, 7, "h"), Ok(None));
        assert_eq!(c.finish("abcdefgh"), Ok("cdefgh".into()));
        let mut c = Continuation::default();
        c.delta(1, 0, "né").unwrap();
        assert_eq!(c.delta(1, 2, "éx"), Ok(None), "inside a character: a gap");
    }
}
