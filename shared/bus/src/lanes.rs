//! Session lanes: the bookkeeping behind per-key order in the consumer runner.
//!
//! A lane is one key's queue (a session, a chat). At most one message of a lane runs at
//! a time, in stream order. A message that failed and was nak'd with a delay keeps its
//! lane: later messages of the key wait until it comes back and succeeds or is
//! dead-lettered. Waiting messages are kept here, not in tasks, so they hold no
//! concurrency permit; how many may wait is bounded by the consumer's `max_ack_pending`
//! (the server delivers no more than that many unacked messages).
//!
//! Pure data structure, no I/O: the runner decides what to do with what it returns.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// What the runner should do with a message that just arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Its lane is free: run it now.
    Run,
    /// Its lane is busy: it was queued and will be returned by [`Lanes::finished`].
    Queued,
    /// The same stream sequence is already running or queued (a redelivery while we
    /// still hold it): the queued copy now carries the newest delivery.
    Duplicate,
}

/// How a lane's running message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acked or dead-lettered: the lane moves on.
    Done,
    /// Nak'd with this delay: the lane waits for its redelivery.
    Retried(Duration),
}

#[derive(Debug)]
struct Lane<T> {
    running: Option<u64>,
    /// A nak'd message expected back, and since when / how long we wait for it.
    retrying: Option<(u64, Instant, Duration)>,
    waiting: BTreeMap<u64, T>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Self {
            running: None,
            retrying: None,
            waiting: BTreeMap::new(),
        }
    }
}

impl<T> Lane<T> {
    fn idle(&self) -> bool {
        self.running.is_none() && self.retrying.is_none() && self.waiting.is_empty()
    }
}

/// Every lane of one runner.
#[derive(Debug)]
pub struct Lanes<T> {
    lanes: HashMap<String, Lane<T>>,
    waiting: usize,
}

impl<T> Default for Lanes<T> {
    fn default() -> Self {
        Self {
            lanes: HashMap::new(),
            waiting: 0,
        }
    }
}

impl<T> Lanes<T> {
    /// Messages held waiting for their lane.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Lanes that are running, retrying or have messages waiting.
    pub fn active(&self) -> usize {
        self.lanes.len()
    }

    /// A message of `key` with stream sequence `seq` arrived.
    pub fn admit(&mut self, key: &str, seq: u64, item: T) -> (Admit, Option<T>) {
        let lane = self.lanes.entry(key.to_owned()).or_default();
        if lane.running == Some(seq) {
            return (Admit::Duplicate, Some(item));
        }
        if let Some(old) = lane.waiting.get_mut(&seq) {
            *old = item;
            return (Admit::Duplicate, None);
        }
        if lane.retrying.is_some_and(|(r, ..)| r == seq) {
            lane.retrying = None;
        }
        // Runs now only if nothing of the lane is running, no earlier message is owed
        // back, and nothing earlier waits (redeliveries may arrive out of order).
        let earlier_owed = lane.retrying.is_some_and(|(r, ..)| r < seq);
        let earlier_waiting = lane.waiting.keys().next().is_some_and(|w| *w < seq);
        if lane.running.is_none() && !earlier_owed && !earlier_waiting {
            lane.running = Some(seq);
            return (Admit::Run, Some(item));
        }
        lane.waiting.insert(seq, item);
        self.waiting += 1;
        (Admit::Queued, None)
    }

    /// The running message `seq` of `key` settled; returns the next message to run.
    pub fn finished(&mut self, key: &str, seq: u64, how: Settled) -> Option<(u64, T)> {
        let lane = self.lanes.get_mut(key)?;
        if lane.running == Some(seq) {
            lane.running = None;
        }
        if let Settled::Retried(delay) = how {
            lane.retrying = Some((seq, Instant::now(), delay));
        }
        self.advance(key)
    }

    fn advance(&mut self, key: &str) -> Option<(u64, T)> {
        let lane = self.lanes.get_mut(key)?;
        let next = if lane.running.is_none() && lane.retrying.is_none() {
            lane.waiting.pop_first()
        } else {
            None
        };
        if let Some((seq, _)) = &next {
            lane.running = Some(*seq);
            self.waiting -= 1;
        }
        if lane.idle() {
            self.lanes.remove(key);
        }
        next
    }

    /// Lanes whose nak'd message has not come back within its delay plus `grace` (it
    /// went to another consumer, or the consumer was reset): they are released so the
    /// lane cannot stall forever. Returns the messages that may run now.
    pub fn expire_retries(&mut self, grace: Duration) -> Vec<(String, u64, T)> {
        let now = Instant::now();
        let stale: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, l)| {
                l.retrying
                    .is_some_and(|(_, since, delay)| now.duration_since(since) > delay + grace)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in stale {
            if let Some(lane) = self.lanes.get_mut(&key) {
                lane.retrying = None;
            }
            if let Some((seq, item)) = self.advance(&key) {
                out.push((key, seq, item));
            }
        }
        out
    }

    /// Every waiting message (for progress acks).
    pub fn waiting_items(&self) -> impl Iterator<Item = &T> {
        self.lanes.values().flat_map(|l| l.waiting.values())
    }

    /// Takes every waiting message out (on shutdown).
    pub fn drain_waiting(&mut self) -> Vec<T> {
        self.waiting = 0;
        let mut out = Vec::new();
        for lane in self.lanes.values_mut() {
            out.extend(std::mem::take(&mut lane.waiting).into_values());
        }
        self.lanes.retain(|_, l| !l.idle());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_runs_per_lane_others_wait_in_order() {
        let mut l = Lanes::default();
        assert_eq!(l.admit("a", 1, "a1").0, Admit::Run);
        assert_eq!(l.admit("a", 3, "a3").0, Admit::Queued);
        assert_eq!(l.admit("a", 2, "a2").0, Admit::Queued);
        assert_eq!(l.admit("b", 4, "b4").0, Admit::Run);
        assert_eq!(l.waiting(), 2);
        assert_eq!(l.finished("a", 1, Settled::Done), Some((2, "a2")));
        assert_eq!(l.finished("a", 2, Settled::Done), Some((3, "a3")));
        assert_eq!(l.finished("a", 3, Settled::Done), None);
        assert_eq!(l.finished("b", 4, Settled::Done), None);
        assert_eq!(l.active(), 0);
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    fn a_retry_keeps_the_lane_until_it_comes_back() {
        let mut l = Lanes::default();
        assert_eq!(l.admit("a", 1, "a1").0, Admit::Run);
        assert_eq!(l.admit("a", 2, "a2").0, Admit::Queued);
        let delay = Duration::from_secs(60);
        assert_eq!(l.finished("a", 1, Settled::Retried(delay)), None);
        // A later message of the lane still waits; another lane runs.
        assert_eq!(l.admit("a", 5, "a5").0, Admit::Queued);
        assert_eq!(l.admit("b", 6, "b6").0, Admit::Run);
        // The redelivery of 1 runs ahead of 2 and 5.
        assert_eq!(l.admit("a", 1, "a1'"), (Admit::Run, Some("a1'")));
        assert_eq!(l.finished("a", 1, Settled::Done), Some((2, "a2")));
        assert_eq!(l.expire_retries(Duration::ZERO), vec![]);
    }

    #[test]
    fn a_retry_that_never_returns_is_released() {
        let mut l = Lanes::default();
        l.admit("a", 1, "a1");
        l.admit("a", 2, "a2");
        l.finished("a", 1, Settled::Retried(Duration::ZERO));
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(
            l.expire_retries(Duration::ZERO),
            vec![("a".into(), 2, "a2")]
        );
    }

    #[test]
    fn duplicates_of_held_messages_are_recognised() {
        let mut l = Lanes::default();
        l.admit("a", 1, "a1");
        l.admit("a", 2, "a2");
        assert_eq!(l.admit("a", 1, "dup"), (Admit::Duplicate, Some("dup")));
        assert_eq!(l.admit("a", 2, "a2-newer"), (Admit::Duplicate, None));
        assert_eq!(l.waiting(), 1);
        assert_eq!(l.finished("a", 1, Settled::Done), Some((2, "a2-newer")));
    }

    #[test]
    fn drain_returns_waiting_and_keeps_running_lanes() {
        let mut l = Lanes::default();
        l.admit("a", 1, "a1");
        l.admit("a", 2, "a2");
        l.admit("a", 3, "a3");
        let mut d = l.drain_waiting();
        d.sort();
        assert_eq!(d, vec!["a2", "a3"]);
        assert_eq!(l.active(), 1);
        assert_eq!(l.finished("a", 1, Settled::Done), None);
        assert_eq!(l.active(), 0);
    }
}
