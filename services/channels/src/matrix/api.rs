//! The Matrix client-server API as this adapter uses it (v3): `whoami`, `sync`
//! (long poll with a `since` token), `join`, `joined_members`, `send` (PUT with a
//! transaction id: the homeserver answers a repeated transaction with the event it
//! created the first time, so a retried piece is never shown twice), `typing`.

use std::time::Duration;

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::SendError;

/// A `/sync` answer as this adapter reads it: the rooms' events kept as raw JSON, each
/// read on its own later, so one event that cannot be read (a lone surrogate escape,
/// a field of an odd type) never fails the batch; what is not used is skipped unread.
#[derive(Debug, Deserialize)]
pub struct SyncBatch {
    #[serde(default)]
    pub next_batch: Option<String>,
    #[serde(default)]
    pub rooms: SyncRooms,
}

#[derive(Debug, Default, Deserialize)]
pub struct SyncRooms {
    #[serde(default)]
    pub join: BTreeMap<String, JoinedRoom>,
    /// Each invitation's raw JSON (`invite_state`).
    #[serde(default)]
    pub invite: BTreeMap<String, Box<RawValue>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct JoinedRoom {
    #[serde(default)]
    pub timeline: Timeline,
}

#[derive(Debug, Default, Deserialize)]
pub struct Timeline {
    #[serde(default)]
    pub events: Vec<Box<RawValue>>,
}

/// A timeline event read on its own, or its `event_id` (if that much can be read) and
/// why not.
pub fn read_event(raw: &RawValue) -> Result<Value, (Option<String>, String)> {
    #[derive(Deserialize)]
    struct IdOnly {
        event_id: String,
    }
    serde_json::from_str(raw.get()).map_err(|e| {
        let id = serde_json::from_str::<IdOnly>(raw.get())
            .ok()
            .map(|i| i.event_id);
        (id, e.to_string())
    })
}

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: SecretString,
}

use crate::percent_encode as seg;

impl Api {
    pub fn new(http: reqwest::Client, homeserver: &str, token: &SecretString) -> Api {
        Api {
            http,
            base: format!("{}/_matrix/client/v3", homeserver.trim_end_matches('/')),
            token: token.clone(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<T, SendError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.expose_secret())
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| SendError::Transient(format!("matrix: {}", e.without_url())))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| SendError::Transient(format!("matrix: {}", e.without_url())))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes)
                .map_err(|e| SendError::Transient(format!("matrix: unreadable answer: {e}")));
        }
        let err: Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let code = err["errcode"].as_str().unwrap_or("").to_owned();
        let msg = format!("{status} {code} {}", err["error"].as_str().unwrap_or(""));
        Err(match (status, code.as_str()) {
            (429, _) | (_, "M_LIMIT_EXCEEDED") => SendError::RateLimited(Duration::from_millis(
                err["retry_after_ms"]
                    .as_u64()
                    .unwrap_or(1000)
                    .min(3_600_000),
            )),
            (401, _) | (_, "M_UNKNOWN_TOKEN") | (_, "M_MISSING_TOKEN") => {
                SendError::Unauthorized(msg)
            }
            (403 | 400 | 404, _) => SendError::Refused(msg),
            _ => SendError::Transient(msg),
        })
    }

    /// The account's user id.
    pub async fn whoami(&self) -> Result<String, SendError> {
        let v: Value = self
            .call(
                reqwest::Method::GET,
                "/account/whoami",
                None,
                Duration::from_secs(15),
            )
            .await?;
        v["user_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| SendError::Transient("whoami without a user id".into()))
    }

    /// Events since `since` (none: the current state only), waiting up to `timeout`.
    pub async fn sync(
        &self,
        since: Option<&str>,
        timeout: Duration,
    ) -> Result<SyncBatch, SendError> {
        let filter = r#"{"presence":{"types":[]},"account_data":{"types":[]},"room":{"timeline":{"limit":50},"ephemeral":{"types":[]}}}"#;
        let mut path = format!(
            "/sync?timeout={}&filter={}",
            timeout.as_millis(),
            seg(filter)
        );
        if let Some(s) = since {
            path.push_str(&format!("&since={}", seg(s)));
        }
        self.call(
            reqwest::Method::GET,
            &path,
            None,
            timeout + Duration::from_secs(10),
        )
        .await
    }

    pub async fn join(&self, room: &str) -> Result<(), SendError> {
        self.call::<Value>(
            reqwest::Method::POST,
            &format!("/join/{}", seg(room)),
            Some(&serde_json::json!({})),
            Duration::from_secs(30),
        )
        .await
        .map(|_| ())
    }

    /// How many members a room has, joined or invited.
    pub async fn member_count(&self, room: &str) -> Result<usize, SendError> {
        let v: Value = self
            .call(
                reqwest::Method::GET,
                &format!("/rooms/{}/members", seg(room)),
                None,
                Duration::from_secs(15),
            )
            .await?;
        Ok(v["chunk"].as_array().map_or(0, |evs| {
            evs.iter()
                .filter(|e| matches!(e["content"]["membership"].as_str(), Some("join" | "invite")))
                .count()
        }))
    }

    /// Sends `content` as an `m.room.message` under transaction `txn`; the event id.
    pub async fn send(&self, room: &str, txn: &str, content: &Value) -> Result<String, SendError> {
        let v: Value = self
            .call(
                reqwest::Method::PUT,
                &format!("/rooms/{}/send/m.room.message/{}", seg(room), seg(txn)),
                Some(content),
                Duration::from_secs(30),
            )
            .await?;
        Ok(v["event_id"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn typing(&self, room: &str, me: &str, on: bool) -> Result<(), SendError> {
        self.call::<Value>(
            reqwest::Method::PUT,
            &format!("/rooms/{}/typing/{}", seg(room), seg(me)),
            Some(&serde_json::json!({"typing": on, "timeout": 30000})),
            Duration::from_secs(10),
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(super::seg("!abc:localhost"), "%21abc%3Alocalhost");
        // No dot segments reach the path: `..` cannot climb out of the room's path.
        assert_eq!(super::seg("../x/y"), "%2E%2E%2Fx%2Fy");
    }
}

#[cfg(test)]
mod sync_tests {
    use super::*;

    #[test]
    fn one_unreadable_event_does_not_fail_the_sync() {
        let body = br#"{"next_batch":"s2","account_data":{"events":[{"content":{"x":"\udead"}}]},
            "rooms":{"invite":{"!i:hs":{"invite_state":{"events":[]}}},"join":{"!r:hs":{"state":{"events":[]},
            "timeline":{"events":[
                {"type":"m.room.message","event_id":"$bad","sender":"@e:hs","content":{"msgtype":"m.text","body":"\ud800"}},
                {"type":"m.room.message","event_id":"$ok","sender":"@a:hs","content":{"msgtype":"m.text","body":"hi"}}
            ]}}}}}"#;
        let b: SyncBatch = serde_json::from_slice(body).unwrap();
        assert_eq!(b.next_batch.as_deref(), Some("s2"));
        assert!(b.rooms.invite.contains_key("!i:hs"));
        let evs = &b.rooms.join["!r:hs"].timeline.events;
        assert_eq!(read_event(&evs[0]).unwrap_err().0.as_deref(), Some("$bad"));
        assert_eq!(read_event(&evs[1]).unwrap()["content"]["body"], "hi");
    }
}
