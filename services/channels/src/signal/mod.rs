//! Signal through signal-cli's daemon (`signal-cli -a +NUMBER daemon --http HOST:PORT`):
//! messages arrive as Server-Sent Events on `GET /api/v1/events` (`event:receive`,
//! `data:` the JSON of `{envelope, account}`), replies go as JSON-RPC 2.0 `send`
//! requests to `POST /api/v1/rpc`, typing as `sendTyping`. The daemon keeps the last
//! events and replays those after the `Last-Event-ID` a client reconnects with; the
//! adapter commits the id of each event it published to KV, so a restarted or new
//! holder of the account resumes there. A Signal message is known by its author and
//! timestamp (what quotes name), which makes the inbound id.

use std::sync::Arc;
use std::time::Duration;

use clawbus_bus::ownership::Fence;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::typing::Typing;
use crate::{Ctx, Platform, SendError, Target};

pub mod events;

/// Signal's own limit is large; long messages read badly on a phone.
const MAX_TEXT: usize = 2000;
/// An event's data longer than this is garbage, not an event: it is cut there and
/// parked, never held whole.
const MAX_EVENT: usize = 1 << 20;

/// A signal-cli daemon's JSON-RPC endpoint for one account.
pub struct Signal {
    http: reqwest::Client,
    rpc: String,
    number: String,
}

/// A chat: a group's id is prefixed so a reply knows to send to the group.
const GROUP: &str = "group:";

impl Signal {
    async fn call(&self, method: &str, params: Value) -> Result<Value, SendError> {
        let id = uuid_like();
        let resp = self
            .http
            .post(&self.rpc)
            .timeout(Duration::from_secs(30))
            .json(&json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id}))
            .send()
            .await
            .map_err(|e| SendError::Transient(format!("signal-cli: {}", e.without_url())))?;
        let status = resp.status().as_u16();
        if status == 201 {
            return Ok(Value::Null);
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| SendError::Transient(format!("signal-cli: HTTP {status}: {e}")))?;
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            let code = e["code"].as_i64().unwrap_or(0);
            let msg = format!("{code} {}", e["message"].as_str().unwrap_or(""));
            // JSON-RPC: -32602 invalid params (a bad recipient), -32601 no such method;
            // signal-cli's own codes: -1 user error, -3 unregistered user, -5 rate limit.
            return Err(match code {
                -32602 | -32601 | -32600 | -3 | -1 => SendError::Refused(msg),
                -5 => SendError::RateLimited(Duration::from_secs(30)),
                _ => SendError::Transient(msg),
            });
        }
        Ok(v["result"].clone())
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "clawbus-{}-{}",
        clawbus_wire::now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The recipient part of a request for chat `chat`: a group or a person.
fn to(chat: &str) -> Result<Value, SendError> {
    let ok = |s: &str| !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control);
    match chat.strip_prefix(GROUP) {
        Some(g) if ok(g) => Ok(json!({"groupId": g})),
        None if ok(chat) => Ok(json!({"recipient": [chat]})),
        _ => Err(SendError::Refused("not a Signal recipient".into())),
    }
}

impl Platform for Signal {
    fn max_text(&self) -> usize {
        MAX_TEXT
    }

    fn rendered_len(&self, markdown: &str) -> usize {
        crate::markdown::plain(markdown).chars().count()
    }

    async fn send(&self, markdown: &str, t: &Target) -> Result<String, SendError> {
        let mut params = to(&t.chat_id)?;
        params["message"] = crate::markdown::plain(markdown).into();
        // A reply quotes the message answered (its author and timestamp).
        if let Some((author, ts)) = t.reply_to.as_deref().and_then(parse_message_id) {
            params["quoteTimestamp"] = ts.into();
            params["quoteAuthor"] = author.into();
        }
        let r = self.call("send", params).await?;
        Ok(r["timestamp"].as_i64().unwrap_or_default().to_string())
    }

    fn can_edit(&self) -> bool {
        true
    }

    /// Signal apps show at most ten edits of a message.
    fn max_edits(&self) -> Option<u32> {
        Some(10)
    }

    /// `send` with `editTimestamp`: the message sent at that timestamp, edited (each
    /// edit names the original message).
    async fn edit(&self, markdown: &str, message_id: &str, t: &Target) -> Result<(), SendError> {
        let Ok(ts) = message_id.parse::<i64>() else {
            return Err(SendError::Refused("not a Signal message timestamp".into()));
        };
        let mut params = to(&t.chat_id)?;
        params["message"] = crate::markdown::plain(markdown).into();
        params["editTimestamp"] = ts.into();
        self.call("send", params).await.map(|_| ())
    }

    async fn typing(&self, chat_id: &str, _thread_id: Option<&str>) -> Result<(), SendError> {
        self.call("sendTyping", to(chat_id)?).await.map(|_| ())
    }
}

/// `<author>/<timestamp>`, a Signal message's identity.
fn message_id(author: &str, ts: i64) -> String {
    format!("{author}/{ts}")
}

fn parse_message_id(s: &str) -> Option<(&str, i64)> {
    let (a, t) = s.rsplit_once('/')?;
    Some((a, t.parse().ok()?))
}

/// Runs one Signal account until `stop`.
pub async fn run(ctx: Ctx, fence: Fence, stop: CancellationToken) {
    let spec = &ctx.spec;
    let Some(number) = spec.number.clone() else {
        return;
    };
    let root = spec.api_root.trim_end_matches('/').to_owned();
    let platform = Arc::new(Signal {
        http: ctx.http.clone(),
        rpc: format!("{root}/api/v1/rpc"),
        number: number.clone(),
    });
    let Some((offsets, records)) = ctx.buckets().await else {
        return;
    };
    let typing = Typing::new(spec.settings.typing);
    let ev = EventsCtx {
        bus: ctx.bus.clone(),
        http: ctx.http.clone(),
        url: format!(
            "{root}/api/v1/events?account={}",
            crate::percent_encode(&number)
        ),
        account: spec.account.clone(),
        platform: platform.clone(),
        offsets,
        metrics: ctx.metrics.clone(),
        typing: typing.clone(),
        fence: fence.clone(),
        stream: spec.settings.stream,
    };
    ctx.serve(platform, records, typing, fence, stop, |work| {
        follow(ev, work)
    })
    .await;
}

struct EventsCtx {
    bus: clawbus_bus::Bus,
    http: reqwest::Client,
    url: String,
    account: String,
    platform: Arc<Signal>,
    offsets: async_nats::jetstream::kv::Store,
    metrics: crate::metrics::ChannelMetrics,
    typing: Typing,
    fence: Fence,
    /// Ask the agent for live deltas (drafts).
    stream: bool,
}

/// Follows the daemon's event stream, reconnecting (1 s doubling to 30 s) with the
/// last published event's id.
async fn follow(c: EventsCtx, stop: CancellationToken) {
    let key = format!("signal.{}", c.account);
    let labels = ["signal", c.account.as_str()];
    let up = c.metrics.account_up.with_label_values(&labels);
    let mut last_id: Option<String> = c
        .offsets
        .get(&key)
        .await
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b.to_vec()).ok());
    let mut wait = Duration::from_secs(1);
    while !stop.is_cancelled() && !c.fence.is_lost() {
        let mut req = c.http.get(&c.url).header("Accept", "text/event-stream");
        if let Some(id) = &last_id {
            req = req.header("Last-Event-ID", id);
        }
        let resp = tokio::select! {
            r = req.send() => r,
            _ = stop.cancelled() => return,
        };
        let resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                tracing::warn!(
                    status = r.status().as_u16(),
                    "signal-cli refused the event stream"
                );
                up.set(0);
                if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
                    return;
                }
                wait = (wait * 2).min(crate::RECONNECT_MAX);
                continue;
            }
            Err(e) => {
                up.set(0);
                c.metrics
                    .errors
                    .with_label_values(&["signal", c.account.as_str(), "poll"])
                    .inc();
                tracing::warn!(error = %e.without_url(), "signal-cli unreachable; retrying");
                if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
                    return;
                }
                wait = (wait * 2).min(crate::RECONNECT_MAX);
                continue;
            }
        };
        up.set(1);
        wait = Duration::from_secs(1);
        let mut body = resp.bytes_stream();
        let mut reader = events::SseReader::new(MAX_EVENT);
        loop {
            let chunk = tokio::select! {
                c = body.next() => c,
                _ = stop.cancelled() => return,
            };
            let Some(Ok(chunk)) = chunk else { break };
            for ev in reader.feed(&chunk) {
                if ev.event != "receive" || ev.data.is_empty() {
                    continue;
                }
                if c.fence.is_lost() {
                    return;
                }
                if c.event(&ev, &stop).await.is_err() {
                    return; // stopping: the id stays before this event
                }
                if let Some(i) = &ev.id {
                    if let Err(e) = c.offsets.put(&key, i.clone().into()).await {
                        tracing::warn!(error = %e, "Cannot commit the Signal event id");
                    }
                    last_id = Some(i.clone());
                }
            }
        }
        up.set(0);
        tracing::info!("Signal event stream ended; reconnecting");
        if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
            return;
        }
    }
}

impl EventsCtx {
    /// Publishes what a `receive` event carries, or parks it in the dead letters with
    /// its bytes when it cannot be read; `Err` when stopping first.
    async fn event(&self, ev: &events::SseEvent, stop: &CancellationToken) -> Result<(), ()> {
        let read = if ev.cut {
            Err(format!("an event over {MAX_EVENT} bytes"))
        } else {
            events::parse_receive(&ev.data, &self.account, &self.platform.number)
        };
        match read {
            Ok(None) => Ok(()),
            Ok(Some(mut m)) => {
                m.stream = self.stream;
                crate::receive(&self.bus, &self.metrics, &self.typing, m, stop).await
            }
            Err(why) => {
                let parked = crate::unreadable::Unreadable {
                    channel: "signal",
                    account: &self.account,
                    id: ev.id.clone(),
                    raw: &ev.data,
                    reason: format!("not a readable Signal event: {why}"),
                };
                crate::unreadable::dead_letter(&self.bus, &self.metrics, parked, stop).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_and_message_ids() {
        assert!(to("a\nb").is_err() && to("group:").is_err() && to("+1555").is_ok());
        assert_eq!(parse_message_id("+1555/17"), Some(("+1555", 17)));
        assert_eq!(parse_message_id("x"), None);
    }
}
