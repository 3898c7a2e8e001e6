//! clawbus-router: inbound messages → turn requests, per session in order.

use clawbus_bus::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = service::start("router", |c| c.admin.router.as_str(), &["consumer"]).await?;
    let result = clawbus_router::serve(&base).await;
    base.drain().await;
    result
}
