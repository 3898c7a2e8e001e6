//! Recent history of hot sessions, kept by the agent that ran their last turn.
//!
//! An entry is only used when the session's last transcript sequence in JetStream (one
//! direct get, done for every turn anyway) equals the sequence the entry was built up
//! to: then no one — no other replica, no restart — has appended since, and the entry
//! is exactly what the store would answer. Otherwise the agent asks the store. This
//! takes the store round trip (and its wait for the previous turn's commit) off the
//! path of a conversation's next turn. A session idle for [`IDLE`] is dropped: an idle
//! session costs the agent nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clawbus_wire::HistoryEntry;

/// Sessions kept; past it the cache starts over (a miss only costs a store query).
pub const MAX_SESSIONS: usize = 1024;
/// A session's history is kept this long after its last turn.
pub const IDLE: Duration = Duration::from_secs(300);

type Entry = (Instant, u64, Vec<HistoryEntry>);

pub struct HistoryCache {
    sessions: Mutex<HashMap<String, Entry>>,
    idle: Duration,
}

impl Default for HistoryCache {
    fn default() -> Self {
        Self::with_idle(IDLE)
    }
}

impl HistoryCache {
    /// A cache that drops a session `idle` after its last turn.
    pub fn with_idle(idle: Duration) -> Self {
        Self {
            sessions: Mutex::default(),
            idle,
        }
    }

    /// The history of `session_key` if it was cached up to exactly `last_seq`.
    pub fn get(&self, session_key: &str, last_seq: u64) -> Option<Vec<HistoryEntry>> {
        let map = self.lock();
        map.get(session_key)
            .filter(|(at, seq, _)| *seq == last_seq && at.elapsed() < self.idle)
            .map(|(_, _, h)| h.clone())
    }

    /// Records the history after a turn: `entries` (oldest first) end at `last_seq`;
    /// only the newest `limit` are kept.
    pub fn put(
        &self,
        session_key: &str,
        last_seq: u64,
        mut entries: Vec<HistoryEntry>,
        limit: usize,
    ) {
        if entries.len() > limit {
            // As the store answers: the newest `limit`, and the latest compaction
            // summary when older than those.
            let cut = entries.len() - limit;
            let summary = entries[..cut]
                .iter()
                .rposition(|e| e.summary.is_some())
                .filter(|_| !entries[cut..].iter().any(|e| e.summary.is_some()));
            let kept = summary.map(|i| entries[i].clone());
            entries.drain(..cut);
            if let Some(s) = kept {
                entries.insert(0, s);
            }
        }
        let mut map = self.lock();
        let idle = self.idle;
        map.retain(|_, (at, _, _)| at.elapsed() < idle);
        if map.len() >= MAX_SESSIONS && !map.contains_key(session_key) {
            map.clear();
        }
        map.insert(session_key.to_owned(), (Instant::now(), last_seq, entries));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawbus_wire::Role;

    fn e(seq: u64) -> HistoryEntry {
        HistoryEntry {
            entry_id: format!("e{seq}"),
            run_id: "r".into(),
            role: Role::User,
            content: "x".into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn only_an_exact_sequence_hits() {
        let c = HistoryCache::default();
        c.put("s", 3, vec![e(1), e(2), e(3)], 2);
        assert_eq!(
            c.get("s", 3)
                .unwrap()
                .iter()
                .map(|h| h.seq)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(c.get("s", 4).is_none(), "someone appended since");
        assert!(c.get("s", 2).is_none());
        assert!(c.get("other", 3).is_none());
    }

    #[test]
    fn bounded() {
        let c = HistoryCache::default();
        for i in 0..MAX_SESSIONS + 5 {
            c.put(&format!("s{i}"), 1, vec![e(1)], 10);
        }
        assert!(c.lock().len() <= MAX_SESSIONS);
    }

    #[test]
    fn idle_sessions_are_dropped() {
        let c = HistoryCache::with_idle(Duration::ZERO);
        c.put("s", 1, vec![e(1)], 10);
        assert!(c.get("s", 1).is_none(), "expired at once");
        c.put("t", 1, vec![e(1)], 10);
        assert_eq!(c.lock().len(), 1, "the expired session was swept");
    }

    #[test]
    fn trimming_keeps_the_latest_summary() {
        let c = HistoryCache::default();
        let mut s = e(2);
        s.summary = Some(clawbus_wire::Summary { first_kept_seq: 3 });
        c.put("s", 5, vec![e(1), s, e(3), e(4), e(5)], 2);
        let seqs: Vec<u64> = c.get("s", 5).unwrap().iter().map(|h| h.seq).collect();
        assert_eq!(seqs, vec![2, 4, 5]);
    }
}
