//! The pull-consumer runner: the one loop every service uses to handle bus messages.
//!
//! - **A small handler stack**: the runner decodes each message through
//!   [`Handler::decode`] (a message that cannot decode is dead-lettered at once, never
//!   retried), puts it in its lane, and runs [`Handler::handle`] inside a tracing span
//!   carrying the consumer, stream sequence, delivery count and trace id.
//! - **Lanes** ([`crate::lanes`]): messages whose [`Handler::key`] is equal run one at a
//!   time in stream order; a nak'd message keeps its lane until it succeeds or is
//!   dead-lettered; a message waiting for its lane holds no concurrency permit, so a
//!   burst in one session never stalls the others.
//! - **Bounded**: at most `concurrency` handlers run; the consumer's `max_ack_pending`
//!   (concurrency + lane capacity) bounds what the server delivers, so what waits in
//!   lanes is bounded too (`clawbus_bus_lane_waiting_messages`).
//! - **Alive**: running and waiting messages get a progress ack every third of the ack
//!   wait, so a short ack wait still detects a dead process quickly without
//!   redelivering slow model calls.
//! - **Typed outcomes**: ack; retry (nak with delay) until `max_deliver`, then dead
//!   letter; reject (dead letter at once, then term). A dead letter is a copy of the
//!   message on `claw.v1.dlq.<consumer>`; the original is termed only once the copy is
//!   stored, so a poison message is never simply dropped.
//! - **Never ends on a transient error**; shutdown stops pulling, naks what waits in
//!   lanes, lets running handlers finish (up to a deadline) and returns.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::lanes::{Admit, Lanes, Settled};
use crate::ownership::Fence;
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
    /// Leave the message alone: neither ack nor nak. Used when a fenced-off (stale)
    /// owner must not touch a message its successor now handles.
    Abandon { reason: String },
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
    /// The partition lease under which this message was received, when the consumer is
    /// partitioned: check it before writing effects a successor may also write.
    pub fence: Option<Fence>,
    /// When the stream stored the message (ms since the epoch; 0 when unknown).
    pub published_ms: i64,
    /// The message waited in its lane behind another of the same key.
    pub queued: bool,
}

/// Handles messages of one consumer: decode, key, handle.
pub trait Handler: Send + Sync + 'static {
    /// The decoded message.
    type Msg: Send + Sync + 'static;

    /// Decodes and validates a delivery; an error dead-letters it at once.
    fn decode(&self, d: &Delivery) -> Result<Self::Msg, String>;

    /// Messages with the same key form a lane: one at a time, in stream order.
    fn key(&self, _d: &Delivery, _m: &Self::Msg) -> Option<String> {
        None
    }

    fn handle(&self, d: Delivery, m: Self::Msg) -> impl Future<Output = Outcome> + Send;
}

/// Decodes the envelope of a delivery (the common [`Handler::decode`]).
pub fn decode_envelope<T: clawbus_wire::Kind>(
    d: &Delivery,
) -> Result<clawbus_wire::Envelope<T>, String> {
    clawbus_wire::decode::<T>(&d.payload).map_err(|e| e.to_string())
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
    /// The lease under which this runner works a partition (copied into deliveries).
    pub fence: Option<Fence>,
    /// Concurrency permits shared with other runners of the process (one per owned
    /// partition); `None` gives this runner its own `concurrency` permits.
    pub permits: Option<Arc<Semaphore>>,
    /// Where this runner reports trouble (it cannot pull: component `consumer`,
    /// instance = the durable's name) so `/readyz` tells the truth.
    pub readiness: Option<clawbus_telemetry::Readiness>,
    /// Recreate the consumer from this declaration when pulls keep failing (a consumer
    /// deleted by an operator or lost with a cluster node) — only while the runner's
    /// fence holds: a consumer deleted by a partition's new owner must stay gone.
    pub rebind: Option<crate::topology::ConsumerDecl>,
    /// Messages a previous owner of the partition left unacknowledged: their first
    /// delivery here is counted across owners before it is decoded, and dead-lettered
    /// past the limit (module `handovers`).
    pub orphans: Option<crate::handovers::Orphans>,
}

/// Consecutive pull failures after which a runner reports trouble and, when it may,
/// recreates its consumer.
const TROUBLE_AFTER_ERRORS: u32 = 3;

impl RunnerOpts {
    /// Options for the consumer `decl`, running `concurrency` handlers at once.
    pub fn for_consumer(
        decl: &crate::topology::ConsumerDecl,
        concurrency: usize,
        drain_deadline: Duration,
    ) -> Self {
        Self {
            name: decl.group,
            concurrency,
            ack_wait: decl.ack_wait,
            max_deliver: decl.max_deliver,
            drain_deadline,
            fence: None,
            permits: None,
            readiness: None,
            rebind: None,
            orphans: None,
        }
    }
}

/// A message waiting for its lane.
struct Waiting<M> {
    msg: Arc<Message>,
    delivery: Delivery,
    decoded: M,
}

/// What a finished task reports back to the loop.
struct TaskDone {
    key: Option<String>,
    seq: u64,
    settled: Settled,
}

struct Runner<H: Handler> {
    bus: Bus,
    opts: RunnerOpts,
    handler: Arc<H>,
    sem: Arc<Semaphore>,
    lanes: Lanes<Waiting<H::Msg>>,
    tasks: JoinSet<TaskDone>,
    /// Key and sequence of each task, to free its lane even if the task died.
    task_keys: HashMap<Id, (Option<String>, u64)>,
    /// Newer deliveries of running messages (the server redelivered while the handler
    /// still ran, e.g. its progress acks were lost in a failover): settled with it.
    newer: Newer,
}

type Newer = Arc<std::sync::Mutex<HashMap<u64, Arc<Message>>>>;

/// Runs `handler` over `consumer` until `shutdown` is cancelled, then drains.
pub async fn run<H: Handler>(
    bus: Bus,
    consumer: PullConsumer,
    opts: RunnerOpts,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let name = opts.name;
    let batch = opts.concurrency.clamp(1, 1000);
    // Export every series at zero from the start, so dashboards and alerts see them.
    let m = &bus.metrics;
    m.received.with_label_values(&[name]);
    m.redeliveries.with_label_values(&[name]);
    m.dead_letters.with_label_values(&[name]);
    m.stream_errors.with_label_values(&[name]);
    m.in_flight.with_label_values(&[name]);
    m.lane_waiting.with_label_values(&[name]);
    m.handler_seconds.with_label_values(&[name]);
    for outcome in ["ack", "nak", "term", "abandon"] {
        m.outcomes.with_label_values(&[name, outcome]);
    }
    // Per durable (a partition's consumer), not per group: partitions differ.
    let durable = consumer.cached_info().name.clone();
    let metrics = bus.metrics.clone();
    let sampler = tokio::spawn(sample_ack_pending(
        bus.clone(),
        consumer.clone(),
        durable.clone(),
        shutdown.clone(),
    ));
    let mut r = Runner {
        sem: opts
            .permits
            .clone()
            .unwrap_or_else(|| Arc::new(Semaphore::new(opts.concurrency.max(1)))),
        bus,
        opts,
        handler,
        lanes: Lanes::default(),
        tasks: JoinSet::new(),
        task_keys: HashMap::new(),
        newer: Newer::default(),
    };
    let every = (r.opts.ack_wait / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut consumer = consumer;
    let mut consecutive_errors = 0u32;
    let mut health = Health::new(&r.opts, consumer.cached_info().name.clone());
    'outer: loop {
        if consecutive_errors >= TROUBLE_AFTER_ERRORS {
            health.trouble(true);
            if let Some(c) = r.rebind().await {
                consumer = c;
            }
        }
        let opened = tokio::select! {
            r = consumer.stream().max_messages_per_batch(batch).heartbeat(HEARTBEAT).expires(PULL_EXPIRES).messages() => r,
            _ = shutdown.cancelled() => break 'outer,
        };
        let mut messages = match opened {
            Ok(m) => m,
            Err(e) => {
                r.bus.metrics.stream_errors.with_label_values(&[name]).inc();
                consecutive_errors += 1;
                tracing::warn!(consumer = name, error = %e, "Cannot open message stream, retrying");
                if sleep_or_cancel(Duration::from_secs(1), &shutdown).await {
                    break 'outer;
                }
                continue;
            }
        };
        let opened_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'outer,
                Some(done) = r.tasks.join_next_with_id(), if !r.tasks.is_empty() => r.task_finished(done),
                _ = tick.tick() => {
                    r.keep_waiting_alive();
                    // A pull open for two heartbeats without an error is healthy.
                    if opened_at.elapsed() > 2 * HEARTBEAT {
                        consecutive_errors = 0;
                        health.trouble(false);
                    }
                }
                next = messages.next() => match next {
                    Some(Ok(msg)) => {
                        consecutive_errors = 0;
                        health.trouble(false);
                        r.received(msg).await;
                    }
                    None => {
                        // The server closed the pull (the consumer may be gone): as
                        // bad as an error when it keeps happening.
                        consecutive_errors += 1;
                        tracing::warn!(consumer = name, consecutive_errors, "Message stream ended, reopening");
                        let pause = Duration::from_millis(100 * u64::from(consecutive_errors.min(10)));
                        if sleep_or_cancel(pause, &shutdown).await {
                            break 'outer;
                        }
                        break;
                    }
                    Some(Err(e)) => {
                        // Missing heartbeats (the server holding our pull died or the
                        // consumer moved), reconnects, a consumer briefly gone: the pull
                        // is dead, so open a new one at once, backing off when it keeps
                        // failing. Never end the loop.
                        r.bus.metrics.stream_errors.with_label_values(&[name]).inc();
                        consecutive_errors += 1;
                        tracing::warn!(consumer = name, error = %e, consecutive_errors, "Transient consumer error; reopening the message stream");
                        let pause = Duration::from_millis(100 * u64::from(consecutive_errors.min(10)));
                        if sleep_or_cancel(pause, &shutdown).await {
                            break 'outer;
                        }
                        break;
                    }
                },
            }
        }
    }
    r.drain().await;
    // A runner that stopped (shutdown, partition handed over) is no trouble.
    health.trouble(false);
    sampler.abort();
    let _ = metrics.ack_pending.remove_label_values(&[&durable]);
}

/// What a runner reports to `/readyz`.
struct Health {
    readiness: Option<clawbus_telemetry::Readiness>,
    instance: String,
    troubled: bool,
}

impl Health {
    fn new(opts: &RunnerOpts, instance: String) -> Self {
        Self {
            readiness: opts.readiness.clone(),
            instance,
            troubled: false,
        }
    }

    fn trouble(&mut self, on: bool) {
        if self.troubled == on {
            return;
        }
        self.troubled = on;
        if let Some(r) = &self.readiness {
            r.trouble("consumer", &self.instance, on);
        }
        if on {
            tracing::warn!(consumer = %self.instance, "Consumer cannot pull; reporting not ready");
        } else {
            tracing::info!(consumer = %self.instance, "Consumer pulling again");
        }
    }
}

impl<H: Handler> Runner<H> {
    /// Recreates the consumer from its declaration, when this runner may.
    async fn rebind(&self) -> Option<PullConsumer> {
        let decl = self.opts.rebind.as_ref()?;
        // Only while this replica still holds the partition: a consumer deleted by a
        // new owner must stay deleted.
        if let Some(f) = &self.opts.fence {
            f.check().await.ok()?;
        }
        match crate::topology::bind_consumer(&self.bus.consumer_js, decl).await {
            Ok(c) => {
                tracing::info!(consumer = %decl.durable, "Consumer bound again");
                Some(c)
            }
            Err(e) => {
                tracing::warn!(consumer = %decl.durable, error = %e, "Cannot bind consumer again");
                None
            }
        }
    }

    async fn received(&mut self, msg: Message) {
        let name = self.opts.name;
        let mut delivery = to_delivery(&msg);
        delivery.fence = self.opts.fence.clone();
        self.bus.metrics.received.with_label_values(&[name]).inc();
        if delivery.delivered > 1 {
            self.bus
                .metrics
                .redeliveries
                .with_label_values(&[name])
                .inc();
        }
        let msg = Arc::new(msg);
        let seq = delivery.stream_seq;
        tracing::debug!(consumer = name, seq, delivered = delivery.delivered, subject = %delivery.subject, "Message received");
        if let Some(reason) = self.orphaned_too_often(&delivery).await {
            self.reject(msg, delivery, reason);
            return;
        }
        let decoded = match self.handler.decode(&delivery) {
            Ok(m) => m,
            Err(reason) => {
                self.reject(msg, delivery, reason);
                return;
            }
        };
        let Some(key) = self.handler.key(&delivery, &decoded) else {
            self.start(None, msg, delivery, decoded);
            return;
        };
        let waiting = Waiting {
            msg,
            delivery,
            decoded,
        };
        match self.lanes.admit(&key, seq, waiting) {
            (Admit::Run, Some(w)) => self.start(Some(key), w.msg, w.delivery, w.decoded),
            (Admit::Duplicate, running) => {
                tracing::debug!(consumer = name, seq, "Redelivery of a message still held");
                if let Some(w) = running {
                    lock(&self.newer).insert(seq, w.msg);
                }
            }
            _ => {}
        }
        self.update_waiting_gauge();
    }

    /// Counts a first delivery of a message the partition's previous owner left
    /// unacknowledged; the reason to dead-letter it when it was handed over too often.
    async fn orphaned_too_often(&self, d: &Delivery) -> Option<String> {
        let orphans = self.opts.orphans.as_ref()?;
        if !orphans.covers(d.stream_seq, d.delivered) {
            return None;
        }
        match orphans.count(d.stream_seq).await {
            Ok(n) if n > orphans.limit() => Some(format!(
                "in flight during {n} partition handovers (a handler may crash on it; at most {} are allowed)",
                orphans.limit()
            )),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(consumer = self.opts.name, seq = d.stream_seq, error = %e, "Cannot count a handed-over message; only max_deliver applies");
                None
            }
        }
    }

    /// Dead-letters a message without handling it.
    fn reject(&mut self, msg: Arc<Message>, delivery: Delivery, reason: String) {
        let (bus, opts, name) = (self.bus.clone(), self.opts.clone(), self.opts.name);
        let seq = delivery.stream_seq;
        let h = self.tasks.spawn(async move {
            let started = Instant::now();
            let label = dead_letter(&bus, &opts, &msg, &delivery, &reason).await;
            record(&bus, name, label, started);
            TaskDone {
                key: None,
                seq,
                settled: Settled::Done,
            }
        });
        self.task_keys.insert(h.id(), (None, seq));
    }

    fn start(&mut self, key: Option<String>, msg: Arc<Message>, delivery: Delivery, m: H::Msg) {
        let (bus, opts, handler, sem, newer) = (
            self.bus.clone(),
            self.opts.clone(),
            self.handler.clone(),
            self.sem.clone(),
            self.newer.clone(),
        );
        let seq = delivery.stream_seq;
        let task_key = key.clone();
        let h = self.tasks.spawn(async move {
            let settled = handle_one(&bus, &opts, handler.as_ref(), &sem, msg, delivery, m).await;
            let newer = lock(&newer).remove(&seq);
            if let Some(n) = newer {
                settle_newer(&n, settled).await;
            }
            TaskDone {
                key: task_key,
                seq,
                settled,
            }
        });
        self.task_keys.insert(h.id(), (key, seq));
    }

    fn task_finished(&mut self, done: Result<(Id, TaskDone), tokio::task::JoinError>) {
        let (key, seq, settled) = match done {
            Ok((id, d)) => {
                self.task_keys.remove(&id);
                (d.key, d.seq, d.settled)
            }
            Err(e) => {
                // Only an abort or a bug outside the handler (which is caught) ends here.
                tracing::error!(consumer = self.opts.name, error = %e, "Message task died");
                let Some((key, seq)) = self.task_keys.remove(&e.id()) else {
                    return;
                };
                (key, seq, Settled::Done)
            }
        };
        if let Some(key) = key {
            if let Some((_, mut w)) = self.lanes.finished(&key, seq, settled) {
                w.delivery.queued = true;
                self.start(Some(key), w.msg, w.delivery, w.decoded);
            }
        }
        self.update_waiting_gauge();
    }

    /// Progress acks for everything waiting in lanes, and release of lanes whose
    /// retried message never came back.
    fn keep_waiting_alive(&mut self) {
        // Generous: a NATS cluster failing over can hold a redelivery back for a while,
        // and releasing the lane early would let a later message overtake it.
        let grace = self.opts.ack_wait * 2 + Duration::from_secs(10);
        for (key, _, w) in self.lanes.expire_retries(grace) {
            tracing::warn!(
                consumer = self.opts.name,
                "A retried message did not come back; its lane moves on"
            );
            self.start(Some(key), w.msg, w.delivery, w.decoded);
        }
        let held: Vec<Arc<Message>> = self.lanes.waiting_items().map(|w| w.msg.clone()).collect();
        if !held.is_empty() {
            tokio::spawn(async move {
                for m in held {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            });
        }
        self.update_waiting_gauge();
    }

    fn update_waiting_gauge(&self) {
        self.bus
            .metrics
            .lane_waiting
            .with_label_values(&[self.opts.name])
            .set(self.lanes.waiting() as i64);
    }

    /// Stops: what waits in lanes goes back to the server at once (nak), running
    /// handlers finish up to the deadline.
    async fn drain(mut self) {
        let name = self.opts.name;
        let waiting = self.lanes.drain_waiting();
        // A lost lease means these belong to the new owner now: leave them alone.
        if !self.opts.fence.as_ref().is_some_and(Fence::is_lost) {
            for w in &waiting {
                let _ = w.msg.ack_with(AckKind::Nak(None)).await;
            }
        }
        self.update_waiting_gauge();
        tracing::info!(
            consumer = name,
            in_flight = self.tasks.len(),
            returned = waiting.len(),
            "Consumer stopping, draining"
        );
        let deadline = self.opts.drain_deadline;
        let drained = tokio::time::timeout(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                consumer = name,
                left = self.tasks.len(),
                "Drain deadline passed; unfinished messages will be redelivered"
            );
            self.tasks.abort_all();
        }
    }
}

async fn handle_one<H: Handler>(
    bus: &Bus,
    opts: &RunnerOpts,
    handler: &H,
    sem: &Arc<Semaphore>,
    msg: Arc<Message>,
    delivery: Delivery,
    decoded: H::Msg,
) -> Settled {
    let name = opts.name;
    let progress = tokio::spawn(progress_acks(msg.clone(), opts.ack_wait));
    let _permit = sem.clone().acquire_owned().await;
    let started = Instant::now();
    bus.metrics.in_flight.with_label_values(&[name]).inc();
    let delivered = delivery.delivered;
    let seq = delivery.stream_seq;
    let span = tracing::info_span!(
        "message",
        consumer = name,
        seq,
        delivered,
        trace_id = %delivery.trace.trace_id
    );
    let kept = delivery.clone();
    let outcome = match AssertUnwindSafe(handler.handle(delivery, decoded).instrument(span))
        .catch_unwind()
        .await
    {
        Ok(o) => o,
        Err(_) => Outcome::retry(Duration::from_secs(1), "handler panicked"),
    };
    progress.abort();
    let (label, settled) = match &outcome {
        Outcome::Ack => {
            if let Err(e) = msg.ack().await {
                tracing::warn!(consumer = name, seq, error = %e, "Ack failed; the message will be redelivered");
            }
            ("ack", Settled::Done)
        }
        Outcome::Abandon { reason } => {
            tracing::warn!(consumer = name, seq, reason = %reason, "Message abandoned to its new owner");
            ("abandon", Settled::Done)
        }
        Outcome::Retry { delay, reason } if delivered < opts.max_deliver => {
            let delay = retry_delay(*delay, delivered);
            tracing::warn!(consumer = name, seq, delivered, delay_ms = delay.as_millis() as u64, reason = %reason, "Retrying message later");
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            ("nak", Settled::Retried(delay))
        }
        Outcome::Retry { reason, .. } | Outcome::Reject { reason } => {
            let reason = if matches!(outcome, Outcome::Retry { .. }) {
                format!("gave up after {delivered} deliveries: {reason}")
            } else {
                reason.clone()
            };
            let label = dead_letter(bus, opts, &msg, &kept, &reason).await;
            let settled = if label == "nak" {
                Settled::Retried(DLQ_RETRY)
            } else {
                Settled::Done
            };
            (label, settled)
        }
    };
    bus.metrics.in_flight.with_label_values(&[name]).dec();
    record(bus, name, label, started);
    settled
}

/// The delay before a retry: what the handler asked for, but growing exponentially with
/// the deliveries (0.5 s, 1 s, 2 s, ... up to 30 s), so that `max_deliver` attempts
/// outlast an outage of a few seconds (a NATS node failing over) instead of burning
/// through in one.
pub fn retry_delay(requested: Duration, delivered: i64) -> Duration {
    let exp = 500u64.saturating_mul(1 << delivered.clamp(1, 7).saturating_sub(1));
    requested
        .max(Duration::from_millis(exp))
        .min(Duration::from_secs(30).max(requested))
}

fn record(bus: &Bus, name: &'static str, label: &'static str, started: Instant) {
    bus.metrics.outcomes.with_label_values(&[name, label]).inc();
    bus.metrics
        .handler_seconds
        .with_label_values(&[name])
        .observe(started.elapsed().as_secs_f64());
}

/// Settles a newer delivery of a message the way its first delivery was settled.
async fn settle_newer(m: &Message, settled: Settled) {
    let kind = match settled {
        Settled::Done => AckKind::Ack,
        Settled::Retried(delay) => AckKind::Nak(Some(delay)),
    };
    let _ = m.ack_with(kind).await;
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Idle heartbeat of a pull: two missed ones (about 4 s) and the pull is reopened.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Lifetime of one pull request.
const PULL_EXPIRES: Duration = Duration::from_secs(10);

/// Delay before a message whose dead-letter copy could not be stored comes back.
const DLQ_RETRY: Duration = Duration::from_secs(5);

async fn dead_letter(
    bus: &Bus,
    opts: &RunnerOpts,
    msg: &Message,
    d: &Delivery,
    reason: &str,
) -> &'static str {
    let name = opts.name;
    let (seq, subject) = (d.stream_seq, d.subject.as_str());
    let mut h = d.headers.clone().unwrap_or_default();
    h.insert("Nats-Msg-Id", format!("dlq:{name}:{seq}").as_str());
    h.insert(crate::DLQ_REASON_HEADER, truncate(reason, 1024).as_str());
    h.insert(crate::DLQ_SUBJECT_HEADER, subject);
    h.insert(crate::DLQ_SEQ_HEADER, seq.to_string().as_str());
    let stored = match bus
        .js
        .publish_with_headers(crate::subjects::dead_letter(name), h, d.payload.clone())
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
            let _ = msg.ack_with(AckKind::Nak(Some(DLQ_RETRY))).await;
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
    durable: String,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(info) = consumer.info().await {
            bus.metrics
                .ack_pending
                .with_label_values(&[&durable])
                .set(info.num_ack_pending as i64);
        }
        if sleep_or_cancel(Duration::from_secs(5), &shutdown).await {
            return;
        }
    }
}

fn to_delivery(msg: &Message) -> Delivery {
    let (delivered, stream_seq, published_ms) = msg
        .info()
        .map(|i| {
            let ms = i64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            (i.delivered, i.stream_sequence, ms)
        })
        .unwrap_or((1, 0, 0));
    Delivery {
        subject: msg.subject.to_string(),
        payload: msg.payload.clone(),
        headers: msg.headers.clone(),
        delivered,
        stream_seq,
        trace: TraceContext::from_headers(msg.headers.as_ref()),
        fence: None,
        published_ms,
        queued: false,
    }
}

/// Sleeps; true when cancelled first.
pub async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn retries_back_off_exponentially() {
        let ms = |d: i64| retry_delay(Duration::from_millis(50), d).as_millis();
        assert_eq!((ms(1), ms(2), ms(3), ms(4)), (500, 1000, 2000, 4000));
        assert_eq!(ms(50), 30_000);
        assert_eq!(
            retry_delay(Duration::from_secs(60), 1),
            Duration::from_secs(60),
            "a longer requested delay wins"
        );
    }
}
