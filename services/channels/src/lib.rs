//! clawbus-channels: where people meet the suite from the chat apps they use.
//!
//! One adapter per configured channel account (`[channels.<channel>]` with
//! credentials). Each account is a named partition of the `channels` lease group
//! (`<channel>.<account>`, leased as `channels.p.<channel>.<account>`): exactly one
//! replica runs it at a time, among the replicas whose configuration has it (replicas
//! may differ during a rolling change), and a dead replica's accounts move to the
//! others within seconds (module `ownership` of the bus). Running an account means:
//!
//! - **inbound** (`telegram::poll`): the platform's events become inbound messages
//!   on `claw.v1.in.<channel>.<account>.<chat>`, with the envelope id
//!   `<channel>:<account>:<platform message id>` so JetStream drops a platform's
//!   redelivery; the platform's offset is committed (KV `claw_channel_offsets`) only
//!   after the messages before it were published;
//! - **outbound** (module `delivery`): a durable consumer of
//!   `claw.v1.out.<channel>.<account>` renders each reply for the platform, cuts it
//!   into messages at the platform's limit (never inside a code block), and records
//!   each piece as sent (KV `claw_deliveries`) before the reply is acked, so a
//!   redelivered reply sends only what was not sent; one chat at a time, in order;
//!   rate limits (`retry_after`) and outages wait instead of dropping;
//! - **typing** (module `typing`): a typing indicator while a turn runs.
//!
//! An account that fails (bad token, platform down) keeps retrying on its own; the
//! other accounts are untouched.

#![forbid(unsafe_code)]

pub mod chunk;
mod delivery;
pub mod discord;
mod drafts;
pub mod irc;
pub mod markdown;
pub mod matrix;
mod metrics;
pub mod signal;
pub mod slack;
pub mod telegram;
mod typing;
mod unreadable;

use std::sync::Arc;
use std::time::Duration;

use clawbus_bus::ownership::{Fence, NamedMember, PartitionWork};
use clawbus_bus::service::ServiceBase;
use clawbus_config::AccountSpec;
use tokio_util::sync::CancellationToken;

use metrics::ChannelMetrics;

/// The longest wait between two attempts to reach a platform that is down: after an
/// outage an account is back within this long.
pub(crate) const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// Why a platform call failed, and so what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Wait this long (the platform's `retry_after`), then try again.
    #[error("rate limited for {0:?}")]
    RateLimited(Duration),
    /// The credentials were refused: nothing works until the config changes.
    #[error("credentials refused: {0}")]
    Unauthorized(String),
    /// Another client holds the account's updates (a webhook, another poller).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The platform could not parse the message's markup (send it as plain text).
    #[error("markup refused: {0}")]
    Markup(String),
    /// The platform refused this message for good (chat gone, bot blocked, bad id).
    #[error("refused: {0}")]
    Refused(String),
    /// Network trouble or a server error: try again later.
    #[error("{0}")]
    Transient(String),
}

/// Where a piece of a reply goes.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub chat_id: String,
    pub thread_id: Option<String>,
    /// The platform id of the message answered (on the first piece only).
    pub reply_to: Option<String>,
    /// This piece's own id, the same on every attempt: platforms with idempotency keys
    /// (Matrix transaction ids) send it so a repeat is dropped by the platform.
    pub piece_id: String,
}

/// What the outbound side needs of a platform.
pub trait Platform: Send + Sync + 'static {
    /// The most characters one message may hold.
    fn max_text(&self) -> usize;
    /// How long `markdown` is once rendered for this platform, counted the way its
    /// limit is: pieces are cut so this stays within `max_text`.
    fn rendered_len(&self, markdown: &str) -> usize {
        markdown.chars().count()
    }
    /// Sends one piece of a reply (Markdown), rendered for the platform; the
    /// platform's id of the message sent.
    fn send(
        &self,
        markdown: &str,
        to: &Target,
    ) -> impl std::future::Future<Output = Result<String, SendError>> + Send;
    /// Whether a sent message can be edited: drafts (`stream_mode = "partial"`) only
    /// work where it can.
    fn can_edit(&self) -> bool {
        false
    }
    /// How many times one message may be edited, if the platform limits it (Signal:
    /// 10); drafts stop short of it, keeping the last edit for the reply.
    fn max_edits(&self) -> Option<u32> {
        None
    }
    /// Replaces the text of a message this account sent (`message_id` as `send` gave
    /// it; `to` where it was sent). An edit that changes nothing succeeds.
    fn edit(
        &self,
        markdown: &str,
        message_id: &str,
        to: &Target,
    ) -> impl std::future::Future<Output = Result<(), SendError>> + Send {
        let _ = (markdown, message_id, to);
        async {
            Err(SendError::Refused(
                "this platform cannot edit messages".into(),
            ))
        }
    }
    /// Shows that a reply is being written.
    fn typing(
        &self,
        chat_id: &str,
        thread_id: Option<&str>,
    ) -> impl std::future::Future<Output = Result<(), SendError>> + Send;
}

/// What running an account needs.
pub struct Ctx {
    pub bus: clawbus_bus::Bus,
    pub spec: AccountSpec,
    pub http: reqwest::Client,
    pub(crate) metrics: ChannelMetrics,
    pub readiness: clawbus_telemetry::Readiness,
    pub drain: Duration,
    /// Timeouts and cap of a webhook listener (`[http]`).
    pub http_limits: clawbus_telemetry::http::HttpLimits,
}

impl Ctx {
    /// Asks the platform who this account is (`what` names the call in logs), again
    /// and again with backoff (1 s doubling to 30 s) while it fails; `None` on `stop`.
    /// While it fails the account is down (`account_up` 0) and each failure is counted
    /// (`unauthorized` for refused credentials, else `identify`).
    pub(crate) async fn identify<T, F, Fut>(
        &self,
        what: &str,
        stop: &CancellationToken,
        mut call: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, SendError>>,
    {
        let (channel, account) = (self.spec.channel.as_str(), self.spec.account.as_str());
        let up = self
            .metrics
            .account_up
            .with_label_values(&[channel, account]);
        let mut wait = Duration::from_secs(1);
        loop {
            match call().await {
                Ok(v) => {
                    up.set(1);
                    return Some(v);
                }
                Err(e) => {
                    up.set(0);
                    self.metrics.identify_failed(channel, account, &e);
                    tracing::warn!(channel, account, error = %e, "{what} failed; retrying");
                    if clawbus_bus::consumer::sleep_or_cancel(wait, stop).await {
                        return None;
                    }
                    wait = (wait * 2).min(RECONNECT_MAX);
                }
            }
        }
    }

    /// Runs the account once its platform is known, until `stop`: typing indicators,
    /// `inbound` (the platform's events, spawned with a token that is cancelled when the
    /// account stops) and the delivery of its replies.
    pub(crate) async fn serve<P, F, Fut>(
        &self,
        platform: Arc<P>,
        records: async_nats::jetstream::kv::Store,
        typing: typing::Typing,
        fence: Fence,
        stop: CancellationToken,
        inbound: F,
    ) where
        P: Platform,
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let work = stop.child_token();
        let typing_task = tokio::spawn(typing.clone().run(platform.clone(), work.clone()));
        let inbound = tokio::spawn(inbound(work.clone()));
        delivery::serve(self, platform, records, typing, fence, stop).await;
        work.cancel();
        let _ = inbound.await;
        let _ = typing_task.await;
    }

    /// The KV buckets of platform offsets and delivery records; `None` (logged) when
    /// they cannot be had: the account is not run.
    pub(crate) async fn buckets(
        &self,
    ) -> Option<(
        async_nats::jetstream::kv::Store,
        async_nats::jetstream::kv::Store,
    )> {
        use clawbus_bus::topology::{KV_CHANNEL_OFFSETS, KV_DELIVERIES};
        match (
            self.bus.js.get_key_value(KV_CHANNEL_OFFSETS).await,
            self.bus.js.get_key_value(KV_DELIVERIES).await,
        ) {
            (Ok(o), Ok(r)) => Some((o, r)),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "Channel buckets unavailable; account not run");
                None
            }
        }
    }
}

/// Percent-encodes everything but `A-Za-z0-9-_~` (so no `.` either: a room id of `..`
/// cannot climb a URL path): for path segments and query values.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Publishes an inbound message with its deterministic id, retrying until JetStream
/// has it or `stop`.
pub(crate) async fn publish(
    bus: &clawbus_bus::Bus,
    m: clawbus_wire::InboundMessage,
    stop: &CancellationToken,
) -> Result<(), ()> {
    let id = format!("{}:{}:{}", m.channel, m.account, m.message_id);
    let Some(subject) = clawbus_bus::subjects::inbound_chat(&m.channel, &m.account, &m.chat.id)
    else {
        tracing::warn!("Inbound message with an invalid account; skipped");
        return Ok(());
    };
    let env = clawbus_wire::Envelope::new(id, clawbus_wire::now_ms(), m);
    let mut wait = Duration::from_millis(200);
    loop {
        match bus
            .publish_durable(subject.clone(), &env, &clawbus_bus::TraceContext::root())
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot publish an inbound message; retrying");
                if clawbus_bus::consumer::sleep_or_cancel(wait, stop).await {
                    return Err(());
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Hands an inbound message to the suite ([`publish`]), counts it and starts its
/// chat's typing indicator; `Err` when stopping (nothing published).
pub(crate) async fn receive(
    bus: &clawbus_bus::Bus,
    metrics: &ChannelMetrics,
    typing: &typing::Typing,
    m: clawbus_wire::InboundMessage,
    stop: &CancellationToken,
) -> Result<(), ()> {
    let labels = [m.channel.clone(), m.account.clone()];
    let (chat, thread) = (m.chat.id.clone(), m.thread_id.clone());
    publish(bus, m, stop).await?;
    metrics.inbound.with_label_values(&labels).inc();
    typing.start(&chat, thread.as_deref());
    Ok(())
}

/// The accounts of this deployment, as named partitions of the `channels` lease group
/// (a partition number is a position in `accounts`, which [`partition_name`] names).
struct Accounts {
    base_bus: clawbus_bus::Bus,
    accounts: Vec<AccountSpec>,
    http: reqwest::Client,
    metrics: ChannelMetrics,
    readiness: clawbus_telemetry::Readiness,
    drain: Duration,
    http_limits: clawbus_telemetry::http::HttpLimits,
}

impl PartitionWork for Accounts {
    async fn run(&self, partition: u32, _epoch: u64, fence: Fence, stop: CancellationToken) {
        let Some(spec) = self.accounts.get(partition as usize) else {
            return;
        };
        tracing::info!(channel = %spec.channel, account = %spec.account, "Running channel account");
        let ctx = Ctx {
            bus: self.base_bus.clone(),
            spec: spec.clone(),
            http: self.http.clone(),
            metrics: self.metrics.clone(),
            readiness: self.readiness.clone(),
            drain: self.drain,
            http_limits: self.http_limits,
        };
        // Boxed: an account's task holds its own adapter's state, not room for the
        // largest adapter's (a few KB per account otherwise).
        type Adapter = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
        let adapter: Adapter = match spec.channel.as_str() {
            "telegram" => Box::pin(telegram::run(ctx, fence, stop)),
            "discord" => Box::pin(discord::run(ctx, fence, stop)),
            "irc" => Box::pin(irc::run(ctx, fence, stop)),
            "matrix" => Box::pin(matrix::run(ctx, fence, stop)),
            "signal" => Box::pin(signal::run(ctx, fence, stop)),
            "slack" => Box::pin(slack::run(ctx, fence, stop)),
            other => {
                tracing::error!(channel = other, "No adapter for this channel");
                return;
            }
        };
        adapter.await;
        tracing::info!(channel = %spec.channel, account = %spec.account, "Channel account handed over");
    }
}

/// Runs the configured accounts until shutdown.
pub async fn serve(base: &ServiceBase) -> anyhow::Result<()> {
    let accounts = base.cfg.channel_accounts();
    let metrics = ChannelMetrics::new(&base.registry);
    base.readiness.set("accounts", true);
    if accounts.is_empty() {
        tracing::info!("No channel account has credentials; nothing to run (see README: Channels)");
        base.shutdown.cancelled().await;
        return Ok(());
    }
    tracing::info!(accounts = accounts.len(), "Channel accounts configured");
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()?;
    let owned = metrics.accounts_owned.clone();
    let work = Arc::new(Accounts {
        base_bus: base.bus.clone(),
        accounts: accounts.clone(),
        http,
        metrics,
        readiness: base.readiness.clone(),
        drain: Duration::from_secs(10),
        http_limits: clawbus_telemetry::http::HttpLimits::from_config(
            &base.cfg.http,
            base.cfg.http.max_connections,
        ),
    });
    let me = NamedMember {
        group: clawbus_config::Service::Channels.name(),
        replica: base.cfg.replica_id(),
        names: accounts.iter().map(partition_name).collect(),
    };
    clawbus_bus::ownership::run_named(&base.bus, me, work, base.shutdown.clone(), move |n| {
        owned.set(n as i64)
    })
    .await?;
    Ok(())
}

/// An account's partition name, `<channel>.<account>` (account ids are
/// `[A-Za-z0-9_-]`): the same on every replica whatever the order of its accounts.
fn partition_name(spec: &AccountSpec) -> String {
    format!("{}.{}", spec.channel, spec.account)
}
