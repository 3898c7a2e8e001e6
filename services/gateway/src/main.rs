//! clawbus-gateway: the OpenAI-compatible HTTP API.

use clawbus_bus::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The token first: a gateway that would let in an empty bearer never starts, and
    // says so before it waits for NATS.
    let token = clawbus_config::ensure_gateway_token(&clawbus_config::Config::load()?)?;
    let base = service::start(clawbus_config::Service::Gateway, &["replies", "http"]).await?;
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
