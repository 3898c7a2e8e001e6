//! The gateway WebSocket of one account: Hello, Identify (or Resume), heartbeats,
//! dispatches; reconnecting with backoff, resuming when the session allows.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use clawbus_bus::ownership::Fence;
use secrecy::ExposeSecret;

use super::inbound::{to_inbound, Threads};
use super::{Discord, FATAL, INTENTS};
use crate::typing::Typing;

pub(super) struct GwCtx {
    pub bus: clawbus_bus::Bus,
    pub platform: Arc<Discord>,
    pub account: String,
    pub metrics: crate::metrics::ChannelMetrics,
    pub typing: Typing,
    pub fence: Fence,
    /// Ask the agent for live deltas (drafts).
    pub stream: bool,
}

/// A gateway session that may be resumed.
#[derive(Default)]
struct Session {
    id: Option<String>,
    resume_url: Option<String>,
    seq: Option<u64>,
    me: String,
    threads: Threads,
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

pub(super) async fn gateway(c: GwCtx, stop: CancellationToken) {
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
                    c.metrics.identify_failed("discord", &c.account, &e);
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
        let v = match read_event(&text) {
            Ok(v) => v,
            Err((seq, e)) => {
                // Parked, and its sequence number kept, so a resume does not replay it.
                if let Some(n) = seq {
                    s.seq = Some(n);
                }
                let ev = crate::unreadable::Unreadable {
                    channel: "discord",
                    account: &c.account,
                    id: seq.map(|n| n.to_string()),
                    raw: text.as_bytes(),
                    reason: format!("not a readable Discord gateway event: {e}"),
                };
                if crate::unreadable::dead_letter(&c.bus, &c.metrics, ev, stop)
                    .await
                    .is_err()
                {
                    return End::Stop;
                }
                continue;
            }
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
                    if let Some(mut m) = to_inbound(&v["d"], &c.account, &s.me, &s.threads) {
                        m.stream = c.stream;
                        if crate::receive(&c.bus, &c.metrics, &c.typing, m, stop)
                            .await
                            .is_err()
                        {
                            return End::Stop;
                        }
                    }
                }
                Some(t) => s.threads.learn(t, &v["d"]),
                None => {}
            },
            _ => {}
        }
    }
}

/// Reads one gateway payload (the connection's only reading of one), or gives its
/// sequence number, when that much can be read, and why not.
pub fn read_event(text: &str) -> Result<Value, (Option<u64>, String)> {
    serde_json::from_str::<Value>(text).map_err(|e| (read_seq(text), e.to_string()))
}

/// The sequence number of a gateway event that cannot be read whole (skipping a value
/// does not check its strings).
fn read_seq(text: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct SeqOnly {
        s: Option<u64>,
    }
    serde_json::from_str::<SeqOnly>(text).ok()?.s
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unreadable_event_keeps_its_sequence_number() {
        let text = r#"{"op":0,"t":"MESSAGE_CREATE","s":42,"d":{"content":"\ud800"}}"#;
        assert!(serde_json::from_str::<serde_json::Value>(text).is_err());
        assert_eq!(super::read_seq(text), Some(42));
        assert_eq!(super::read_seq("not json"), None);
    }
}
