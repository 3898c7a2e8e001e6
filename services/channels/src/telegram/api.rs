//! The Telegram Bot API as this adapter uses it: `getMe`, `getUpdates` (long poll),
//! `sendMessage`, `sendChatAction`. Every call is a POST of JSON to
//! `<api root>/bot<token>/<method>`, answered `{"ok": true, "result": …}` or
//! `{"ok": false, "error_code": n, "description": "…", "parameters": {"retry_after": s}}`.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::SendError;

/// Telegram's limit on a message's text (after entity parsing).
pub const MAX_TEXT: usize = 4096;

/// A Bot API client of one bot.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

#[derive(Deserialize)]
struct Reply<T> {
    ok: bool,
    result: Option<T>,
    #[serde(default)]
    error_code: Option<u16>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Deserialize)]
struct Parameters {
    retry_after: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: i64,
    #[serde(default)]
    pub is_bot: bool,
    #[serde(default)]
    pub first_name: String,
    #[serde(default)]
    pub last_name: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Chat {
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub is_forum: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Entity {
    #[serde(rename = "type")]
    pub kind: String,
    /// In UTF-16 code units.
    pub offset: usize,
    pub length: usize,
    #[serde(default)]
    pub user: Option<User>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub message_id: i64,
    #[serde(default)]
    pub from: Option<User>,
    pub chat: Chat,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub caption: Option<String>,
    #[serde(default)]
    pub entities: Vec<Entity>,
    #[serde(default)]
    pub caption_entities: Vec<Entity>,
    #[serde(default)]
    pub message_thread_id: Option<i64>,
    #[serde(default)]
    pub is_topic_message: bool,
    #[serde(default)]
    pub reply_to_message: Option<Box<Message>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Update {
    pub update_id: i64,
    #[serde(default)]
    pub message: Option<Message>,
}

/// An update that could not be read, with what could be told of it.
#[derive(Debug)]
pub struct Unreadable {
    /// Its `update_id`, read leniently (the rest of the update ignored), so the
    /// offset can move past it.
    pub update_id: Option<i64>,
    pub error: String,
}

/// Reads one update of a batch. Skipping a value never checks its strings (serde_json
/// ignores surrogates it does not decode), so the id of an update whose text holds a
/// lone surrogate is still found.
pub fn decode_update(raw: &RawValue) -> Result<Update, Unreadable> {
    #[derive(Deserialize)]
    struct IdOnly {
        update_id: i64,
    }
    serde_json::from_str(raw.get()).map_err(|e| Unreadable {
        update_id: serde_json::from_str::<IdOnly>(raw.get())
            .ok()
            .map(|u| u.update_id),
        error: e.to_string(),
    })
}

/// The update a webhook call carries, or its `update_id` (if readable) and why not.
pub fn read_update(body: &[u8]) -> Result<Update, (Option<i64>, String)> {
    let raw: Box<RawValue> = serde_json::from_slice(body).map_err(|e| (None, e.to_string()))?;
    decode_update(&raw).map_err(|e| (e.update_id, e.error))
}

#[derive(Serialize)]
struct ReplyParameters {
    message_id: i64,
    allow_sending_without_reply: bool,
}

/// A text message to send.
#[derive(Debug, Clone, Default)]
pub struct Outgoing<'a> {
    pub chat_id: &'a str,
    pub text: &'a str,
    /// `HTML`, or none for plain text.
    pub parse_mode: Option<&'static str>,
    pub reply_to: Option<i64>,
    pub thread_id: Option<i64>,
}

impl Api {
    pub fn new(http: reqwest::Client, root: &str, token: &SecretString) -> Api {
        Api {
            http,
            base: format!(
                "{}/bot{}",
                root.trim_end_matches('/'),
                token.expose_secret()
            ),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<T, SendError> {
        let resp = self
            .http
            .post(format!("{}/{method}", self.base))
            .timeout(timeout)
            .json(body)
            .send()
            .await
            // The URL carries the token: never let it reach a log.
            .map_err(|e| SendError::Transient(format!("{method}: {}", e.without_url())))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| SendError::Transient(format!("{method}: {}", e.without_url())))?;
        let reply: Reply<T> = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(_) if status >= 500 || status == 429 => {
                return Err(SendError::Transient(format!("{method}: HTTP {status}")))
            }
            Err(e) => {
                return Err(SendError::Transient(format!(
                    "{method}: HTTP {status}, unreadable answer: {e}"
                )))
            }
        };
        if reply.ok {
            return reply
                .result
                .ok_or_else(|| SendError::Transient(format!("{method}: ok without a result")));
        }
        let code = reply.error_code.unwrap_or(status);
        let description = reply
            .description
            .unwrap_or_else(|| format!("HTTP {status}"));
        let retry_after = reply.parameters.and_then(|p| p.retry_after);
        Err(match code {
            429 => SendError::RateLimited(Duration::from_secs(retry_after.unwrap_or(1).min(3600))),
            401 | 404 => SendError::Unauthorized(description),
            409 => SendError::Conflict(description),
            400 if description.contains("can't parse entities") => SendError::Markup(description),
            400 | 403 => SendError::Refused(description),
            _ => SendError::Transient(format!("{method}: {code} {description}")),
        })
    }

    pub async fn get_me(&self) -> Result<User, SendError> {
        self.call("getMe", &serde_json::json!({}), Duration::from_secs(15))
            .await
    }

    /// Has Telegram deliver updates to `url` with `secret` in each call's header.
    pub async fn set_webhook(&self, url: &str, secret: &str) -> Result<(), SendError> {
        self.call::<bool>(
            "setWebhook",
            &serde_json::json!({
                "url": url,
                "secret_token": secret,
                "allowed_updates": ["message"],
            }),
            Duration::from_secs(15),
        )
        .await
        .map(|_| ())
    }

    /// Back to long polling (pending updates are kept for `getUpdates`).
    pub async fn delete_webhook(&self) -> Result<(), SendError> {
        self.call::<bool>(
            "deleteWebhook",
            &serde_json::json!({"drop_pending_updates": false}),
            Duration::from_secs(15),
        )
        .await
        .map(|_| ())
    }

    /// Updates from `offset` on (which confirms every earlier one), waiting up to
    /// `timeout` for the first; each as its raw JSON, for [`decode_update`] to read on
    /// its own (one update this adapter cannot read must not fail the others).
    pub async fn get_updates(
        &self,
        offset: i64,
        timeout: Duration,
    ) -> Result<Vec<Box<RawValue>>, SendError> {
        self.call(
            "getUpdates",
            &serde_json::json!({
                "offset": offset,
                "timeout": timeout.as_secs(),
                "limit": 100,
                "allowed_updates": ["message"],
            }),
            timeout + Duration::from_secs(10),
        )
        .await
    }

    /// Sends a message; its id.
    pub async fn send_message(&self, m: &Outgoing<'_>) -> Result<i64, SendError> {
        let mut body = serde_json::json!({
            "chat_id": m.chat_id,
            "text": m.text,
            "link_preview_options": {"is_disabled": true},
        });
        if let Some(p) = m.parse_mode {
            body["parse_mode"] = p.into();
        }
        if let Some(r) = m.reply_to {
            body["reply_parameters"] = serde_json::to_value(ReplyParameters {
                message_id: r,
                allow_sending_without_reply: true,
            })
            .unwrap_or_default();
        }
        if let Some(t) = m.thread_id {
            body["message_thread_id"] = t.into();
        }
        let sent: Message = self
            .call("sendMessage", &body, Duration::from_secs(30))
            .await?;
        Ok(sent.message_id)
    }

    /// Replaces the text of a message the bot sent. Telegram refuses an edit that
    /// changes nothing ("message is not modified"); that counts as done.
    pub async fn edit_message_text(
        &self,
        chat_id: &str,
        message_id: i64,
        text: &str,
        parse_mode: Option<&'static str>,
    ) -> Result<(), SendError> {
        let mut body = serde_json::json!({
            "chat_id": chat_id,
            "message_id": message_id,
            "text": text,
            "link_preview_options": {"is_disabled": true},
        });
        if let Some(p) = parse_mode {
            body["parse_mode"] = p.into();
        }
        match self
            .call::<serde_json::Value>("editMessageText", &body, Duration::from_secs(30))
            .await
        {
            Err(SendError::Refused(d)) if d.contains("message is not modified") => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Shows "typing…" in a chat (for five seconds, or until the bot's next message).
    pub async fn send_typing(
        &self,
        chat_id: &str,
        thread_id: Option<i64>,
    ) -> Result<(), SendError> {
        let mut body = serde_json::json!({"chat_id": chat_id, "action": "typing"});
        if let Some(t) = thread_id {
            body["message_thread_id"] = t.into();
        }
        self.call::<bool>("sendChatAction", &body, Duration::from_secs(10))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn a_batch_with_hostile_updates_is_read_one_by_one() {
        let body = br#"{"ok":true,"result":[
            {"update_id":7,"message":{"message_id":1,"chat":{"id":5,"type":"private"},"text":"bad \ud800 text"}},
            {"update_id":8,"message":{"message_id":2,"chat":{"id":5,"type":"private"},"text":"hi","entities":[{"type":"bold","offset":-1,"length":2}]}},
            {"update_id":9,"message":{"message_id":"three","chat":{"id":5,"type":"private"},"text":"hi"}},
            {"update_id":10,"message":{"message_id":4,"chat":{"id":5,"type":"private"},"text":"fine"}}
        ]}"#;
        let reply: Reply<Vec<Box<RawValue>>> = serde_json::from_slice(body).unwrap();
        let got: Vec<_> = reply
            .result
            .unwrap()
            .iter()
            .map(|r| decode_update(r))
            .collect();
        for (i, id) in [7, 8, 9].into_iter().enumerate() {
            let e = got[i].as_ref().unwrap_err();
            assert_eq!(e.update_id, Some(id), "{e:?}");
        }
        let ok = got[3].as_ref().unwrap();
        assert_eq!(ok.update_id, 10);
        assert_eq!(ok.message.as_ref().unwrap().text.as_deref(), Some("fine"));
    }

    #[test]
    fn an_update_without_a_readable_id_says_so() {
        let e = decode_update(&raw(r#"{"update_id":"x"}"#)).unwrap_err();
        assert_eq!(e.update_id, None);
        let e = decode_update(&raw(r#"[1,2]"#)).unwrap_err();
        assert_eq!(e.update_id, None);
    }
}
