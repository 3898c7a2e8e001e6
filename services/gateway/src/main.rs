//! clawbus-gateway: the OpenAI-compatible HTTP API.

use clawbus_bus::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = service::start(clawbus_config::Service::Gateway, &["replies", "http"]).await?;
    let token = clawbus_config::ensure_gateway_token(&base.cfg)?;
    if token.generated {
        eprintln!(
            "clawbus gateway token (stored in {}): {}",
            base.cfg.state_dir().join("gateway.token").display(),
            token.token
        );
    }
    let result = clawbus_gateway::serve(&base, token.token).await;
    base.drain().await;
    result
}
