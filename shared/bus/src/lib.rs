//! The bus layer every service stands on.
//!
//! - [`subjects`]: every subject the suite uses, built from validated tokens.
//! - [`topology`]: every stream, consumer and KV bucket, provisioned idempotently and
//!   failing loudly when a live object drifted from its declaration.
//! - [`Bus`]: connections (one for publishing, one for consuming, see nats.rs#1285) and
//!   typed publishing with `Nats-Msg-Id`, schema id and `traceparent` headers.
//! - [`consumer`]: the pull-consumer runner with bounded concurrency, session lanes
//!   ([`lanes`]), progress acks, nak-with-delay, dead letters and graceful shutdown.
//! - [`ownership`]: partition leases shared by the replicas of a service;
//!   [`handovers`]: deliveries counted across their owners.
//! - [`request`]: typed request/reply with deadlines and a bounded responder.

#![forbid(unsafe_code)]

pub mod approvals;
pub mod consumer;
pub mod cron;
pub mod handovers;
pub mod lanes;
pub mod metrics;
pub mod ownership;
pub mod pairing;
pub mod request;
pub mod rights;
pub mod service;
pub mod subjects;
pub mod topology;
mod trace;
pub mod unreadable;

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::{HeaderMap, HeaderValue};
use clawbus_wire::{encode, Envelope, Kind, WireError};
use tokio_util::sync::CancellationToken;

pub use async_nats;
pub use metrics::BusMetrics;
/// Re-export of the Prometheus types metrics register into.
pub mod metrics_registry {
    pub use prometheus::Registry;
}
pub use trace::TraceContext;

/// Header naming the reason a message was dead-lettered.
pub const DLQ_REASON_HEADER: &str = "Clawbus-Dlq-Reason";
/// Header naming the subject a dead-lettered message was first published on.
pub const DLQ_SUBJECT_HEADER: &str = "Clawbus-Dlq-Subject";
/// Header naming the stream sequence of a dead-lettered message.
pub const DLQ_SEQ_HEADER: &str = "Clawbus-Dlq-Stream-Seq";

/// Errors of the bus layer. Handlers treat them as transient (nak with delay); wire
/// errors inside are permanent and come from decoding, which handlers reject on their own.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("publish to {subject} failed: {reason}")]
    Publish { subject: String, reason: String },
    #[error("request to {subject} failed: {reason}")]
    Request { subject: String, reason: String },
    #[error("topology: {0}")]
    Topology(String),
    #[error("topology drift on {object}: {detail}")]
    Drift { object: String, detail: String },
}

/// Connections and JetStream contexts of one service.
#[derive(Clone)]
pub struct Bus {
    /// Connection used for publishing and request/reply.
    pub client: async_nats::Client,
    /// Separate connection for consumers, so heavy publishing cannot starve them.
    pub consumer_client: async_nats::Client,
    pub js: jetstream::Context,
    pub consumer_js: jetstream::Context,
    pub metrics: BusMetrics,
}

/// How to reach NATS.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    pub url: String,
    pub name: String,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl Bus {
    /// A bus over one existing connection (a command-line tool's), its metrics kept
    /// in a registry of its own.
    pub fn from_client(client: async_nats::Client) -> Bus {
        let js = jetstream::new(client.clone());
        Bus {
            consumer_client: client.clone(),
            client,
            consumer_js: js.clone(),
            js,
            metrics: BusMetrics::new(&prometheus::Registry::new()),
        }
    }

    /// Connects, retrying with backoff until connected or `shutdown` fires.
    pub async fn connect(
        opts: &ConnectOpts,
        metrics: BusMetrics,
        shutdown: &CancellationToken,
    ) -> Result<Bus, BusError> {
        let client = connect_retrying(opts, "pub", shutdown).await?;
        let consumer_client = connect_retrying(opts, "sub", shutdown).await?;
        // Bounded in-flight publish acks: backpressure instead of unbounded buffering.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .max_ack_inflight(4096)
            .build(client.clone());
        let consumer_js = jetstream::new(consumer_client.clone());
        Ok(Bus {
            client,
            consumer_client,
            js,
            consumer_js,
            metrics,
        })
    }

    /// Publishes an envelope to a JetStream subject and returns the publish-ack future,
    /// so callers can pipeline several publishes and await them together.
    pub async fn publish<T: Kind>(
        &self,
        subject: String,
        env: &Envelope<T>,
        trace: &TraceContext,
    ) -> Result<PublishAckFuture, BusError> {
        self.publish_encoded::<T>(subject, &env.id, encode(env)?.into(), trace)
            .await
    }

    /// Publishes an envelope of kind `T` that the caller already encoded (e.g. to check
    /// its size first); `msg_id` is the envelope id.
    pub async fn publish_encoded<T: Kind>(
        &self,
        subject: String,
        msg_id: &str,
        payload: bytes::Bytes,
        trace: &TraceContext,
    ) -> Result<PublishAckFuture, BusError> {
        let headers = headers_for::<T>(msg_id, trace);
        self.metrics.published.with_label_values(&[T::KIND]).inc();
        self.js
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| self.publish_failed::<T>(subject, e))
    }

    fn publish_failed<T: Kind>(&self, subject: String, e: impl std::fmt::Display) -> BusError {
        self.metrics
            .publish_errors
            .with_label_values(&[T::KIND])
            .inc();
        BusError::Publish {
            subject,
            reason: e.to_string(),
        }
    }

    /// Publishes and waits until JetStream has stored the message.
    pub async fn publish_durable<T: Kind>(
        &self,
        subject: String,
        env: &Envelope<T>,
        trace: &TraceContext,
    ) -> Result<jetstream::publish::PublishAck, BusError> {
        let fut = self.publish(subject.clone(), env, trace).await?;
        fut.await.map_err(|e| self.publish_failed::<T>(subject, e))
    }

    /// Publishes an encoded envelope and waits until JetStream stored it, retrying with
    /// backoff for up to `within` while NATS is unreachable (a node failing over, a
    /// reconnect). The message id makes a retry of a publish that did land a duplicate
    /// JetStream drops.
    pub async fn publish_durable_retrying<T: Kind>(
        &self,
        subject: String,
        msg_id: &str,
        payload: bytes::Bytes,
        trace: &TraceContext,
        within: Duration,
    ) -> Result<jetstream::publish::PublishAck, BusError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut delay = Duration::from_millis(50);
        loop {
            let attempt = match self
                .publish_encoded::<T>(subject.clone(), msg_id, payload.clone(), trace)
                .await
            {
                Ok(f) => f
                    .await
                    .map_err(|e| self.publish_failed::<T>(subject.clone(), e)),
                Err(e) => Err(e),
            };
            match attempt {
                Ok(ack) => return Ok(ack),
                Err(e) if tokio::time::Instant::now() + delay > deadline => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "Publish failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Stream sequence of the last message of `stream` whose subject matches `filter`
    /// (wildcards allowed), or `None` when there is none: one direct get, answered by
    /// any replica of the stream.
    pub async fn last_sequence(&self, stream: &str, filter: &str) -> Result<Option<u64>, BusError> {
        let fail = |reason: String| {
            BusError::Topology(format!("last message of {stream} on {filter}: {reason}"))
        };
        // A literal subject goes in the API subject (no body to parse); a filter with
        // wildcards in a request body.
        let (api, body) = if filter.contains(['*', '>']) {
            let body = serde_json::json!({ "last_by_subj": filter }).to_string();
            (format!("$JS.API.DIRECT.GET.{stream}"), body)
        } else {
            (
                format!("$JS.API.DIRECT.GET.{stream}.{filter}"),
                String::new(),
            )
        };
        let m = self
            .client
            .request(api, body.into())
            .await
            .map_err(|e| fail(e.to_string()))?;
        if let Some(seq) = m.headers.as_ref().and_then(|h| h.get("Nats-Sequence")) {
            return seq
                .as_str()
                .parse()
                .map(Some)
                .map_err(|_| fail(format!("bad Nats-Sequence `{seq}`")));
        }
        match m.status {
            Some(s) if s == async_nats::StatusCode::NOT_FOUND => Ok(None),
            s => Err(fail(format!(
                "status {s:?} {}",
                m.description.unwrap_or_default()
            ))),
        }
    }

    /// Publishes on core NATS only (live, not persisted), e.g. token deltas.
    pub async fn publish_live<T: Kind>(
        &self,
        subject: String,
        env: &Envelope<T>,
    ) -> Result<(), BusError> {
        let payload = encode(env)?;
        self.client
            .publish(subject.clone(), payload.into())
            .await
            .map_err(|e| BusError::Publish {
                subject,
                reason: e.to_string(),
            })
    }
}

/// The keys of a KV bucket matching `filter` (`a.b.*`, `a.>`), read from the subjects
/// its stream holds: no consumer, no waiting on an empty bucket. Deleted keys may be
/// listed (their markers are subjects too); a `get` of one finds nothing.
pub async fn kv_keys(
    kv: &async_nats::jetstream::kv::Store,
    filter: &str,
) -> Result<Vec<String>, BusError> {
    use futures::StreamExt;
    let prefix = format!("$KV.{}.", kv.name);
    let mut subjects = kv
        .stream
        .info_with_subjects(format!("{prefix}{filter}"))
        .await
        .map_err(|e| BusError::Topology(e.to_string()))?;
    let mut keys = Vec::new();
    while let Some(s) = subjects.next().await {
        let (subject, _) = s.map_err(|e| BusError::Topology(e.to_string()))?;
        if let Some(k) = subject.strip_prefix(&prefix) {
            keys.push(k.to_owned());
        }
    }
    keys.sort();
    Ok(keys)
}

/// Awaits a batch of pipelined publish acks; fails if any failed.
pub async fn await_acks(
    futs: Vec<(String, PublishAckFuture)>,
) -> Result<Vec<jetstream::publish::PublishAck>, BusError> {
    let results = futures::future::join_all(futs.into_iter().map(|(subject, f)| async move {
        f.await.map_err(|e| BusError::Publish {
            subject,
            reason: e.to_string(),
        })
    }))
    .await;
    results.into_iter().collect()
}

fn headers_for<T: Kind>(msg_id: &str, trace: &TraceContext) -> HeaderMap {
    let mut h = typed_headers::<T>(trace);
    h.insert("Nats-Msg-Id", msg_id);
    h
}

/// The schema id of `T` and a child span of `trace`: what every message carries.
pub(crate) fn typed_headers<T: Kind>(trace: &TraceContext) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        clawbus_wire::SCHEMA_HEADER,
        HeaderValue::from(clawbus_wire::schema_id::<T>().as_str()),
    );
    h.insert(
        "traceparent",
        HeaderValue::from(trace.child().traceparent().as_str()),
    );
    h
}

/// The servers of a NATS URL list: `nats://a:4222,nats://b:4222` (the form every NATS
/// client accepts), each URL possibly carrying `user:password@`.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, BusError> {
    let addrs: Result<Vec<_>, _> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| BusError::Connect {
                    url: service::redact_url(u),
                    reason: format!("not a NATS server URL: {e}"),
                })
        })
        .collect();
    match addrs? {
        a if a.is_empty() => Err(BusError::Connect {
            url: String::new(),
            reason: "no NATS server URL given".into(),
        }),
        a => Ok(a),
    }
}

/// Connection options for a NATS user: its password, and its own inbox prefix (the
/// only inboxes its rights let it subscribe to; see [`rights::inbox_prefix`]).
pub fn with_credentials(
    o: async_nats::ConnectOptions,
    user: Option<&str>,
    password: Option<&str>,
) -> async_nats::ConnectOptions {
    match (user, password) {
        (Some(u), Some(p)) => o
            .user_and_password(u.to_owned(), p.to_owned())
            .custom_inbox_prefix(rights::inbox_prefix(u)),
        _ => o,
    }
}

async fn connect_retrying(
    opts: &ConnectOpts,
    role: &str,
    shutdown: &CancellationToken,
) -> Result<async_nats::Client, BusError> {
    let mut delay = Duration::from_millis(50);
    let mut attempts = 0u32;
    loop {
        let mut o = async_nats::ConnectOptions::new()
            .name(format!("{}-{role}", opts.name))
            .connection_timeout(Duration::from_secs(2))
            .max_reconnects(None);
        o = with_credentials(o, opts.user.as_deref(), opts.password.as_deref());
        match o.connect(server_addrs(&opts.url)?.as_slice()).await {
            Ok(c) => return Ok(c),
            Err(e) => {
                attempts += 1;
                if attempts == 1 || attempts.is_multiple_of(20) {
                    tracing::warn!(url = %service::redact_url(&opts.url), error = %e, attempts, "NATS not reachable yet, retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {
                        return Err(BusError::Connect { url: service::redact_url(&opts.url), reason: format!("gave up: {e}") });
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
