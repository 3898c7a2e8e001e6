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
        _ => StatusCode::BAD_REQUEST,
    };
    let kind = if status == StatusCode::BAD_REQUEST {
        "invalid_request_error"
    } else {
        "server_error"
    };
    ApiError::new(status, kind, Some(err.code.clone()), err.message.clone())
}

pub(crate) fn usage_json(out: &OutboundMessage) -> Value {
    let u = out.usage.unwrap_or_default();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
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
        // Bytes of the reply sent so far; deltas of a retried attempt and the final
        // reply only ever add what lies beyond it.
        let mut sent = 0usize;
        let deadline = tokio::time::Instant::now() + gw.timeout;
        loop {
            match tokio::time::timeout_at(deadline, reg.rx.recv()).await {
                Ok(Some(ReplyEvent::Delta(d))) => {
                    let (start, end) = (d.offset as usize, d.offset as usize + d.text.len());
                    if end <= sent || start > sent {
                        continue; // already sent, or a gap the final reply will fill
                    }
                    let cut = sent - start;
                    if !d.text.is_char_boundary(cut) {
                        continue;
                    }
                    let piece = &d.text[cut..];
                    sent = end;
                    if tx
                        .send(meta.chunk(json!({"content": piece}), None))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Some(ReplyEvent::Final(out))) => {
                    if let Some(err) = &out.error {
                        let _ = tx.send(sse(&reply_error(err).body())).await;
                    } else {
                        if out.text.len() > sent && out.text.is_char_boundary(sent) {
                            let _ = tx
                                .send(meta.chunk(json!({"content": &out.text[sent..]}), None))
                                .await;
                        }
                        let _ = tx.send(meta.chunk(json!({}), Some("stop"))).await;
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
