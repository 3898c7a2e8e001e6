//! Recent history of hot sessions, kept by the agent that ran their last turn.
//!
//! An entry is only used when the session's last transcript sequence in JetStream (one
//! direct get, done for every turn anyway) equals the sequence the entry was built up
//! to: then no one — no other replica, no restart — has appended since, and the entry
//! is exactly what the store would answer. Otherwise the agent asks the store. This
//! takes the store round trip (and its wait for the previous turn's commit) off the
//! path of a conversation's next turn.

use std::collections::HashMap;
use std::sync::Mutex;

use clawbus_wire::HistoryEntry;

/// Sessions kept; past it the cache starts over (a miss only costs a store query).
pub const MAX_SESSIONS: usize = 1024;

#[derive(Default)]
pub struct HistoryCache {
    sessions: Mutex<HashMap<String, (u64, Vec<HistoryEntry>)>>,
}

impl HistoryCache {
    /// The history of `session_key` if it was cached up to exactly `last_seq`.
    pub fn get(&self, session_key: &str, last_seq: u64) -> Option<Vec<HistoryEntry>> {
        let map = self.lock();
        map.get(session_key)
            .filter(|(seq, _)| *seq == last_seq)
            .map(|(_, h)| h.clone())
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
        if map.len() >= MAX_SESSIONS && !map.contains_key(session_key) {
            map.clear();
        }
        map.insert(session_key.to_owned(), (last_seq, entries));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Vec<HistoryEntry>)>> {
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
}
