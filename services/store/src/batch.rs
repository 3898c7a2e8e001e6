//! A batch of queued writes reduced to the rows each table receives: one multi-row
//! statement per table per commit instead of one statement per row. With sqlx's SQLite
//! driver every statement is a round trip to the connection's worker thread, which is
//! what a write cost before (measured in BENCHMARKS.md).
//!
//! Rows are deduplicated the way sequential writes would have left them, so a batch
//! holding a redelivered event gives the same result as applying its writes one by one
//! (and no statement touches a row twice, which Postgres refuses).

use std::collections::HashMap;
use std::future::Future;

use clawbus_wire::{Role, RunEvent, TranscriptEvent};
use tokio::sync::{mpsc, oneshot};

use crate::db::StoreError;

/// Most writes committed in one transaction (group commit).
const MAX_BATCH: usize = 512;

/// One queued write: an event and the stream sequence and time it arrived with.
pub enum WriteOp {
    Transcript(TranscriptEvent, u64, i64),
    Run(RunEvent, u64, i64),
}

pub struct RunRow<'a> {
    pub ev: &'a RunEvent,
    pub seq: u64,
    pub ts: i64,
}

pub struct EntryRow<'a> {
    pub session_key: &'a str,
    pub run_id: &'a str,
    pub entry_id: &'a str,
    pub role: Role,
    pub content: &'a str,
    /// The model's function calls (assistant entries), as a JSON array.
    pub tool_calls: Option<String>,
    /// The call a tool entry answers, and the function's name.
    pub tool_call_id: Option<&'a str>,
    pub tool_name: Option<&'a str>,
    /// A compaction summary's extent, as JSON.
    pub summary: Option<String>,
    /// The usage of the model call that wrote the entry, as JSON.
    pub usage: Option<String>,
    /// Stream sequence of the carrying event, and the position in it.
    pub seq: u64,
    pub idx: usize,
    pub ts: i64,
}

pub struct SessionRow<'a> {
    pub session_key: &'a str,
    pub agent_id: &'a str,
    /// Highest transcript-bearing sequence applied.
    pub seq: u64,
    pub first_ts: i64,
    pub last_ts: i64,
}

/// The rows of a batch, per table.
#[derive(Default)]
pub struct Rows<'a> {
    /// The newest state of each run (highest sequence).
    pub runs: Vec<RunRow<'a>>,
    /// The first usage report of each run.
    pub usage: Vec<RunRow<'a>>,
    /// The first occurrence of each transcript entry.
    pub entries: Vec<EntryRow<'a>>,
    pub sessions: Vec<SessionRow<'a>>,
}

impl<'a> Rows<'a> {
    pub fn of(ops: impl IntoIterator<Item = &'a WriteOp>) -> Self {
        let mut rows = Rows::default();
        let mut runs: HashMap<&str, usize> = HashMap::new();
        let mut usage: HashMap<&str, ()> = HashMap::new();
        let mut entries: HashMap<&str, ()> = HashMap::new();
        let mut sessions: HashMap<&str, usize> = HashMap::new();
        for op in ops {
            match op {
                WriteOp::Transcript(ev, seq, ts) => {
                    if entries.insert(&ev.entry_id, ()).is_none() {
                        rows.entries.push(EntryRow {
                            session_key: &ev.session_key,
                            run_id: &ev.run_id,
                            entry_id: &ev.entry_id,
                            role: ev.role,
                            content: &ev.content,
                            tool_calls: None,
                            tool_call_id: None,
                            tool_name: None,
                            summary: None,
                            usage: None,
                            seq: *seq,
                            idx: 0,
                            ts: *ts,
                        });
                    }
                    rows.touch(&mut sessions, &ev.session_key, &ev.agent_id, *seq, *ts);
                }
                WriteOp::Run(ev, seq, ts) => {
                    let row = RunRow {
                        ev,
                        seq: *seq,
                        ts: *ts,
                    };
                    match runs.get(ev.run_id.as_str()) {
                        Some(&i) if rows.runs[i].seq >= *seq => {}
                        Some(&i) => rows.runs[i] = row,
                        None => {
                            runs.insert(&ev.run_id, rows.runs.len());
                            rows.runs.push(row);
                        }
                    }
                    if ev.usage.is_some() && usage.insert(&ev.run_id, ()).is_none() {
                        rows.usage.push(RunRow {
                            ev,
                            seq: *seq,
                            ts: *ts,
                        });
                    }
                    for (idx, e) in ev.entries.iter().enumerate() {
                        if entries.insert(&e.entry_id, ()).is_none() {
                            rows.entries.push(EntryRow {
                                session_key: &ev.session_key,
                                run_id: &ev.run_id,
                                entry_id: &e.entry_id,
                                role: e.role,
                                content: &e.content,
                                tool_calls: (!e.tool_calls.is_empty())
                                    .then(|| serde_json::to_string(&e.tool_calls).ok())
                                    .flatten(),
                                tool_call_id: e.tool_call_id.as_deref(),
                                tool_name: e.name.as_deref(),
                                summary: e.summary.and_then(|s| serde_json::to_string(&s).ok()),
                                usage: e.usage.and_then(|u| serde_json::to_string(&u).ok()),
                                seq: *seq,
                                idx,
                                ts: *ts,
                            });
                        }
                    }
                    if !ev.entries.is_empty() {
                        rows.touch(&mut sessions, &ev.session_key, &ev.agent_id, *seq, *ts);
                    }
                }
            }
        }
        // One lock order for every writer: concurrent transactions on Postgres (store
        // replicas during a handover) cannot deadlock on each other's rows.
        rows.runs.sort_by(|a, b| a.ev.run_id.cmp(&b.ev.run_id));
        rows.usage.sort_by(|a, b| a.ev.run_id.cmp(&b.ev.run_id));
        rows.entries.sort_by(|a, b| a.entry_id.cmp(b.entry_id));
        rows.sessions
            .sort_by(|a, b| a.session_key.cmp(b.session_key));
        rows
    }

    fn touch(
        &mut self,
        index: &mut HashMap<&'a str, usize>,
        session_key: &'a str,
        agent_id: &'a str,
        seq: u64,
        ts: i64,
    ) {
        match index.get(session_key) {
            Some(&i) => {
                let s = &mut self.sessions[i];
                s.seq = s.seq.max(seq);
                s.first_ts = s.first_ts.min(ts);
                s.last_ts = s.last_ts.max(ts);
            }
            None => {
                index.insert(session_key, self.sessions.len());
                self.sessions.push(SessionRow {
                    session_key,
                    agent_id,
                    seq,
                    first_ts: ts,
                    last_ts: ts,
                });
            }
        }
    }
}

/// Rows per statement: SQLite allows 32,766 bound parameters, Postgres 65,535, and a row
/// binds at most 11.
pub const ROWS_PER_STATEMENT: usize = 1000;

/// Writes a batch's rows in one transaction.
pub trait Committer: Send + 'static {
    fn commit(&mut self, rows: &Rows<'_>) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

struct WriteReq {
    op: WriteOp,
    done: oneshot::Sender<Result<(), String>>,
}

/// The queue in front of a database's single writer task: concurrent writes are
/// committed together (group commit).
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<WriteReq>,
}

impl Writer {
    /// Starts the writer task over `committer`.
    pub fn start(committer: impl Committer) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(write_loop(committer, rx));
        Self { tx }
    }

    /// A writer that refuses every write (a read-only handle).
    pub fn closed() -> Self {
        let (tx, _) = mpsc::channel(1);
        Self { tx }
    }

    /// Queues a write and waits until it is committed.
    pub async fn write(&self, op: WriteOp) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(WriteReq { op, done })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await
            .map_err(|_| StoreError::WriterGone)?
            .map_err(StoreError::Write)
    }
}

/// Commits queued writes in batches. A batch that fails is retried one write per
/// transaction, so one bad write fails alone.
async fn write_loop(mut c: impl Committer, mut rx: mpsc::Receiver<WriteReq>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if c.commit(&Rows::of(batch.iter().map(|r| &r.op)))
            .await
            .is_ok()
        {
            for req in batch.drain(..) {
                let _ = req.done.send(Ok(()));
            }
            continue;
        }
        for req in batch.drain(..) {
            let r = c.commit(&Rows::of([&req.op])).await;
            let _ = req.done.send(r.map_err(|e| e.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawbus_wire::{RunEntry, RunStatus, Usage};

    fn run(id: &str, status: RunStatus, entries: &[&str]) -> RunEvent {
        RunEvent {
            run_id: id.into(),
            session_key: "s".into(),
            agent_id: "main".into(),
            status,
            model: None,
            usage: Some(Usage::default()),
            cost_usd: None,
            error: None,
            attempt: 1,
            duration_ms: 0,
            entries: entries
                .iter()
                .map(|e| RunEntry {
                    entry_id: format!("{id}:{e}"),
                    role: Role::User,
                    content: e.to_string(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn a_batch_leaves_what_sequential_writes_would() {
        let ops = [
            WriteOp::Run(
                run("r1", RunStatus::Completed, &["user", "assistant"]),
                7,
                70,
            ),
            // The same event redelivered, and an older state arriving late.
            WriteOp::Run(
                run("r1", RunStatus::Completed, &["user", "assistant"]),
                7,
                70,
            ),
            WriteOp::Run(run("r1", RunStatus::Started, &[]), 3, 30),
            WriteOp::Run(run("r2", RunStatus::Failed, &["user"]), 9, 90),
        ];
        let rows = Rows::of(&ops);
        let states: Vec<(&str, u64)> = rows
            .runs
            .iter()
            .map(|r| (r.ev.run_id.as_str(), r.seq))
            .collect();
        assert_eq!(states, vec![("r1", 7), ("r2", 9)], "newest state per run");
        assert_eq!(rows.usage.len(), 2, "one usage row per run");
        let entries: Vec<(&str, u64, usize)> = rows
            .entries
            .iter()
            .map(|e| (e.entry_id, e.seq, e.idx))
            .collect();
        assert_eq!(
            entries,
            vec![("r1:assistant", 7, 1), ("r1:user", 7, 0), ("r2:user", 9, 0)],
            "sorted by id (one lock order), each with its position"
        );
        assert_eq!(rows.sessions.len(), 1);
        let s = &rows.sessions[0];
        assert_eq!((s.seq, s.first_ts, s.last_ts), (9, 70, 90));
    }
}
