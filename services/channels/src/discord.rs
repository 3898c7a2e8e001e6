//! Discord: the gateway WebSocket for messages (Hello, Identify with the guild and
//! direct message intents and message content, heartbeats at the interval the server
//! gives, Resume with the session and the last sequence after a lost connection,
//! Reconnect and Invalid Session handled, fatal close codes stop the account), the REST
//! API for replies (`POST /channels/{id}/messages` with a nonce the server enforces:
//! a piece sent again within minutes is the same message), typing, 429s waited out.
//! Replies never ping anyone (`allowed_mentions: {parse: []}`).

use std::sync::Arc;
use std::time::Duration;

use clawbus_bus::ownership::Fence;
use clawbus_wire::{ChatKind, ChatRef, InboundMessage, ReplyRef, Sender};
use futures::{SinkExt, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_util::sync::CancellationToken;

use crate::typing::Typing;
use crate::{Ctx, Platform, SendError, Target};

/// Discord's limit on a message's content.
pub const MAX_TEXT: usize = 2000;
/// GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT.
const INTENTS: u64 = (1 << 9) | (1 << 12) | (1 << 15);
/// Close codes after which reconnecting cannot help (bad token, bad intents, ...).
const FATAL: &[u16] = &[4004, 4010, 4011, 4012, 4013, 4014];

pub struct Discord {
    http: reqwest::Client,
    root: String,
    token: SecretString,
}

impl Discord {
    async fn rest(&self, path: &str, body: &Value) -> Result<Value, SendError> {
        self.call(reqwest::Method::POST, path, body).await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<Value, SendError> {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.root.trim_end_matches('/')))
            .header(
                "Authorization",
                format!("Bot {}", self.token.expose_secret()),
            )
            .timeout(Duration::from_secs(30))
            .json(body)
            .send()
            .await
            .map_err(|e| SendError::Transient(format!("discord: {}", e.without_url())))?;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        match status {
            200..=299 => Ok(v),
            429 => Err(SendError::RateLimited(Duration::from_millis(
                (v["retry_after"].as_f64().unwrap_or(1.0) * 1000.0).clamp(0.0, 3_600_000.0) as u64,
            ))),
            401 => Err(SendError::Unauthorized(format!("401 {}", v["message"]))),
            400 | 403 | 404 => Err(SendError::Refused(format!("{status} {}", v["message"]))),
            _ => Err(SendError::Transient(format!("{status} {}", v["message"]))),
        }
    }

    async fn get(&self, path: &str) -> Result<Value, SendError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.root.trim_end_matches('/')))
            .header(
                "Authorization",
                format!("Bot {}", self.token.expose_secret()),
            )
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| SendError::Transient(format!("discord: {}", e.without_url())))?;
        match resp.status().as_u16() {
            200..=299 => resp
                .json()
                .await
                .map_err(|e| SendError::Transient(e.to_string())),
            401 => Err(SendError::Unauthorized("401 Unauthorized".into())),
            s => Err(SendError::Transient(format!("HTTP {s}"))),
        }
    }
}

/// A snowflake: digits only (they go into URL paths).
fn snowflake(s: &str) -> bool {
    !s.is_empty() && s.len() <= 24 && s.bytes().all(|b| b.is_ascii_digit())
}

impl Platform for Discord {
    fn max_text(&self) -> usize {
        MAX_TEXT
    }

    async fn send(&self, markdown: &str, to: &Target) -> Result<String, SendError> {
        // A thread is a channel of its own.
        let channel = to.thread_id.as_deref().unwrap_or(&to.chat_id);
        if !snowflake(channel) {
            return Err(SendError::Refused("not a Discord channel id".into()));
        }
        // Discord's own Markdown is close to the model's; what matters is that no
        // @everyone or role ping goes out.
        let mut body = json!({
            "content": markdown,
            "allowed_mentions": {"parse": []},
            "nonce": to.piece_id.chars().rev().take(25).collect::<String>(),
            "enforce_nonce": true,
        });
        if let Some(r) = to.reply_to.as_deref().filter(|r| snowflake(r)) {
            body["message_reference"] = json!({"message_id": r, "fail_if_not_exists": false});
        }
        let v = self
            .rest(&format!("/channels/{channel}/messages"), &body)
            .await?;
        Ok(v["id"].as_str().unwrap_or_default().to_owned())
    }

    fn can_edit(&self) -> bool {
        true
    }

    async fn edit(&self, markdown: &str, message_id: &str, to: &Target) -> Result<(), SendError> {
        let channel = to.thread_id.as_deref().unwrap_or(&to.chat_id);
        if !snowflake(channel) || !snowflake(message_id) {
            return Err(SendError::Refused("not a Discord message id".into()));
        }
        let body = json!({"content": markdown, "allowed_mentions": {"parse": []}});
        self.call(
            reqwest::Method::PATCH,
            &format!("/channels/{channel}/messages/{message_id}"),
            &body,
        )
        .await
        .map(|_| ())
    }

    async fn typing(&self, chat_id: &str, _thread_id: Option<&str>) -> Result<(), SendError> {
        if !snowflake(chat_id) {
            return Ok(());
        }
        self.rest(&format!("/channels/{chat_id}/typing"), &json!({}))
            .await
            .map(|_| ())
    }
}

/// Runs one Discord account until `stop`.
pub async fn run(ctx: Ctx, fence: Fence, stop: CancellationToken) {
    let spec = &ctx.spec;
    let platform = Arc::new(Discord {
        http: ctx.http.clone(),
        root: spec.api_root.clone(),
        token: spec.token.clone(),
    });
    let Some((_, records)) = ctx.buckets().await else {
        return;
    };
    let typing = Typing::new(spec.settings.typing);
    let work = stop.child_token();
    let typing_task = tokio::spawn(typing.clone().run(platform.clone(), work.clone()));
    let gateway = tokio::spawn(gateway(
        GwCtx {
            bus: ctx.bus.clone(),
            platform: platform.clone(),
            account: spec.account.clone(),
            metrics: ctx.metrics.clone(),
            typing: typing.clone(),
            fence: fence.clone(),
            stream: spec.settings.stream,
        },
        work.clone(),
    ));
    crate::delivery::serve(&ctx, platform, records, typing, fence, stop).await;
    work.cancel();
    let _ = gateway.await;
    let _ = typing_task.await;
}

struct GwCtx {
    bus: clawbus_bus::Bus,
    platform: Arc<Discord>,
    account: String,
    metrics: crate::metrics::ChannelMetrics,
    typing: Typing,
    fence: Fence,
    /// Ask the agent for live deltas (drafts).
    stream: bool,
}

/// A gateway session that may be resumed.
#[derive(Default)]
struct Session {
    id: Option<String>,
    resume_url: Option<String>,
    seq: Option<u64>,
    me: String,
}

/// How a connection ended.
enum End {
    Stop,
    /// Connect again, resuming when the session allows.
    Again,
    /// Connect again with a new session.
    Fresh,
    Fatal(String),
}

async fn gateway(c: GwCtx, stop: CancellationToken) {
    let labels = ["discord", c.account.as_str()];
    let up = c.metrics.account_up.with_label_values(&labels);
    let mut session = Session::default();
    let mut wait = Duration::from_secs(1);
    while !stop.is_cancelled() && !c.fence.is_lost() {
        let url = match &session.resume_url {
            Some(u) if session.id.is_some() => u.clone(),
            _ => match c.platform.get("/gateway/bot").await {
                Ok(v) => v["url"]
                    .as_str()
                    .unwrap_or("wss://gateway.discord.gg")
                    .to_owned(),
                Err(e) => {
                    up.set(0);
                    let reason = if matches!(e, SendError::Unauthorized(_)) {
                        "unauthorized"
                    } else {
                        "identify"
                    };
                    c.metrics
                        .errors
                        .with_label_values(&["discord", c.account.as_str(), reason])
                        .inc();
                    tracing::warn!(error = %e, "Discord /gateway/bot failed; retrying");
                    if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
                        return;
                    }
                    wait = (wait * 2).min(crate::RECONNECT_MAX);
                    continue;
                }
            },
        };
        let end = connection(
            &c,
            &format!("{url}/?v=10&encoding=json"),
            &mut session,
            &stop,
        )
        .await;
        up.set(0);
        match end {
            End::Stop => return,
            End::Fatal(why) => {
                c.metrics
                    .errors
                    .with_label_values(&["discord", c.account.as_str(), "unauthorized"])
                    .inc();
                tracing::error!(reason = %why, "Discord closed the gateway for good; fix the configuration");
                // Still retry, slowly: a token fixed in Discord's portal works again.
                if clawbus_bus::consumer::sleep_or_cancel(Duration::from_secs(300), &stop).await {
                    return;
                }
            }
            End::Fresh => {
                session = Session::default();
                if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
                    return;
                }
                wait = (wait * 2).min(crate::RECONNECT_MAX);
            }
            End::Again => {
                c.metrics
                    .errors
                    .with_label_values(&["discord", c.account.as_str(), "connection"])
                    .inc();
                if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
                    return;
                }
                wait = (wait * 2).min(crate::RECONNECT_MAX);
            }
        }
    }
}

/// One gateway connection: Hello, Identify or Resume, then dispatches and heartbeats.
async fn connection(c: &GwCtx, url: &str, s: &mut Session, stop: &CancellationToken) -> End {
    let ws = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(url),
    )
    .await;
    let mut ws = match ws {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Discord gateway connection failed");
            return End::Again;
        }
        Err(_) => return End::Again,
    };
    let labels = ["discord", c.account.as_str()];
    let token = c.platform.token.expose_secret().to_owned();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(3600));
    let mut acked = true;
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = heartbeat.tick() => {
                if !acked {
                    // No ACK for the last heartbeat: a zombie connection.
                    tracing::warn!("Discord heartbeat not acknowledged; reconnecting");
                    return End::Again;
                }
                acked = false;
                let hb = json!({"op": 1, "d": s.seq});
                if ws.send(Ws::text(hb.to_string())).await.is_err() {
                    return End::Again;
                }
                continue;
            }
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
                return End::Stop;
            }
        };
        let text = match msg {
            Some(Ok(Ws::Text(t))) => t.to_string(),
            Some(Ok(Ws::Close(frame))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code)).unwrap_or(1000);
                if FATAL.contains(&code) {
                    return End::Fatal(format!("close code {code}"));
                }
                // 4007 invalid seq, 4009 session timed out: start a new session.
                return if matches!(code, 4007 | 4009) {
                    End::Fresh
                } else {
                    End::Again
                };
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return End::Again,
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let Some(n) = v["s"].as_u64() {
            s.seq = Some(n);
        }
        match v["op"].as_u64() {
            // Hello: heartbeat at the interval given, then identify or resume.
            Some(10) => {
                let ms = v["d"]["heartbeat_interval"]
                    .as_u64()
                    .unwrap_or(41_250)
                    .max(100);
                heartbeat = tokio::time::interval_at(
                    tokio::time::Instant::now() + Duration::from_millis(ms / 2),
                    Duration::from_millis(ms),
                );
                let hello = match (&s.id, s.seq) {
                    (Some(id), Some(seq)) => {
                        json!({"op": 6, "d": {"token": token, "session_id": id, "seq": seq}})
                    }
                    _ => json!({"op": 2, "d": {"token": token, "intents": INTENTS,
                        "properties": {"os": std::env::consts::OS, "browser": "clawbus", "device": "clawbus"}}}),
                };
                if ws.send(Ws::text(hello.to_string())).await.is_err() {
                    return End::Again;
                }
            }
            Some(11) => acked = true,
            // The server asks for a heartbeat now.
            Some(1)
                if ws
                    .send(Ws::text(json!({"op": 1, "d": s.seq}).to_string()))
                    .await
                    .is_err() =>
            {
                return End::Again;
            }
            Some(7) => return End::Again,
            Some(9) => {
                return if v["d"] == true {
                    End::Again
                } else {
                    End::Fresh
                };
            }
            Some(0) => match v["t"].as_str() {
                Some("READY") => {
                    s.id = v["d"]["session_id"].as_str().map(str::to_owned);
                    s.resume_url = v["d"]["resume_gateway_url"].as_str().map(str::to_owned);
                    s.me = v["d"]["user"]["id"].as_str().unwrap_or_default().to_owned();
                    c.metrics.account_up.with_label_values(&labels).set(1);
                    tracing::info!(
                        bot = v["d"]["user"]["username"].as_str().unwrap_or(""),
                        "Discord gateway ready"
                    );
                }
                Some("RESUMED") => {
                    c.metrics.account_up.with_label_values(&labels).set(1);
                    tracing::info!("Discord gateway session resumed");
                }
                Some("MESSAGE_CREATE") => {
                    if c.fence.is_lost() {
                        return End::Stop;
                    }
                    if let Some(mut m) = to_inbound(&v["d"], &c.account, &s.me) {
                        m.stream = c.stream;
                        let chat = m.thread_id.clone().unwrap_or_else(|| m.chat.id.clone());
                        if crate::publish(&c.bus, m, stop).await.is_err() {
                            return End::Stop;
                        }
                        c.metrics.inbound.with_label_values(&labels).inc();
                        c.typing.start(&chat, None);
                        let p = c.platform.clone();
                        tokio::spawn(async move {
                            let _ = p.typing(&chat, None).await;
                        });
                    }
                }
                _ => {}
            },
            _ => {}
        }
    }
}

/// The inbound message of a MESSAGE_CREATE, or `None` for bots (this one included),
/// system messages and empty content.
fn to_inbound(d: &Value, account: &str, me: &str) -> Option<InboundMessage> {
    let author = &d["author"];
    let (id, channel, author_id) = (
        d["id"].as_str()?,
        d["channel_id"].as_str()?,
        author["id"].as_str()?,
    );
    if author["bot"] == true || author_id == me || !snowflake(id) || !snowflake(channel) {
        return None;
    }
    let content = d["content"].as_str()?;
    if content.trim().is_empty() {
        return None;
    }
    let guild = d["guild_id"].as_str().map(str::to_owned);
    let mentioned = d["mentions"]
        .as_array()
        .is_some_and(|ms| ms.iter().any(|m| m["id"].as_str() == Some(me)));
    let reply_to = d["referenced_message"]["id"].as_str().map(|rid| ReplyRef {
        message_id: rid.to_owned(),
        text: d["referenced_message"]["content"]
            .as_str()
            .map(str::to_owned),
        from_bot: d["referenced_message"]["author"]["id"].as_str() == Some(me),
    });
    let text = if me.is_empty() {
        content.to_owned()
    } else {
        content
            .replace(&format!("<@{me}>"), "")
            .replace(&format!("<@!{me}>"), "")
            .trim()
            .to_owned()
    };
    Some(InboundMessage {
        channel: "discord".into(),
        account: account.into(),
        message_id: id.to_owned(),
        chat: ChatRef {
            id: channel.to_owned(),
            kind: if guild.is_some() {
                ChatKind::Group
            } else {
                ChatKind::Direct
            },
            guild_id: guild,
            ..Default::default()
        },
        sender: Sender {
            id: author_id.to_owned(),
            display_name: author["global_name"]
                .as_str()
                .or_else(|| author["username"].as_str())
                .map(str::to_owned),
            is_bot: false,
        },
        reply_to,
        text: if text.is_empty() {
            content.to_owned()
        } else {
            text
        },
        mentions_bot: mentioned,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guild_and_direct_messages_mentions_and_replies() {
        let d = json!({"id": "111", "channel_id": "222", "guild_id": "333", "content": "<@42> lunch?",
            "author": {"id": "7", "username": "ada"}, "mentions": [{"id": "42"}],
            "referenced_message": {"id": "100", "content": "earlier", "author": {"id": "42"}}});
        let m = to_inbound(&d, "default", "42").unwrap();
        assert_eq!(
            (m.chat.kind, m.chat.guild_id.as_deref()),
            (ChatKind::Group, Some("333"))
        );
        assert!(m.mentions_bot);
        assert_eq!(m.text, "lunch?");
        assert!(m.reply_to.unwrap().from_bot);
        let dm = json!({"id": "112", "channel_id": "223", "content": "hi", "author": {"id": "7"}});
        assert_eq!(
            to_inbound(&dm, "default", "42").unwrap().chat.kind,
            ChatKind::Direct
        );
    }

    #[test]
    fn bots_odd_ids_and_empty_messages_are_skipped() {
        for d in [
            json!({"id": "1", "channel_id": "2", "content": "x", "author": {"id": "9", "bot": true}}),
            json!({"id": "1", "channel_id": "2", "content": "x", "author": {"id": "42"}}),
            json!({"id": "1", "channel_id": "../x", "content": "x", "author": {"id": "7"}}),
            json!({"id": "1", "channel_id": "2", "content": "  ", "author": {"id": "7"}}),
            json!({"id": "1", "channel_id": "2", "author": {"id": "7"}}),
        ] {
            assert!(to_inbound(&d, "default", "42").is_none(), "{d}");
        }
    }
}
