//! clawbus-agent: runs turns against the configured model provider.

use clawbus_bus::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = service::start(clawbus_config::Service::Agent, &["consumer"]).await?;
    let result = clawbus_agent::serve(&base).await;
    base.drain().await;
    result
}
