//! Typing indicators: from an inbound message until its reply's last piece (or two
//! minutes), the chat shows that the bot is writing. Platforms show an indicator for
//! a few seconds, so it is sent again every four.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::Platform;

/// Chats shown typing at once, at most: beyond, new ones get no indicator.
const MAX_CHATS: usize = 256;
const REFRESH: Duration = Duration::from_secs(4);
const LONGEST: Duration = Duration::from_secs(120);

/// A chat shown typing: its thread, until when at most, when last shown.
struct Chat {
    thread: Option<String>,
    until: Instant,
    shown: Option<Instant>,
}

#[derive(Clone, Default)]
pub(crate) struct Typing {
    chats: Arc<Mutex<HashMap<String, Chat>>>,
    /// Wakes the sender when a chat starts, so the indicator shows at once.
    started: Arc<tokio::sync::Notify>,
    enabled: bool,
}

impl Typing {
    pub fn new(enabled: bool) -> Typing {
        Typing {
            enabled,
            ..Default::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Chat>> {
        self.chats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A turn started for `chat`: the indicator shows now and until its reply.
    pub fn start(&self, chat: &str, thread: Option<&str>) {
        if !self.enabled {
            return;
        }
        let mut c = self.lock();
        if c.len() < MAX_CHATS || c.contains_key(chat) {
            let shown = c.get(chat).and_then(|e| e.shown);
            c.insert(
                chat.to_owned(),
                Chat {
                    thread: thread.map(str::to_owned),
                    until: Instant::now() + LONGEST,
                    shown,
                },
            );
            self.started.notify_one();
        }
    }

    /// The reply to `chat` is complete.
    pub fn stop(&self, chat: &str) {
        self.lock().remove(chat);
    }

    /// Sends the indicators until `stop`: for a chat that just started, and again
    /// every four seconds.
    pub async fn run<P: Platform>(self, platform: Arc<P>, stop: CancellationToken) {
        if !self.enabled {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.started.notified() => {}
                _ = stop.cancelled() => return,
            }
            let now = Instant::now();
            let due: Vec<(String, Option<String>)> = {
                let mut c = self.lock();
                c.retain(|_, e| e.until > now);
                c.iter_mut()
                    .filter(|(_, e)| e.shown.is_none_or(|t| now.duration_since(t) >= REFRESH))
                    .map(|(k, e)| {
                        e.shown = Some(now);
                        (k.clone(), e.thread.clone())
                    })
                    .collect()
            };
            for (chat, thread) in due {
                if let Err(e) = platform.typing(&chat, thread.as_deref()).await {
                    tracing::debug!(error = %e, "Typing indicator not sent");
                }
            }
        }
    }
}
