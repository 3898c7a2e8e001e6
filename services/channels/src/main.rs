//! clawbus-channels: chat platform adapters (Telegram, ...).

use clawbus_bus::service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = service::start(clawbus_config::Service::Channels, &["accounts"]).await?;
    let result = clawbus_channels::serve(&base).await;
    base.drain().await;
    result
}
