//! Slack's Socket Mode on the gateway, for workspaces that cannot reach it over HTTP:
//! with an app-level token (`[channels.slack] app_token = "xapp-…"`) the gateway asks
//! `apps.connections.open` for a WebSocket URL, connects, and takes each envelope
//! (`events_api` with the same event payloads as the Events API) as an inbound message,
//! acknowledging it (`{"envelope_id": …}`) only once JetStream has it: an envelope not
//! acknowledged is sent again by Slack. A `disconnect` message, a lost connection or
//! an error reconnects with backoff (1 s doubling to 60 s). An envelope whose event
//! cannot be read is parked in the dead letters with its raw text, then acknowledged.

use std::sync::Arc;
use std::time::Duration;

use clawbus_wire::Envelope;
use futures::{SinkExt, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_util::sync::CancellationToken;

use crate::api::Gateway;
use crate::slack::SlackEvent;

/// What one Socket Mode frame asks of the gateway.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// The connection is ready.
    Hello,
    /// Slack asks for a new connection.
    Disconnect,
    /// An envelope to acknowledge once handled, and its event read (an `events_api`
    /// payload; other envelope types read as [`SlackEvent::Other`]).
    Envelope {
        id: String,
        event: Result<SlackEvent, String>,
    },
    /// A frame that cannot be read, with its envelope id when that much can be.
    Unreadable { id: Option<String>, why: String },
    /// Nothing to do.
    Other,
}

/// Reads one text frame of the connection (the session's only reading of it).
pub fn read_frame(text: &str, account: &str) -> Frame {
    let v = match serde_json::from_str::<Value>(text) {
        Ok(v) => v,
        Err(e) => {
            // Skipping a value does not check its strings: the id of a frame holding a
            // lone surrogate escape is still found.
            #[derive(serde::Deserialize)]
            struct IdOnly {
                envelope_id: String,
            }
            let id = serde_json::from_str::<IdOnly>(text)
                .ok()
                .map(|i| i.envelope_id);
            return Frame::Unreadable {
                id,
                why: format!("not JSON: {e}"),
            };
        }
    };
    match v["type"].as_str() {
        Some("hello") => return Frame::Hello,
        Some("disconnect") => return Frame::Disconnect,
        _ => {}
    }
    let Some(id) = v["envelope_id"].as_str() else {
        return Frame::Other;
    };
    let event = if v["type"] == "events_api" {
        crate::slack::read_event(&v["payload"], account)
    } else {
        Ok(SlackEvent::Other)
    };
    Frame::Envelope {
        id: id.to_owned(),
        event,
    }
}

/// A Slack account the gateway holds a Socket Mode connection for.
pub struct SocketAccount {
    pub account: String,
    pub app_token: SecretString,
    pub api_root: String,
    /// Ask the agent for live deltas (drafts, `stream_mode = "partial"`).
    pub stream: bool,
}

/// The accounts of `cfg` with an app-level token.
pub fn accounts(cfg: &clawbus_config::Config) -> Vec<SocketAccount> {
    cfg.channel_accounts()
        .into_iter()
        .filter(|a| a.channel == "slack")
        .filter_map(|a| {
            Some(SocketAccount {
                stream: a.settings.stream,
                app_token: a.app_token?,
                account: a.account,
                api_root: a.api_root,
            })
        })
        .collect()
}

/// Holds the connection of `a` until `stop`.
pub async fn run(gw: Arc<Gateway>, a: SocketAccount, stop: CancellationToken) {
    let http = reqwest::Client::new();
    let mut wait = Duration::from_secs(1);
    while !stop.is_cancelled() {
        match session(&gw, &a, &http, &stop).await {
            Ok(()) => wait = Duration::from_secs(1),
            Err(e) => {
                gw.count_slack("socket_error");
                tracing::warn!(account = %a.account, error = %e, "Slack Socket Mode connection failed; reconnecting");
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
        if clawbus_bus::consumer::sleep_or_cancel(wait, &stop).await {
            return;
        }
    }
}

/// One connection: open, take envelopes until Slack asks to reconnect (`Ok`) or the
/// connection fails (`Err`).
async fn session(
    gw: &Arc<Gateway>,
    a: &SocketAccount,
    http: &reqwest::Client,
    stop: &CancellationToken,
) -> Result<(), String> {
    let v: Value = http
        .post(format!(
            "{}/apps.connections.open",
            a.api_root.trim_end_matches('/')
        ))
        .bearer_auth(a.app_token.expose_secret())
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .map_err(|e| format!("apps.connections.open: {}", e.without_url()))?
        .json()
        .await
        .map_err(|e| format!("apps.connections.open: {e}"))?;
    let url = match (v["ok"].as_bool(), v["url"].as_str()) {
        (Some(true), Some(u)) => u.to_owned(),
        _ => {
            return Err(format!(
                "apps.connections.open: {}",
                v["error"].as_str().unwrap_or("no url")
            ))
        }
    };
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(&url),
    )
    .await
    .map_err(|_| "connecting timed out".to_owned())?
    .map_err(|e| format!("connecting: {e}"))?;
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = stop.cancelled() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
        };
        let text = match msg {
            Some(Ok(Ws::Text(t))) => t.to_string(),
            Some(Ok(Ws::Ping(p))) => {
                let _ = ws.send(Ws::Pong(p)).await;
                continue;
            }
            Some(Ok(Ws::Close(_))) | None => return Err("Slack closed the connection".into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
        };
        let envelope_id = match read_frame(&text, &a.account) {
            Frame::Hello => {
                tracing::info!(account = %a.account, "Slack Socket Mode connected");
                continue;
            }
            Frame::Disconnect => return Ok(()),
            Frame::Other => continue,
            Frame::Envelope { id, event } => {
                match event {
                    Ok(SlackEvent::Message(mut m)) => {
                        m.stream = a.stream;
                        let env = Envelope::new(
                            format!("slack:{}:{}", a.account, m.message_id),
                            clawbus_wire::now_ms(),
                            *m,
                        );
                        // Not acknowledged when the bus cannot take it: Slack sends it again.
                        if crate::api::publish(gw, env).await.is_err() {
                            continue;
                        }
                        gw.count_slack("published");
                    }
                    Ok(_) => {}
                    Err(why) => {
                        if !crate::slack::park(
                            gw,
                            &a.account,
                            Some(id.clone()),
                            text.as_bytes(),
                            &why,
                        )
                        .await
                        {
                            continue; // not acknowledged: Slack sends it again
                        }
                    }
                }
                id
            }
            Frame::Unreadable { id, why } => {
                let parked =
                    crate::slack::park(gw, &a.account, id.clone(), text.as_bytes(), &why).await;
                match id {
                    Some(id) if parked => id,
                    _ => continue,
                }
            }
        };
        let ack = json!({ "envelope_id": envelope_id }).to_string();
        ws.send(Ws::text(ack))
            .await
            .map_err(|e| format!("acknowledging: {e}"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_read_and_unreadable_ones_keep_their_envelope_id() {
        assert_eq!(read_frame(r#"{"type":"hello"}"#, "a"), Frame::Hello);
        assert_eq!(
            read_frame(r#"{"type":"disconnect"}"#, "a"),
            Frame::Disconnect
        );
        assert_eq!(read_frame(r#"{"type":"events_api"}"#, "a"), Frame::Other);
        let lone =
            r#"{"envelope_id":"e1","type":"events_api","payload":{"event":{"text":"\ud800"}}}"#;
        assert!(
            matches!(read_frame(lone, "a"), Frame::Unreadable { id: Some(i), .. } if i == "e1")
        );
        assert!(matches!(
            read_frame("nope", "a"),
            Frame::Unreadable { id: None, .. }
        ));
        let odd = r#"{"envelope_id":"e2","type":"events_api","payload":{"type":"event_callback","event":{"type":"message","user":"U","text":7,"channel":"C","ts":"1"}}}"#;
        assert!(
            matches!(read_frame(odd, "a"), Frame::Envelope { id, event: Err(_) } if id == "e2")
        );
        let slash = r#"{"envelope_id":"e3","type":"slash_commands","payload":{}}"#;
        assert_eq!(
            read_frame(slash, "a"),
            Frame::Envelope {
                id: "e3".into(),
                event: Ok(SlackEvent::Other)
            }
        );
    }
}
