//! clawbus-store: persists transcripts, runs and usage; answers history queries.

use std::sync::Arc;

use clawbus_bus::service;
use clawbus_store::{serve, Database, StoreService};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let base = service::start(clawbus_config::Service::Store, &["database", "consumer"]).await?;
    let url = base.cfg.database_url();
    if let Some(dir) = url
        .strip_prefix("sqlite://")
        .and_then(|p| std::path::Path::new(p).parent())
    {
        std::fs::create_dir_all(dir)?;
    }
    let store = Database::open(&url).await?;
    tracing::info!(backend = store.backend(), "Database open");
    let result = serve(&base, Arc::new(StoreService::new(store))).await;
    base.drain().await;
    result
}
