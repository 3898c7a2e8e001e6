//! Streaming as draft edits (`stream_mode = "partial"`): while the agent writes, the
//! text so far is shown in a draft message (sent after the first words, edited at most
//! every 1.5 s, plain text), and the reply's first piece replaces the draft instead of
//! arriving as a new message. The text comes from the agent's live deltas
//! (`claw.v1.evt.delta.*`, core NATS: a preview that may miss a delta, never the
//! reply itself, which still comes from the durable reply stream).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawbus_wire::{decode, DeltaEvent};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::api::{Api, Outgoing, MAX_TEXT};
use super::inbound::parse_message_id;

/// Drafts in progress at once, at most (the oldest is forgotten beyond).
const MAX_DRAFTS: usize = 256;
/// Telegram allows about one edit a second per chat.
const EDIT_EVERY: Duration = Duration::from_millis(1500);
/// The first words wait this long, so a quick answer is not a draft at all.
const FIRST_AFTER: Duration = Duration::from_millis(700);

struct Draft {
    attempt: u32,
    text: String,
    message_id: Option<i64>,
    started: Instant,
    last_shown: Option<Instant>,
    shown_len: usize,
}

/// The drafts of one Telegram account, by the platform id of the message answered
/// (`<chat>:<message>`).
#[derive(Default)]
pub struct Drafts {
    drafts: Mutex<HashMap<String, Draft>>,
    order: Mutex<VecDeque<String>>,
    done: Mutex<VecDeque<String>>,
}

impl Drafts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Draft>> {
        self.drafts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The draft message answering `reply_to`, taken: the reply replaces it.
    pub fn take(&self, reply_to: &str) -> Option<i64> {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if done.len() >= MAX_DRAFTS {
            done.pop_front();
        }
        done.push_back(reply_to.to_owned());
        self.lock().remove(reply_to).and_then(|d| d.message_id)
    }

    fn add(&self, key: &str, ev: &DeltaEvent) {
        if self
            .done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|k| k == key)
        {
            return; // answered already: a late delta
        }
        let mut drafts = self.lock();
        if !drafts.contains_key(key) {
            let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            while drafts.len() >= MAX_DRAFTS {
                match order.pop_front() {
                    Some(old) => {
                        drafts.remove(&old);
                    }
                    None => break,
                }
            }
            order.push_back(key.to_owned());
        }
        let d = drafts.entry(key.to_owned()).or_insert_with(|| Draft {
            attempt: ev.attempt,
            text: String::new(),
            message_id: None,
            started: Instant::now(),
            last_shown: None,
            shown_len: 0,
        });
        if ev.attempt != d.attempt {
            // A retried turn starts its text again.
            d.attempt = ev.attempt;
            d.text.clear();
        }
        let offset = ev.offset as usize;
        if offset <= d.text.len() && d.text.is_char_boundary(offset) {
            d.text.truncate(offset);
            d.text.push_str(&ev.text);
        }
    }

    /// Sends or edits the drafts that are due.
    async fn show(&self, api: &Api) {
        let due: Vec<(String, Option<i64>, String)> = {
            let now = Instant::now();
            self.lock()
                .iter()
                .filter(|(_, d)| {
                    !d.text.trim().is_empty()
                        && d.text.len() != d.shown_len
                        && match d.last_shown {
                            None => now.duration_since(d.started) >= FIRST_AFTER,
                            Some(t) => now.duration_since(t) >= EDIT_EVERY,
                        }
                })
                .map(|(k, d)| {
                    let mut text: String = d.text.chars().take(MAX_TEXT - 2).collect();
                    text.push_str(" …");
                    (k.clone(), d.message_id, text)
                })
                .collect()
        };
        for (key, message_id, text) in due {
            let Some((chat, reply)) = key.rsplit_once(':') else {
                continue;
            };
            let shown = match message_id {
                Some(mid) => api
                    .edit_message_text(chat, mid, &text, None)
                    .await
                    .map(|_| mid),
                None => {
                    api.send_message(&Outgoing {
                        chat_id: chat,
                        text: &text,
                        parse_mode: None,
                        reply_to: parse_message_id(reply).or_else(|| reply.parse().ok()),
                        thread_id: None,
                    })
                    .await
                }
            };
            match shown {
                Ok(mid) => {
                    if let Some(d) = self.lock().get_mut(&key) {
                        d.message_id = Some(mid);
                        d.last_shown = Some(Instant::now());
                        d.shown_len = text.len() - " …".len();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "Draft not shown"),
            }
        }
    }

    /// Follows the agent's deltas for this account's chats until `stop`.
    pub async fn run(
        self: Arc<Self>,
        client: async_nats::Client,
        api: Api,
        account: String,
        stop: CancellationToken,
    ) {
        let prefix = format!("telegram:{account}:");
        let mut sub = match client.subscribe("claw.v1.evt.delta.>").await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot follow the agent's deltas; no drafts");
                return;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                m = sub.next() => {
                    let Some(m) = m else { return };
                    let Ok(env) = decode::<DeltaEvent>(&m.payload) else { continue };
                    if let Some(key) = env.body.inbound_id.strip_prefix(&prefix) {
                        self.add(key, &env.body);
                    }
                }
                _ = tick.tick() => self.show(&api).await,
                _ = stop.cancelled() => return,
            }
        }
    }
}
