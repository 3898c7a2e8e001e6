//! `[admin]` (each service's `/livez`, `/readyz` and `/metrics` listener) and `[log]`.

use serde::Deserialize;

use crate::check::socket_addr;
use crate::ConfigError;

/// Admin listeners (`/livez`, `/readyz`, `/metrics`), one per service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub gateway: String,
    pub router: String,
    pub agent: String,
    pub store: String,
    pub sandbox: String,
    pub channels: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            gateway: "127.0.0.1:18790".into(),
            router: "127.0.0.1:18791".into(),
            agent: "127.0.0.1:18792".into(),
            store: "127.0.0.1:18793".into(),
            sandbox: "127.0.0.1:18794".into(),
            channels: "127.0.0.1:18795".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `clawbus_agent=debug,info`.
    pub level: String,
    /// `json` (default) or `pretty`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "json".into(),
        }
    }
}

impl AdminConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        socket_addr("admin.gateway", &self.gateway)?;
        socket_addr("admin.router", &self.router)?;
        socket_addr("admin.agent", &self.agent)?;
        socket_addr("admin.store", &self.store)?;
        socket_addr("admin.sandbox", &self.sandbox)?;
        socket_addr("admin.channels", &self.channels)
    }
}

impl LogConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if !matches!(self.format.as_str(), "json" | "pretty") {
            return Err(ConfigError::Invalid {
                field: "log.format",
                reason: "`json` or `pretty`".into(),
            });
        }
        Ok(())
    }
}
