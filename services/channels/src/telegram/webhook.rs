//! Telegram updates by webhook: Telegram POSTs each update as JSON to the configured
//! URL with the header `X-Telegram-Bot-Api-Secret-Token`; the listener (run by the
//! account's holder, behind the reverse proxy that terminates TLS) checks the secret,
//! publishes the update's message and answers 200 only once JetStream has it. Any other
//! answer makes Telegram deliver the update again; the deterministic inbound id makes
//! the copy harmless.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use clawbus_config::WebhookSpec;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::api::Update;
use super::inbound::{self, Me};
use crate::metrics::ChannelMetrics;
use crate::typing::Typing;

/// Updates are small; Telegram's own limit on a message is 4096 characters.
const MAX_BODY: usize = 1024 * 1024;

pub(super) struct Hook {
    pub bus: clawbus_bus::Bus,
    pub me: Me,
    pub account: String,
    pub secret: String,
    pub metrics: ChannelMetrics,
    pub typing: Typing,
    pub stop: CancellationToken,
    /// Ask the agent for live deltas (drafts).
    pub stream: bool,
}

/// True when `given` equals `want`, comparing every byte whatever the first
/// difference (no timing hint about the secret).
fn same_secret(given: &[u8], want: &[u8]) -> bool {
    if given.len() != want.len() {
        return false;
    }
    given
        .iter()
        .zip(want)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

async fn receive(
    State(h): State<Arc<Hook>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let given = headers
        .get("x-telegram-bot-api-secret-token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !same_secret(given, h.secret.as_bytes()) {
        h.metrics
            .errors
            .with_label_values(&["telegram", h.account.as_str(), "webhook_secret"])
            .inc();
        return StatusCode::UNAUTHORIZED;
    }
    let update: Update = match read_update(&body) {
        Ok(u) => u,
        Err((id, error)) => {
            // Answered 200 once parked: an error answer would have Telegram send the
            // same update again and again, holding back the ones after it.
            let ev = crate::unreadable::Unreadable {
                channel: "telegram",
                account: &h.account,
                id: id.map(|i| i.to_string()),
                raw: &body,
                reason: format!("not a readable Telegram update: {error}"),
            };
            return match crate::unreadable::dead_letter(&h.bus, &h.metrics, ev, &h.stop).await {
                Ok(()) => StatusCode::OK,
                Err(()) => StatusCode::SERVICE_UNAVAILABLE,
            };
        }
    };
    let Some(mut m) = inbound::to_inbound(&update, &h.account, &h.me) else {
        return StatusCode::OK; // nothing for the suite: confirmed
    };
    m.stream = h.stream;
    match crate::receive(&h.bus, &h.metrics, &h.typing, m, &h.stop).await {
        Ok(()) => StatusCode::OK,
        // Stopping: Telegram sends it again, to whoever holds the account next.
        Err(()) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The update a webhook call carries, or its `update_id` (if readable) and why not.
fn read_update(body: &[u8]) -> Result<Update, (Option<i64>, String)> {
    let raw: Box<serde_json::value::RawValue> =
        serde_json::from_slice(body).map_err(|e| (None, e.to_string()))?;
    super::api::decode_update(&raw).map_err(|e| (e.update_id, e.error))
}

/// Serves the webhook until `stop`.
pub(super) async fn serve(spec: WebhookSpec, hook: Hook) -> Result<(), String> {
    let stop = hook.stop.clone();
    let app = Router::new()
        .route(&spec.path, post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(hook));
    let listener = tokio::net::TcpListener::bind(&spec.listen)
        .await
        .map_err(|e| format!("webhook listener on {}: {e}", spec.listen))?;
    tracing::info!(addr = %spec.listen, path = %spec.path, "Telegram webhook listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(|e| e.to_string())
}

/// The secret as configured.
pub(super) fn secret(spec: &WebhookSpec) -> String {
    spec.secret.expose_secret().to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn unreadable_bodies_keep_their_update_id_when_they_can() {
        let bad = br#"{"update_id":12,"message":{"message_id":1,"chat":{"id":1,"type":"private"},"text":"\udc00"}}"#;
        assert_eq!(super::read_update(bad).unwrap_err().0, Some(12));
        assert_eq!(super::read_update(b"\xff\xfe").unwrap_err().0, None);
        assert!(super::read_update(br#"{"update_id":13}"#).is_ok());
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(super::same_secret(b"abc", b"abc"));
        assert!(!super::same_secret(b"abd", b"abc"));
        assert!(!super::same_secret(b"ab", b"abc"));
        assert!(!super::same_secret(b"", b"abc"));
    }
}
