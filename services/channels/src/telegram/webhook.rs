//! Telegram updates by webhook: Telegram POSTs each update as JSON to the configured
//! URL with the header `X-Telegram-Bot-Api-Secret-Token`; the listener (run by the
//! account's holder, behind the reverse proxy that terminates TLS) checks the secret,
//! publishes the update's message and answers 200 only once JetStream has it. Any other
//! answer makes Telegram deliver the update again; the deterministic inbound id makes
//! the copy harmless.
//!
//! The secret is checked from the headers before a byte of the body is read; the body
//! then has a size limit (refused at once when its `Content-Length` says more) and
//! the listener's body timeout. The listener is the suite's shared HTTP server
//! (header, body and idle timeouts; a cap on connections).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use clawbus_config::WebhookSpec;
use clawbus_telemetry::http::{read_body, BodyError, HttpLimits};
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

async fn receive(
    State(h): State<Arc<Hook>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> StatusCode {
    let given = headers
        .get("x-telegram-bot-api-secret-token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !clawbus_config::secret_matches(given, h.secret.as_bytes()) {
        h.metrics
            .errors
            .with_label_values(&["telegram", h.account.as_str(), "webhook_secret"])
            .inc();
        return StatusCode::UNAUTHORIZED;
    }
    let body = match read_body(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "Webhook body refused");
            return match e {
                BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
                BodyError::Malformed(_) => StatusCode::BAD_REQUEST,
            };
        }
    };
    let update: Update = match super::api::read_update(&body) {
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

/// Serves the webhook within `limits` until `stop`.
pub(super) async fn serve(spec: WebhookSpec, hook: Hook, limits: HttpLimits) -> Result<(), String> {
    let stop = hook.stop.clone();
    let name = format!("telegram_webhook:{}", hook.account);
    let app = Router::new()
        .route(&spec.path, post(receive))
        .with_state(Arc::new(hook));
    let listener = tokio::net::TcpListener::bind(&spec.listen)
        .await
        .map_err(|e| format!("webhook listener on {}: {e}", spec.listen))?;
    tracing::info!(addr = %spec.listen, path = %spec.path, "Telegram webhook listening");
    clawbus_telemetry::http::serve(listener, name, app, limits, stop).await;
    Ok(())
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
        assert_eq!(super::super::api::read_update(bad).unwrap_err().0, Some(12));
        assert_eq!(
            super::super::api::read_update(b"\xff\xfe").unwrap_err().0,
            None
        );
        assert!(super::super::api::read_update(br#"{"update_id":13}"#).is_ok());
    }
}
