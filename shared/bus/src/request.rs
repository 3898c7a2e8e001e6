//! Request/reply on core NATS, typed: the store's history, sessions and usage queries,
//! the sandbox's tool calls and tool lists.
//!
//! - [`Bus::request`] sends an envelope with the schema id, `traceparent` and a
//!   `Clawbus-Deadline` header (Unix milliseconds) and waits at most until that
//!   deadline for a typed answer.
//! - [`serve`] answers a subject in a queue group with bounded concurrency, drops
//!   requests whose deadline already passed (nobody waits for them), reports itself in
//!   readiness and, on stop, stops taking requests and lets those in hand finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clawbus_telemetry::Readiness;
use clawbus_wire::{decode, encode, Envelope, Kind};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Bus, BusError, TraceContext};

/// Header carrying a request's deadline, in Unix milliseconds.
pub const DEADLINE_HEADER: &str = "Clawbus-Deadline";

impl Bus {
    /// Sends a typed request and waits up to `timeout` for its typed answer.
    pub async fn request<Req: Kind, Resp: Kind>(
        &self,
        subject: String,
        env: &Envelope<Req>,
        trace: &TraceContext,
        timeout: Duration,
    ) -> Result<Envelope<Resp>, BusError> {
        let fail = |reason: String| BusError::Request {
            subject: subject.clone(),
            reason,
        };
        let payload = encode(env)?;
        let mut h = crate::typed_headers::<Req>(trace);
        let deadline = clawbus_wire::now_ms() + timeout.as_millis() as i64;
        h.insert(DEADLINE_HEADER, deadline.to_string().as_str());
        let req = async_nats::Request::new()
            .headers(h)
            .payload(payload.into())
            .timeout(Some(timeout));
        let msg = self
            .client
            .send_request(subject.clone(), req)
            .await
            .map_err(|e| fail(e.to_string()))?;
        decode::<Resp>(&msg.payload).map_err(|e| fail(format!("malformed answer: {e}")))
    }
}

/// Answers requests of one subject.
pub trait Responder: Send + Sync + 'static {
    type Req: Kind + Send + 'static;
    type Resp: Kind + Send + 'static;

    /// The answer to a request, or to one that could not be decoded (`Err` carries
    /// why): a malformed request gets an error answer, never silence.
    fn respond(
        &self,
        req: Result<Envelope<Self::Req>, String>,
    ) -> impl Future<Output = Self::Resp> + Send;
}

/// Settings of a responder.
#[derive(Clone)]
pub struct ResponderOpts {
    pub subject: String,
    /// Queue group: each request goes to one member.
    pub queue: &'static str,
    pub concurrency: usize,
    /// How long stop waits for requests in hand.
    pub drain_deadline: Duration,
    /// Readiness component that is ready while requests are taken.
    pub readiness: Option<(Readiness, &'static str)>,
}

/// Answers requests until `stop`, then drains.
pub async fn serve<R: Responder>(
    bus: Bus,
    opts: ResponderOpts,
    responder: Arc<R>,
    stop: CancellationToken,
) {
    let ready = |v: bool| {
        if let Some((r, name)) = &opts.readiness {
            r.set(name, v);
        }
    };
    let subscribe = || async {
        loop {
            match bus
                .client
                .queue_subscribe(opts.subject.clone(), opts.queue.into())
                .await
            {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!(subject = %opts.subject, error = %e, "Cannot subscribe; retrying");
                    if crate::consumer::sleep_or_cancel(Duration::from_secs(1), &stop).await {
                        return None;
                    }
                }
            }
        }
    };
    let Some(mut sub) = subscribe().await else {
        return;
    };
    ready(true);
    let limit = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    loop {
        let msg = tokio::select! {
            m = sub.next() => m,
            _ = stop.cancelled() => break,
        };
        let Some(msg) = msg else {
            // The subscription ended under us (the connection was closed): not ready
            // until subscribed again.
            ready(false);
            tracing::warn!(subject = %opts.subject, "Subscription ended; subscribing again");
            match subscribe().await {
                Some(s) => {
                    sub = s;
                    ready(true);
                    continue;
                }
                None => break,
            }
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        while tasks.try_join_next().is_some() {}
        let expired = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(DEADLINE_HEADER))
            .and_then(|v| v.as_str().parse::<i64>().ok())
            .is_some_and(|d| d < clawbus_wire::now_ms());
        if expired {
            tracing::debug!(subject = %opts.subject, "Request past its deadline dropped");
            continue;
        }
        let trace = TraceContext::from_headers(msg.headers.as_ref());
        let span =
            tracing::info_span!("request", subject = %opts.subject, trace_id = %trace.trace_id);
        let (responder, client) = (responder.clone(), bus.client.clone());
        tasks.spawn(
            async move {
                let _permit = permit;
                let req = decode::<R::Req>(&msg.payload).map_err(|e| e.to_string());
                let id = match &req {
                    Ok(e) => format!("{}:reply", e.id),
                    Err(_) => format!("reply:{}", clawbus_wire::now_ms()),
                };
                let resp = responder.respond(req).await;
                let env = Envelope::new(id, clawbus_wire::now_ms(), resp);
                match encode(&env) {
                    Ok(bytes) => {
                        if let Err(e) = client.publish(reply, bytes.into()).await {
                            tracing::warn!(error = %e, "Reply failed");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "Reply could not be encoded"),
                }
            }
            .instrument(span),
        );
    }
    ready(false);
    let _ = sub.unsubscribe().await;
    let drained = tokio::time::timeout(opts.drain_deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
}
