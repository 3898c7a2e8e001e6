//! The turn handler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use clawbus_bus::consumer::{self, Delivery, Handler, Outcome};
use clawbus_bus::ownership::{Fence, Fenced};
use clawbus_bus::{await_acks, subjects, topology, Bus, BusError, TraceContext};
use clawbus_config::AgentConfig;
use clawbus_wire::{
    Envelope, ErrorInfo, HistoryEntry, HistoryRequest, HistoryResponse, OutboundMessage, Role,
    RunEntry, RunEvent, RunStatus, TurnRequest,
};

use crate::checkpoint::{Checkpoint, CheckpointError, Loaded, Progress};
use crate::compaction::Prepared;
use crate::context::chunk_text;
use crate::failover::Models;
use crate::history_cache::HistoryCache;
use crate::metrics::AgentMetrics;
use crate::providers::{thinking_directive, Completion, Thinking};
use crate::steps::{reply_text, Deltas, StepError};
use crate::tools::Registry;
use crate::workspace::Workspaces;

/// Largest text of one outbound message; longer replies are split into chunks.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;
// A turn's run event carries its message (at most the router's text limit) and the
// model's answer (at most the provider limit): together they fit in one stream message
// (tool steps fill the rest, see `steps::steps_budget`).
const _: () = assert!(
    clawbus_wire::MAX_TEXT_BYTES + crate::providers::MAX_REPLY_BYTES + 64 * 1024
        <= topology::MAX_MESSAGE_BYTES as usize
);
/// How long a finished turn keeps trying to publish its results before it gives the
/// turn back for a later delivery.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(10);

/// The agent's turn handler.
pub struct AgentService {
    pub(crate) bus: Bus,
    pub(crate) cfg: AgentConfig,
    /// The agent's models and keys, with failover.
    pub(crate) models: Models,
    pub(crate) runs: kv::Store,
    pub(crate) metrics: AgentMetrics,
    pub(crate) history: HistoryCache,
    pub(crate) workspaces: Arc<Workspaces>,
    pub(crate) tools: Registry,
    /// Per partition, the last turn stream sequence an earlier owner may have started:
    /// turns up to it may have a checkpoint (`u64::MAX` until the partition is taken).
    pub(crate) orphans: Vec<std::sync::atomic::AtomicU64>,
    /// Runs in progress here, to cancel on request.
    pub(crate) running: Arc<crate::queue::Running>,
    /// Turns taken by runs here (steer, collect), acked when met.
    pub(crate) absorbed: crate::queue::Absorbed,
    /// The turn stream, for the turns waiting behind a run (steer, collect).
    pub(crate) turn_stream: tokio::sync::OnceCell<async_nats::jetstream::stream::Stream>,
}

/// How a turn ended: the model's answer, or an error for the sender.
type TurnResult<'a> = Result<&'a Completion, ErrorInfo>;

impl AgentService {
    async fn load_history(&self, turn: &TurnRequest) -> Result<Vec<HistoryEntry>, String> {
        // The session's last transcript-bearing event: its run events (which carry a
        // turn's entries) or single transcript events. Two literal direct gets in
        // parallel: the per-subject index answers them at once, where one wildcard get
        // scans (measured: 0.2 ms more per turn).
        let (run, single) = (
            subjects::stored_run(&turn.session_key, topology::PARTITIONS),
            subjects::stored_transcript(&turn.session_key, topology::PARTITIONS),
        );
        let (run, single) = tokio::join!(
            self.bus.last_sequence(topology::STREAM_EVENTS, &run),
            self.bus.last_sequence(topology::STREAM_EVENTS, &single),
        );
        let min_seq = run
            .map_err(|e| e.to_string())?
            .max(single.map_err(|e| e.to_string())?);
        let Some(last_seq) = min_seq else {
            return Ok(Vec::new());
        };
        if let Some(h) = self.history.get(&turn.session_key, last_seq) {
            self.metrics.history.with_label_values(&["cache"]).inc();
            return Ok(h);
        }
        self.metrics.history.with_label_values(&["store"]).inc();
        let req = Envelope::new(
            format!("{}:history", turn.run_id),
            clawbus_wire::now_ms(),
            HistoryRequest {
                session_key: turn.session_key.clone(),
                limit: self.cfg.history_limit,
                min_seq,
            },
        );
        let resp = self
            .bus
            .request::<HistoryRequest, HistoryResponse>(
                subjects::store_history(subjects::event_partition(
                    &turn.session_key,
                    topology::PARTITIONS,
                )),
                &req,
                &TraceContext::root(),
                Duration::from_secs(5),
            )
            .await
            .map_err(|e| e.to_string())?
            .body;
        match resp.error {
            Some(e) => Err(format!("store: {}: {}", e.code, e.message)),
            None => Ok(resp.entries),
        }
    }

    /// Publishes everything a finished turn produces, unless this replica's partition
    /// lease was lost meanwhile (a successor owns the session now).
    async fn publish_fenced(
        &self,
        d: &Delivery,
        env: &Envelope<TurnRequest>,
        attempt: u32,
        progress: &Progress,
        result: TurnResult<'_>,
        duration_ms: u64,
    ) -> Result<u64, Outcome> {
        if let Some(f) = &d.fence {
            match f.check().await {
                Ok(()) => {}
                Err(e @ Fenced::Lost(_)) => {
                    self.metrics.fenced.inc();
                    tracing::warn!(run_id = %env.body.run_id, error = %e, "Stale owner: results not published");
                    return Err(Outcome::Abandon {
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(Outcome::retry(Duration::from_secs(1), e.to_string())),
            }
        }
        // Every id is deterministic, so publishing again after a failure (a NATS node
        // failing over) only fills in what did not land. Hold the turn a while rather
        // than burn a delivery on a short outage.
        let deadline = tokio::time::Instant::now() + PUBLISH_PATIENCE;
        let mut pause = Duration::from_millis(100);
        loop {
            match self
                .publish_results(
                    env,
                    attempt,
                    progress,
                    result.clone(),
                    duration_ms,
                    &d.trace,
                )
                .await
            {
                Ok(seq) => return Ok(seq),
                Err(e) if tokio::time::Instant::now() + pause > deadline => {
                    return Err(Outcome::retry(Duration::from_secs(1), e.to_string()))
                }
                Err(e) => {
                    tracing::warn!(run_id = %env.body.run_id, error = %e, "Publishing the turn's results failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Publishes everything a finished turn produces and waits for the acks: first the
    /// run event carrying the turn's transcript entries (one message per turn), then,
    /// once that is stored, the reply. Returns the run event's stream sequence.
    async fn publish_results(
        &self,
        env: &Envelope<TurnRequest>,
        attempt: u32,
        progress: &Progress,
        result: TurnResult<'_>,
        duration_ms: u64,
        trace: &TraceContext,
    ) -> Result<u64, BusError> {
        let turn = &env.body;
        let now = clawbus_wire::now_ms();
        let entries = run_entries(turn, progress, result.as_ref().ok().copied());
        let finish_reason = result.as_ref().ok().and_then(|c| c.finish_reason.clone());
        let tool_calls = result
            .as_ref()
            .map(|c| c.tool_calls.clone())
            .unwrap_or_default();
        let (status, usage, model, error, text) = match result {
            Ok(c) => (
                RunStatus::Completed,
                c.usage,
                Some(c.model.clone()),
                None,
                reply_text(&progress.steps, &c.text),
            ),
            Err(info) => {
                let text = format!("Sorry, this turn failed: {}", info.message);
                (
                    RunStatus::Failed,
                    (progress.model_calls > 0).then_some(progress.usage),
                    Some(
                        progress
                            .model
                            .clone()
                            .unwrap_or_else(|| self.models.primary()),
                    ),
                    Some(info),
                    text,
                )
            }
        };
        let run = RunEvent {
            run_id: turn.run_id.clone(),
            session_key: turn.session_key.clone(),
            agent_id: turn.agent_id.clone(),
            status,
            model: model.clone(),
            usage,
            cost_usd: progress.cost_usd,
            error: error.clone(),
            attempt,
            duration_ms,
            entries,
        };
        let rsub = subjects::run(&turn.session_key);
        let renv = Envelope::new(format!("{}:{}", turn.run_id, status.as_str()), now, run);
        // The reply goes out only once the transcript is stored: a caller that has the
        // reply and sends its next message finds this turn in the history, whatever
        // failed in between (a NATS node, this process).
        let run_ack = self.bus.publish(rsub.clone(), &renv, trace).await?;
        let run_seq = await_acks(vec![(rsub, run_ack)]).await?[0].sequence;
        let mut out_acks = Vec::new();
        // A heartbeat that found nothing to say is not delivered.
        let quiet = (turn.heartbeat && status == RunStatus::Completed && heartbeat_ok(&text))
            || error.as_ref().is_some_and(|e| e.code == "cancelled");
        let outbound =
            subjects::outbound(&turn.inbound.channel, &turn.inbound.account).filter(|_| !quiet);
        if let Some(osub) = outbound {
            let chunks = chunk_text(&text, MAX_CHUNK_BYTES);
            let n = chunks.len();
            for (i, chunk) in chunks.into_iter().enumerate() {
                let out = OutboundMessage {
                    run_id: turn.run_id.clone(),
                    session_key: turn.session_key.clone(),
                    channel: turn.inbound.channel.clone(),
                    account: turn.inbound.account.clone(),
                    chat_id: turn.inbound.chat.id.clone(),
                    thread_id: turn.inbound.thread_id.clone(),
                    reply_to_message_id: Some(turn.inbound.message_id.clone()),
                    inbound_id: turn.inbound_id.clone(),
                    chunk: i as u32,
                    last: i + 1 == n,
                    text: chunk.to_owned(),
                    error: if i + 1 == n { error.clone() } else { None },
                    usage: if i + 1 == n { usage } else { None },
                    model: model.clone(),
                    finish_reason: if i + 1 == n {
                        finish_reason.clone()
                    } else {
                        None
                    },
                    tool_calls: if i + 1 == n {
                        tool_calls.clone()
                    } else {
                        Vec::new()
                    },
                };
                let oenv = Envelope::new(format!("{}:out:{i}", turn.run_id), now, out);
                out_acks.push((
                    osub.clone(),
                    self.bus.publish(osub.clone(), &oenv, trace).await?,
                ));
            }
        }
        await_acks(out_acks).await?;
        let u = usage.unwrap_or_default();
        self.metrics
            .tokens
            .with_label_values(&["prompt"])
            .inc_by(u.prompt_tokens);
        self.metrics
            .tokens
            .with_label_values(&["completion"])
            .inc_by(u.completion_tokens);
        Ok(run_seq)
    }
}

impl AgentService {
    /// Caches the session's history as it stands after this turn, whose entries the
    /// run event at `seq` carried.
    fn remember(
        &self,
        turn: &TurnRequest,
        mut history: Vec<HistoryEntry>,
        progress: &Progress,
        c: &Completion,
        seq: u64,
    ) {
        let ts = clawbus_wire::now_ms();
        history.extend(
            run_entries(turn, progress, Some(c))
                .into_iter()
                .map(|e| HistoryEntry {
                    entry_id: e.entry_id,
                    run_id: turn.run_id.clone(),
                    role: e.role,
                    content: e.content,
                    seq,
                    ts,
                    tool_calls: e.tool_calls,
                    tool_call_id: e.tool_call_id,
                    name: e.name,
                    summary: e.summary,
                    usage: e.usage,
                }),
        );
        self.history.put(
            &turn.session_key,
            seq,
            history,
            self.cfg.history_limit as usize,
        );
    }
}

/// The transcript entries of a turn: the message, the steps with tools, the answer.
fn run_entries(
    turn: &TurnRequest,
    progress: &Progress,
    answer: Option<&Completion>,
) -> Vec<RunEntry> {
    let mut entries = Vec::with_capacity(progress.steps.len() + 4);
    let id = &turn.run_id;
    if turn.reset {
        // Nothing before this entry is history any more.
        entries.push(RunEntry {
            entry_id: format!("{id}:reset"),
            role: Role::System,
            content: "(new session)".into(),
            summary: Some(clawbus_wire::Summary {
                first_kept_seq: clawbus_wire::Summary::RESET,
            }),
            ..Default::default()
        });
        if turn.inbound.text.trim().is_empty() {
            return entries;
        }
    }
    if let Some((text, first_kept_seq)) = &progress.summary {
        entries.push(RunEntry {
            entry_id: format!("{id}:summary"),
            role: Role::System,
            content: text.clone(),
            summary: Some(clawbus_wire::Summary {
                first_kept_seq: *first_kept_seq,
            }),
            ..Default::default()
        });
    }
    if crate::compaction::command(&turn.inbound.text).is_some()
        || thinking_directive(&turn.inbound.text).is_some()
    {
        // `/compact` leaves only its summary, a lone `/think` nothing: commands and
        // their notes are not conversation.
        return entries;
    }
    if turn.inbound.text.trim().is_empty() {
        // The caller's results of its own functions' calls stand for its message.
        for (i, m) in turn.inbound.caller_results().iter().enumerate() {
            entries.push(RunEntry::of(id, &format!("result:{i}"), m));
        }
    } else {
        entries.push(RunEntry {
            entry_id: format!("{id}:user"),
            role: Role::User,
            content: turn.inbound.text.clone(),
            ..Default::default()
        });
    }
    for (i, m) in progress.steps.iter().enumerate() {
        let mut e = RunEntry::of(id, &format!("step:{i}"), m);
        e.usage = progress
            .step_usage
            .iter()
            .find(|(at, _)| *at == i)
            .map(|(_, u)| *u);
        entries.push(e);
    }
    if let Some(c) = answer {
        entries.push(RunEntry {
            entry_id: format!("{id}:assistant"),
            role: Role::Assistant,
            content: c.text.clone(),
            tool_calls: c.tool_calls.clone(),
            usage: c.call_usage,
            ..Default::default()
        });
    }
    entries
}

impl Handler for AgentService {
    type Msg = Envelope<TurnRequest>;

    fn decode(&self, d: &Delivery) -> Result<Self::Msg, String> {
        let env = consumer::decode_envelope::<TurnRequest>(d)?;
        let turn = &env.body;
        if turn.run_id.is_empty() || turn.session_key.is_empty() {
            return Err("run_id and session_key are required".into());
        }
        if d.subject.rsplit('.').next() != Some(subjects::session_token(&turn.session_key).as_str())
        {
            return Err(format!("session key does not match subject {}", d.subject));
        }
        Ok(env)
    }

    /// One active run per session: its lane is the session token (last subject token).
    fn key(&self, d: &Delivery, _m: &Self::Msg) -> Option<String> {
        d.subject.rsplit('.').next().map(str::to_owned)
    }

    async fn handle(&self, d: Delivery, env: Self::Msg) -> Outcome {
        let (env, thinking) = self.directives(env);
        if self.absorbed.take(&env.body.run_id) {
            tracing::debug!(run_id = %env.body.run_id, "Turn taken by an earlier run; acked");
            return Outcome::Ack;
        }
        let turn = &env.body;
        if d.fence.as_ref().is_some_and(Fence::is_lost) {
            return Outcome::Abandon {
                reason: "partition lease lost before the turn started".into(),
            };
        }
        let attempt = u32::try_from(d.delivered).unwrap_or(u32::MAX);
        let mut ckpt = Checkpoint::new(&self.runs, &turn.run_id);
        let mut progress = Progress::default();
        // A redelivered turn may have a checkpoint, and so may a turn a new owner of the
        // partition gets for the first time that its predecessor had started. Read
        // alongside the history, it costs no extra round trip.
        let (loaded, history) = if attempt > 1 || self.maybe_orphan(&d) {
            tokio::join!(ckpt.load(), self.load_history(turn))
        } else {
            (Ok(Loaded::New), self.load_history(turn).await)
        };
        match loaded {
            Ok(Loaded::Done) => {
                tracing::info!(run_id = %turn.run_id, attempt, "Run already finished; acking the redelivery");
                return Outcome::Ack;
            }
            Ok(Loaded::InProgress(p)) => {
                tracing::info!(run_id = %turn.run_id, attempt, steps = p.steps.len(), "Resuming the run from its checkpoint");
                progress = *p;
            }
            Ok(Loaded::New) => progress.thinking = thinking,
            Err(e) => return Outcome::retry(Duration::from_secs(1), e.to_string()),
        }
        let history = match history {
            Ok(h) => h,
            Err(e) if d.delivered < self.cfg.max_deliver => {
                return Outcome::retry(Duration::from_secs(1), e)
            }
            Err(e) => {
                // Last delivery: tell the sender rather than leave them waiting.
                tracing::error!(run_id = %turn.run_id, error = %e, "History unavailable; turn failed");
                let info = ErrorInfo {
                    code: "history_unavailable".into(),
                    message: format!("the session history could not be loaded: {e}"),
                };
                if let Err(o) = self
                    .publish_fenced(&d, &env, attempt, &progress, Err(info), 0)
                    .await
                {
                    return o;
                }
                self.metrics.turns.with_label_values(&["failed"]).inc();
                return Outcome::Ack;
            }
        };
        // A redelivered run whose entries were already published (crash after publishing,
        // before the ack) must not see its own message twice: the model gets the
        // history as it was before this run.
        let (own, mut history): (Vec<HistoryEntry>, Vec<HistoryEntry>) =
            history.into_iter().partition(|h| h.run_id == turn.run_id);
        // A session starting afresh (`/new`, `/reset`, a reset policy) has no history.
        if turn.reset {
            history.clear();
        }
        // The session's queue: a queued run waits for quiet, a full queue loses what
        // its drop policy says, `collect` takes what waits (recorded in the checkpoint
        // before the taken turns are marked finished).
        if progress.collected.is_none() && progress.model_calls == 0 && own.is_empty() {
            match self.shape_backlog(&d, turn, &mut progress, &mut ckpt).await {
                Ok(crate::backlog::Shaped::Run) => {}
                Ok(crate::backlog::Shaped::Dropped) => return Outcome::Ack,
                Err(e) => return Outcome::retry(Duration::from_secs(1), e),
            }
        }
        let env = match &progress.collected {
            Some(text) => {
                let mut e = env.clone();
                e.body.inbound.text = text.clone();
                e
            }
            None => env,
        };
        let turn = &env.body;
        let started = Instant::now();
        let guard = self.running.start(&turn.session_key, &turn.run_id);
        // Its answer is already in the transcript (the ack, or the checkpoint, was lost):
        // finish from it instead of asking the model again, which would also see later
        // turns of the session.
        let work = async {
            match recorded(turn, &own, &mut progress) {
                Some(mut c) => {
                    tracing::info!(run_id = %turn.run_id, attempt, "Run already answered; publishing its recorded reply");
                    c.model = progress
                        .model
                        .clone()
                        .unwrap_or_else(|| self.cfg.model.clone());
                    Ok(c)
                }
                // `/new` alone: the session starts afresh, nothing to ask the model.
                None if turn.reset && turn.inbound.text.trim().is_empty() => {
                    Ok(self.note("New session started.", &progress))
                }
                None => {
                    let workspace = self.workspaces.context(&turn.agent_id).await;
                    match self
                        .prepare(turn, &history, &workspace.text, &mut progress, &mut ckpt)
                        .await
                    {
                        Err(e) => Err(e),
                        Ok(Prepared::Answer(c)) => Ok(c),
                        Ok(Prepared::Base(base)) => {
                            let mut deltas = Deltas::new(&self.bus, turn, attempt);
                            deltas.replay(&progress.steps).await;
                            self.run_steps(&d, turn, &base, &mut progress, &mut ckpt, &mut deltas)
                                .await
                        }
                    }
                }
            }
        };
        // `/stop`, or a newer message in `interrupt` mode, ends the run where it is.
        let result = tokio::select! {
            r = work => r,
            _ = guard.token.cancelled() => Err(StepError::End(ErrorInfo {
                code: "cancelled".into(),
                message: guard.reason(),
            })),
        };
        drop(guard);
        let duration_ms = started.elapsed().as_millis() as u64;
        let result = match result {
            Ok(mut c) => {
                // The answer's own call, and the turn's sum over all its calls.
                c.call_usage = c.usage;
                if progress.model_calls > 0 {
                    c.usage = Some(progress.usage);
                }
                Ok(c)
            }
            Err(StepError::Provider(e)) => {
                if e.is_retryable() && d.delivered < self.cfg.max_deliver {
                    return Outcome::retry(
                        Duration::from_secs(2 * u64::from(attempt)),
                        e.to_string(),
                    );
                }
                tracing::warn!(run_id = %turn.run_id, error = %e, "Turn failed");
                Err(e.info())
            }
            Err(StepError::End(info)) => {
                tracing::warn!(run_id = %turn.run_id, code = %info.code, error = %info.message, "Turn stopped");
                Err(info)
            }
            Err(StepError::Fenced | StepError::Checkpoint(CheckpointError::Superseded)) => {
                self.metrics.fenced.inc();
                return Outcome::Abandon {
                    reason: "another replica took the session over".into(),
                };
            }
            Err(StepError::Checkpoint(e)) if d.delivered < self.cfg.max_deliver => {
                return Outcome::retry(Duration::from_secs(1), e.to_string())
            }
            Err(StepError::Checkpoint(e)) => Err(ErrorInfo {
                code: "checkpoint_unavailable".into(),
                message: format!("the turn's progress could not be recorded: {e}"),
            }),
        };
        let seq = match self
            .publish_fenced(
                &d,
                &env,
                attempt,
                &progress,
                result.as_ref().map_err(Clone::clone),
                duration_ms,
            )
            .await
        {
            Ok(s) => s,
            Err(o) => return o,
        };
        if let Ok(c) = &result {
            self.remember(turn, history, &progress, c, seq);
        }
        // A completed run without tools needs no checkpoint: a redelivery finds its
        // answer in the transcript. One with steps, or a failed one (nothing in the
        // transcript), is marked finished lest a redelivery run it again (best effort:
        // its publishes would dedupe).
        if result.is_err() || !progress.steps.is_empty() || progress.summary.is_some() {
            if let Err(e) = ckpt.finish().await {
                tracing::warn!(run_id = %turn.run_id, error = %e, "Checkpoint write failed");
            }
        }
        let status = if result.is_ok() {
            "completed"
        } else {
            "failed"
        };
        self.metrics.turns.with_label_values(&[status]).inc();
        tracing::debug!(run_id = %turn.run_id, trace_id = %d.trace.trace_id, status, duration_ms, "Turn finished");
        Outcome::Ack
    }
}

impl AgentService {
    /// Records that this replica took `partition` over when its turn stream ended at
    /// `last_seq`.
    pub(crate) fn adopt(&self, partition: u32, last_seq: u64) {
        if let Some(h) = self.orphans.get(partition as usize) {
            h.store(last_seq, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Whether a turn may have been started by the partition's previous owner.
    fn maybe_orphan(&self, d: &Delivery) -> bool {
        let partition = d
            .subject
            .split('.')
            .nth(3)
            .and_then(|p| p.parse::<usize>().ok());
        match partition.and_then(|p| self.orphans.get(p)) {
            Some(h) => d.stream_seq <= h.load(std::sync::atomic::Ordering::SeqCst),
            None => true,
        }
    }

    /// The message's directives applied: `/think <level> <message>` sets the thinking
    /// level of this turn and leaves the message.
    fn directives(&self, mut env: Envelope<TurnRequest>) -> (Envelope<TurnRequest>, Thinking) {
        // The session's level (`/think`), else the agent's, else the default.
        let level = env
            .body
            .thinking
            .clone()
            .or_else(|| {
                self.cfg
                    .agents
                    .get(&env.body.agent_id)
                    .and_then(|a| a.thinking.clone())
            })
            .unwrap_or_else(|| self.cfg.thinking.clone());
        let default = Thinking::parse(&level)
            .or_else(|| Thinking::parse(&self.cfg.thinking))
            .unwrap_or_default();
        match thinking_directive(&env.body.inbound.text) {
            Some((level, rest)) if !rest.trim().is_empty() => {
                env.body.inbound.text = rest.to_owned();
                (env, level)
            }
            _ => (env, default),
        }
    }
}

/// Whether a heartbeat's answer says only that nothing needs attention:
/// `HEARTBEAT_OK`, alone or at either end of a short note.
fn heartbeat_ok(text: &str) -> bool {
    let t = text.trim();
    let rest = t
        .strip_prefix("HEARTBEAT_OK")
        .or_else(|| t.strip_suffix("HEARTBEAT_OK"));
    rest.is_some_and(|r| r.trim().len() <= 300)
}

/// The answer of a run already in the transcript, with its steps put back into
/// `progress`; `None` when the run has not answered yet.
fn recorded(
    turn: &TurnRequest,
    own: &[HistoryEntry],
    progress: &mut Progress,
) -> Option<Completion> {
    let answer_id = format!("{}:assistant", turn.run_id);
    let answer = own.iter().find(|h| h.entry_id == answer_id)?;
    let step = format!("{}:step:", turn.run_id);
    progress.steps = own
        .iter()
        .filter(|h| h.entry_id.starts_with(&step))
        .map(HistoryEntry::message)
        .collect();
    Some(Completion {
        text: answer.content.clone(),
        finish_reason: (!answer.tool_calls.is_empty()).then(|| "tool_calls".to_owned()),
        tool_calls: answer.tool_calls.clone(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::heartbeat_ok;

    #[test]
    fn only_a_bare_heartbeat_ok_stays_quiet() {
        assert!(heartbeat_ok("HEARTBEAT_OK"));
        assert!(heartbeat_ok("  HEARTBEAT_OK\n"));
        assert!(heartbeat_ok("All quiet. HEARTBEAT_OK"));
        assert!(!heartbeat_ok("Your flight leaves in 2 hours."));
        assert!(!heartbeat_ok(&format!("{} HEARTBEAT_OK", "x".repeat(400))));
        assert!(!heartbeat_ok(
            "HEARTBEAT_OK is what I would say, but: the oven is on"
                .repeat(10)
                .as_str()
        ));
    }
}
