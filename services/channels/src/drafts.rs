//! Streaming as draft edits (`stream_mode = "partial"`) on platforms that can edit a
//! message they sent (Telegram, Discord, Slack, Matrix): while the agent writes, the
//! text so far is shown in a draft message (sent after the first words, edited at most
//! every 1.5 s, ending in " …"), and the reply's first piece replaces the draft instead
//! of arriving as a new message.
//!
//! The text comes from the agent's live deltas (`claw.v1.evt.delta.*`, core NATS: a
//! preview that may miss a delta, never the reply itself, which still comes from the
//! durable reply stream); a delta names the chat and thread it answers in. A draft's
//! platform id is recorded in KV `claw_deliveries` (`<channel>.<account>.<hash of the
//! inbound id>.draft`) when it is first shown, so a reply delivered by a successor
//! replica, or retried after an outage, still replaces the draft instead of leaving it
//! half-written above the answer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use clawbus_wire::{decode, DeltaEvent};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{Platform, Target};

/// Drafts in progress at once, at most (the oldest is forgotten beyond).
const MAX_DRAFTS: usize = 256;
/// Platforms allow about one edit a second per chat (Telegram, Discord's 5 per 5 s).
const EDIT_EVERY: Duration = Duration::from_millis(1500);
/// The first words wait this long, so a quick answer is not a draft at all.
const FIRST_AFTER: Duration = Duration::from_millis(700);
/// What ends a draft's text while the answer is being written.
const MORE: &str = " …";

struct Draft {
    attempt: u32,
    text: String,
    chat_id: String,
    thread_id: Option<String>,
    started: Instant,
    last_shown: Option<Instant>,
    shown_len: usize,
    edits: u32,
    /// The draft's platform id once shown; locked while it is being sent or edited,
    /// so that the reply waits for a draft on its way instead of missing it.
    shown: Arc<tokio::sync::Mutex<Option<String>>>,
}

impl Draft {
    /// Whether the draft should be shown (sent or edited) now: it has new text, the
    /// first words are old enough or the last edit is, and the platform's edits are
    /// not used up (`max_shows` counts the sending too).
    fn due(&self, now: Instant, max_shows: u32) -> bool {
        self.edits < max_shows
            && !self.text.trim().is_empty()
            && self.text.len() != self.shown_len
            && match self.last_shown {
                None => now.duration_since(self.started) >= FIRST_AFTER,
                Some(t) => now.duration_since(t) >= EDIT_EVERY,
            }
    }
}

#[derive(Default)]
struct Table {
    drafts: HashMap<String, Draft>,
    order: VecDeque<String>,
    /// Inbound ids answered already: a late delta starts no new draft.
    done: VecDeque<String>,
}

/// The drafts of one channel account, by the inbound id of the message answered.
pub(crate) struct Drafts<P> {
    channel: String,
    account: String,
    platform: Arc<P>,
    records: kv::Store,
    table: Mutex<Table>,
}

/// The KV key of the draft answering `inbound_id`.
fn draft_key(channel: &str, account: &str, inbound_id: &str) -> String {
    format!(
        "{channel}.{account}.{:016x}.draft",
        clawbus_bus::subjects::session_hash(inbound_id)
    )
}

impl<P: Platform> Drafts<P> {
    pub(crate) fn new(
        channel: &str,
        account: &str,
        platform: Arc<P>,
        records: kv::Store,
    ) -> Arc<Self> {
        Arc::new(Self {
            channel: channel.to_owned(),
            account: account.to_owned(),
            platform,
            records,
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The platform id of the draft answering `inbound_id`, taken: the reply replaces
    /// it. Waits for a draft being sent right now; asks KV for one shown by an earlier
    /// holder of the account (or before a retried delivery).
    pub(crate) async fn take(&self, inbound_id: &str) -> Option<String> {
        let slot = {
            let mut t = self.lock();
            if t.done.len() >= MAX_DRAFTS {
                t.done.pop_front();
            }
            t.done.push_back(inbound_id.to_owned());
            t.drafts.remove(inbound_id).map(|d| d.shown)
        };
        if let Some(slot) = slot {
            if let Some(id) = slot.lock().await.clone() {
                return Some(id);
            }
        }
        let key = draft_key(&self.channel, &self.account, inbound_id);
        match self.records.get(&key).await {
            Ok(Some(v)) if !v.is_empty() => String::from_utf8(v.to_vec()).ok(),
            _ => None,
        }
    }

    /// Adds a delta to its draft (`inbound_id` is this account's).
    fn add(&self, ev: DeltaEvent) {
        if ev.chat_id.is_empty() || ev.chat_id.len() > 256 {
            return; // an agent that does not say where: no draft
        }
        let mut t = self.lock();
        if t.done.iter().any(|k| *k == ev.inbound_id) {
            return; // answered already: a late delta
        }
        if !t.drafts.contains_key(&ev.inbound_id) {
            while t.drafts.len() >= MAX_DRAFTS {
                match t.order.pop_front() {
                    Some(old) => {
                        t.drafts.remove(&old);
                    }
                    None => break,
                }
            }
            t.order.push_back(ev.inbound_id.clone());
        }
        let d = t
            .drafts
            .entry(ev.inbound_id.clone())
            .or_insert_with(|| Draft {
                attempt: ev.attempt,
                text: String::new(),
                chat_id: ev.chat_id.clone(),
                thread_id: ev.thread_id.clone(),
                started: Instant::now(),
                last_shown: None,
                shown_len: 0,
                edits: 0,
                shown: Arc::default(),
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
    async fn show(&self) {
        let max = self
            .platform
            .max_text()
            .saturating_sub(MORE.chars().count());
        // Shows of a draft (its sending, then its edits), keeping one edit for the reply.
        let max_shows = self.platform.max_edits().unwrap_or(u32::MAX);
        let prefix_len = self.channel.len() + self.account.len() + 2;
        let due: Vec<_> = {
            let now = Instant::now();
            let mut t = self.lock();
            t.drafts
                .iter_mut()
                .filter(|(_, d)| d.due(now, max_shows))
                .map(|(k, d)| {
                    let mut text: String = d.text.chars().take(max).collect();
                    // Rendering may add characters: shorten until the draft fits.
                    while self.platform.rendered_len(&text) > max && text.len() > 16 {
                        let keep = text.chars().count() * 3 / 4;
                        text = text.chars().take(keep).collect();
                    }
                    d.edits += 1;
                    let to = Target {
                        chat_id: d.chat_id.clone(),
                        thread_id: d.thread_id.clone(),
                        reply_to: k.get(prefix_len..).map(str::to_owned),
                        piece_id: format!(
                            "draft-{:016x}-{}",
                            clawbus_bus::subjects::session_hash(k),
                            d.edits
                        ),
                    };
                    (k.clone(), d.shown.clone(), text, d.text.len(), to)
                })
                .collect()
        };
        let shows = due
            .into_iter()
            .map(|(key, slot, text, len, to)| async move {
                // Busy: the last edit is still on its way.
                let Ok(mut shown) = slot.try_lock() else {
                    return;
                };
                if self.lock().done.iter().any(|k| *k == key) {
                    return; // the reply came meanwhile
                }
                let markdown = format!("{text}{MORE}");
                let result = match shown.as_deref() {
                    Some(id) => self.platform.edit(&markdown, id, &to).await.map(|_| None),
                    None => self.platform.send(&markdown, &to).await.map(Some),
                };
                match result {
                    Ok(first) => {
                        if let Some(id) = first {
                            let k = draft_key(&self.channel, &self.account, &key);
                            if let Err(e) = self.records.put(&k, id.clone().into()).await {
                                tracing::debug!(error = %e, "Draft id not recorded");
                            }
                            *shown = Some(id);
                        }
                        if let Some(d) = self.lock().drafts.get_mut(&key) {
                            d.last_shown = Some(Instant::now());
                            d.shown_len = len;
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "Draft not shown"),
                }
            });
        futures::future::join_all(shows).await;
    }

    /// Follows the agent's deltas for this account's chats until `stop`.
    pub(crate) async fn run(self: Arc<Self>, client: async_nats::Client, stop: CancellationToken) {
        let prefix = format!("{}:{}:", self.channel, self.account);
        let mut sub = match client.subscribe("claw.v1.evt.delta.>").await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot follow the agent's deltas; no drafts");
                return;
            }
        };
        // Shown on their own task: a slow platform call never holds up the deltas.
        let shower = {
            let (me, stop) = (self.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => me.show().await,
                        _ = stop.cancelled() => return,
                    }
                }
            })
        };
        loop {
            tokio::select! {
                m = sub.next() => {
                    let Some(m) = m else { break };
                    let Ok(env) = decode::<DeltaEvent>(&m.payload) else { continue };
                    if env.body.inbound_id.starts_with(&prefix) {
                        self.add(env.body);
                    }
                }
                _ = stop.cancelled() => break,
            }
        }
        shower.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draft_is_shown_after_its_first_words_then_every_so_often_within_the_edits_allowed() {
        let t0 = Instant::now();
        let mut d = Draft {
            attempt: 0,
            text: "Hello".into(),
            chat_id: "1".into(),
            thread_id: None,
            started: t0,
            last_shown: None,
            shown_len: 0,
            edits: 0,
            shown: Arc::default(),
        };
        assert!(!d.due(t0, u32::MAX), "a quick answer is no draft");
        assert!(d.due(t0 + FIRST_AFTER, u32::MAX));
        d.edits = 1;
        d.last_shown = Some(t0 + FIRST_AFTER);
        d.shown_len = d.text.len();
        assert!(!d.due(t0 + FIRST_AFTER * 10, u32::MAX), "nothing new");
        d.text.push_str(" world");
        assert!(
            !d.due(t0 + FIRST_AFTER + EDIT_EVERY / 2, u32::MAX),
            "too soon"
        );
        assert!(d.due(t0 + FIRST_AFTER + EDIT_EVERY, u32::MAX));
        // Signal: ten edits of a message at most; the last is the reply's.
        d.edits = 9;
        assert!(d.due(t0 + FIRST_AFTER + EDIT_EVERY, 10));
        d.edits = 10;
        assert!(!d.due(t0 + FIRST_AFTER + EDIT_EVERY, 10));
    }

    #[test]
    fn draft_keys_are_valid_kv_keys_whatever_the_inbound_id() {
        let k = draft_key("slack", "default", "slack:default:C1:17.0001 ü/..");
        assert!(
            k.starts_with("slack.default.") && k.ends_with(".draft"),
            "{k}"
        );
        assert!(k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
    }
}
