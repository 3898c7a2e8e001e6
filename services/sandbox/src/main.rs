//! clawbus-sandbox: runs the tools agents call.

use clawbus_bus::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = service::start(clawbus_config::Service::Sandbox, &["registry", "calls"]).await?;
    let result = clawbus_sandbox::serve(&base).await;
    base.drain().await;
    result
}
