//! Telegram through the Bot API: updates by long poll (`getUpdates`), replies by
//! `sendMessage` in Telegram's HTML (plain text when Telegram refuses the markup),
//! typing by `sendChatAction`. `TELEGRAM_BOT_TOKEN` or `[channels.telegram]
//! bot_token` configures the default account.

pub mod api;
pub mod inbound;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use clawbus_bus::ownership::Fence;
use tokio_util::sync::CancellationToken;

use crate::metrics::ChannelMetrics;
use crate::typing::Typing;
use crate::{Ctx, Platform, SendError, Target};
use api::{Api, Outgoing};
use inbound::Me;

/// The sending side of a Telegram bot.
pub struct Telegram {
    api: Api,
}

impl Platform for Telegram {
    fn max_text(&self) -> usize {
        api::MAX_TEXT
    }

    fn rendered_len(&self, markdown: &str) -> usize {
        crate::markdown::telegram_len(markdown)
    }

    async fn send(&self, markdown: &str, to: &Target) -> Result<String, SendError> {
        let html = crate::markdown::telegram_html(markdown);
        let mut m = Outgoing {
            chat_id: &to.chat_id,
            text: &html,
            parse_mode: Some("HTML"),
            reply_to: to.reply_to.as_deref().and_then(inbound::parse_message_id),
            thread_id: to.thread_id.as_deref().and_then(|t| t.parse().ok()),
        };
        let plain;
        let id = match self.api.send_message(&m).await {
            Err(SendError::Markup(why)) => {
                tracing::warn!(error = %why, "Telegram refused the HTML; sending plain text");
                plain = crate::markdown::plain(markdown);
                m.text = &plain;
                m.parse_mode = None;
                self.api.send_message(&m).await?
            }
            other => other?,
        };
        Ok(inbound::message_id(
            to.chat_id.parse().unwrap_or_default(),
            id,
        ))
    }

    fn can_edit(&self) -> bool {
        true
    }

    async fn edit(&self, markdown: &str, message_id: &str, to: &Target) -> Result<(), SendError> {
        let Some(mid) = inbound::parse_message_id(message_id) else {
            return Err(SendError::Refused("not a Telegram message id".into()));
        };
        let html = crate::markdown::telegram_html(markdown);
        match self
            .api
            .edit_message_text(&to.chat_id, mid, &html, Some("HTML"))
            .await
        {
            Err(SendError::Markup(_)) => {
                let plain = crate::markdown::plain(markdown);
                self.api
                    .edit_message_text(&to.chat_id, mid, &plain, None)
                    .await
            }
            other => other,
        }
    }

    async fn typing(&self, chat_id: &str, thread_id: Option<&str>) -> Result<(), SendError> {
        self.api
            .send_typing(chat_id, thread_id.and_then(|t| t.parse().ok()))
            .await
    }
}

/// Runs one Telegram account until `stop`: finds out who the bot is, then polls and
/// delivers.
pub async fn run(ctx: Ctx, fence: Fence, stop: CancellationToken) {
    let spec = &ctx.spec;
    let api = Api::new(ctx.http.clone(), &spec.api_root, &spec.token);
    // Who the bot is (its id and name decide what counts as a mention). A refused
    // token waits here, retrying, without touching the other accounts.
    let Some(me) = ctx
        .identify("Telegram getMe", &stop, || api.get_me())
        .await
        .map(|u| Me::from(&u))
    else {
        return;
    };
    tracing::info!(account = %spec.account, bot = %me.username, "Telegram bot identified");
    let Some((offsets, records)) = ctx.buckets().await else {
        return;
    };
    let platform = Arc::new(Telegram { api: api.clone() });
    let typing = Typing::new(spec.settings.typing);
    let (bus, metrics, account) = (ctx.bus.clone(), ctx.metrics.clone(), spec.account.clone());
    let (hook, stream) = (spec.webhook.clone(), spec.settings.stream);
    let limits = ctx.http_limits;
    let poll_timeout = Duration::from_secs(spec.settings.poll_timeout_secs);
    let (t, f) = (typing.clone(), fence.clone());
    // Updates by webhook, or by long polling (after taking down any webhook an
    // earlier configuration left, which would make getUpdates fail with 409).
    // Each way boxed on its own: the task holds the one it runs (a webhook server's
    // future is much larger than a poller's, and there is a task per account).
    let receive = move |work: CancellationToken| -> ReceiveTask {
        match hook {
            Some(hook) => Box::pin(async move {
                let h = webhook::Hook {
                    bus,
                    me,
                    account,
                    secret: webhook::secret(&hook),
                    metrics,
                    typing: t,
                    stop: work.clone(),
                    stream,
                };
                let mut wait = Duration::from_secs(1);
                while let Err(e) = api.set_webhook(&hook.url, &h.secret).await {
                    tracing::warn!(error = %e, "Telegram setWebhook failed; retrying");
                    if clawbus_bus::consumer::sleep_or_cancel(wait, &work).await {
                        return;
                    }
                    wait = (wait * 2).min(crate::RECONNECT_MAX);
                }
                if let Err(e) = webhook::serve(hook, h, limits).await {
                    tracing::error!(error = %e, "Telegram webhook stopped");
                }
            }),
            None => Box::pin(async move {
                if let Err(e) = api.delete_webhook().await {
                    tracing::warn!(error = %e, "Telegram deleteWebhook failed; polling anyway");
                }
                let c = PollCtx {
                    bus,
                    api,
                    me,
                    account,
                    offsets,
                    metrics,
                    typing: t,
                    poll_timeout,
                    fence: f,
                    stream,
                };
                poll(c, work).await;
            }),
        }
    };
    ctx.serve(platform, records, typing, fence, stop, receive)
        .await;
}

type ReceiveTask = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

struct PollCtx {
    bus: clawbus_bus::Bus,
    api: Api,
    me: Me,
    account: String,
    offsets: kv::Store,
    metrics: ChannelMetrics,
    typing: Typing,
    poll_timeout: Duration,
    fence: Fence,
    /// Ask the agent for live deltas (drafts).
    stream: bool,
}

/// Long-polls updates and publishes them; the offset moves past an update only once
/// it is published (or has nothing for the suite), and is committed to KV after each
/// batch, so a successor resumes where this replica stopped.
async fn poll(c: PollCtx, stop: CancellationToken) {
    let key = format!("telegram.{}", c.account);
    let mut offset: i64 = loop {
        match c.offsets.get(&key).await {
            Ok(v) => {
                break v
                    .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
                    .unwrap_or(0)
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the Telegram offset; retrying");
                if clawbus_bus::consumer::sleep_or_cancel(Duration::from_secs(1), &stop).await {
                    return;
                }
            }
        }
    };
    let labels = ["telegram", c.account.as_str()];
    let up = c.metrics.account_up.with_label_values(&labels);
    let mut wait = Duration::from_secs(1);
    loop {
        let got = tokio::select! {
            r = c.api.get_updates(offset, c.poll_timeout) => r,
            _ = stop.cancelled() => return,
        };
        let updates = match got {
            Ok(u) => {
                wait = Duration::from_secs(1);
                up.set(1);
                u
            }
            Err(e) => {
                up.set(0);
                let pause = match &e {
                    SendError::RateLimited(after) => *after,
                    _ => wait,
                };
                tracing::warn!(error = %e, wait_ms = pause.as_millis() as u64, "Telegram getUpdates failed; retrying");
                c.metrics
                    .errors
                    .with_label_values(&["telegram", c.account.as_str(), "poll"])
                    .inc();
                wait = (wait * 2).min(crate::RECONNECT_MAX);
                if clawbus_bus::consumer::sleep_or_cancel(pause, &stop).await {
                    return;
                }
                continue;
            }
        };
        if updates.is_empty() {
            continue;
        }
        let before = offset;
        for raw in &updates {
            if c.fence.is_lost() {
                return;
            }
            // Each update read on its own: one this adapter cannot read is parked in
            // the dead letters and passed, never retried with the batch for ever.
            let id = match api::decode_update(raw) {
                Ok(u) if u.update_id < offset => continue, // confirmed already
                Ok(u) => {
                    if let Some(mut m) = inbound::to_inbound(&u, &c.account, &c.me) {
                        m.stream = c.stream;
                        if crate::receive(&c.bus, &c.metrics, &c.typing, m, &stop)
                            .await
                            .is_err()
                        {
                            break; // stopping: the offset stays before this update
                        }
                    }
                    Some(u.update_id)
                }
                Err(e) if e.update_id.is_some_and(|id| id < offset) => continue,
                Err(e) => {
                    let ev = crate::unreadable::Unreadable {
                        channel: "telegram",
                        account: &c.account,
                        id: e.update_id.map(|id| id.to_string()),
                        raw: raw.get().as_bytes(),
                        reason: format!("not a readable Telegram update: {}", e.error),
                    };
                    if crate::unreadable::dead_letter(&c.bus, &c.metrics, ev, &stop)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    e.update_id
                }
            };
            if let Some(id) = id {
                offset = offset.max(id.saturating_add(1));
            }
        }
        if offset == before {
            // Nothing to move past (only updates without a readable id): wait instead
            // of asking again at once.
            if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
                return;
            }
            wait = (wait * 2).min(crate::RECONNECT_MAX);
            continue;
        }
        if offset != before {
            if let Err(e) = c.offsets.put(&key, offset.to_string().into()).await {
                // Published already: a successor would publish them again, and
                // JetStream's dedupe window drops the copies.
                tracing::warn!(error = %e, "Cannot commit the Telegram offset");
            }
        }
    }
}
