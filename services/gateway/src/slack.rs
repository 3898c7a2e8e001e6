//! Slack's Events API on the gateway: Slack POSTs each event of a workspace to
//! `/slack/events` (the default account; `/slack/events/<account>` for others). Every
//! call is checked before anything else: `X-Slack-Request-Timestamp` within five
//! minutes of now (no replays) and `X-Slack-Signature` = `v0=` HMAC-SHA256 of
//! `v0:<timestamp>:<body>` with the app's signing secret, compared in constant time.
//! The `url_verification` handshake answers its challenge; a message (or
//! `app_mention`) becomes an inbound message on `claw.v1.in.slack.<account>.<chat>`,
//! with the id `slack:<account>:<channel>:<ts>` so Slack's retries and the two events
//! of one mentioned message are one turn. 200 only once JetStream has it: Slack
//! retries anything else. Replies go out through the channels service
//! (`chat.postMessage`).
//!
//! What the headers can refuse is refused before a byte of the body is read: a stale
//! or missing timestamp, a missing or malformed signature, a `Content-Length` over the
//! limit. Only a well-formed signature waits for the body it signs (within the size
//! limit and the listener's body timeout).
//!
//! A signed body whose event cannot be read (not JSON, a lone surrogate escape, a
//! field of the wrong type, a channel or timestamp no Slack id looks like) is parked in
//! the dead letters (`claw.v1.dlq.gateway`) with its raw bytes and answered 200: an
//! error answer would have Slack send it again and again. Socket Mode does the same
//! before acknowledging.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use clawbus_wire::{ChatKind, ChatRef, Envelope, InboundMessage, Sender};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::api::{body_bytes, Gateway};

/// How far a request's timestamp may be from now (Slack's own advice: five minutes).
const REPLAY_WINDOW_SECS: i64 = 300;

/// A Slack account the gateway takes events for.
pub struct SlackAccount {
    pub account: String,
    pub secret: String,
    /// Ask the agent for live deltas (drafts, `stream_mode = "partial"`).
    pub stream: bool,
}

/// The routes of the configured Slack accounts.
pub fn routes(accounts: &[SlackAccount]) -> Router<Arc<Gateway>> {
    let mut r = Router::new();
    for a in accounts {
        let path = if a.account == "default" {
            "/slack/events".to_owned()
        } else {
            format!("/slack/events/{}", a.account)
        };
        let account = a.account.clone();
        r = r.route(
            &path,
            post(
                move |State(gw): State<Arc<Gateway>>,
                      headers: HeaderMap,
                      body: axum::body::Body| {
                    let account = account.clone();
                    async move { events(gw, &account, headers, body).await }
                },
            ),
        );
    }
    r
}

/// The accounts of `cfg` with a signing secret.
pub fn accounts(cfg: &clawbus_config::Config) -> Vec<SlackAccount> {
    cfg.channel_accounts()
        .into_iter()
        .filter(|a| a.channel == "slack")
        .filter_map(|a| {
            Some(SlackAccount {
                stream: a.settings.stream,
                secret: a.signing_secret?.expose_secret().to_owned(),
                account: a.account,
            })
        })
        .collect()
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, Json(json!({"ok": false, "error": why}))).into_response()
}

/// True when `signature` is Slack's for `body` at `ts` with `secret`.
pub fn signed(secret: &str, ts: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("v0=") else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(b"v0:");
    mac.update(ts.as_bytes());
    mac.update(b":");
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    clawbus_config::secret_matches(hex.as_bytes(), want.as_bytes())
}

/// True when `signature` looks like one of Slack's (`v0=` and 64 lowercase hex
/// digits), whatever it signs.
fn well_formed(signature: &str) -> bool {
    signature
        .strip_prefix("v0=")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

async fn events(
    gw: Arc<Gateway>,
    account: &str,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let Some(a) = gw.slack.iter().find(|a| a.account == account) else {
        return refuse(StatusCode::NOT_FOUND, "unknown_account");
    };
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ts = header("x-slack-request-timestamp");
    let fresh = ts
        .parse::<i64>()
        .is_ok_and(|t| (clawbus_wire::now_ms() / 1000 - t).abs() <= REPLAY_WINDOW_SECS);
    if !fresh {
        gw.count_slack("stale");
        return refuse(StatusCode::UNAUTHORIZED, "stale_or_missing_timestamp");
    }
    let signature = header("x-slack-signature");
    if !well_formed(signature) {
        gw.count_slack("bad_signature");
        return refuse(StatusCode::UNAUTHORIZED, "invalid_signature");
    }
    let body = match body_bytes(&gw, body).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if !signed(&a.secret, ts, &body, signature) {
        gw.count_slack("bad_signature");
        return refuse(StatusCode::UNAUTHORIZED, "invalid_signature");
    }
    let mut m = match parse_event(&body, account) {
        Ok(SlackEvent::Challenge(c)) => return Json(json!({"challenge": c})).into_response(),
        Ok(SlackEvent::Message(m)) => *m,
        Ok(SlackEvent::Other) => return StatusCode::OK.into_response(), // nothing for the suite
        Err(why) => {
            // Slack's `event_id`, when that much can be read, names the dead letter.
            #[derive(serde::Deserialize)]
            struct IdOnly {
                event_id: String,
            }
            let id = serde_json::from_slice::<IdOnly>(&body)
                .ok()
                .map(|i| i.event_id);
            return if park(&gw, account, id, &body, &why).await {
                StatusCode::OK.into_response()
            } else {
                refuse(StatusCode::SERVICE_UNAVAILABLE, "try_again")
            };
        }
    };
    m.stream = a.stream;
    let env = Envelope::new(
        format!("slack:{account}:{}", m.message_id),
        clawbus_wire::now_ms(),
        m,
    );
    match crate::api::publish(&gw, env).await {
        Ok(()) => {
            gw.count_slack("published");
            StatusCode::OK.into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// What a signed Events API body (or a Socket Mode `events_api` payload) holds.
#[derive(Debug, PartialEq)]
pub enum SlackEvent {
    /// The `url_verification` handshake: answer with this.
    Challenge(String),
    /// A person's message for the suite.
    Message(Box<InboundMessage>),
    /// Nothing for the suite (bots, edits, joins, other event types).
    Other,
}

/// Reads the raw bytes of an Events API body (the handler's only reading of it);
/// `Err` (why) for one that cannot be read.
pub fn parse_event(raw: &[u8], account: &str) -> Result<SlackEvent, String> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| format!("not JSON: {e}"))?;
    read_event(&v, account)
}

/// Reads an Events API body or a Socket Mode payload already parsed as JSON.
pub fn read_event(v: &Value, account: &str) -> Result<SlackEvent, String> {
    if !v.is_object() {
        return Err("not an object".into());
    }
    match opt_str(v, "type")? {
        Some("url_verification") => {
            let c = opt_str(v, "challenge")?.ok_or("a handshake without its challenge")?;
            Ok(SlackEvent::Challenge(c.to_owned()))
        }
        Some("event_callback") => {
            Ok(to_inbound(v, account)?
                .map_or(SlackEvent::Other, |m| SlackEvent::Message(Box::new(m))))
        }
        _ => Ok(SlackEvent::Other),
    }
}

/// A string field: absent (or null) is `None`, another type is unreadable.
fn opt_str<'a>(v: &'a Value, field: &str) -> Result<Option<&'a str>, String> {
    match &v[field] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(format!("`{field}` is not text")),
    }
}

/// The inbound message of an `event_callback`, `Ok(None)` for what is no person's
/// message (bots, edits, joins, other event types), `Err` (why) for an event that
/// cannot be read: no event, fields of the wrong type, a channel or timestamp unlike
/// any of Slack's (they name the message on the bus).
fn to_inbound(v: &Value, account: &str) -> Result<Option<InboundMessage>, String> {
    let ev = &v["event"];
    if !ev.is_object() {
        return Err("an event callback without its event".into());
    }
    let Some(kind) = opt_str(ev, "type")? else {
        return Err("an event without its type".into());
    };
    if !matches!(kind, "message" | "app_mention")
        || ev.get("subtype").is_some_and(|s| !s.is_null())
        || ev.get("bot_id").is_some_and(|b| !b.is_null())
    {
        return Ok(None);
    }
    let (user, text, channel, ts) = (
        opt_str(ev, "user")?,
        opt_str(ev, "text")?,
        opt_str(ev, "channel")?,
        opt_str(ev, "ts")?,
    );
    let (Some(user), Some(text), Some(channel), Some(ts)) = (user, text, channel, ts) else {
        return Ok(None);
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    if !clawbus_bus::subjects::is_token(channel) {
        return Err("a channel id unlike Slack's".into());
    }
    if ts.is_empty() || ts.len() > 32 || !ts.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("a message timestamp unlike Slack's".into());
    }
    if user.is_empty() || user.len() > 64 || user.chars().any(char::is_control) {
        return Err("a user id unlike Slack's".into());
    }
    let thread = match opt_str(ev, "thread_ts")? {
        // A reply in a thread belongs to the thread of its parent.
        Some(t) if t != ts => {
            if t.len() > 32 || !t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
                return Err("a thread timestamp unlike Slack's".into());
            }
            Some(t.to_owned())
        }
        _ => None,
    };
    let bot = v["authorizations"][0]["user_id"].as_str().unwrap_or("");
    let mention = !bot.is_empty() && text.contains(&format!("<@{bot}>"));
    let direct = ev["channel_type"] == "im";
    Ok(Some(InboundMessage {
        channel: "slack".into(),
        account: account.into(),
        message_id: format!("{channel}:{ts}"),
        chat: ChatRef {
            id: channel.to_owned(),
            kind: if direct {
                ChatKind::Direct
            } else {
                ChatKind::Group
            },
            team_id: opt_str(v, "team_id")?.map(str::to_owned),
            ..Default::default()
        },
        sender: Sender {
            id: user.to_owned(),
            display_name: None,
            is_bot: false,
        },
        thread_id: thread,
        text: if mention {
            text.replace(&format!("<@{bot}>"), "").trim().to_owned()
        } else {
            text.to_owned()
        },
        mentions_bot: !direct && (kind == "app_mention" || mention),
        ..Default::default()
    }))
}

/// Parks a Slack event that cannot be read in the gateway's dead letters with its raw
/// bytes and counts it; false when JetStream did not take it within 10 s (Slack is
/// then asked to send it again).
pub(crate) async fn park(
    gw: &Gateway,
    account: &str,
    id: Option<String>,
    raw: &[u8],
    why: &str,
) -> bool {
    let ev = clawbus_bus::unreadable::Unreadable {
        channel: "slack",
        account,
        id,
        raw,
        reason: format!("not a readable Slack event: {why}"),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let parked = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        clawbus_bus::unreadable::dead_letter(&gw.bus, "gateway", ev, &stop),
    )
    .await;
    let ok = matches!(parked, Ok(Ok(())));
    gw.count_slack(if ok {
        "unreadable"
    } else {
        "unreadable_not_parked"
    });
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slacks_documented_signature_example_verifies() {
        // From Slack's "Verifying requests from Slack" guide.
        let secret = "8f742231b10e8888abcd99yyyzzz85a5";
        let ts = "1531420618";
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let sig = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        assert!(signed(secret, ts, body, sig));
        assert!(!signed(secret, "1531420619", body, sig));
        assert!(!signed("other", ts, body, sig));
        assert!(!signed(secret, ts, body, "a2114d57"));
        assert!(well_formed(sig));
        for bad in [
            "",
            "v0=",
            "v0=a2114d57",
            &sig.to_uppercase(),
            &sig[3..],
            &format!("{sig}0"),
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn messages_mentions_threads_and_what_is_skipped() {
        let v = json!({"type": "event_callback", "team_id": "T1", "authorizations": [{"user_id": "UBOT"}],
            "event": {"type": "app_mention", "user": "UADA", "text": "<@UBOT> lunch?", "channel": "C1",
                "channel_type": "channel", "ts": "1700.0002", "thread_ts": "1700.0001"}});
        let m = to_inbound(&v, "default").unwrap().unwrap();
        assert_eq!((m.text.as_str(), m.mentions_bot), ("lunch?", true));
        assert_eq!(
            (m.message_id.as_str(), m.thread_id.as_deref()),
            ("C1:1700.0002", Some("1700.0001"))
        );
        assert_eq!(m.chat.team_id.as_deref(), Some("T1"));
        let dm = json!({"type": "event_callback", "event": {"type": "message", "user": "UADA",
            "text": "hi", "channel": "D1", "channel_type": "im", "ts": "1.2"}});
        let m = to_inbound(&dm, "default").unwrap().unwrap();
        assert_eq!(m.chat.kind, ChatKind::Direct);
        assert!(!m.mentions_bot);
        for skip in [
            json!({"event": {"type": "message", "subtype": "message_changed", "user": "U", "text": "x", "channel": "C", "ts": "1"}}),
            json!({"event": {"type": "message", "bot_id": "B1", "user": "U", "text": "x", "channel": "C", "ts": "1"}}),
            json!({"event": {"type": "reaction_added", "user": "U", "channel": "C", "ts": "1"}}),
            json!({"event": {"type": "message", "user": "U", "text": " ", "channel": "C", "ts": "1"}}),
            json!({"event": {"type": "message", "user": "U", "channel": "C", "ts": "1"}}),
        ] {
            assert_eq!(to_inbound(&skip, "default"), Ok(None), "{skip}");
        }
    }

    #[test]
    fn events_that_cannot_be_read_say_why() {
        let ev = |e: Value| json!({"type": "event_callback", "event": e});
        for bad in [
            json!([1]),
            json!({"type": 5}),
            json!({"type": "url_verification"}),
            json!({"type": "event_callback"}),
            ev(json!("message")),
            ev(json!({"type": 1})),
            ev(json!({"type": "message", "user": "U", "text": 5, "channel": "C", "ts": "1"})),
            ev(json!({"type": "message", "user": "U", "text": "x", "channel": "C.>", "ts": "1"})),
            ev(json!({"type": "message", "user": "U", "text": "x", "channel": "C", "ts": "1\n"})),
            ev(
                json!({"type": "message", "user": "U", "text": "x", "channel": "C", "ts": "1", "thread_ts": 2}),
            ),
        ] {
            assert!(read_event(&bad, "default").is_err(), "{bad}");
        }
        assert!(parse_event(
            br#"{"type":"event_callback","event":{"text":"\ud800"}}"#,
            "a"
        )
        .is_err());
        assert!(parse_event(b"{\"type\":\"x\xff\"}", "a").is_err());
        assert_eq!(
            parse_event(br#"{"type":"url_verification","challenge":"c"}"#, "a"),
            Ok(SlackEvent::Challenge("c".into()))
        );
        assert_eq!(
            parse_event(br#"{"type":"app_rate_limited"}"#, "a"),
            Ok(SlackEvent::Other)
        );
    }
}
