//! Model providers. Today: any OpenAI-compatible Chat Completions endpoint.

pub mod openai;
mod sse;

use clawbus_wire::{ErrorInfo, Usage};

/// The result of one model call.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub usage: Option<Usage>,
    pub model: String,
    /// The provider's reason for ending the answer, as it sent it.
    pub finish_reason: Option<String>,
}

/// Why a model call failed, and whether trying again may help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error(
        "no model provider is configured. Set OPENAI_BASE_URL (e.g. https://api.openai.com/v1) and \
         OPENAI_API_KEY, or [agent.provider] base_url/api_key in clawbus.toml, then restart the agent"
    )]
    NotConfigured,
    #[error("provider answered HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("provider unreachable: {0}")]
    Network(String),
    #[error("provider sent an invalid response: {0}")]
    Protocol(String),
}

impl ProviderError {
    /// Rate limits, server errors and network failures are worth retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => matches!(status, 408 | 409 | 429 | 500..=599),
            ProviderError::Network(_) => true,
            ProviderError::NotConfigured | ProviderError::Protocol(_) => false,
        }
    }

    pub fn info(&self) -> ErrorInfo {
        let code = match self {
            ProviderError::NotConfigured => "provider_not_configured",
            ProviderError::Status {
                status: 401 | 403, ..
            } => "provider_auth_failed",
            ProviderError::Status { status: 429, .. } => "provider_rate_limited",
            ProviderError::Status { .. } => "provider_error",
            ProviderError::Network(_) => "provider_unreachable",
            ProviderError::Protocol(_) => "provider_protocol_error",
        };
        ErrorInfo {
            code: code.into(),
            message: self.to_string(),
        }
    }
}
