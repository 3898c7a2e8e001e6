//! Matrix through the client-server API: `/sync` long polls with the `since` token
//! committed to KV after the messages before it were published, invitations accepted,
//! messages sent with transaction ids derived from the reply piece (the homeserver
//! itself drops a repeat, so a piece is shown once even when the process died between
//! sending it and recording it), threads and replies, mentions (`m.mentions`, the bot's
//! name), typing notifications. A room of two members (joined or invited) is a
//! direct chat, counted again whenever its membership changes.

pub mod api;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawbus_bus::ownership::Fence;
use clawbus_wire::{ChatKind, ChatRef, InboundMessage, ReplyRef, Sender};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::typing::Typing;
use crate::{Ctx, Platform, SendError, Target};
use api::Api;

/// Event ids of the bot's recent messages (replies to them count as mentions).
const RECENT_SENT: usize = 1000;

/// The sending side of a Matrix account.
pub struct Matrix {
    api: Api,
    me: String,
    sent: Mutex<VecDeque<String>>,
}

impl Matrix {
    fn remember(&self, event_id: &str) {
        let mut s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        if s.len() >= RECENT_SENT {
            s.pop_front();
        }
        s.push_back(event_id.to_owned());
    }

    fn sent_by_me(&self, event_id: &str) -> bool {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|e| e == event_id)
    }
}

impl Platform for Matrix {
    fn max_text(&self) -> usize {
        16_000
    }

    fn rendered_len(&self, markdown: &str) -> usize {
        crate::markdown::plain(markdown).chars().count()
    }

    async fn send(&self, markdown: &str, to: &Target) -> Result<String, SendError> {
        let mut content = text_content(markdown);
        match (&to.thread_id, &to.reply_to) {
            (Some(root), reply) => {
                content["m.relates_to"] = json!({
                    "rel_type": "m.thread",
                    "event_id": root,
                    "is_falling_back": reply.is_none(),
                    "m.in_reply_to": {"event_id": reply.as_deref().unwrap_or(root)},
                })
            }
            (None, Some(reply)) => {
                content["m.relates_to"] = json!({"m.in_reply_to": {"event_id": reply}})
            }
            (None, None) => {}
        }
        let event = self
            .api
            .send(&to.chat_id, &format!("clawbus-{}", to.piece_id), &content)
            .await?;
        self.remember(&event);
        Ok(event)
    }

    fn can_edit(&self) -> bool {
        true
    }

    /// An `m.replace` edit of event `message_id` (clients show the new content in
    /// place; the fallback body starts with `* ` as the spec suggests), under a
    /// transaction id of its own.
    async fn edit(&self, markdown: &str, message_id: &str, to: &Target) -> Result<(), SendError> {
        let new = text_content(markdown);
        let mut content = json!({
            "msgtype": "m.text",
            "body": format!("* {}", new["body"].as_str().unwrap_or_default()),
            "format": "org.matrix.custom.html",
            "formatted_body": format!("* {}", new["formatted_body"].as_str().unwrap_or_default()),
            "m.mentions": {},
            "m.relates_to": {"rel_type": "m.replace", "event_id": message_id},
        });
        content["m.new_content"] = new;
        let event = self
            .api
            .send(
                &to.chat_id,
                &format!("clawbus-{}-edit", to.piece_id),
                &content,
            )
            .await?;
        self.remember(&event);
        Ok(())
    }

    async fn typing(&self, chat_id: &str, _thread_id: Option<&str>) -> Result<(), SendError> {
        self.api.typing(chat_id, &self.me, true).await
    }
}

/// An `m.text` message of `markdown`: plain text and HTML.
fn text_content(markdown: &str) -> Value {
    json!({
        "msgtype": "m.text",
        "body": crate::markdown::plain(markdown),
        "format": "org.matrix.custom.html",
        "formatted_body": crate::markdown::telegram_html(markdown),
        "m.mentions": {},
    })
}

/// Runs one Matrix account until `stop`.
pub async fn run(ctx: Ctx, fence: Fence, stop: CancellationToken) {
    let spec = &ctx.spec;
    let api = Api::new(ctx.http.clone(), &spec.api_root, &spec.token);
    let Some(me) = ctx.identify("Matrix whoami", &stop, || api.whoami()).await else {
        return;
    };
    tracing::info!(account = %spec.account, user = %me, "Matrix account identified");
    let Some((offsets, records)) = ctx.buckets().await else {
        return;
    };
    let platform = Arc::new(Matrix {
        api: api.clone(),
        me: me.clone(),
        sent: Mutex::new(VecDeque::new()),
    });
    let typing = Typing::new(spec.settings.typing);
    let sc = SyncCtx {
        bus: ctx.bus.clone(),
        api,
        me,
        account: spec.account.clone(),
        offsets,
        metrics: ctx.metrics.clone(),
        typing: typing.clone(),
        platform: platform.clone(),
        timeout: Duration::from_secs(spec.settings.poll_timeout_secs),
        fence: fence.clone(),
        stream: spec.settings.stream,
    };
    ctx.serve(platform, records, typing, fence, stop, |work| {
        sync(sc, work)
    })
    .await;
}

struct SyncCtx {
    bus: clawbus_bus::Bus,
    api: Api,
    me: String,
    account: String,
    offsets: async_nats::jetstream::kv::Store,
    metrics: crate::metrics::ChannelMetrics,
    typing: Typing,
    platform: Arc<Matrix>,
    timeout: Duration,
    fence: Fence,
    /// Ask the agent for live deltas (drafts).
    stream: bool,
}

async fn sync(c: SyncCtx, stop: CancellationToken) {
    let key = format!("matrix.{}", c.account);
    let labels = ["matrix", c.account.as_str()];
    let up = c.metrics.account_up.with_label_values(&labels);
    let mut since: Option<String> = loop {
        match c.offsets.get(&key).await {
            Ok(v) => break v.and_then(|b| String::from_utf8(b.to_vec()).ok()),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the Matrix sync token; retrying");
                if clawbus_bus::consumer::sleep_or_cancel(Duration::from_secs(1), &stop).await {
                    return;
                }
            }
        }
    };
    // Room id → whether it is a direct chat (two members).
    let mut direct: HashMap<String, bool> = HashMap::new();
    let mut wait = Duration::from_secs(1);
    loop {
        // The first sync of a new account only learns where "now" is: the rooms'
        // history before the bot arrived is not a backlog of questions.
        let timeout = if since.is_some() {
            c.timeout
        } else {
            Duration::ZERO
        };
        let got = tokio::select! {
            r = c.api.sync(since.as_deref(), timeout) => r,
            _ = stop.cancelled() => return,
        };
        let resp = match got {
            Ok(r) => {
                wait = Duration::from_secs(1);
                up.set(1);
                r
            }
            Err(e) => {
                up.set(0);
                c.metrics
                    .errors
                    .with_label_values(&["matrix", c.account.as_str(), "poll"])
                    .inc();
                let pause = match &e {
                    SendError::RateLimited(after) => *after,
                    _ => wait,
                };
                tracing::warn!(error = %e, "Matrix sync failed; retrying");
                wait = (wait * 2).min(crate::RECONNECT_MAX);
                if clawbus_bus::consumer::sleep_or_cancel(pause, &stop).await {
                    return;
                }
                continue;
            }
        };
        let Some(next) = resp.next_batch.clone() else {
            continue;
        };
        let first = since.is_none();
        // Invitations are accepted (who may talk is the router's business).
        for (room, raw) in &resp.rooms.invite {
            // An invitation whose state cannot be read is still taken (as a group).
            let v: Value = serde_json::from_str(raw.get()).unwrap_or_default();
            let is_direct = v["invite_state"]["events"].as_array().is_some_and(|evs| {
                evs.iter().any(|e| {
                    e["type"] == "m.room.member"
                        && e["state_key"] == c.me.as_str()
                        && e["content"]["is_direct"] == true
                })
            });
            match c.api.join(room).await {
                Ok(()) => {
                    if is_direct {
                        direct.insert(room.clone(), true);
                    }
                    tracing::info!(room = %room, "Joined a Matrix room on invitation");
                }
                Err(e) => tracing::warn!(room = %room, error = %e, "Cannot join a room"),
            }
        }
        let mut stopped = false;
        for (room, v) in &resp.rooms.join {
            if first {
                continue;
            }
            for raw in &v.timeline.events {
                if c.fence.is_lost() {
                    return;
                }
                let ev = match api::read_event(raw) {
                    Ok(ev) => ev,
                    Err((id, error)) => {
                        let ev = crate::unreadable::Unreadable {
                            channel: "matrix",
                            account: &c.account,
                            id,
                            raw: raw.get().as_bytes(),
                            reason: format!("not a readable Matrix event in {room}: {error}"),
                        };
                        if crate::unreadable::dead_letter(&c.bus, &c.metrics, ev, &stop)
                            .await
                            .is_err()
                        {
                            stopped = true;
                            break;
                        }
                        continue;
                    }
                };
                let ev = &ev;
                // Someone joined, left or was invited: count the room again.
                if ev["type"] == "m.room.member" {
                    direct.remove(room);
                    continue;
                }
                let is_direct = match direct.get(room) {
                    Some(d) => *d,
                    None => {
                        let d = c
                            .api
                            .member_count(room)
                            .await
                            .map(|n| n <= 2)
                            .unwrap_or(false);
                        direct.insert(room.clone(), d);
                        d
                    }
                };
                let Some(mut m) = to_inbound(ev, room, is_direct, &c.account, &c.me, &c.platform)
                else {
                    continue;
                };
                m.stream = c.stream;
                if crate::receive(&c.bus, &c.metrics, &c.typing, m, &stop)
                    .await
                    .is_err()
                {
                    stopped = true;
                    break;
                }
            }
            if stopped {
                break;
            }
        }
        if stopped {
            return; // the token stays before what was not published
        }
        if let Err(e) = c.offsets.put(&key, next.clone().into()).await {
            tracing::warn!(error = %e, "Cannot commit the Matrix sync token");
        }
        since = Some(next);
    }
}

/// The inbound message of a timeline event, or `None` for the bot's own, non-message
/// and empty events.
fn to_inbound(
    ev: &Value,
    room: &str,
    is_direct: bool,
    account: &str,
    me: &str,
    platform: &Matrix,
) -> Option<InboundMessage> {
    if ev["type"] != "m.room.message" {
        return None;
    }
    let sender = ev["sender"].as_str()?;
    let event_id = ev["event_id"].as_str()?;
    if sender == me || event_id.is_empty() || event_id.len() > 255 {
        return None;
    }
    let content = &ev["content"];
    if content["m.relates_to"]["rel_type"] == "m.replace" {
        return None; // an edit of a message sent before: no new turn
    }
    let body = content["body"].as_str()?;
    let text = match content["msgtype"].as_str()? {
        "m.text" | "m.notice" => body.to_owned(),
        "m.emote" => format!("* {sender} {body}"),
        _ => return None,
    };
    if text.trim().is_empty() {
        return None;
    }
    let rel = &content["m.relates_to"];
    let thread_id = (rel["rel_type"] == "m.thread")
        .then(|| rel["event_id"].as_str().map(str::to_owned))
        .flatten();
    let reply_to = rel["m.in_reply_to"]["event_id"]
        .as_str()
        .map(|id| ReplyRef {
            message_id: id.to_owned(),
            text: None,
            from_bot: platform.sent_by_me(id),
        });
    let localpart = me.trim_start_matches('@').split(':').next().unwrap_or(me);
    let mentioned = content["m.mentions"]["user_ids"]
        .as_array()
        .is_some_and(|ids| ids.iter().any(|i| i == me))
        || text.split_whitespace().any(|w| {
            let w = w.trim_matches(|c: char| matches!(c, ':' | ',' | '.' | '!' | '?' | '(' | ')'));
            w.eq_ignore_ascii_case(me) || w.eq_ignore_ascii_case(localpart)
        });
    // Clients start a message to someone with their name ("clawbot: ..."): the agent
    // gets the message without it.
    let text = [me, localpart]
        .iter()
        .find_map(|name| {
            let head = text.get(..name.len())?;
            let rest = text[name.len()..].strip_prefix([':', ','])?;
            (head.eq_ignore_ascii_case(name) && !rest.trim().is_empty())
                .then(|| rest.trim().to_owned())
        })
        .unwrap_or(text);
    Some(InboundMessage {
        channel: "matrix".into(),
        account: account.into(),
        message_id: event_id.to_owned(),
        chat: ChatRef {
            id: room.to_owned(),
            kind: if is_direct {
                ChatKind::Direct
            } else {
                ChatKind::Group
            },
            ..Default::default()
        },
        sender: Sender {
            id: sender.to_owned(),
            display_name: None,
            is_bot: false,
        },
        thread_id,
        reply_to,
        text,
        mentions_bot: !is_direct && mentioned,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform() -> Matrix {
        Matrix {
            api: Api::new(
                reqwest::Client::new(),
                "http://127.0.0.1:1",
                &"t".to_owned().into(),
            ),
            me: "@claw:localhost".into(),
            sent: Mutex::new(VecDeque::new()),
        }
    }

    #[test]
    fn room_messages_become_inbound_messages() {
        let p = platform();
        p.remember("$mine");
        let ev = json!({"type": "m.room.message", "event_id": "$e1", "sender": "@ada:localhost",
            "content": {"msgtype": "m.text", "body": "claw: lunch?",
                "m.relates_to": {"rel_type": "m.thread", "event_id": "$root", "m.in_reply_to": {"event_id": "$mine"}}}});
        let m = to_inbound(&ev, "!r:localhost", false, "default", "@claw:localhost", &p).unwrap();
        assert_eq!(
            (m.message_id.as_str(), m.chat.kind),
            ("$e1", ChatKind::Group)
        );
        assert!(m.mentions_bot);
        assert_eq!(m.text, "lunch?", "the name it was addressed with goes");
        assert_eq!(m.thread_id.as_deref(), Some("$root"));
        assert!(m.reply_to.unwrap().from_bot);
        let dm = json!({"type": "m.room.message", "event_id": "$e2", "sender": "@ada:localhost",
            "content": {"msgtype": "m.text", "body": "hi"}});
        let m = to_inbound(&dm, "!d:localhost", true, "default", "@claw:localhost", &p).unwrap();
        assert_eq!(m.chat.kind, ChatKind::Direct);
        for (body, text) in [
            ("@claw:localhost, hello", "hello"),
            ("CLAW: ok", "ok"),
            ("claw:", "claw:"),
            ("clawdia: hi", "clawdia: hi"),
            ("ask claw: why", "ask claw: why"),
        ] {
            let ev = json!({"type": "m.room.message", "event_id": "$e3", "sender": "@ada:localhost",
                "content": {"msgtype": "m.text", "body": body}});
            let m = to_inbound(&ev, "!r:localhost", false, "d", "@claw:localhost", &p).unwrap();
            assert_eq!(m.text, text, "{body}");
        }
    }

    #[test]
    fn own_and_odd_events_are_skipped() {
        let p = platform();
        for ev in [
            json!({"type": "m.room.message", "event_id": "$e", "sender": "@claw:localhost", "content": {"msgtype": "m.text", "body": "x"}}),
            json!({"type": "m.room.member", "event_id": "$e", "sender": "@a:l", "content": {}}),
            json!({"type": "m.room.message", "event_id": "$e", "sender": "@a:l", "content": {"msgtype": "m.image", "body": "x.png"}}),
            json!({"type": "m.room.message", "event_id": "$e", "sender": "@a:l", "content": {"msgtype": "m.text", "body": "  "}}),
            json!({"type": "m.room.message", "sender": "@a:l", "content": {"msgtype": "m.text", "body": "no id"}}),
            json!({"type": "m.room.message", "event_id": "$e", "sender": "@a:l", "content": {"msgtype": "m.text", "body": 7}}),
            json!({"type": "m.room.message", "event_id": "$e", "sender": "@a:l", "content": {"msgtype": "m.text", "body": "* fixed",
                "m.new_content": {"msgtype": "m.text", "body": "fixed"}, "m.relates_to": {"rel_type": "m.replace", "event_id": "$d"}}}),
        ] {
            assert!(
                to_inbound(&ev, "!r:l", false, "d", "@claw:localhost", &p).is_none(),
                "{ev}"
            );
        }
    }
}
