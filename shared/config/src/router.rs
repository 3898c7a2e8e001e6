//! `[router]`: which agents exist and how much the router does at once.

use serde::Deserialize;

use crate::check::{positive, token};
use crate::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// Agent used when a message names none.
    pub default_agent: String,
    /// Agents that exist; messages naming another are refused.
    pub agents: Vec<String>,
    /// Inbound messages handled at once (sessions run in parallel, each in order).
    pub concurrency: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            default_agent: "main".into(),
            agents: vec!["main".into()],
            concurrency: 256,
        }
    }
}

impl RouterConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        positive("router.concurrency", self.concurrency as u64)?;
        token("router.default_agent", &self.default_agent)?;
        if let Some(a) = self.agents.iter().find(|a| !crate::is_token(a)) {
            return Err(ConfigError::Invalid {
                field: "router.agents",
                reason: format!("`{a}` is not a valid agent id"),
            });
        }
        if !self.agents.contains(&self.default_agent) {
            return Err(ConfigError::Invalid {
                field: "router.default_agent",
                reason: format!("`{}` is not in router.agents", self.default_agent),
            });
        }
        Ok(())
    }
}
