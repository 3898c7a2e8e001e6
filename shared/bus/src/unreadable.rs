//! Platform events a service cannot read.
//!
//! Every service that takes a chat platform's events (the channels service's adapters,
//! the gateway's Slack Events API and Socket Mode) decodes them one at a time, so one
//! event it cannot read (a lone surrogate escape, a field of an unexpected type, bytes
//! that are not UTF-8, a line that is no IRC message) never fails the events around
//! it. Such an event is parked in the dead letters (`claw.v1.dlq.<service>` on stream
//! `CLAW_DLQ`) with its raw bytes as the platform sent them, and the service moves past
//! it: the bot keeps answering every other chat. The caller counts it.

use std::time::Duration;

use async_nats::HeaderMap;
use tokio_util::sync::CancellationToken;

/// Raw bytes kept of one event: far above any real event, below NATS's payload limit
/// (1 MiB by default), so an outsized event is still parked (cut, and said so).
pub const MAX_RAW: usize = 512 * 1024;
/// Header naming the platform's id of the event, when it could be read.
pub const EVENT_ID_HEADER: &str = "Clawbus-Dlq-Event-Id";
/// Header set when the raw bytes were cut to [`MAX_RAW`].
pub const TRUNCATED_HEADER: &str = "Clawbus-Dlq-Truncated";

/// One event that could not be read.
pub struct Unreadable<'a> {
    pub channel: &'a str,
    pub account: &'a str,
    /// The platform's id of the event (Telegram's `update_id`, a Matrix event id, a
    /// Discord sequence number), when it could be read; it names the dead letter, so
    /// the same event seen again is parked once.
    pub id: Option<String>,
    /// The event's bytes as the platform sent them.
    pub raw: &'a [u8],
    /// Why it could not be read.
    pub reason: String,
}

impl Unreadable<'_> {
    /// The dead letter's id (per `service`): the platform's event id, else a hash of
    /// its bytes.
    fn dedupe_id(&self, service: &str) -> String {
        let event = match &self.id {
            Some(id) if crate::subjects::is_token(id) => id.clone(),
            Some(id) => format!("h{:016x}", hash(id.as_bytes())),
            None => format!("h{:016x}", hash(self.raw)),
        };
        format!("dlq:{service}:{}:{}:{event}", self.channel, self.account)
    }

    fn headers(&self, service: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", self.dedupe_id(service).as_str());
        h.insert(
            crate::DLQ_REASON_HEADER,
            truncate(&self.reason, 1024).as_str(),
        );
        // Where it came from: a platform, not a bus subject (nothing to replay).
        h.insert(
            crate::DLQ_SUBJECT_HEADER,
            format!("platform.{}.{}", self.channel, self.account).as_str(),
        );
        if let Some(id) = &self.id {
            h.insert(EVENT_ID_HEADER, truncate(&printable(id), 256).as_str());
        }
        if self.raw.len() > MAX_RAW {
            h.insert(TRUNCATED_HEADER, self.raw.len().to_string().as_str());
        }
        h
    }
}

/// Parks `ev` in the dead letters of `service` (`claw.v1.dlq.<service>`), retrying
/// until JetStream has it; `Err` when `stop` came first (the caller must not move past
/// the event then, so a successor parks it). A service may park the same event again
/// (a crash between parking and moving past): its dead-letter id is the same, so
/// JetStream keeps one.
pub async fn dead_letter(
    bus: &crate::Bus,
    service: &str,
    ev: Unreadable<'_>,
    stop: &CancellationToken,
) -> Result<(), ()> {
    let (channel, account) = (ev.channel, ev.account);
    tracing::warn!(
        channel,
        account,
        event = ev.id.as_deref().map(printable).unwrap_or_default(),
        bytes = ev.raw.len(),
        reason = %ev.reason,
        "Unreadable platform event; dead-lettered and skipped"
    );
    let subject = format!("claw.v1.dlq.{service}");
    let headers = ev.headers(service);
    let payload = bytes::Bytes::copy_from_slice(&ev.raw[..ev.raw.len().min(MAX_RAW)]);
    let mut wait = Duration::from_millis(200);
    loop {
        let stored = match bus
            .js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(channel, account, error = %e, "Cannot dead-letter an unreadable event; retrying");
                if crate::consumer::sleep_or_cancel(wait, stop).await {
                    return Err(());
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn hash(b: &[u8]) -> u64 {
    // FNV-1a: a dedupe key, not a secret.
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100000001b3)
    })
}

/// `s` without control characters (it goes into a header and a log line).
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

fn truncate(s: &str, max: usize) -> String {
    let s = printable(s);
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev<'a>(id: Option<&str>, raw: &'a [u8]) -> Unreadable<'a> {
        Unreadable {
            channel: "telegram",
            account: "default",
            id: id.map(str::to_owned),
            raw,
            reason: "bad\r\nreason".into(),
        }
    }

    #[test]
    fn the_same_event_has_the_same_dead_letter_id() {
        assert_eq!(
            ev(Some("42"), b"x").dedupe_id("channels"),
            "dlq:channels:telegram:default:42"
        );
        let id = |raw: &[u8]| ev(None, raw).dedupe_id("channels");
        assert_eq!(id(b"abc"), id(b"abc"));
        assert_ne!(id(b"abc"), id(b"abd"));
        // An id that is not a subject token is hashed, never pasted into the header.
        let odd = ev(Some("$a b\n"), b"x").dedupe_id("channels");
        assert!(odd.starts_with("dlq:channels:telegram:default:h"), "{odd}");
    }

    #[test]
    fn headers_hold_no_control_characters() {
        let big = vec![b'x'; MAX_RAW + 1];
        let h = ev(Some("a\nb"), &big).headers("gateway");
        let reason = h.get(crate::DLQ_REASON_HEADER).unwrap().as_str();
        assert_eq!(reason, "badreason");
        assert_eq!(h.get(EVENT_ID_HEADER).unwrap().as_str(), "ab");
        assert!(h.get(TRUNCATED_HEADER).is_some());
    }
}
