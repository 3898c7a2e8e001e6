//! Outbound: the replies of one account, from its durable consumer to the platform.
//!
//! A reply (one outbound message; the agent sends long answers as a few) is cut into
//! platform messages; piece `i` of envelope `id` is recorded in KV `claw_deliveries`
//! (`<channel>.<account>.<hash of id>.<i>` → the platform's message id) right after
//! the platform accepted it and before the next piece, and the reply is acked only
//! once every piece is recorded. A redelivered reply (a crash, a rate limit, an
//! outage) therefore sends only the pieces not recorded. The one piece that can go
//! twice is one the platform accepted in the instant before the process died and its
//! record was written: platforms without idempotency keys (Telegram) leave no way to
//! ask; the README says so.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use clawbus_bus::consumer::{decode_envelope, Delivery, Handler, Outcome};
use clawbus_bus::ownership::Fenced;
use clawbus_wire::{Envelope, OutboundMessage};

use crate::metrics::ChannelMetrics;
use crate::typing::Typing;
use crate::{Platform, SendError, Target};

/// Replies of one account delivered at once (one per chat).
const CONCURRENCY: usize = 16;

/// Delivers the account's replies until `stop`: binds its consumer, rewinds it (a reply
/// the previous holder left unacked comes back now, not after the ack wait), and runs
/// it with one lane per chat.
pub(crate) async fn serve<P: Platform>(
    ctx: &crate::Ctx,
    platform: Arc<P>,
    records: kv::Store,
    typing: Typing,
    fence: clawbus_bus::ownership::Fence,
    stop: tokio_util::sync::CancellationToken,
) {
    let spec = &ctx.spec;
    let decl = clawbus_bus::topology::channel_consumer(&spec.channel, &spec.account, CONCURRENCY);
    let consumer = loop {
        match clawbus_bus::topology::bind_consumer(&ctx.bus.consumer_js, &decl).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(consumer = %decl.durable, error = %e, "Cannot bind the reply consumer; retrying");
                if clawbus_bus::consumer::sleep_or_cancel(Duration::from_secs(1), &stop).await {
                    return;
                }
            }
        }
    };
    let orphans = clawbus_bus::ownership::rewind(&ctx.bus, &decl).await;
    let mut opts = clawbus_bus::consumer::RunnerOpts::for_consumer(&decl, CONCURRENCY, ctx.drain);
    opts.orphans = orphans;
    opts.fence = Some(fence);
    opts.readiness = Some(ctx.readiness.clone());
    opts.rebind = Some(decl.clone());
    // Drafts while answers are written (`stream_mode = "partial"`), where messages
    // can be edited.
    let drafts = match (spec.settings.stream, platform.can_edit()) {
        (true, true) => Some(crate::drafts::Drafts::new(
            &spec.channel,
            &spec.account,
            platform.clone(),
            records.clone(),
        )),
        (true, false) => {
            tracing::warn!(channel = %spec.channel, "This platform cannot edit messages: no drafts, replies arrive whole");
            None
        }
        _ => None,
    };
    let drafts_task = drafts
        .clone()
        .map(|d| tokio::spawn(d.run(ctx.bus.client.clone(), stop.clone())));
    let handler = Arc::new(Deliverer {
        channel: spec.channel.clone(),
        account: spec.account.clone(),
        platform,
        drafts,
        records,
        limit: spec.settings.text_chunk_limit,
        metrics: ctx.metrics.clone(),
        typing,
    });
    clawbus_bus::consumer::run(ctx.bus.clone(), consumer, opts, handler, stop).await;
    if let Some(t) = drafts_task {
        t.abort();
    }
}

pub(crate) struct Deliverer<P> {
    pub channel: String,
    pub account: String,
    pub platform: Arc<P>,
    /// Drafts the first piece of a reply replaces.
    pub drafts: Option<Arc<crate::drafts::Drafts<P>>>,
    pub records: kv::Store,
    pub limit: usize,
    pub metrics: ChannelMetrics,
    pub typing: Typing,
}

/// The KV key recording piece `piece` of reply `envelope_id` as sent.
fn record_key(channel: &str, account: &str, envelope_id: &str, piece: usize) -> String {
    format!(
        "{channel}.{account}.{:016x}.{piece}",
        clawbus_bus::subjects::session_hash(envelope_id)
    )
}

/// How long to wait before trying a reply again after `delivered` attempts.
fn backoff(delivered: i64) -> Duration {
    Duration::from_secs(1u64 << delivered.clamp(1, 5) as u32).min(Duration::from_secs(30))
}

impl<P: Platform> Handler for Deliverer<P> {
    type Msg = Envelope<OutboundMessage>;

    fn decode(&self, d: &Delivery) -> Result<Self::Msg, String> {
        let env = decode_envelope::<OutboundMessage>(d)?;
        let m = &env.body;
        if m.channel != self.channel || m.account != self.account {
            return Err(format!(
                "reply for {}/{} on the subject of {}/{}",
                m.channel.chars().take(64).collect::<String>(),
                m.account.chars().take(64).collect::<String>(),
                self.channel,
                self.account
            ));
        }
        if m.chat_id.is_empty() || m.chat_id.len() > 256 {
            return Err("reply without a valid chat id".into());
        }
        Ok(env)
    }

    /// One chat at a time, in stream order: pieces and replies arrive in order.
    fn key(&self, _d: &Delivery, m: &Self::Msg) -> Option<String> {
        Some(m.body.chat_id.clone())
    }

    async fn handle(&self, d: Delivery, env: Self::Msg) -> Outcome {
        let m = &env.body;
        let labels = [self.channel.as_str(), self.account.as_str()];
        if m.text.trim().is_empty() {
            if m.last {
                self.typing.stop(&m.chat_id);
            }
            return Outcome::Ack;
        }
        let pieces =
            crate::chunk::chunk_to_fit(&m.text, self.limit.min(self.platform.max_text()), &|p| {
                self.platform.rendered_len(p)
            });
        for (i, piece) in pieces.iter().enumerate() {
            let key = record_key(&self.channel, &self.account, &env.id, i);
            match self.records.get(&key).await {
                Ok(Some(_)) => {
                    self.metrics.resent_skipped.with_label_values(&labels).inc();
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    return Outcome::retry(Duration::from_secs(1), format!("delivery records: {e}"))
                }
            }
            // A replica that lost the account must not send: its successor will.
            if let Some(f) = &d.fence {
                match f.check().await {
                    Ok(()) => {}
                    Err(Fenced::Lost(_)) => {
                        return Outcome::Abandon {
                            reason: "account handed over".into(),
                        }
                    }
                    Err(e) => return Outcome::retry(Duration::from_secs(1), e.to_string()),
                }
            }
            let to = Target {
                chat_id: m.chat_id.clone(),
                thread_id: m.thread_id.clone(),
                reply_to: (m.chunk == 0 && i == 0)
                    .then(|| m.reply_to_message_id.clone())
                    .flatten(),
                piece_id: key.replace('.', "-"),
            };
            let first = m.chunk == 0 && i == 0;
            let sent = match &self.drafts {
                Some(drafts) if first => {
                    self.replace_draft(drafts, &m.inbound_id, piece, &to).await
                }
                _ => self.platform.send(piece, &to).await,
            };
            match sent {
                Ok(platform_id) => {
                    self.metrics.sent.with_label_values(&labels).inc();
                    if let Err(e) = self.records.put(&key, platform_id.into()).await {
                        // Sent but not recorded: the redelivery would send it again.
                        // Keep trying to record it before anything else.
                        tracing::warn!(error = %e, "Cannot record a sent piece; retrying");
                        if let Err(e) = clawbus_bus::service::patiently("delivery record", || {
                            self.records.put(&key, bytes::Bytes::new())
                        })
                        .await
                        {
                            return Outcome::retry(Duration::from_secs(1), format!("record: {e}"));
                        }
                    }
                }
                Err(e) => return self.failed(&d, e),
            }
        }
        if m.last {
            self.typing.stop(&m.chat_id);
        }
        Outcome::Ack
    }
}

impl<P: Platform> Deliverer<P> {
    /// The reply's first piece in place of the draft answering `inbound_id`, or as a
    /// new message when there is none (or it is gone: deleted by someone, too old to
    /// edit).
    async fn replace_draft(
        &self,
        drafts: &crate::drafts::Drafts<P>,
        inbound_id: &str,
        piece: &str,
        to: &Target,
    ) -> Result<String, SendError> {
        if let Some(draft) = drafts.take(inbound_id).await {
            match self.platform.edit(piece, &draft, to).await {
                Ok(()) => return Ok(draft),
                Err(SendError::Refused(why) | SendError::Markup(why)) => {
                    tracing::info!(error = %why, "The draft cannot be edited; the reply comes as a new message");
                }
                Err(e) => return Err(e),
            }
        }
        self.platform.send(piece, to).await
    }

    fn failed(&self, d: &Delivery, e: SendError) -> Outcome {
        let reason = match &e {
            SendError::RateLimited(_) => "rate_limited",
            SendError::Unauthorized(_) => "unauthorized",
            SendError::Conflict(_) => "conflict",
            SendError::Markup(_) => "markup",
            SendError::Refused(_) => "refused",
            SendError::Transient(_) => "transient",
        };
        self.metrics
            .errors
            .with_label_values(&[self.channel.as_str(), self.account.as_str(), reason])
            .inc();
        match e {
            SendError::RateLimited(after) => {
                tracing::info!(
                    wait_ms = after.as_millis() as u64,
                    "Platform rate limit; the reply waits"
                );
                Outcome::retry(after, "rate limited")
            }
            // Nothing this message can change: keep it for the operator.
            SendError::Refused(why) | SendError::Markup(why) => {
                Outcome::reject(format!("the platform refused the reply: {why}"))
            }
            SendError::Unauthorized(why) | SendError::Conflict(why) | SendError::Transient(why) => {
                tracing::warn!(error = %why, attempt = d.delivered, "Reply not delivered; retrying");
                Outcome::retry(backoff(d.delivered), why)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_are_valid_kv_keys_whatever_the_envelope_id() {
        let k = record_key("telegram", "default", "run:x y/ü:out:0", 3);
        assert!(
            k.starts_with("telegram.default.") && k.ends_with(".3"),
            "{k}"
        );
        assert!(k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
        assert_ne!(k, record_key("telegram", "default", "run:x y/ü:out:1", 3));
    }

    #[test]
    fn backoff_grows_to_half_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(100), Duration::from_secs(30));
    }
}
