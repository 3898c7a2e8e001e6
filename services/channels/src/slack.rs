//! Slack's outbound side: replies as `chat.postMessage` in mrkdwn, in the thread of
//! the message answered when it came in one. (Messages come in through the gateway's
//! Events API endpoint, signed by Slack.) `auth.test` identifies the bot at start; a
//! 429 waits its `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use clawbus_bus::ownership::Fence;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::typing::Typing;
use crate::{Ctx, Platform, SendError, Target};

/// Slack's advice for a message's text.
const MAX_TEXT: usize = 4000;

pub struct Slack {
    http: reqwest::Client,
    root: String,
    token: SecretString,
}

impl Slack {
    async fn call(&self, method: &str, body: &Value) -> Result<Value, SendError> {
        let resp = self
            .http
            .post(format!("{}/{method}", self.root.trim_end_matches('/')))
            .bearer_auth(self.token.expose_secret())
            .timeout(Duration::from_secs(30))
            .json(body)
            .send()
            .await
            .map_err(|e| SendError::Transient(format!("slack {method}: {}", e.without_url())))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if status == 429 {
            return Err(SendError::RateLimited(Duration::from_secs(
                retry_after.unwrap_or(1).min(3600),
            )));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| SendError::Transient(format!("slack {method}: HTTP {status}: {e}")))?;
        if v["ok"] == true {
            return Ok(v);
        }
        let err = v["error"].as_str().unwrap_or("unknown_error").to_owned();
        Err(match err.as_str() {
            "ratelimited" => SendError::RateLimited(Duration::from_secs(retry_after.unwrap_or(1))),
            "invalid_auth" | "not_authed" | "account_inactive" | "token_revoked" => {
                SendError::Unauthorized(err)
            }
            "channel_not_found" | "not_in_channel" | "is_archived" | "msg_too_long" | "no_text"
            | "invalid_arguments" => SendError::Refused(err),
            _ if status >= 500 => SendError::Transient(err),
            _ => SendError::Refused(err),
        })
    }
}

impl Platform for Slack {
    fn max_text(&self) -> usize {
        MAX_TEXT
    }

    fn rendered_len(&self, markdown: &str) -> usize {
        crate::markdown::slack_mrkdwn(markdown).chars().count()
    }

    async fn send(&self, markdown: &str, to: &Target) -> Result<String, SendError> {
        let mut body = json!({
            "channel": to.chat_id,
            "text": crate::markdown::slack_mrkdwn(markdown),
            "mrkdwn": true,
            "unfurl_links": false,
        });
        if let Some(t) = &to.thread_id {
            body["thread_ts"] = t.clone().into();
        }
        let v = self.call("chat.postMessage", &body).await?;
        Ok(v["ts"].as_str().unwrap_or_default().to_owned())
    }

    fn can_edit(&self) -> bool {
        true
    }

    /// `chat.update` of the message whose `ts` is `message_id`.
    async fn edit(&self, markdown: &str, message_id: &str, to: &Target) -> Result<(), SendError> {
        let body = json!({
            "channel": to.chat_id,
            "ts": message_id,
            "text": crate::markdown::slack_mrkdwn(markdown),
        });
        self.call("chat.update", &body).await.map(|_| ())
    }

    async fn typing(&self, _chat_id: &str, _thread_id: Option<&str>) -> Result<(), SendError> {
        Ok(()) // the Web API has no typing indicator for bots
    }
}

/// Runs one Slack account's outbound side until `stop`.
pub async fn run(ctx: Ctx, fence: Fence, stop: CancellationToken) {
    let spec = &ctx.spec;
    let platform = Arc::new(Slack {
        http: ctx.http.clone(),
        root: spec.api_root.clone(),
        token: spec.token.clone(),
    });
    let no_args = json!({});
    let Some(v) = ctx
        .identify("Slack auth.test", &stop, || {
            platform.call("auth.test", &no_args)
        })
        .await
    else {
        return;
    };
    tracing::info!(account = %spec.account, bot = v["user"].as_str().unwrap_or(""), team = v["team"].as_str().unwrap_or(""), "Slack bot identified");
    let Some((_, records)) = ctx.buckets().await else {
        return;
    };
    // Messages come in through the gateway; the Web API has no typing indicator for bots.
    ctx.serve(
        platform,
        records,
        Typing::new(false),
        fence,
        stop,
        |_| async {},
    )
    .await;
}
