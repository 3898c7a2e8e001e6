//! A chat session's backlog before its next run starts: the run waits until the
//! session has been quiet for the queue's debounce when it was queued behind another,
//! then the queue's cap applies (`drop` = `old` | `new` | `summarize`) and `collect`
//! takes what waits. What a run takes or drops is recorded in its checkpoint before the
//! taken turns are marked finished, so a crash in between changes nothing.

use std::time::{Duration, Instant};

use clawbus_bus::consumer::Delivery;
use clawbus_wire::{QueueOptions, TurnRequest};

use crate::checkpoint::{Checkpoint, Progress};
use crate::turn::AgentService;

/// Turns looked at beyond the cap when a queue overflows; any further are met by
/// later runs.
const OVERFLOW_SCAN: usize = 100;

/// The debounce waits at most this many times its length when messages keep coming.
const MAX_DEBOUNCES: u32 = 10;

/// Characters of a dropped message kept in a `summarize` line.
const SUMMARY_CHARS: usize = 160;

/// What the delivered turn does about the messages waiting behind it.
#[derive(Debug, PartialEq)]
pub(crate) enum Plan {
    /// Runs as it is.
    AsIs,
    /// Runs with `text`, having taken (run or dropped) the turns `taken`.
    Take {
        text: String,
        taken: Vec<String>,
        dropped: usize,
    },
    /// Is dropped, with the turns `taken`; nothing runs.
    Drop { taken: Vec<String>, dropped: usize },
}

/// The plan for `first` with `waiting` behind it (oldest first).
pub(crate) fn plan(
    first: &TurnRequest,
    waiting: &[TurnRequest],
    o: &QueueOptions,
    collect: bool,
) -> Plan {
    let all: Vec<&TurnRequest> = std::iter::once(first).chain(waiting).collect();
    let cap = (o.cap.max(1)) as usize;
    let excess = all.len().saturating_sub(cap);
    let ids = |ts: &[&TurnRequest]| ts.iter().map(|t| t.run_id.clone()).collect::<Vec<_>>();
    if excess == 0 {
        if collect && !waiting.is_empty() {
            return Plan::Take {
                text: crate::queue::collected(&first.inbound.text, waiting),
                taken: ids(&all[1..]),
                dropped: 0,
            };
        }
        return Plan::AsIs;
    }
    // The messages kept, and a preface saying what went (summarize).
    let (kept, preface): (&[&TurnRequest], String) = match o.drop.as_str() {
        "new" => (&all[..cap], String::new()),
        "summarize" => (&all[excess..], summary(&all[..excess], o.cap)),
        _ => (&all[excess..], String::new()),
    };
    let body = |kept: &[&TurnRequest]| {
        let rest: Vec<TurnRequest> = kept[1..].iter().map(|t| (*t).clone()).collect();
        if collect && !rest.is_empty() {
            crate::queue::collected(&kept[0].inbound.text, &rest)
        } else {
            kept[0].inbound.text.clone()
        }
    };
    match o.drop.as_str() {
        "new" => {
            // The newest go; the first runs (taking the kept ones too when collecting).
            let taken = if collect {
                ids(&all[1..])
            } else {
                ids(&all[cap..])
            };
            Plan::Take {
                text: body(kept),
                taken,
                dropped: excess,
            }
        }
        "summarize" => {
            // The oldest become one line each before the first kept message, in the
            // delivered turn's run.
            let upto = if collect { all.len() } else { excess + 1 };
            Plan::Take {
                text: format!(
                    "{preface}\n\n{}",
                    body(if collect { kept } else { &kept[..1] })
                ),
                taken: ids(&all[1..upto]),
                dropped: excess,
            }
        }
        _ if collect => Plan::Take {
            text: body(kept),
            taken: ids(&all[1..]),
            dropped: excess,
        },
        // `old`: the oldest go, the delivered turn among them.
        _ => Plan::Drop {
            taken: ids(&all[1..excess]),
            dropped: excess,
        },
    }
}

/// One line per message dropped by `summarize`.
fn summary(dropped: &[&TurnRequest], cap: u32) -> String {
    let mut s = format!(
        "[{} earlier message{} dropped from a full queue (cap {cap}); in brief:]",
        dropped.len(),
        if dropped.len() == 1 { " was" } else { "s were" }
    );
    for t in dropped {
        let line: String = t
            .inbound
            .text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let mut short: String = line.chars().take(SUMMARY_CHARS).collect();
        if short.len() < line.len() {
            short.push('…');
        }
        s.push_str("\n- ");
        s.push_str(&short);
    }
    s
}

/// What became of the delivered turn.
pub(crate) enum Shaped {
    /// It runs (maybe with other turns' text, recorded in its progress).
    Run,
    /// It was dropped; ack it.
    Dropped,
}

impl AgentService {
    /// Applies the session's queue to a chat turn about to start afresh. A backlog
    /// can form behind any chat turn (a run going on, an agent that was down), so its
    /// queue is always looked at: one direct get when nothing waits. The gateway's
    /// turns (no queue mode) skip all of it.
    pub(crate) async fn shape_backlog(
        &self,
        d: &Delivery,
        turn: &TurnRequest,
        progress: &mut Progress,
        ckpt: &mut Checkpoint<'_>,
    ) -> Result<Shaped, String> {
        let Some(mode) = turn.queue.as_deref() else {
            return Ok(Shaped::Run);
        };
        if mode == "interrupt" {
            return Ok(Shaped::Run);
        }
        let o = turn.queue_options.clone().unwrap_or_else(|| {
            let q = clawbus_config::QueueConfig::default();
            QueueOptions {
                debounce_ms: q.debounce_ms,
                cap: q.cap,
                drop: q.drop,
            }
        });
        if d.queued && o.debounce_ms > 0 {
            self.debounce(d, o.debounce_ms).await;
        }
        let collect = mode == "collect";
        let waiting = self.waiting_turns(d, o.cap as usize + OVERFLOW_SCAN).await;
        match plan(turn, &waiting, &o, collect) {
            Plan::AsIs => Ok(Shaped::Run),
            Plan::Take {
                text,
                taken,
                dropped,
            } => {
                progress.collected = Some(text);
                progress.absorbed = taken;
                ckpt.save(progress).await.map_err(|e| e.to_string())?;
                self.absorb(&progress.absorbed).await;
                self.count_dropped(turn, &o, dropped, progress.absorbed.len());
                Ok(Shaped::Run)
            }
            Plan::Drop { taken, dropped } => {
                self.absorb(&taken).await;
                ckpt.finish().await.map_err(|e| e.to_string())?;
                self.count_dropped(turn, &o, dropped, taken.len());
                Ok(Shaped::Dropped)
            }
        }
    }

    fn count_dropped(&self, turn: &TurnRequest, o: &QueueOptions, dropped: usize, taken: usize) {
        if dropped > 0 {
            self.metrics
                .queue_dropped
                .with_label_values(&[o.drop.as_str()])
                .inc_by(dropped as u64);
            tracing::info!(run_id = %turn.run_id, session_key = %turn.session_key, dropped, taken, cap = o.cap, policy = %o.drop, "Session queue over its cap");
        } else if taken > 0 {
            tracing::info!(run_id = %turn.run_id, taken, "Collected the messages waiting behind the run");
        }
    }

    /// Waits until the session's newest message is `ms` old (at most
    /// [`MAX_DEBOUNCES`] times that while messages keep coming).
    async fn debounce(&self, d: &Delivery, ms: u32) {
        let Some(stream) = self.turn_stream().await else {
            return;
        };
        let quiet = i64::from(ms);
        let deadline =
            Instant::now() + Duration::from_millis(u64::from(ms) * u64::from(MAX_DEBOUNCES));
        loop {
            let newest = match stream.direct_get_last_for_subject(d.subject.clone()).await {
                Ok(m) => i64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
                Err(_) => d.published_ms,
            }
            .max(d.published_ms);
            let age = (clawbus_wire::now_ms() - newest).max(0);
            let now = Instant::now();
            if age >= quiet || now >= deadline {
                return;
            }
            let wait = Duration::from_millis((quiet - age) as u64).min(deadline - now);
            tracing::debug!(subject = %d.subject, wait_ms = wait.as_millis() as u64, "Waiting for the session to go quiet");
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(texts: &[&str]) -> Vec<TurnRequest> {
        texts
            .iter()
            .map(|t| {
                let mut r = TurnRequest {
                    run_id: format!("run:{t}"),
                    ..Default::default()
                };
                r.inbound.text = (*t).to_owned();
                r
            })
            .collect()
    }

    fn opts(cap: u32, drop: &str) -> QueueOptions {
        QueueOptions {
            debounce_ms: 0,
            cap,
            drop: drop.into(),
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|t| format!("run:{t}")).collect()
    }

    #[test]
    fn under_the_cap_nothing_changes_unless_collecting() {
        let all = turns(&["a", "b", "c"]);
        assert_eq!(plan(&all[0], &all[1..], &opts(3, "old"), false), Plan::AsIs);
        match plan(&all[0], &all[1..], &opts(3, "old"), true) {
            Plan::Take {
                text,
                taken,
                dropped,
            } => {
                assert_eq!(taken, ids(&["b", "c"]));
                assert_eq!(dropped, 0);
                assert!(text.starts_with('a') && text.contains("b\nc"), "{text}");
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn old_drops_the_oldest_including_the_delivered_turn() {
        let all = turns(&["a", "b", "c", "d", "e"]);
        assert_eq!(
            plan(&all[0], &all[1..], &opts(3, "old"), false),
            Plan::Drop {
                taken: ids(&["b"]),
                dropped: 2
            }
        );
        // Collecting, the delivered turn carries the kept ones.
        match plan(&all[0], &all[1..], &opts(3, "old"), true) {
            Plan::Take {
                text,
                taken,
                dropped,
            } => {
                assert_eq!((taken, dropped), (ids(&["b", "c", "d", "e"]), 2));
                assert_eq!(text, crate::queue::collected("c", &all[3..]));
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn new_drops_the_newest() {
        let all = turns(&["a", "b", "c", "d", "e"]);
        assert_eq!(
            plan(&all[0], &all[1..], &opts(3, "new"), false),
            Plan::Take {
                text: "a".into(),
                taken: ids(&["d", "e"]),
                dropped: 2
            }
        );
    }

    #[test]
    fn summarize_gives_the_dropped_ones_to_the_next_run_in_brief() {
        let mut all = turns(&["a", "b", "c", "d", "e"]);
        all[1].inbound.text = format!("b\nline two {}", "x".repeat(400));
        match plan(&all[0], &all[1..], &opts(3, "summarize"), false) {
            Plan::Take {
                text,
                taken,
                dropped,
            } => {
                // a and b summarised, c in full: the queue is back at its cap (run, d, e).
                assert_eq!((taken, dropped), (ids(&["b", "c"]), 2));
                assert!(
                    text.starts_with("[2 earlier messages were dropped from a full queue (cap 3)"),
                    "{text}"
                );
                assert!(text.contains("\n- a\n- b line two xxx"), "{text}");
                assert!(text.contains('…') && text.ends_with("\n\nc"), "{text}");
                assert!(text.len() < 400, "dropped messages are shortened");
            }
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn a_cap_of_one_keeps_only_the_run() {
        let all = turns(&["a", "b"]);
        assert_eq!(
            plan(&all[0], &all[1..], &opts(1, "new"), false),
            Plan::Take {
                text: "a".into(),
                taken: ids(&["b"]),
                dropped: 1
            }
        );
        assert_eq!(
            plan(&all[0], &all[1..], &opts(1, "old"), false),
            Plan::Drop {
                taken: vec![],
                dropped: 1
            }
        );
    }
}
