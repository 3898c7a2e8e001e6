//! Every stream, consumer and KV bucket of the suite, declared in one place.
//!
//! [`provision`] is idempotent: it creates what is missing and accepts what matches.
//! A stream or bucket whose live configuration differs from its declaration fails
//! start-up with the differences spelled out, rather than running on a silent drift.
//! Consumers are create-or-update for their tunables (ack wait, max ack pending, max
//! deliver follow the owning service's config) and fail loudly when an immutable field
//! (filter, deliver or ack policy) drifted.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};

use crate::BusError;

pub const STREAM_INBOUND: &str = "CLAW_IN";
pub const STREAM_TURNS: &str = "CLAW_TURN";
pub const STREAM_OUTBOUND: &str = "CLAW_OUT";
pub const STREAM_EVENTS: &str = "CLAW_EVT";
pub const STREAM_DEAD_LETTERS: &str = "CLAW_DLQ";
/// Run checkpoints of the agent: `<run_id>` → state.
pub const KV_RUNS: &str = "claw_runs";
/// Partition leases and replica membership (see [`crate::ownership`]).
pub const KV_LEASES: &str = "claw_leases";
/// Cooldowns of the agent's provider keys (auth profiles), shared by its replicas:
/// `<provider>.<key hash>` → state.
pub const KV_PROFILES: &str = "claw_profiles";
/// Tool calls the sandbox has started and their results, by call id: a call is never
/// run twice.
pub const KV_TOOL_CALLS: &str = "claw_tool_calls";
/// Tool calls waiting for their owner's approval, and programs allowed always:
/// `pending.<id>` → approval, `always.<agent>.<program hash>` → program.
pub const KV_APPROVALS: &str = "claw_approvals";

/// Session state the router keeps (`s.<session token>`: last activity, start of the
/// current session, `/model` and `/think` settings) and unmentioned group messages
/// kept as context (`ctx.<session token>`).
pub const KV_SESSIONS: &str = "claw_sessions";
/// Pairing requests and approved senders (see [`crate::pairing`]).
pub const KV_PAIRING: &str = "claw_pairing";
/// Cron jobs and the slots they fired (see [`crate::cron`]).
pub const KV_CRON: &str = "claw_cron";

/// Background `exec` sessions of every sandbox replica, for `process list`:
/// `<agent>.<session id>` → listing.
pub const KV_PROCESSES: &str = "claw_processes";

/// Platform offsets of the channel accounts (`<channel>.<account>` → the next update
/// to read), committed after the updates before it were published. Kept until changed.
pub const KV_CHANNEL_OFFSETS: &str = "claw_channel_offsets";
/// Reply pieces the channels service sent (`<channel>.<account>.<reply hash>.<piece>`
/// → the platform's message id): a redelivered reply sends only what is not here.
pub const KV_DELIVERIES: &str = "claw_deliveries";
/// Deliveries of messages in flight when their partition changed owner, counted across
/// owners (module `handovers`): `<group>.<stream>.<sequence>`.
pub const KV_HANDOVERS: &str = "claw_handovers";

/// Number of turn partitions (`claw.v1.turn.<p>.…`), fixed for the life of a deployment.
///
/// Why partitions rather than one consumer with per-session locks: a partition has its
/// own durable consumer, so the server itself guarantees that only its owner receives
/// its messages, in stream order, and a new owner recreating the consumer cuts the old
/// one off (no deliveries, no acks). 16 spreads well over up to ~8 replicas. Changing it
/// remaps sessions to partitions: drain the turn stream (no agent running, `clawbus
/// status` shows 0 pending), stop the suite, change it, start again.
pub const PARTITIONS: u32 = 16;
/// Messages a consumer may hold waiting for their lane, beyond those running.
pub const LANE_CAPACITY: i64 = 256;

/// Handler concurrency of each store partition's event consumer.
pub const STORE_CONCURRENCY: usize = 64;

pub const CONSUMER_ROUTER: &str = "router";
/// Chat partitions of the inbound stream (`claw.v1.in.<channel>.<account>.<p>.<chat>`),
/// which router replicas share. Fewer than the turn partitions: a router does ~50 µs
/// of work per message, so 4 spread it over up to 4 replicas, while each partition is
/// one more replicated consumer for a NATS cluster to move when a node fails. Fixed for
/// a deployment like [`PARTITIONS`].
pub const ROUTER_CHAT_PARTITIONS: u32 = 4;
/// Router partitions: the chat partitions, plus one for inbound messages published
/// without a chat token (`claw.v1.in.<channel>.<account>`).
pub const ROUTER_PARTITIONS: u32 = ROUTER_CHAT_PARTITIONS + 1;
pub const CONSUMER_AGENT: &str = "agent";
pub const CONSUMER_STORE: &str = "store";

/// Largest message a stream accepts (nats-server's default `max_payload`).
pub const MAX_MESSAGE_BYTES: i32 = 1024 * 1024;
const DAY: Duration = Duration::from_secs(24 * 3600);
/// Window in which JetStream drops a republished `Nats-Msg-Id`. It must exceed the
/// longest redelivery delay (ack wait × max deliver + backoff) so retries dedupe.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(30 * 60);

/// The declared streams.
pub fn streams(replicas: usize) -> Vec<stream::Config> {
    let s = |name: &str, subjects: &[&str], retention, max_age| stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        retention,
        storage: stream::StorageType::File,
        max_age,
        duplicate_window: DUPLICATE_WINDOW,
        max_message_size: MAX_MESSAGE_BYTES,
        num_replicas: replicas.max(1),
        allow_direct: true,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    vec![
        stream::Config {
            // `claw.v1.in.<channel>.<account>.<chat_token>` is stored with the chat's
            // router partition inserted (`subjects::inbound_chat`); the form without a
            // chat token is stored as it is.
            subject_transform: Some(stream::SubjectTransform {
                source: "claw.v1.in.*.*.*".into(),
                destination: format!(
                    "claw.v1.in.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({ROUTER_CHAT_PARTITIONS},3)}}}}.{{{{wildcard(3)}}}}"
                ),
            }),
            ..s(
                STREAM_INBOUND,
                &["claw.v1.in.>"],
                stream::RetentionPolicy::Limits,
                7 * DAY,
            )
        },
        // Work queue: a turn leaves the stream once an agent acked it.
        s(
            STREAM_TURNS,
            &["claw.v1.turn.>"],
            stream::RetentionPolicy::WorkQueue,
            7 * DAY,
        ),
        s(
            STREAM_OUTBOUND,
            &["claw.v1.out.>"],
            stream::RetentionPolicy::Limits,
            7 * DAY,
        ),
        stream::Config {
            // Stored as claw.v1.evt.<kind>.<partition>.<session_token>: publishers use
            // the session's subject, the server adds the partition the store's
            // replicas share (see `subjects::event_partition`).
            subject_transform: Some(stream::SubjectTransform {
                source: "claw.v1.evt.*.*".into(),
                destination: format!(
                    "claw.v1.evt.{{{{wildcard(1)}}}}.{{{{partition({PARTITIONS},2)}}}}.{{{{wildcard(2)}}}}"
                ),
            }),
            ..s(
                STREAM_EVENTS,
                &["claw.v1.evt.transcript.>", "claw.v1.evt.run.>"],
                stream::RetentionPolicy::Limits,
                7 * DAY,
            )
        },
        s(
            STREAM_DEAD_LETTERS,
            &["claw.v1.dlq.>"],
            stream::RetentionPolicy::Limits,
            30 * DAY,
        ),
    ]
}

/// Declared KV buckets.
pub fn buckets(replicas: usize) -> Vec<kv::Config> {
    vec![
        kv::Config {
            bucket: KV_RUNS.to_owned(),
            description: "agent run checkpoints".to_owned(),
            history: 1,
            max_age: 7 * DAY,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_APPROVALS.to_owned(),
            description: "tool calls waiting for approval, programs allowed always".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_TOOL_CALLS.to_owned(),
            description: "sandbox tool calls and their results".to_owned(),
            history: 1,
            max_age: 7 * DAY,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_SESSIONS.to_owned(),
            description: "router session state and group context".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_CRON.to_owned(),
            description: "cron jobs and their fired slots".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_PAIRING.to_owned(),
            description: "pairing requests and approved senders".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_PROCESSES.to_owned(),
            description: "background exec sessions of the sandbox replicas".to_owned(),
            history: 1,
            max_age: 7 * DAY,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_PROFILES.to_owned(),
            description: "provider key cooldowns".to_owned(),
            history: 1,
            max_age: DAY,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_CHANNEL_OFFSETS.to_owned(),
            description: "platform offsets of the channel accounts".to_owned(),
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_DELIVERIES.to_owned(),
            description: "reply pieces the channels service sent".to_owned(),
            history: 1,
            // As long as CLAW_OUT keeps the replies they record.
            max_age: 7 * DAY,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_HANDOVERS.to_owned(),
            description: "deliveries of in-flight messages counted across partition handovers"
                .to_owned(),
            history: 1,
            // A crash loop repeats within minutes; a day covers any outage between.
            max_age: DAY,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
        kv::Config {
            bucket: KV_LEASES.to_owned(),
            description: "partition leases and replica membership".to_owned(),
            history: 1,
            // A key not renewed within this time vanishes: the lease TTL.
            max_age: crate::ownership::LEASE_TTL,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
    ]
}

/// A durable pull consumer declaration.
#[derive(Debug, Clone)]
pub struct ConsumerDecl {
    pub stream: &'static str,
    pub durable: String,
    /// The service's consumer group (metrics label, dead-letter subject).
    pub group: &'static str,
    pub filter_subjects: Vec<String>,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// Backpressure: at most this many unacked messages; sized to handler concurrency.
    pub max_ack_pending: i64,
}

impl ConsumerDecl {
    /// The router's consumer of chat partition `partition` (below
    /// [`ROUTER_CHAT_PARTITIONS`]), or, for `partition == ROUTER_CHAT_PARTITIONS`, of the
    /// inbound messages published without a chat token. Shared by the router replicas,
    /// worked by the partition's owner.
    pub fn router(partition: u32, concurrency: usize) -> Self {
        let filter = if partition < ROUTER_CHAT_PARTITIONS {
            format!("claw.v1.in.*.*.{partition}.*")
        } else {
            "claw.v1.in.*.*".to_owned()
        };
        Self {
            stream: STREAM_INBOUND,
            durable: format!("{CONSUMER_ROUTER}-p{partition}"),
            group: CONSUMER_ROUTER,
            filter_subjects: vec![filter],
            ack_wait: Duration::from_secs(5),
            max_deliver: 10,
            max_ack_pending: concurrency as i64 + LANE_CAPACITY,
        }
    }

    /// The agent's consumer of one partition, for the acquisition `epoch`: each new
    /// owner creates its own, so a stale owner's pulls and acks reach nothing.
    pub fn agent(
        partition: u32,
        epoch: u64,
        concurrency: usize,
        ack_wait: Duration,
        max_deliver: i64,
    ) -> Self {
        Self {
            stream: STREAM_TURNS,
            durable: format!("{}-{epoch}", Self::agent_prefix(partition)),
            group: CONSUMER_AGENT,
            filter_subjects: vec![format!("claw.v1.turn.{partition}.>")],
            ack_wait,
            max_deliver,
            max_ack_pending: concurrency as i64 + LANE_CAPACITY,
        }
    }

    /// Name prefix of every consumer of an agent partition.
    pub fn agent_prefix(partition: u32) -> String {
        format!("{CONSUMER_AGENT}-p{partition}")
    }

    /// The store's consumer of one event partition (shared by the store replicas,
    /// worked by the partition's owner).
    pub fn store(partition: u32, concurrency: usize) -> Self {
        Self {
            stream: STREAM_EVENTS,
            durable: format!("{CONSUMER_STORE}-p{partition}"),
            group: CONSUMER_STORE,
            // One filter (the stream holds only transcript and run events): a consumer
            // with several filters costs the server more per message.
            filter_subjects: vec![format!("claw.v1.evt.*.{partition}.*")],
            ack_wait: Duration::from_secs(5),
            max_deliver: 10,
            max_ack_pending: concurrency as i64 + LANE_CAPACITY,
        }
    }

    fn config(&self) -> consumer::pull::Config {
        let (filter_subject, filter_subjects) = match self.filter_subjects.as_slice() {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        consumer::pull::Config {
            durable_name: Some(self.durable.clone()),
            description: Some(format!("clawbus {}", self.group)),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
            filter_subject,
            filter_subjects,
            ..Default::default()
        }
    }
}

/// The channels service's consumer of one account's replies:
/// `channels-<channel>-<account>`, created by the replica that runs the account.
pub fn channel_consumer(channel: &str, account: &str, concurrency: usize) -> ConsumerDecl {
    ConsumerDecl {
        stream: STREAM_OUTBOUND,
        durable: format!("channels-{channel}-{account}"),
        group: "channels",
        filter_subjects: vec![format!("claw.v1.out.{channel}.{account}")],
        ack_wait: Duration::from_secs(60),
        // An outage is waited out (retry delays grow to 30 s): about two hours of
        // tries before a reply goes to the dead letters.
        max_deliver: 250,
        max_ack_pending: concurrency as i64 + LANE_CAPACITY,
    }
}

/// The consumers with fixed names (the router's, the store partitions'), as provisioning
/// creates them; their services bind them again with their own tunables. The agent's
/// consumers are made per partition acquisition by the agent itself.
pub fn fixed_consumers(cfg: &clawbus_config::Config) -> Vec<ConsumerDecl> {
    (0..ROUTER_PARTITIONS)
        .map(|p| ConsumerDecl::router(p, cfg.router.concurrency))
        .chain((0..PARTITIONS).map(|p| ConsumerDecl::store(p, STORE_CONCURRENCY)))
        .collect()
}

/// Consumers of earlier releases, replaced by partitioned ones: `(stream, name)`.
pub const RETIRED_CONSUMERS: [(&str, &str); 3] = [
    (STREAM_EVENTS, CONSUMER_STORE),
    (STREAM_TURNS, CONSUMER_AGENT),
    (STREAM_INBOUND, CONSUMER_ROUTER),
];

/// The provisioning step (`clawbus provision`): every declared stream, bucket and
/// fixed consumer, created or verified; consumers of earlier releases deleted (their
/// messages are all in the partitioned consumers too).
pub async fn provision_all(
    js: &jetstream::Context,
    cfg: &clawbus_config::Config,
) -> Result<(), BusError> {
    provision(js, cfg.nats.replicas).await?;
    for decl in fixed_consumers(cfg) {
        bind_consumer(js, &decl).await?;
    }
    for (stream, name) in RETIRED_CONSUMERS {
        if let Ok(s) = js.get_stream(stream).await {
            if s.delete_consumer(name).await.is_ok() {
                tracing::info!(
                    stream,
                    consumer = name,
                    "Deleted a consumer of an earlier release"
                );
            }
        }
    }
    Ok(())
}

/// Checks that the streams (and KV bucket streams) named exist and match their
/// declarations: a service's start-up check, which needs only read rights on them.
pub async fn verify(
    js: &jetstream::Context,
    replicas: usize,
    names: &[String],
) -> Result<(), BusError> {
    let declared = streams(replicas);
    for name in names {
        let mut live = match js.get_stream(name).await {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
                ) =>
            {
                return Err(BusError::Topology(format!(
                    "stream {name} does not exist: run `clawbus provision` (clawbus up and compose do)"
                )));
            }
            Err(e) => return Err(BusError::Topology(format!("stream {name}: {e}"))),
        };
        let Some(decl) = declared.iter().find(|d| &d.name == name) else {
            continue; // a bucket's stream: existing is enough
        };
        let info = live
            .info()
            .await
            .map_err(|e| BusError::Topology(format!("stream {name}: {e}")))?;
        let diff = stream_diff(decl, &info.config);
        if !diff.is_empty() {
            return Err(BusError::Drift {
                object: format!("stream {name}"),
                detail: diff.join("; "),
            });
        }
    }
    Ok(())
}

/// Creates every declared stream and bucket, or verifies the existing ones match.
pub async fn provision(js: &jetstream::Context, replicas: usize) -> Result<(), BusError> {
    for decl in streams(replicas) {
        ensure_stream(js, decl).await?;
    }
    for decl in buckets(replicas) {
        let name = decl.bucket.clone();
        if let Err(e) = js.create_key_value(decl).await {
            return Err(BusError::Drift {
                object: format!("KV bucket {name}"),
                detail: e.to_string(),
            });
        }
    }
    Ok(())
}

async fn ensure_stream(js: &jetstream::Context, decl: stream::Config) -> Result<(), BusError> {
    match js.get_stream(&decl.name).await {
        Ok(mut s) => {
            let live = s
                .info()
                .await
                .map_err(|e| BusError::Topology(format!("stream {}: {e}", decl.name)))?
                .config
                .clone();
            let diff = stream_diff(&decl, &live);
            if diff.is_empty() {
                Ok(())
            } else {
                Err(BusError::Drift {
                    object: format!("stream {}", decl.name),
                    detail: diff.join("; "),
                })
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(_)
            ) =>
        {
            // Not found (or another JetStream error, which create reports precisely).
            let name = decl.name.clone();
            match js.create_stream(decl.clone()).await {
                Ok(_) => {
                    tracing::info!(stream = %name, "Stream created");
                    Ok(())
                }
                // Lost a race with another service creating it: verify instead.
                Err(_) if js.get_stream(&name).await.is_ok() => {
                    Box::pin(ensure_stream(js, decl)).await
                }
                Err(e) => Err(BusError::Topology(format!(
                    "cannot create stream {name}: {e}"
                ))),
            }
        }
        Err(e) => Err(BusError::Topology(format!("stream {}: {e}", decl.name))),
    }
}

/// Differences between a declared and a live stream, in the fields we declare.
pub fn stream_diff(decl: &stream::Config, live: &stream::Config) -> Vec<String> {
    let mut d = Vec::new();
    let mut check = |field: &str, want: String, got: String| {
        if want != got {
            d.push(format!("{field} is {got}, declared {want}"));
        }
    };
    let mut ws = decl.subjects.clone();
    let mut ls = live.subjects.clone();
    ws.sort();
    ls.sort();
    check("subjects", format!("{ws:?}"), format!("{ls:?}"));
    type Field = fn(&stream::Config) -> String;
    let fields: [(&str, Field); 8] = [
        ("subject_transform", |c| {
            c.subject_transform
                .as_ref()
                .map(|t| format!("{} -> {}", t.source, t.destination))
                .unwrap_or_else(|| "none".into())
        }),
        ("retention", |c| format!("{:?}", c.retention)),
        ("storage", |c| format!("{:?}", c.storage)),
        ("max_age", |c| format!("{:?}", c.max_age)),
        ("duplicate_window", |c| format!("{:?}", c.duplicate_window)),
        ("max_message_size", |c| c.max_message_size.to_string()),
        ("num_replicas", |c| c.num_replicas.to_string()),
        ("allow_direct", |c| c.allow_direct.to_string()),
    ];
    for (name, get) in fields {
        check(name, get(decl), get(live));
    }
    d
}

/// Creates or updates a durable pull consumer and returns it bound.
pub async fn bind_consumer(
    js: &jetstream::Context,
    decl: &ConsumerDecl,
) -> Result<consumer::PullConsumer, BusError> {
    let stream = js.get_stream(decl.stream).await.map_err(|e| {
        BusError::Topology(format!(
            "stream {} for consumer {}: {e}",
            decl.stream, decl.durable
        ))
    })?;
    stream
        .create_consumer(decl.config())
        .await
        .map_err(|e| BusError::Drift {
            object: format!("consumer {} on {}", decl.durable, decl.stream),
            detail: e.to_string(),
        })
}
