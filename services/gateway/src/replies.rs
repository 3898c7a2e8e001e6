//! Routes replies and live deltas from the bus to the HTTP requests waiting for them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use clawbus_wire::{decode, DeltaEvent, OutboundMessage};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use clawbus_bus::service::patiently;
use clawbus_bus::{subjects, topology, Bus};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a waiting request receives.
#[derive(Debug, Clone)]
pub enum ReplyEvent {
    Delta(DeltaEvent),
    /// The whole reply (chunks joined); `last` chunk's error/usage/model.
    Final(Box<OutboundMessage>),
}

struct Waiter {
    tx: Option<mpsc::Sender<ReplyEvent>>,
    chunks: Vec<OutboundMessage>,
    since: std::time::Instant,
}

/// Pending requests by inbound envelope id.
#[derive(Clone, Default)]
pub struct Replies {
    waiters: Arc<Mutex<HashMap<String, Waiter>>>,
}

/// Removes its waiter when the request ends (answered, timed out or disconnected).
pub struct Registration {
    replies: Replies,
    id: String,
    pub rx: mpsc::Receiver<ReplyEvent>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.replies.lock().remove(&self.id);
    }
}

impl Replies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers interest in the reply to `inbound_id` before the message is published.
    pub fn register(&self, inbound_id: &str) -> Registration {
        let (tx, rx) = mpsc::channel(1024);
        self.lock().insert(
            inbound_id.to_owned(),
            Waiter {
                tx: Some(tx),
                chunks: Vec::new(),
                since: std::time::Instant::now(),
            },
        );
        Registration {
            replies: self.clone(),
            id: inbound_id.to_owned(),
            rx,
        }
    }

    /// How long the longest-waiting request has waited.
    fn oldest_wait(&self) -> Option<Duration> {
        self.lock().values().map(|w| w.since.elapsed()).max()
    }

    fn on_delta(&self, d: DeltaEvent) {
        let tx = self.lock().get(&d.inbound_id).and_then(|w| w.tx.clone());
        if let Some(tx) = tx {
            // A slow reader loses deltas, never the final reply (the gap is filled from it).
            let _ = tx.try_send(ReplyEvent::Delta(d));
        }
    }

    fn on_outbound(&self, m: OutboundMessage) {
        let mut map = self.lock();
        let Some(w) = map.get_mut(&m.inbound_id) else {
            return;
        };
        if w.chunks.iter().any(|c| c.chunk == m.chunk) {
            return;
        }
        w.chunks.push(m);
        w.chunks.sort_by_key(|c| c.chunk);
        let complete = w
            .chunks
            .last()
            .is_some_and(|c| c.last && c.chunk as usize + 1 == w.chunks.len());
        if !complete {
            return;
        }
        let chunks = std::mem::take(&mut w.chunks);
        let Some(tx) = w.tx.take() else { return };
        drop(map);
        let mut last = chunks
            .last()
            .cloned()
            .expect("complete reply has a last chunk");
        last.text = chunks.iter().map(|c| c.text.as_str()).collect();
        // The final reply must not be lost to a full delta queue.
        tokio::spawn(async move {
            let _ = tx.send(ReplyEvent::Final(Box::new(last))).await;
        });
    }
}

/// Receives this gateway's replies and the live deltas and dispatches them until
/// shutdown. Replies come from a consumer on `CLAW_OUT` filtered to the
/// gateway's account, so a reconnect (a NATS node failing) resumes after the last reply
/// seen instead of missing what was published meanwhile; deltas are live only.
pub async fn dispatch(
    bus: &Bus,
    account: &str,
    replies: Replies,
    readiness: clawbus_telemetry::Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let filter = subjects::outbound("http", account)
        .ok_or_else(|| anyhow::anyhow!("gateway.account `{account}` is not a subject token"))?;
    let js = &bus.consumer_js;
    let stream = patiently("reply stream", || js.get_stream(topology::STREAM_OUTBOUND)).await?;
    let mut deltas = bus.consumer_client.subscribe("claw.v1.evt.delta.>").await?;
    let name = clawbus_bus::rights::gateway_reply_consumer(account);
    let mut start = DeliverPolicy::New;
    let mut out = patiently("reply consumer", || {
        open_replies(&stream, &name, &filter, start)
    })
    .await?;
    // Consumer sequence of the last reply taken from the current consumer.
    let mut delivered: u64 = 0;
    // A reply delivered while the connection was down is gone (no acks on this
    // consumer): after every reconnect, resume from the last reply seen.
    let stats = bus.consumer_client.statistics();
    let mut connects = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_reply = std::time::Instant::now();
    tokio::spawn(async move {
        loop {
            let mut reopen = false;
            tokio::select! {
                _ = tick.tick() => {
                    let now = stats.connects.load(std::sync::atomic::Ordering::Relaxed);
                    if now != connects {
                        connects = now;
                        tracing::info!("Reconnected to NATS; resuming replies after the last one seen");
                        reopen = true;
                    } else if last_reply.elapsed() > QUIET && replies.oldest_wait().is_some_and(|w| w > QUIET) {
                        // Requests wait and nothing arrives: a consumer that silently
                        // stalled (lost with a failed-over stream leader) must not
                        // leave them waiting; resuming from the last reply is harmless.
                        tracing::info!("No reply for a while with requests waiting; resuming replies");
                        last_reply = std::time::Instant::now();
                        reopen = true;
                    }
                }
                m = out.next() => match m {
                    Some(Ok(m)) => {
                        last_reply = std::time::Instant::now();
                        if let Ok(info) = m.info() {
                            // Without acks nothing is redelivered: a message lost on the
                            // way (a connection that moved to another server) shows as a
                            // gap in the consumer sequence. Resume after the last one
                            // seen rather than skip it.
                            if info.consumer_sequence != delivered + 1 {
                                tracing::info!(expected = delivered + 1, got = info.consumer_sequence, "Gap in the reply stream; resuming after the last reply seen");
                                reopen = true;
                            } else {
                                delivered = info.consumer_sequence;
                                start = DeliverPolicy::ByStartSequence { start_sequence: info.stream_sequence + 1 };
                            }
                        }
                        if reopen {
                            // Not processed: it comes again from the resumed consumer.
                        } else {
                            match decode::<OutboundMessage>(&m.payload) {
                                Ok(env) => replies.on_outbound(env.body),
                                Err(e) => tracing::warn!(subject = %m.subject, error = %e, "Undecodable reply ignored"),
                            }
                        }
                    }
                    other => {
                        if let Some(Err(e)) = other {
                            tracing::warn!(error = %e, "Reply consumer interrupted; resuming");
                        }
                        reopen = true;
                    }
                },
                Some(m) = deltas.next() => {
                    if let Ok(env) = decode::<DeltaEvent>(&m.payload) {
                        replies.on_delta(env.body);
                    }
                }
                _ = shutdown.cancelled() => break,
            }
            let mut failures = 0;
            while reopen {
                match open_replies(&stream, &name, &filter, start).await {
                    Ok(o) => {
                        out = o;
                        delivered = 0;
                        reopen = false;
                        readiness.trouble("replies", "reply consumer", false);
                    }
                    Err(e) => {
                        failures += 1;
                        if failures >= 3 {
                            // Requests would wait for replies that cannot arrive.
                            readiness.trouble("replies", "reply consumer", true);
                        }
                        tracing::warn!(error = %e, "Cannot resume replies; retrying");
                        if clawbus_bus::consumer::sleep_or_cancel(
                            Duration::from_millis(500),
                            &shutdown,
                        )
                        .await
                        {
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

/// With requests waiting this long and no reply arriving, the reply consumer is reopened.
const QUIET: Duration = Duration::from_secs(10);

type ReplyStream = async_nats::jetstream::consumer::pull::Stream;

/// An ephemeral, unacknowledged consumer of this gateway's replies from `start`, with
/// a short idle heartbeat so a lost server is noticed within seconds (an ordered
/// consumer waits for two missed 15 s heartbeats). It has the account's name
/// (`gateway-<account>`, the one the gateway's NATS rights allow), so the previous one
/// is deleted first: its start position cannot be changed.
async fn open_replies(
    stream: &async_nats::jetstream::stream::Stream,
    name: &str,
    filter: &str,
    start: DeliverPolicy,
) -> anyhow::Result<ReplyStream> {
    let _ = stream.delete_consumer(name).await;
    let consumer = stream
        .create_consumer(pull::Config {
            name: Some(name.to_owned()),
            filter_subject: filter.to_owned(),
            deliver_policy: start,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        })
        .await?;
    Ok(consumer
        .stream()
        .max_messages_per_batch(256)
        .heartbeat(Duration::from_secs(1))
        .expires(Duration::from_secs(5))
        .messages()
        .await?)
}
