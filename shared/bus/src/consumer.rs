//! The pull-consumer runner: the one loop every service uses to handle bus messages.
//!
//! - **Bounded**: at most `concurrency` messages are in flight; the consumer's
//!   `max_ack_pending` and the fetch batch are sized to it, so the server stops
//!   delivering when handlers are busy (backpressure) and nothing waits in a client
//!   buffer long enough to be redelivered spuriously.
//! - **Ordered per key**: messages whose handler key is equal run one at a time in
//!   delivery order (one active turn per session); other keys run in parallel.
//! - **Alive**: while a message is being handled (or waits for its key), a progress ack
//!   is sent every third of the ack wait, so a short ack wait still detects a dead
//!   process quickly without redelivering slow model calls.
//! - **Typed outcomes**: ack; retry (nak with delay) until `max_deliver`, then dead
//!   letter; reject (dead letter at once, then term). A dead letter is a copy of the
//!   message on `claw.v1.dlq.<consumer>`; the original is termed only once the copy is
//!   stored, so a poison message is never simply dropped.
//! - **Never ends on a transient error**; shutdown stops pulling, lets in-flight
//!   handlers finish (up to a deadline) and returns.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{Bus, TraceContext};

/// What to do with a handled message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: its effect is durable.
    Ack,
    /// Transient failure: redeliver after `delay` (dead letter after `max_deliver`).
    Retry { delay: Duration, reason: String },
    /// Permanent failure (malformed, unknown version, invalid): dead letter now.
    Reject { reason: String },
}

impl Outcome {
    pub fn retry(delay: Duration, reason: impl Into<String>) -> Self {
        Outcome::Retry {
            delay,
            reason: reason.into(),
        }
    }

    pub fn reject(reason: impl Into<String>) -> Self {
        Outcome::Reject {
            reason: reason.into(),
        }
    }
}

/// A received message, as handlers see it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    /// 1 on first delivery.
    pub delivered: i64,
    pub stream_seq: u64,
    pub trace: TraceContext,
}

/// Handles messages of one consumer.
pub trait Handler: Send + Sync + 'static {
    /// Messages with the same key are handled one at a time, in delivery order.
    fn key(&self, _d: &Delivery) -> Option<String> {
        None
    }

    fn handle(&self, d: Delivery) -> impl Future<Output = Outcome> + Send;
}

/// Settings of a runner.
#[derive(Debug, Clone)]
pub struct RunnerOpts {
    /// Consumer name, used in metrics, logs and the dead-letter subject.
    pub name: &'static str,
    pub concurrency: usize,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// How long shutdown waits for in-flight handlers.
    pub drain_deadline: Duration,
}

type Chains = Arc<Mutex<HashMap<String, (u64, oneshot::Receiver<()>)>>>;

/// A message's place in its key's chain: it runs after `prev` completes and signals
/// its successor by dropping `done`.
struct KeySlot {
    key: String,
    ticket: u64,
    done: oneshot::Sender<()>,
    prev: Option<oneshot::Receiver<()>>,
}

/// Runs `handler` over `consumer` until `shutdown` is cancelled, then drains.
pub async fn run<H: Handler>(
    bus: Bus,
    consumer: PullConsumer,
    opts: RunnerOpts,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let chains: Chains = Arc::default();
    let mut tasks = JoinSet::new();
    let mut ticket = 0u64;
    let name = opts.name;
    let batch = opts.concurrency.clamp(1, 1000);
    // Export every series at zero from the start, so dashboards and alerts see them.
    let m = &bus.metrics;
    m.received.with_label_values(&[name]);
    m.redeliveries.with_label_values(&[name]);
    m.dead_letters.with_label_values(&[name]);
    m.stream_errors.with_label_values(&[name]);
    m.in_flight.with_label_values(&[name]);
    m.ack_pending.with_label_values(&[name]);
    m.handler_seconds.with_label_values(&[name]);
    for outcome in ["ack", "nak", "term"] {
        m.outcomes.with_label_values(&[name, outcome]);
    }
    let sampler = tokio::spawn(sample_ack_pending(
        bus.clone(),
        consumer.clone(),
        name,
        shutdown.clone(),
    ));

    'outer: loop {
        let opened = tokio::select! {
            r = consumer.stream().max_messages_per_batch(batch).heartbeat(Duration::from_secs(5)).expires(Duration::from_secs(30)).messages() => r,
            _ = shutdown.cancelled() => break 'outer,
        };
        let mut messages = match opened {
            Ok(m) => m,
            Err(e) => {
                bus.metrics.stream_errors.with_label_values(&[name]).inc();
                tracing::warn!(consumer = name, error = %e, "Cannot open message stream, retrying");
                if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                    break 'outer;
                }
                continue;
            }
        };
        let mut consecutive_errors = 0u32;
        loop {
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = sem.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = shutdown.cancelled() => break 'outer,
            };
            let next = tokio::select! {
                m = messages.next() => m,
                _ = shutdown.cancelled() => break 'outer,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                None => {
                    tracing::warn!(consumer = name, "Message stream ended, reopening");
                    break;
                }
                Some(Err(e)) => {
                    // Missing heartbeats, reconnects, a consumer briefly gone: keep going.
                    bus.metrics.stream_errors.with_label_values(&[name]).inc();
                    consecutive_errors += 1;
                    tracing::warn!(consumer = name, error = %e, consecutive_errors, "Transient consumer error");
                    if consecutive_errors >= 5 {
                        if sleep_or_cancel(Duration::from_millis(500), &shutdown).await {
                            break 'outer;
                        }
                        break;
                    }
                    continue;
                }
            };
            consecutive_errors = 0;
            let delivery = to_delivery(&msg);
            bus.metrics.received.with_label_values(&[name]).inc();
            if delivery.delivered > 1 {
                bus.metrics.redeliveries.with_label_values(&[name]).inc();
            }
            let chain = handler.key(&delivery).map(|key| {
                ticket += 1;
                let (tx, rx) = oneshot::channel::<()>();
                let prev = lock(&chains)
                    .insert(key.clone(), (ticket, rx))
                    .map(|(_, rx)| rx);
                KeySlot {
                    key,
                    ticket,
                    done: tx,
                    prev,
                }
            });
            let (bus, handler, chains, opts) =
                (bus.clone(), handler.clone(), chains.clone(), opts.clone());
            tasks.spawn(async move {
                let _permit = permit;
                handle_one(&bus, &opts, handler.as_ref(), msg, delivery, chain, &chains).await;
            });
        }
    }

    // Stop pulling, then let in-flight handlers finish.
    tracing::info!(
        consumer = name,
        in_flight = tasks.len(),
        "Consumer stopping, draining"
    );
    let drained = tokio::time::timeout(opts.drain_deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            consumer = name,
            left = tasks.len(),
            "Drain deadline passed; unfinished messages will be redelivered"
        );
        tasks.abort_all();
    }
    sampler.abort();
}

async fn handle_one<H: Handler>(
    bus: &Bus,
    opts: &RunnerOpts,
    handler: &H,
    msg: Message,
    delivery: Delivery,
    chain: Option<KeySlot>,
    chains: &Chains,
) {
    let name = opts.name;
    let started = Instant::now();
    bus.metrics.in_flight.with_label_values(&[name]).inc();
    let msg = Arc::new(msg);
    let progress = tokio::spawn(progress_acks(msg.clone(), opts.ack_wait));
    let (key_info, prev) = match chain {
        Some(slot) => (Some((slot.key, slot.ticket, slot.done)), slot.prev),
        None => (None, None),
    };
    if let Some(prev) = prev {
        // An error only means the predecessor's task ended (dropped its sender): go on.
        let _ = prev.await;
    }
    let delivered = delivery.delivered;
    let seq = delivery.stream_seq;
    let subject = delivery.subject.clone();
    let payload = delivery.payload.clone();
    let headers = delivery.headers.clone();
    let outcome = match AssertUnwindSafe(handler.handle(delivery))
        .catch_unwind()
        .await
    {
        Ok(o) => o,
        Err(_) => Outcome::retry(Duration::from_secs(1), "handler panicked"),
    };
    progress.abort();
    let label = match &outcome {
        Outcome::Ack => {
            if let Err(e) = msg.ack().await {
                tracing::warn!(consumer = name, seq, error = %e, "Ack failed; the message will be redelivered");
            }
            "ack"
        }
        Outcome::Retry { delay, reason } if delivered < opts.max_deliver => {
            tracing::warn!(consumer = name, seq, delivered, reason = %reason, "Retrying message later");
            let _ = msg.ack_with(AckKind::Nak(Some(*delay))).await;
            "nak"
        }
        Outcome::Retry { reason, .. } | Outcome::Reject { reason } => {
            let reason = if matches!(outcome, Outcome::Retry { .. }) {
                format!("gave up after {delivered} deliveries: {reason}")
            } else {
                reason.clone()
            };
            dead_letter(bus, name, &msg, &subject, seq, payload, headers, &reason).await
        }
    };
    bus.metrics.outcomes.with_label_values(&[name, label]).inc();
    bus.metrics
        .handler_seconds
        .with_label_values(&[name])
        .observe(started.elapsed().as_secs_f64());
    bus.metrics.in_flight.with_label_values(&[name]).dec();
    if let Some((key, ticket, tx)) = key_info {
        drop(tx);
        let mut map = lock(chains);
        if map.get(&key).is_some_and(|(t, _)| *t == ticket) {
            map.remove(&key);
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn dead_letter(
    bus: &Bus,
    name: &'static str,
    msg: &Message,
    subject: &str,
    seq: u64,
    payload: Bytes,
    headers: Option<HeaderMap>,
    reason: &str,
) -> &'static str {
    let mut h = headers.unwrap_or_default();
    h.insert("Nats-Msg-Id", format!("dlq:{name}:{seq}").as_str());
    h.insert(crate::DLQ_REASON_HEADER, truncate(reason, 1024).as_str());
    h.insert(crate::DLQ_SUBJECT_HEADER, subject);
    h.insert(crate::DLQ_SEQ_HEADER, seq.to_string().as_str());
    let stored = match bus
        .js
        .publish_with_headers(crate::subjects::dead_letter(name), h, payload)
        .await
    {
        Ok(f) => f.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match stored {
        Ok(()) => {
            tracing::error!(
                consumer = name,
                seq,
                subject,
                reason,
                "Message dead-lettered"
            );
            bus.metrics.dead_letters.with_label_values(&[name]).inc();
            let _ = msg.ack_with(AckKind::Term).await;
            "term"
        }
        Err(e) => {
            // Never drop a message we could not park: try again later.
            tracing::error!(consumer = name, seq, error = %e, "Dead-letter publish failed; will redeliver");
            let _ = msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
            "nak"
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

async fn progress_acks(msg: Arc<Message>, ack_wait: Duration) {
    let every = (ack_wait / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        if let Err(e) = msg.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "Progress ack failed");
        }
    }
}

async fn sample_ack_pending(
    bus: Bus,
    mut consumer: PullConsumer,
    name: &'static str,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            bus.metrics
                .ack_pending
                .with_label_values(&[name])
                .set(info.num_ack_pending as i64);
        }
        if sleep_or_cancel(Duration::from_secs(5), &shutdown).await {
            return;
        }
    }
}

fn to_delivery(msg: &Message) -> Delivery {
    let (delivered, stream_seq) = msg
        .info()
        .map(|i| (i.delivered, i.stream_sequence))
        .unwrap_or((1, 0));
    Delivery {
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
        headers: msg.headers.clone(),
        delivered,
        stream_seq,
        trace: TraceContext::from_headers(msg.headers.as_ref()),
    }
}

/// Sleeps; true when cancelled first.
pub async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
