//! Deliveries counted across partition handovers.
//!
//! JetStream counts a message's deliveries per consumer, and `max_deliver` applies to
//! that count. A partition's new owner rewinds the shared consumer (router, store) or
//! replaces the previous owner's consumer with its own (agent), so a message that
//! kills the process handling it — whatever the cause — would come back as a first
//! delivery after every restart and never reach the dead letters: a crash loop.
//!
//! So a new owner notes, before it rewinds or replaces the consumer, the range of
//! stream sequences the previous owner had received without acknowledging them (its
//! ack floor up to its last delivered sequence). A first delivery inside that range is
//! an **orphan**: the runner counts it in the KV bucket `claw_handovers` (key
//! `<group>.<stream>.<sequence>`) before decoding or handling it, and dead-letters it
//! once it was orphaned more often than [`Orphans::limit`]. Only orphans cost a KV
//! write; the hot path of an owner that took over nothing is untouched.

use async_nats::jetstream::{consumer::Info, kv};

use crate::{topology, Bus};

/// Handovers a message may survive while in flight before it is dead-lettered (at most
/// the consumer's `max_deliver`). A message in flight during five crashes in a row is
/// the likeliest cause of them.
pub const MAX_HANDOVERS: i64 = 5;

/// The orphans of one partition's previous owner, counted across handovers.
#[derive(Clone)]
pub struct Orphans {
    kv: kv::Store,
    /// `<group>.<stream>.`
    prefix: String,
    /// Sequences after `floor` up to `upto` were delivered and not acknowledged.
    floor: u64,
    upto: u64,
    limit: i64,
}

impl std::fmt::Debug for Orphans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orphans")
            .field("prefix", &self.prefix)
            .field("floor", &self.floor)
            .field("upto", &self.upto)
            .finish()
    }
}

impl Orphans {
    /// The orphans left by the consumers `previous` (their state read before the
    /// rewind or deletion), `None` when they left none or the bucket is unreachable
    /// (then only `max_deliver` applies, as before).
    pub async fn of(
        bus: &Bus,
        group: &str,
        stream: &str,
        max_deliver: i64,
        previous: &[Info],
    ) -> Option<Orphans> {
        let floor = previous.iter().map(|i| i.ack_floor.stream_sequence).min()?;
        let upto = previous.iter().map(|i| i.delivered.stream_sequence).max()?;
        if upto <= floor {
            return None;
        }
        let kv = match bus.js.get_key_value(topology::KV_HANDOVERS).await {
            Ok(kv) => kv,
            Err(e) => {
                tracing::warn!(bucket = topology::KV_HANDOVERS, error = %e, "Cannot count deliveries across handovers; only max_deliver applies");
                return None;
            }
        };
        tracing::info!(
            group,
            stream,
            floor,
            upto,
            "Messages left unacknowledged by the previous owner are counted"
        );
        Some(Orphans {
            kv,
            prefix: format!("{group}.{stream}."),
            floor,
            upto,
            limit: max_deliver.clamp(1, MAX_HANDOVERS),
        })
    }

    /// Whether a delivery is an orphan of the previous owner (its first delivery to
    /// this one, in the range the previous owner left unacknowledged).
    pub fn covers(&self, stream_seq: u64, delivered: i64) -> bool {
        delivered == 1 && stream_seq > self.floor && stream_seq <= self.upto
    }

    /// How many handovers a message may survive.
    pub fn limit(&self) -> i64 {
        self.limit
    }

    /// Counts one more handover of the message at `stream_seq`; returns the count.
    pub async fn count(&self, stream_seq: u64) -> Result<i64, String> {
        let key = format!("{}{stream_seq}", self.prefix);
        // Compare-and-swap: a concurrent count (two owners in a handover race) retries.
        for _ in 0..5 {
            let entry = self.kv.entry(&key).await.map_err(|e| e.to_string())?;
            let written = match entry.filter(|e| e.operation == kv::Operation::Put) {
                None => {
                    let n = 1i64;
                    self.kv
                        .create(&key, n.to_string().into())
                        .await
                        .map(|_| n)
                        .map_err(|e| e.to_string())
                }
                Some(e) => {
                    let n = std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .unwrap_or(0)
                        .saturating_add(1);
                    self.kv
                        .update(&key, n.to_string().into(), e.revision)
                        .await
                        .map(|_| n)
                        .map_err(|e| e.to_string())
                }
            };
            if let Ok(n) = written {
                return Ok(n);
            }
        }
        Err(format!("handover count of {key} kept changing"))
    }
}
