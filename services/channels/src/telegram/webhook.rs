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
    let update: Update = match serde_json::from_slice(&body) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "Webhook body is not a Telegram update");
            return StatusCode::BAD_REQUEST;
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
    fn secrets_compare_whole() {
        assert!(super::same_secret(b"abc", b"abc"));
        assert!(!super::same_secret(b"abd", b"abc"));
        assert!(!super::same_secret(b"ab", b"abc"));
        assert!(!super::same_secret(b"", b"abc"));
    }
}
