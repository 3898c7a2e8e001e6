//! Queue modes in the agent. A session's turns wait in the turn stream while one runs;
//! `steer` hands the waiting messages to the run in progress at its next model call,
//! `collect` lets the next run take all the waiting messages as one, `followup` runs
//! each on its own. A message taken by another run is *absorbed*: recorded in that
//! run's checkpoint first, then marked finished in `claw_runs`, so it never runs on its
//! own, whichever replica meets it. `interrupt` and `/stop` cancel the run in progress
//! through `claw.v1.ctl.<session_token>` ([`Running`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use clawbus_bus::consumer::Delivery;
use clawbus_bus::{subjects, topology, Bus};
use clawbus_wire::{decode, RunControl, TurnRequest};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::Checkpoint;
use crate::turn::AgentService;

/// Turns a steered run takes at once at most.
pub(crate) const MAX_STEERED: usize = 20;

/// The runs in progress on this replica, by session, to cancel on request.
#[derive(Default)]
pub struct Running {
    runs: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    run_id: String,
    token: CancellationToken,
    reason: Arc<Mutex<String>>,
}

/// A run registered as in progress; unregistered when dropped.
pub struct RunGuard<'a> {
    running: &'a Running,
    session_key: String,
    run_id: String,
    pub token: CancellationToken,
    reason: Arc<Mutex<String>>,
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let mut runs = lock(&self.running.runs);
        if runs
            .get(&self.session_key)
            .is_some_and(|e| e.run_id == self.run_id)
        {
            runs.remove(&self.session_key);
        }
    }
}

impl RunGuard<'_> {
    /// Why the run was cancelled.
    pub fn reason(&self) -> String {
        let r = lock(&self.reason).clone();
        if r.is_empty() {
            "cancelled".into()
        } else {
            r
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Running {
    pub fn start(&self, session_key: &str, run_id: &str) -> RunGuard<'_> {
        let token = CancellationToken::new();
        let reason = Arc::new(Mutex::new(String::new()));
        lock(&self.runs).insert(
            session_key.to_owned(),
            Entry {
                run_id: run_id.to_owned(),
                token: token.clone(),
                reason: reason.clone(),
            },
        );
        RunGuard {
            running: self,
            session_key: session_key.to_owned(),
            run_id: run_id.to_owned(),
            token,
            reason,
        }
    }

    /// Cancels the session's run in progress, unless it is the one spared.
    pub fn cancel(&self, ctl: &RunControl) -> bool {
        let runs = lock(&self.runs);
        match runs.get(&ctl.session_key) {
            Some(e) if ctl.except_run_id.as_ref() != Some(&e.run_id) => {
                *lock(&e.reason) = ctl.reason.clone();
                e.token.cancel();
                tracing::info!(run_id = %e.run_id, reason = %ctl.reason, "Run cancelled");
                true
            }
            _ => false,
        }
    }
}

/// Cancels runs on request until shutdown (`claw.v1.ctl.*`, core NATS).
pub async fn listen(bus: Bus, running: std::sync::Arc<Running>, shutdown: CancellationToken) {
    let mut sub = match bus.consumer_client.subscribe("claw.v1.ctl.*").await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot listen for run controls; /stop and interrupt will not reach runs");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m {
                Some(m) => match decode::<RunControl>(&m.payload) {
                    Ok(env) if env.body.action == "cancel"
                        && m.subject.as_str() == subjects::control(&env.body.session_key) =>
                    {
                        running.cancel(&env.body);
                    }
                    Ok(_) => tracing::warn!(subject = %m.subject, "Run control ignored: unknown action or wrong subject"),
                    Err(e) => tracing::warn!(subject = %m.subject, error = %e, "Undecodable run control ignored"),
                },
                None => return,
            },
        }
    }
}

/// Turns absorbed by runs of this replica, not met yet.
#[derive(Default)]
pub struct Absorbed(Mutex<HashSet<String>>);

impl Absorbed {
    /// True (once) when `run_id` was absorbed by another run here.
    pub fn take(&self, run_id: &str) -> bool {
        lock(&self.0).remove(run_id)
    }

    /// True when `run_id` was absorbed here and not met yet.
    pub fn contains(&self, run_id: &str) -> bool {
        lock(&self.0).contains(run_id)
    }
}

impl AgentService {
    /// The turn stream's handle, looked up once.
    pub(crate) async fn turn_stream(&self) -> Option<&async_nats::jetstream::stream::Stream> {
        match self
            .turn_stream
            .get_or_try_init(|| self.bus.js.get_stream(topology::STREAM_TURNS))
            .await
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "Turn stream unavailable; queued messages not looked at");
                None
            }
        }
    }

    /// The session's turns waiting in the stream behind the one delivered (at most
    /// `limit`, up to the first command or reset, which keep their own runs).
    pub(crate) async fn waiting_turns(&self, d: &Delivery, limit: usize) -> Vec<TurnRequest> {
        let Some(stream) = self.turn_stream().await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut seq = d.stream_seq + 1;
        while out.len() < limit {
            match stream
                .direct_get_next_for_subject(d.subject.clone(), Some(seq))
                .await
            {
                Ok(m) => {
                    seq = m.sequence + 1;
                    if let Ok(env) = decode::<TurnRequest>(&m.payload) {
                        let t = env.body;
                        let plain = !t.reset
                            && !t.heartbeat
                            && !t.inbound.text.trim_start().starts_with('/');
                        if !plain {
                            break;
                        }
                        // Taken already (a `new` drop leaves a gap behind a run).
                        if !self.absorbed.contains(&t.run_id) {
                            out.push(t);
                        }
                    }
                }
                Err(_) => break,
            }
        }
        out
    }

    /// Marks turns as taken by another run: they are acked, not run, wherever they
    /// are met (the caller recorded them in its own checkpoint first).
    pub(crate) async fn absorb(&self, run_ids: &[String]) {
        for id in run_ids {
            lock(&self.absorbed.0).insert(id.clone());
            if let Err(e) = Checkpoint::new(&self.runs, id).finish().await {
                tracing::warn!(run_id = %id, error = %e, "Absorbed turn not marked finished");
            }
        }
    }
}

/// The text of a run that takes the messages waiting behind it (`collect`).
pub fn collected(first: &str, later: &[TurnRequest]) -> String {
    let mut s = first.to_owned();
    s.push_str("\n\n[Sent after it while you were busy]");
    for t in later {
        s.push('\n');
        s.push_str(&t.inbound.text);
    }
    s
}
