//! What the router keeps per session (KV `claw_sessions`, shared by its replicas):
//! when the session was last active and when its current run of history started
//! (reset policies), its `/model` and `/think` settings, and the unmentioned group
//! messages waiting to be context.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use clawbus_bus::subjects;
use clawbus_config::ResetPolicy;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const DAY_MS: i64 = 24 * 3600 * 1000;
/// Characters of one context message kept.
const CONTEXT_TEXT_CHARS: usize = 2000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    /// The last message routed to the session (0: none yet).
    #[serde(default)]
    pub last_active_ms: i64,
    /// When the session's current history started (its last reset; 0: never reset).
    #[serde(default)]
    pub started_ms: i64,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub thinking: Option<String>,
    /// Where the session's owner last wrote from (heartbeats answer there).
    #[serde(default)]
    pub last_route: Option<LastRoute>,
    /// The session's queue mode (`/queue`), over `[messages.queue]`.
    #[serde(default)]
    pub queue: Option<String>,
    /// The session's queue options (`/queue … debounce:2s cap:10 drop:old`), each
    /// over `[messages.queue]`.
    #[serde(default)]
    pub queue_debounce_ms: Option<u32>,
    #[serde(default)]
    pub queue_cap: Option<u32>,
    #[serde(default)]
    pub queue_drop: Option<String>,
    /// System events (`/hooks/wake` with `next-heartbeat`) for the next heartbeat.
    #[serde(default)]
    pub events: Vec<String>,
}

impl SessionState {
    /// The session's queue options: its own over the configured ones.
    pub fn queue_options(&self, q: &clawbus_config::QueueConfig) -> clawbus_wire::QueueOptions {
        clawbus_wire::QueueOptions {
            debounce_ms: self.queue_debounce_ms.unwrap_or(q.debounce_ms),
            cap: self.queue_cap.unwrap_or(q.cap),
            drop: self.queue_drop.clone().unwrap_or_else(|| q.drop.clone()),
        }
    }
}

/// System events kept for the next heartbeat at most.
pub const MAX_EVENTS: usize = 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRoute {
    pub channel: String,
    pub account: String,
    pub chat_id: String,
}

/// An unmentioned group message kept as context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContextLine {
    pub sender: String,
    pub text: String,
    pub ts: i64,
}

fn state_key(session_key: &str) -> String {
    format!("s.{}", subjects::session_token(session_key))
}

fn context_key(session_key: &str) -> String {
    format!("ctx.{}", subjects::session_token(session_key))
}

/// Whether a session last active at `last` starts afresh at `now` under `policy`.
pub fn reset_due(policy: &ResetPolicy, last: i64, now: i64) -> bool {
    if last <= 0 {
        return false;
    }
    match policy.mode.as_str() {
        "daily" => {
            // The latest daily boundary (UTC) at or before now.
            let at = i64::from(policy.at_hour) * 3600 * 1000;
            let mut boundary = now - now.rem_euclid(DAY_MS) + at;
            if boundary > now {
                boundary -= DAY_MS;
            }
            last < boundary
        }
        "idle" => {
            now.saturating_sub(last)
                > i64::try_from(policy.idle_minutes).unwrap_or(i64::MAX) * 60_000
        }
        _ => false,
    }
}

/// The session state store: KV `claw_sessions`, read through a cache every router
/// replica keeps in step with the bucket by a watch (so routing a message reads no
/// KV on the hot path); until the watch has caught up, or while it is down, reads go
/// to the bucket.
#[derive(Clone)]
pub struct States {
    pub kv: kv::Store,
    cache: Arc<Cache>,
}

#[derive(Default)]
struct Cache {
    ready: AtomicBool,
    /// State key → (revision, state).
    map: Mutex<HashMap<String, (u64, SessionState)>>,
}

impl Cache {
    fn put(&self, key: String, rev: u64, st: Option<SessionState>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(&key).is_some_and(|(r, _)| *r >= rev) {
            return;
        }
        match st {
            Some(st) => map.insert(key, (rev, st)),
            None => map.remove(&key),
        };
    }
}

impl States {
    pub fn new(kv: kv::Store) -> Self {
        Self {
            kv,
            cache: Arc::default(),
        }
    }

    /// Keeps the cache in step with the bucket (every replica's writes) until
    /// shutdown; falls back to reading the bucket while it cannot.
    pub async fn follow(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.follow_once(&shutdown).await {
                tracing::warn!(error = %e, "Session state watch interrupted; reading the bucket meanwhile");
            }
            self.cache.ready.store(false, Ordering::SeqCst);
            if clawbus_bus::consumer::sleep_or_cancel(std::time::Duration::from_secs(1), &shutdown)
                .await
            {
                return;
            }
        }
    }

    async fn follow_once(&self, shutdown: &CancellationToken) -> Result<(), String> {
        let existing = clawbus_bus::kv_keys(&self.kv, "s.*")
            .await
            .map_err(|e| e.to_string())?;
        let mut watch = self
            .kv
            .watch_with_history("s.*")
            .await
            .map_err(|e| e.to_string())?;
        if existing.is_empty() {
            self.cache.ready.store(true, Ordering::SeqCst);
        }
        loop {
            let e = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                e = watch.next() => e,
            };
            let e = match e {
                Some(Ok(e)) => e,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("the watch ended".into()),
            };
            let st = (e.operation == kv::Operation::Put)
                .then(|| serde_json::from_slice(&e.value).unwrap_or_default());
            self.cache.put(e.key.clone(), e.revision, st);
            if e.delta == 0 {
                self.cache.ready.store(true, Ordering::SeqCst);
            }
        }
    }

    /// A session's state (default when it has none).
    pub async fn load(&self, session_key: &str) -> Result<(SessionState, u64), String> {
        let key = state_key(session_key);
        if self.cache.ready.load(Ordering::SeqCst) {
            let map = self.cache.map.lock().unwrap_or_else(|p| p.into_inner());
            return Ok(map
                .get(&key)
                .map(|(r, st)| (st.clone(), *r))
                .unwrap_or_default());
        }
        match self.kv.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Ok((
                serde_json::from_slice(&e.value).unwrap_or_default(),
                e.revision,
            )),
            Ok(_) => Ok((SessionState::default(), 0)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Writes a session's state. A session's messages route on one router replica at
    /// a time, in order, so the last write wins without a conflict check.
    pub async fn save(&self, session_key: &str, s: &SessionState) -> Result<(), String> {
        let v = serde_json::to_vec(s).map_err(|e| e.to_string())?;
        let key = state_key(session_key);
        let rev = self
            .kv
            .put(&key, v.into())
            .await
            .map_err(|e| e.to_string())?;
        self.cache.put(key, rev, Some(s.clone()));
        Ok(())
    }

    /// Keeps an unmentioned group message, the newest `limit`.
    pub async fn remember(
        &self,
        session_key: &str,
        line: ContextLine,
        limit: usize,
    ) -> Result<(), String> {
        let mut lines = self.context(session_key).await?;
        lines.push(ContextLine {
            text: line.text.chars().take(CONTEXT_TEXT_CHARS).collect(),
            ..line
        });
        let drop = lines.len().saturating_sub(limit);
        lines.drain(..drop);
        let v = serde_json::to_vec(&lines).map_err(|e| e.to_string())?;
        self.kv
            .put(context_key(session_key), v.into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The group messages kept since the last mention.
    pub async fn context(&self, session_key: &str) -> Result<Vec<ContextLine>, String> {
        match self.kv.get(context_key(session_key)).await {
            Ok(Some(v)) => Ok(serde_json::from_slice(&v).unwrap_or_default()),
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Forgets the kept group messages (they went to the agent).
    pub async fn clear_context(&self, session_key: &str) -> Result<(), String> {
        self.kv
            .purge(context_key(session_key))
            .await
            .map_err(|e| e.to_string())
    }
}

/// The text the agent gets for a mentioned group message with the messages before it.
pub fn with_context(lines: &[ContextLine], sender: &str, text: &str) -> String {
    if lines.is_empty() {
        return text.to_owned();
    }
    let mut s = String::from("[Chat messages since your last reply, for context]\n");
    for l in lines {
        s.push_str(&format!("{}: {}\n", l.sender, l.text));
    }
    s.push_str(&format!("\n[Addressed to you]\n{sender}: {text}"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: &str) -> ResetPolicy {
        ResetPolicy {
            mode: mode.into(),
            at_hour: 4,
            idle_minutes: 30,
        }
    }

    #[test]
    fn daily_resets_after_the_hour_and_idle_after_the_silence() {
        let day = 20_000 * DAY_MS;
        let h = |x: i64| day + x * 3600 * 1000;
        let daily = policy("daily");
        assert!(!reset_due(&daily, h(5), h(6)), "same day after 4");
        assert!(reset_due(&daily, h(3), h(5)), "crossed 4:00");
        assert!(
            !reset_due(&daily, h(-1), h(3)),
            "before 4:00 still yesterday's"
        );
        assert!(reset_due(&daily, h(-21), h(3)), "crossed yesterday's 4:00");
        assert!(
            !reset_due(&daily, 0, h(5)),
            "a new session has nothing to reset"
        );
        let idle = policy("idle");
        assert!(!reset_due(&idle, h(1), h(1) + 29 * 60_000));
        assert!(reset_due(&idle, h(1), h(1) + 31 * 60_000));
        assert!(!reset_due(&policy("none"), 1, h(100)));
    }

    #[test]
    fn context_comes_before_the_current_message() {
        let lines = vec![ContextLine {
            sender: "Ann".into(),
            text: "the door is blue".into(),
            ts: 1,
        }];
        let t = with_context(&lines, "Bob", "@bot what colour?");
        assert!(t.contains("Ann: the door is blue\n\n[Addressed to you]\nBob: @bot what colour?"));
        assert_eq!(with_context(&[], "Bob", "hi"), "hi");
    }
}
