//! The turn handler.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::kv;
use clawbus_bus::consumer::{self, Delivery, Handler, Outcome, RunnerOpts};
use clawbus_bus::ownership::{self, Fence, Fenced, Member, PartitionWork};
use clawbus_bus::service::{self, ServiceBase};
use clawbus_bus::{await_acks, subjects, topology, Bus, BusError, TraceContext};
use clawbus_config::AgentConfig;
use clawbus_wire::{
    ChatMessage, DeltaEvent, Envelope, ErrorInfo, HistoryEntry, HistoryRequest, HistoryResponse,
    OutboundMessage, Role, RunEntry, RunEvent, RunStatus, TurnRequest,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::context::{build_messages, chunk_text, fit_to_window, prompt_budget};
use crate::failover::Failover;
use crate::history_cache::HistoryCache;
use crate::metrics::AgentMetrics;
use crate::providers::{Completion, ProviderError};
use crate::workspace::Workspaces;

/// Largest text of one outbound message; longer replies are split into chunks.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;
// A turn's run event carries its message (at most the router's text limit) and the
// model's answer (at most the provider limit): together they fit in one stream message.
const _: () = assert!(
    clawbus_wire::MAX_TEXT_BYTES + crate::providers::MAX_REPLY_BYTES + 64 * 1024
        <= topology::MAX_MESSAGE_BYTES as usize
);
const DONE: &[u8] = b"done";
/// How long a finished turn keeps trying to publish its results before it gives the
/// turn back for a later delivery.
const PUBLISH_PATIENCE: Duration = Duration::from_secs(10);

/// The agent's turn handler.
pub struct AgentService {
    bus: Bus,
    cfg: AgentConfig,
    /// The agent's models and keys, with failover.
    models: Failover,
    runs: kv::Store,
    metrics: AgentMetrics,
    history: HistoryCache,
    workspaces: Arc<Workspaces>,
}

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

    async fn call_model(
        &self,
        turn: &TurnRequest,
        messages: &[ChatMessage],
        attempt: u32,
    ) -> Result<Completion, ProviderError> {
        let (tx, forward) = if turn.inbound.stream {
            let (tx, mut rx) = mpsc::channel::<String>(256);
            let (bus, run_id, inbound_id) = (
                self.bus.clone(),
                turn.run_id.clone(),
                turn.inbound_id.clone(),
            );
            let subject = subjects::delta(&turn.session_key);
            let forward = tokio::spawn(async move {
                let mut offset = 0u64;
                let mut n = 0u64;
                while let Some(text) = rx.recv().await {
                    let len = text.len() as u64;
                    let ev = DeltaEvent {
                        run_id: run_id.clone(),
                        inbound_id: inbound_id.clone(),
                        attempt,
                        offset,
                        text,
                    };
                    let env = Envelope::new(
                        format!("{run_id}:delta:{attempt}:{n}"),
                        clawbus_wire::now_ms(),
                        ev,
                    );
                    if let Err(e) = bus.publish_live(subject.clone(), &env).await {
                        tracing::debug!(error = %e, "Delta publish failed");
                    }
                    offset += len;
                    n += 1;
                }
            });
            (Some(tx), Some(forward))
        } else {
            (None, None)
        };
        let started = Instant::now();
        let result = self.models.chat(messages, tx.as_ref()).await;
        drop(tx);
        if let Some(f) = forward {
            let _ = f.await;
        }
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .provider_seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Publishes everything a finished turn produces, unless this replica's partition
    /// lease was lost meanwhile (a successor owns the session now).
    async fn publish_fenced(
        &self,
        d: &Delivery,
        env: &Envelope<TurnRequest>,
        attempt: u32,
        result: Result<&Completion, ErrorInfo>,
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
                .publish_results(env, attempt, result.clone(), duration_ms, &d.trace)
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
        result: Result<&Completion, ErrorInfo>,
        duration_ms: u64,
        trace: &TraceContext,
    ) -> Result<u64, BusError> {
        let turn = &env.body;
        let now = clawbus_wire::now_ms();
        let entry = |role: Role, suffix: &str, content: &str| RunEntry {
            entry_id: format!("{}:{suffix}", turn.run_id),
            role,
            content: content.to_owned(),
        };
        let mut entries = vec![entry(Role::User, "user", &turn.inbound.text)];
        let finish_reason = result.as_ref().ok().and_then(|c| c.finish_reason.clone());
        let (status, usage, model, error, text) = match result {
            Ok(c) => {
                entries.push(entry(Role::Assistant, "assistant", &c.text));
                (
                    RunStatus::Completed,
                    c.usage,
                    Some(c.model.clone()),
                    None,
                    c.text.clone(),
                )
            }
            Err(info) => {
                let text = format!("Sorry, this turn failed: {}", info.message);
                (
                    RunStatus::Failed,
                    None,
                    Some(self.models.primary()),
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
        if let Some(osub) = subjects::outbound(&turn.inbound.channel, &turn.inbound.account) {
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
        c: &Completion,
        seq: u64,
    ) {
        let now = clawbus_wire::now_ms();
        let entry = |suffix: &str, role, content: &str, seq| HistoryEntry {
            entry_id: format!("{}:{suffix}", turn.run_id),
            run_id: turn.run_id.clone(),
            role,
            content: content.to_owned(),
            seq,
            ts: now,
        };
        history.push(entry("user", Role::User, &turn.inbound.text, seq));
        history.push(entry("assistant", Role::Assistant, &c.text, seq));
        self.history.put(
            &turn.session_key,
            seq,
            history,
            self.cfg.history_limit as usize,
        );
    }
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
        let turn = &env.body;
        if d.fence.as_ref().is_some_and(Fence::is_lost) {
            return Outcome::Abandon {
                reason: "partition lease lost before the turn started".into(),
            };
        }
        let attempt = u32::try_from(d.delivered).unwrap_or(u32::MAX);
        let ckey = checkpoint_key(&turn.run_id);
        if attempt > 1 {
            match self.runs.get(ckey.clone()).await {
                Ok(Some(v)) if v.as_ref() == DONE => {
                    tracing::info!(run_id = %turn.run_id, attempt, "Run already finished; acking the redelivery");
                    return Outcome::Ack;
                }
                Ok(_) => {}
                Err(e) => {
                    return Outcome::retry(Duration::from_secs(1), format!("checkpoint read: {e}"))
                }
            }
        }
        let history = match self.load_history(turn).await {
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
                if let Err(o) = self.publish_fenced(&d, &env, attempt, Err(info), 0).await {
                    return o;
                }
                self.metrics.turns.with_label_values(&["failed"]).inc();
                return Outcome::Ack;
            }
        };
        // A redelivered run whose entries were already published (crash after publishing,
        // before the ack) must not see its own message twice: the model gets the
        // history as it was before this run.
        let (own, history): (Vec<HistoryEntry>, Vec<HistoryEntry>) =
            history.into_iter().partition(|h| h.run_id == turn.run_id);
        // Its answer is already in the transcript (the ack, or the checkpoint, was lost):
        // finish from it instead of asking the model again, which would also see later
        // turns of the session.
        let recorded = own
            .iter()
            .find(|h| h.role == Role::Assistant)
            .map(|h| Completion {
                text: h.content.clone(),
                usage: None,
                model: self.cfg.model.clone(),
                finish_reason: None,
            });
        let started = Instant::now();
        let result = match recorded {
            Some(c) => {
                tracing::info!(run_id = %turn.run_id, attempt, "Run already answered; publishing its recorded reply");
                Ok(c)
            }
            None => {
                let workspace = self.workspaces.context(&turn.agent_id).await;
                let mut messages = build_messages(&self.cfg, Some(&workspace.text), turn, &history);
                match prompt_budget(&self.cfg).map(|b| fit_to_window(&mut messages, b)) {
                    Some(Err(e)) => Err(ProviderError::ContextOverflow(e)),
                    Some(Ok(dropped)) => {
                        if dropped > 0 {
                            tracing::info!(run_id = %turn.run_id, dropped, "Oldest history left out to fit the context window");
                        }
                        self.call_model(turn, &messages, attempt).await
                    }
                    None => self.call_model(turn, &messages, attempt).await,
                }
            }
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        if let Err(e) = &result {
            if e.is_retryable() && d.delivered < self.cfg.max_deliver {
                return Outcome::retry(Duration::from_secs(2 * u64::from(attempt)), e.to_string());
            }
            tracing::warn!(run_id = %turn.run_id, error = %e, "Turn failed");
        }
        let seq = match self
            .publish_fenced(
                &d,
                &env,
                attempt,
                result.as_ref().map_err(ProviderError::info),
                duration_ms,
            )
            .await
        {
            Ok(s) => s,
            Err(o) => return o,
        };
        match &result {
            Ok(c) => self.remember(turn, history, c, seq),
            // A completed run needs no checkpoint: a redelivery finds its answer in the
            // transcript. A failed one has none there, so this marks it finished lest a
            // redelivery ask the model again (best effort: its publishes would dedupe).
            Err(_) => {
                if let Err(e) = self.runs.put(ckey, DONE.into()).await {
                    tracing::warn!(run_id = %turn.run_id, error = %e, "Checkpoint write failed");
                }
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

/// KV keys allow `[-/_=.a-zA-Z0-9]`: a run id becomes two FNV-64 hashes.
fn checkpoint_key(run_id: &str) -> String {
    let salted = format!("clawbus:{run_id}");
    format!(
        "{:016x}{:016x}",
        subjects::session_hash(run_id),
        subjects::session_hash(&salted)
    )
}

/// The agent's work on one owned partition: take the partition's consumer over from
/// any previous owner, then run the turn runner on it until told to stop.
struct PartitionRunner {
    svc: Arc<AgentService>,
    bus: Bus,
    permits: Arc<Semaphore>,
    readiness: clawbus_telemetry::Readiness,
}

impl PartitionRunner {
    /// Deletes every earlier consumer of the partition (a previous owner's) and
    /// creates this acquisition's. On the
    /// work-queue stream acked turns are gone, so the new consumer starts at the oldest
    /// unfinished turn and delivers the orphaned ones again, in stream order.
    async fn take_over(
        &self,
        decl: &topology::ConsumerDecl,
        partition: u32,
    ) -> Result<PullConsumer, BusError> {
        let stream = self
            .bus
            .js
            .get_stream(topology::STREAM_TURNS)
            .await
            .map_err(|e| BusError::Topology(e.to_string()))?;
        let prefix = format!("{}-", topology::ConsumerDecl::agent_prefix(partition));
        let mut names = stream.consumer_names();
        let mut stale = Vec::new();
        while let Some(n) = names.next().await {
            let n = n.map_err(|e| BusError::Topology(e.to_string()))?;
            if n.starts_with(&prefix) && n != decl.durable {
                stale.push(n);
            }
        }
        for n in stale {
            if let Err(e) = stream.delete_consumer(&n).await {
                tracing::debug!(consumer = %n, error = %e, "Stale consumer already gone");
            }
        }
        topology::bind_consumer(&self.bus.consumer_js, decl).await
    }
}

impl PartitionWork for PartitionRunner {
    async fn run(&self, partition: u32, epoch: u64, fence: Fence, stop: CancellationToken) {
        let cfg = &self.svc.cfg;
        let decl = topology::ConsumerDecl::agent(
            partition,
            epoch,
            cfg.concurrency,
            Duration::from_secs(cfg.ack_wait_secs),
            cfg.max_deliver,
        );
        let consumer = loop {
            match self.take_over(&decl, partition).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "Cannot take the partition's consumer over; retrying");
                    if consumer::sleep_or_cancel(Duration::from_secs(1), &stop).await {
                        return;
                    }
                }
            }
        };
        let mut opts = RunnerOpts::for_consumer(&decl, cfg.concurrency, Duration::from_secs(30));
        opts.fence = Some(fence);
        opts.permits = Some(self.permits.clone());
        opts.readiness = Some(self.readiness.clone());
        opts.rebind = Some(decl.clone());
        consumer::run(self.bus.clone(), consumer, opts, self.svc.clone(), stop).await;
    }
}

/// Runs the agent until shutdown: takes part in partition ownership with the other
/// agent replicas and runs the turns of the partitions it owns.
pub async fn serve(base: &ServiceBase) -> anyhow::Result<()> {
    let cfg = base.cfg.agent.clone();
    let js = &base.bus.js;
    let runs =
        service::patiently("run checkpoints", || js.get_key_value(topology::KV_RUNS)).await?;
    let profiles =
        service::patiently("key cooldowns", || js.get_key_value(topology::KV_PROFILES)).await?;
    let models = Failover::from_config(&cfg, Some(profiles));
    if let Some(e) = models.unconfigured() {
        tracing::warn!(error = %e, "No model provider; turns will answer with setup instructions");
    }
    let metrics = AgentMetrics::new(&base.registry);
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let replica = base.cfg.replica_id();
    tracing::info!(model = %models.primary(), fallbacks = ?cfg.fallback_models, partitions = topology::PARTITIONS, "Agent ready");
    let workspaces = Arc::new(Workspaces::new(base.cfg.clone()));
    workspaces.ensure_all()?;
    let svc = Arc::new(AgentService {
        bus: base.bus.clone(),
        cfg,
        models,
        runs,
        metrics: metrics.clone(),
        history: HistoryCache::default(),
        workspaces,
    });
    let work = Arc::new(PartitionRunner {
        svc,
        bus: base.bus.clone(),
        permits,
        readiness: base.readiness.clone(),
    });
    let me = Member {
        group: topology::CONSUMER_AGENT,
        replica,
        partitions: topology::PARTITIONS,
    };
    base.readiness.set("consumer", true);
    let owned = metrics.partitions_owned.clone();
    ownership::run(&base.bus, me, work, base.shutdown.clone(), move |n| {
        owned.set(n as i64)
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_keys_are_kv_safe() {
        let k = checkpoint_key("run:http:default:ab/c d");
        assert_eq!(k.len(), 32);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
