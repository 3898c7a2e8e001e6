//! Routes replies and live deltas from the bus to the HTTP requests waiting for them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use clawbus_wire::{decode, DeltaEvent, OutboundMessage};
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

#[derive(Default)]
struct Waiter {
    tx: Option<mpsc::Sender<ReplyEvent>>,
    chunks: Vec<OutboundMessage>,
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
            },
        );
        Registration {
            replies: self.clone(),
            id: inbound_id.to_owned(),
            rx,
        }
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

/// Subscribes to replies and deltas and dispatches them until shutdown.
pub async fn dispatch(
    client: async_nats::Client,
    replies: Replies,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut out = client.subscribe("claw.v1.out.http.>").await?;
    let mut deltas = client.subscribe("claw.v1.evt.delta.>").await?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(m) = out.next() => match decode::<OutboundMessage>(&m.payload) {
                    Ok(env) => replies.on_outbound(env.body),
                    Err(e) => tracing::warn!(subject = %m.subject, error = %e, "Undecodable reply ignored"),
                },
                Some(m) = deltas.next() => {
                    if let Ok(env) = decode::<DeltaEvent>(&m.payload) {
                        replies.on_delta(env.body);
                    }
                }
                _ = shutdown.cancelled() => break,
                else => break,
            }
        }
    });
    Ok(())
}
