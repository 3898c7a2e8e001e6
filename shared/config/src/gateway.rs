//! `[gateway]` (the HTTP API) and `[hooks]` (its webhook entry point).

use secrecy::SecretString;
use serde::Deserialize;

use crate::check::{positive, socket_addr, token};
use crate::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub bind: String,
    /// This gateway's account (`claw.v1.in.http.<account>`); several gateway processes
    /// side by side each need their own, so each receives only its own replies.
    pub account: String,
    /// Bearer token; when unset, read from or generated into `<state_dir>/gateway.token`.
    pub token: Option<SecretString>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long a chat completion waits for its reply before answering 504.
    pub request_timeout_secs: u64,
    /// Most requests waiting for a reply at once; beyond it the gateway answers 429.
    pub max_in_flight: usize,
}

/// `[hooks]`: the gateway's webhooks (`POST <path>/agent`, `POST <path>/wake`), with a
/// token of their own (`CLAWBUS_HOOKS_TOKEN`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksConfig {
    pub enabled: bool,
    pub token: Option<SecretString>,
    pub path: String,
    /// Agents a hook may name (`agentId`); unset: any; `*` in it: any.
    #[serde(alias = "allowedAgentIds")]
    pub allowed_agent_ids: Option<Vec<String>>,
    /// A hook may choose its session (`sessionKey`); otherwise each run has its own.
    #[serde(alias = "allowRequestSessionKey")]
    pub allow_request_session_key: bool,
}

impl Default for HooksConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            token: None,
            path: "/hooks".into(),
            allowed_agent_ids: None,
            allow_request_session_key: false,
        }
    }
}

impl HooksConfig {
    /// The hooks' token: `[hooks] token`, else `CLAWBUS_HOOKS_TOKEN`.
    pub fn token(&self) -> Option<String> {
        use secrecy::ExposeSecret;
        self.token
            .as_ref()
            .map(|t| t.expose_secret().trim().to_owned())
            .or_else(|| std::env::var("CLAWBUS_HOOKS_TOKEN").ok())
            .filter(|t| !t.is_empty())
    }

    /// Whether a hook may name `agent`.
    pub fn allows_agent(&self, agent: &str) -> bool {
        self.allowed_agent_ids
            .as_ref()
            .is_none_or(|l| l.iter().any(|a| a == "*" || a == agent))
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.into(),
        };
        if !self.path.starts_with('/') || self.path.len() < 2 || self.path.ends_with('/') {
            return Err(invalid("hooks.path", "must look like /hooks"));
        }
        if self.enabled {
            match self.token() {
                None => {
                    return Err(invalid(
                        "hooks.token",
                        "hooks are enabled: set hooks.token or CLAWBUS_HOOKS_TOKEN",
                    ))
                }
                Some(t) => crate::token::check_secret("hooks.token", &t)?,
            }
        }
        Ok(())
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:18789".into(),
            account: "default".into(),
            token: None,
            max_body_bytes: 1024 * 1024,
            request_timeout_secs: 300,
            max_in_flight: 4096,
        }
    }
}

impl GatewayConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        socket_addr("gateway.bind", &self.bind)?;
        positive("gateway.max_body_bytes", self.max_body_bytes as u64)?;
        positive("gateway.request_timeout_secs", self.request_timeout_secs)?;
        positive("gateway.max_in_flight", self.max_in_flight as u64)?;
        token("gateway.account", &self.account)
    }
}
