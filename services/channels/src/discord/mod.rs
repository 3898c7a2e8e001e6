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
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::typing::Typing;
use crate::{Ctx, Platform, SendError, Target};

/// Discord's limit on a message's content.
mod gateway;
mod inbound;

pub use gateway::read_event;

use gateway::{gateway, GwCtx};

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

    /// In the thread when there is one (a thread is a channel of its own).
    async fn typing(&self, chat_id: &str, thread_id: Option<&str>) -> Result<(), SendError> {
        let channel = thread_id.unwrap_or(chat_id);
        if !snowflake(channel) {
            return Ok(());
        }
        self.rest(&format!("/channels/{channel}/typing"), &json!({}))
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
    let gw = GwCtx {
        bus: ctx.bus.clone(),
        platform: platform.clone(),
        account: spec.account.clone(),
        metrics: ctx.metrics.clone(),
        typing: typing.clone(),
        fence: fence.clone(),
        stream: spec.settings.stream,
    };
    ctx.serve(platform, records, typing, fence, stop, |work| {
        gateway(gw, work)
    })
    .await;
}
