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

/// Chat → (thread, shown until).
type Chats = HashMap<String, (Option<String>, Instant)>;

#[derive(Clone, Default)]
pub(crate) struct Typing {
    chats: Arc<Mutex<Chats>>,
    enabled: bool,
}

impl Typing {
    pub fn new(enabled: bool) -> Typing {
        Typing {
            chats: Arc::default(),
            enabled,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Chats> {
        self.chats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A turn started for `chat`.
    pub fn start(&self, chat: &str, thread: Option<&str>) {
        if !self.enabled {
            return;
        }
        let mut c = self.lock();
        if c.len() < MAX_CHATS || c.contains_key(chat) {
            c.insert(
                chat.to_owned(),
                (thread.map(str::to_owned), Instant::now() + LONGEST),
            );
        }
    }

    /// The reply to `chat` is complete.
    pub fn stop(&self, chat: &str) {
        self.lock().remove(chat);
    }

    /// Sends the indicators until `stop`.
    pub async fn run<P: Platform>(self, platform: Arc<P>, stop: CancellationToken) {
        if !self.enabled {
            return;
        }
        let mut tick = tokio::time::interval(REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let now = Instant::now();
            let due: Vec<(String, Option<String>)> = {
                let mut c = self.lock();
                c.retain(|_, (_, until)| *until > now);
                c.iter().map(|(k, (t, _))| (k.clone(), t.clone())).collect()
            };
            for (chat, thread) in due {
                if let Err(e) = platform.typing(&chat, thread.as_deref()).await {
                    tracing::debug!(error = %e, "Typing indicator not sent");
                }
            }
        }
    }
}
