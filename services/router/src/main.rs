//! clawbus-router: inbound messages → turn requests, per session in order.

use clawbus_bus::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = service::start(clawbus_config::Service::Router, &["consumer"]).await?;
    let result = clawbus_router::serve(&base).await;
    base.drain().await;
    result
}
