//! Bus side of the store: the event consumer and the history responder.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawbus_bus::consumer::{Delivery, Handler, Outcome};
use clawbus_bus::ownership::{self, Fence, Member, PartitionWork, SharedConsumers};
use clawbus_bus::request::{self, Responder, ResponderOpts};
use clawbus_bus::service::ServiceBase;
use clawbus_bus::{subjects, topology};
use clawbus_wire::{
    decode, decode_any, Envelope, ErrorInfo, HistoryRequest, HistoryResponse, Kind, RunEvent,
    TranscriptEvent,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::TranscriptStore;

/// Longest session key a history query may name.
const MAX_SESSION_KEY_BYTES: usize = 512;

fn valid_session_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_SESSION_KEY_BYTES
}

/// Most history entries one query may ask for.
pub const MAX_HISTORY_LIMIT: u32 = 1000;
/// How long a history query waits for its `min_seq` to be applied.
const CATCH_UP_WAIT: Duration = Duration::from_secs(3);

/// Sessions whose applied sequence is cached in memory; beyond it the cache restarts
/// empty and lookups fall back to the database.
const MAX_CACHED_SESSIONS: usize = 100_000;

/// The store's event handler.
pub struct StoreService<S> {
    pub store: S,
    applied: Notify,
    /// Highest transcript sequence applied per session, as committed by this process.
    applied_seq: Mutex<HashMap<String, u64>>,
    /// Transcript sequences received but not committed yet, per session. Events apply
    /// concurrently (writes are idempotent and ordered by sequence, not by arrival), so
    /// "caught up to N" means: N applied and nothing at or below N still in flight.
    in_flight: Mutex<HashMap<String, BTreeSet<u64>>>,
}

impl<S: TranscriptStore> StoreService<S> {
    pub fn new(store: S) -> Self {
        Self {
            store,
            applied: Notify::new(),
            applied_seq: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn begin_apply(&self, session_key: &str, seq: u64) {
        lock(&self.in_flight)
            .entry(session_key.to_owned())
            .or_default()
            .insert(seq);
    }

    fn end_apply(&self, session_key: &str, seq: u64) {
        let mut m = lock(&self.in_flight);
        if let Some(set) = m.get_mut(session_key) {
            set.remove(&seq);
            if set.is_empty() {
                m.remove(session_key);
            }
        }
    }

    fn pending_at_or_below(&self, session_key: &str, seq: u64) -> bool {
        lock(&self.in_flight)
            .get(session_key)
            .and_then(|s| s.first())
            .is_some_and(|first| *first <= seq)
    }

    /// Runs a write that adds transcript entries at `seq`, tracked so that history
    /// queries asking for `seq` wait for it.
    async fn applying<T>(
        &self,
        session_key: &str,
        seq: u64,
        write: impl std::future::Future<Output = Result<T, crate::StoreError>>,
    ) -> Result<(), crate::StoreError> {
        self.begin_apply(session_key, seq);
        let r = write.await;
        if r.is_ok() {
            self.note_applied(session_key, seq);
        }
        self.end_apply(session_key, seq);
        r.map(|_| ())
    }

    fn cached_seq(&self, session_key: &str) -> Option<u64> {
        lock(&self.applied_seq).get(session_key).copied()
    }

    fn note_applied(&self, session_key: &str, seq: u64) {
        let mut m = lock(&self.applied_seq);
        if m.len() >= MAX_CACHED_SESSIONS && !m.contains_key(session_key) {
            m.clear();
        }
        let e = m.entry(session_key.to_owned()).or_insert(0);
        *e = (*e).max(seq);
    }

    /// Whether the transcript of `session_key` is applied up to `min`: from what this
    /// process applied, else from the database (another replica may have applied it
    /// while it owned the session's partition).
    async fn applied_up_to(&self, session_key: &str, min: u64) -> Result<bool, crate::StoreError> {
        if self.cached_seq(session_key).is_some_and(|s| s >= min) {
            return Ok(true);
        }
        let stored = self.store.applied_seq(session_key).await?;
        if stored > 0 {
            self.note_applied(session_key, stored);
        }
        Ok(stored >= min)
    }

    /// Answers a history query (already decoded).
    pub async fn history(&self, req: &HistoryRequest) -> HistoryResponse {
        let fail = |code: &str, message: String| HistoryResponse {
            entries: vec![],
            error: Some(ErrorInfo {
                code: code.into(),
                message,
            }),
        };
        if !valid_session_key(&req.session_key) {
            return fail(
                "invalid_request",
                format!("session_key must be 1-{MAX_SESSION_KEY_BYTES} bytes"),
            );
        }
        if let Some(min) = req.min_seq {
            let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
            loop {
                let notified = self.applied.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match self.applied_up_to(&req.session_key, min).await {
                    Ok(true) if !self.pending_at_or_below(&req.session_key, min) => break,
                    Ok(_) => {}
                    Err(e) => return fail("store_unavailable", e.to_string()),
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return fail(
                        "not_caught_up",
                        format!("transcript sequence {min} not applied yet"),
                    );
                }
            }
        }
        match self
            .store
            .history(&req.session_key, req.limit.min(MAX_HISTORY_LIMIT))
            .await
        {
            Ok(entries) => HistoryResponse {
                entries,
                error: None,
            },
            Err(e) => fail("store_unavailable", e.to_string()),
        }
    }
}

impl<S: TranscriptStore> Handler for StoreService<S> {
    type Msg = clawbus_wire::RawEnvelope;

    fn decode(&self, d: &Delivery) -> Result<Self::Msg, String> {
        decode_any(&d.payload).map_err(|e| e.to_string())
    }

    async fn handle(&self, d: Delivery, head: Self::Msg) -> Outcome {
        let result = match head.kind.as_str() {
            TranscriptEvent::KIND => match decode::<TranscriptEvent>(&d.payload) {
                Ok(env) => {
                    let write = self.store.apply_transcript(&env.body, d.stream_seq, env.ts);
                    self.applying(&env.body.session_key, d.stream_seq, write)
                        .await
                }
                Err(e) => return Outcome::reject(e.to_string()),
            },
            RunEvent::KIND => match decode::<RunEvent>(&d.payload) {
                Ok(env) if env.body.entries.iter().any(|e| e.entry_id.is_empty()) => {
                    return Outcome::reject("a run event's entry has an empty entry_id")
                }
                // A cost that is not a finite, non-negative number would poison every
                // sum of usage it joins.
                Ok(env) if env.body.cost_usd.is_some_and(|c| !c.is_finite() || c < 0.0) => {
                    return Outcome::reject(
                        "a run event's cost_usd is not a finite, non-negative number",
                    )
                }
                Ok(env) if env.body.entries.is_empty() => {
                    self.store.apply_run(&env.body, d.stream_seq, env.ts).await
                }
                Ok(env) => {
                    // It carries transcript entries: history readers wait for it.
                    let write = self.store.apply_run(&env.body, d.stream_seq, env.ts);
                    self.applying(&env.body.session_key, d.stream_seq, write)
                        .await
                }
                Err(e) => return Outcome::reject(e.to_string()),
            },
            other => {
                return Outcome::reject(format!(
                    "unexpected message kind `{other}` on {}",
                    d.subject
                ))
            }
        };
        match result {
            Ok(()) => {
                self.applied.notify_waiters();
                Outcome::Ack
            }
            Err(e) => Outcome::retry(Duration::from_millis(500), e.to_string()),
        }
    }
}

/// The store's work on one event partition while it holds its lease: the partition's
/// event consumer and its history responder, so that the replica answering a session's
/// history is the one applying its events (read-your-writes). Store replicas share the
/// partitions like the agents.
struct StoreWork<S> {
    svc: Arc<StoreService<S>>,
    consumers: SharedConsumers<StoreService<S>>,
}

impl<S: TranscriptStore> PartitionWork for StoreWork<S> {
    async fn run(&self, p: u32, epoch: u64, fence: Fence, stop: CancellationToken) {
        let runner = self.consumers.run(p, epoch, fence, stop.clone());
        let opts = ResponderOpts {
            subject: subjects::store_history(p),
            queue: "store",
            concurrency: 128,
            drain_deadline: Duration::from_secs(5),
            readiness: None,
        };
        let history = Arc::new(PartitionHistory {
            svc: self.svc.clone(),
            partition: p,
        });
        let responder = request::serve(self.consumers.bus.clone(), opts, history, stop);
        tokio::join!(runner, responder);
    }
}

/// The history responder of one event partition: it answers only for the sessions of
/// its partition, whose events this replica applies (read-your-writes).
struct PartitionHistory<S> {
    svc: Arc<StoreService<S>>,
    partition: u32,
}

impl<S: TranscriptStore> Responder for PartitionHistory<S> {
    type Req = HistoryRequest;
    type Resp = HistoryResponse;

    async fn respond(&self, req: Result<Envelope<HistoryRequest>, String>) -> HistoryResponse {
        let error = |code: &str, message: String| HistoryResponse {
            entries: vec![],
            error: Some(ErrorInfo {
                code: code.into(),
                message,
            }),
        };
        match req {
            Ok(env) => {
                let key = &env.body.session_key;
                let p = subjects::event_partition(key, topology::PARTITIONS);
                // (A key that is not valid at all gets `invalid_request` below.)
                if p != self.partition && valid_session_key(key) {
                    return error(
                        "wrong_partition",
                        format!(
                            "the session belongs to event partition {p}; ask claw.v1.store.history.{p}"
                        ),
                    );
                }
                self.svc.history(&env.body).await
            }
            Err(e) => error("malformed_request", e),
        }
    }
}

/// Answers listings of an agent's sessions: any replica may (the database is shared).
struct Sessions<S>(Arc<StoreService<S>>);

/// Most sessions one listing returns.
const MAX_SESSIONS: u32 = 200;

impl<S: TranscriptStore> Responder for Sessions<S> {
    type Req = clawbus_wire::SessionsRequest;
    type Resp = clawbus_wire::SessionsResponse;

    async fn respond(
        &self,
        req: Result<Envelope<clawbus_wire::SessionsRequest>, String>,
    ) -> clawbus_wire::SessionsResponse {
        let error = |code: &str, message: String| clawbus_wire::SessionsResponse {
            sessions: vec![],
            error: Some(ErrorInfo {
                code: code.into(),
                message,
            }),
        };
        let req = match req {
            Ok(env) => env.body,
            Err(e) => return error("malformed_request", e),
        };
        if !subjects::is_token(&req.agent_id) {
            return error("invalid_request", "agent_id is not an agent id".into());
        }
        let since = req.active_minutes.map_or(0, |m| {
            clawbus_wire::now_ms() - i64::from(m).saturating_mul(60_000)
        });
        let limit = req.limit.clamp(1, MAX_SESSIONS);
        match self
            .0
            .store
            .sessions(&format!("agent:{}:", req.agent_id), since, limit)
            .await
        {
            Ok(sessions) => clawbus_wire::SessionsResponse {
                sessions,
                error: None,
            },
            Err(e) => error("unavailable", e.to_string()),
        }
    }
}

/// Answers a session's usage (`/usage`): any replica may.
struct Usage<S>(Arc<StoreService<S>>);

impl<S: TranscriptStore> Responder for Usage<S> {
    type Req = clawbus_wire::UsageRequest;
    type Resp = clawbus_wire::UsageResponse;

    async fn respond(
        &self,
        req: Result<Envelope<clawbus_wire::UsageRequest>, String>,
    ) -> clawbus_wire::UsageResponse {
        let error = |code: &str, message: String| clawbus_wire::UsageResponse {
            error: Some(ErrorInfo {
                code: code.into(),
                message,
            }),
            ..Default::default()
        };
        let req = match req {
            Ok(env) => env.body,
            Err(e) => return error("malformed_request", e),
        };
        if !valid_session_key(&req.session_key) {
            return error("invalid_request", "invalid session key".into());
        }
        match self.0.store.usage(&req.session_key).await {
            Ok(records) => {
                let mut u = clawbus_wire::UsageResponse::default();
                for r in records {
                    u.runs += 1;
                    u.prompt_tokens += r.prompt_tokens;
                    u.completion_tokens += r.completion_tokens;
                    u.total_tokens += r.total_tokens;
                    if let Some(c) = r.cost_usd {
                        *u.cost_usd.get_or_insert(0.0) += c;
                    }
                }
                u
            }
            Err(e) => error("unavailable", e.to_string()),
        }
    }
}

use topology::STORE_CONCURRENCY;

/// Runs the store until shutdown: on each event partition this replica owns, the
/// partition's consumer and history responder.
pub async fn serve<S: TranscriptStore>(
    base: &ServiceBase,
    svc: Arc<StoreService<S>>,
) -> anyhow::Result<()> {
    svc.store.ping().await?;
    base.readiness.set("database", true);

    let decls: Vec<_> = (0..topology::PARTITIONS)
        .map(|p| topology::ConsumerDecl::store(p, STORE_CONCURRENCY))
        .collect();
    let work = Arc::new(StoreWork {
        svc: svc.clone(),
        consumers: SharedConsumers {
            bus: base.bus.clone(),
            decls: decls.clone(),
            readiness: Some(base.readiness.clone()),
            permits: Some(Arc::new(tokio::sync::Semaphore::new(256))),
            handler: svc,
            concurrency: STORE_CONCURRENCY,
            drain_deadline: Duration::from_secs(10),
        },
    });
    let me = Member {
        group: topology::CONSUMER_STORE,
        replica: base.cfg.replica_id(),
        partitions: topology::PARTITIONS,
    };
    tracing::info!("Store ready");
    let listing = request::serve(
        base.bus.clone(),
        ResponderOpts {
            subject: subjects::STORE_SESSIONS.to_owned(),
            queue: "store",
            concurrency: 16,
            drain_deadline: Duration::from_secs(5),
            readiness: None,
        },
        Arc::new(Sessions(work.svc.clone())),
        base.shutdown.clone(),
    );
    let usage = request::serve(
        base.bus.clone(),
        ResponderOpts {
            subject: subjects::STORE_USAGE.to_owned(),
            queue: "store",
            concurrency: 16,
            drain_deadline: Duration::from_secs(5),
            readiness: None,
        },
        Arc::new(Usage(work.svc.clone())),
        base.shutdown.clone(),
    );
    let (owned, _, _) = tokio::join!(
        ownership::serve_shared(base, me, &decls, work),
        listing,
        usage
    );
    owned?;
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
