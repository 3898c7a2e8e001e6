//! `[store]`: the database.

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://<path>` or `postgres://…` (also `DATABASE_URL`); default
    /// `sqlite://<state_dir>/clawbus.db`.
    pub database_url: Option<String>,
}

impl StoreConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(u) = self
            .database_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        {
            let known = ["sqlite:", "postgres://", "postgresql://"];
            if !known.iter().any(|k| u.starts_with(k)) {
                return Err(ConfigError::Invalid {
                    field: "store.database_url",
                    reason: "use sqlite://<path> or postgres://user@host/db (DATABASE_URL)".into(),
                });
            }
        }
        Ok(())
    }
}
