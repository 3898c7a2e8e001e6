//! `[agent]`: the model and its providers, prices, tools, compaction and workspaces.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::check::positive;
use crate::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// The model, as `provider/model` (`openai/gpt-4o-mini`, `anthropic/claude-sonnet-4-5`,
    /// `gemini/gemini-2.5-flash`) or a bare name for the OpenAI-compatible endpoint
    /// (`CLAWBUS_MODEL`).
    pub model: String,
    /// The OpenAI-compatible endpoint (`OPENAI_BASE_URL`, `OPENAI_API_KEY`) and the
    /// timeout and retries of every provider's calls.
    pub provider: ProviderConfig,
    /// Anthropic Messages API (`ANTHROPIC_BASE_URL`, `ANTHROPIC_API_KEY`).
    pub anthropic: ApiEndpoint,
    /// Google Gemini API (`GEMINI_BASE_URL`, `GEMINI_API_KEY`).
    pub gemini: ApiEndpoint,
    /// Models tried in order when every key of the model fails
    /// (`CLAWBUS_FALLBACK_MODELS=anthropic/...,gemini/...`).
    pub fallback_models: Vec<String>,
    /// The longest a turn may spend calling models, fallbacks included.
    pub turn_timeout_secs: u64,
    /// What is known of each model (`[agent.models."anthropic/claude-sonnet-4-5"]`):
    /// prices and the most tokens an answer may have.
    pub models: std::collections::BTreeMap<String, ModelSpec>,
    /// Turns run at once (each session one at a time).
    pub concurrency: usize,
    /// JetStream ack wait of turn requests; progress acks keep long turns alive, so a
    /// crashed agent's turn is redelivered after at most this long.
    pub ack_wait_secs: u64,
    /// Deliveries of a turn before it is dead-lettered.
    pub max_deliver: i64,
    /// Transcript entries sent to the model as history.
    pub history_limit: u32,
    pub system_prompt: Option<String>,
    /// Most tokens the model may write per turn (`max_tokens` in the request); unset:
    /// the provider's default. A reply cut there ends with `finish_reason: "length"`.
    pub max_tokens: Option<u32>,
    /// How much the model thinks before answering: `off`, `minimal`, `low`, `medium`,
    /// `high` (OpenAI reasoning effort, Anthropic thinking budget, Gemini thinking
    /// budget). A message may start with `/think <level>` for itself.
    pub thinking: String,
    /// Workspace directory per agent id; default `<state>/workspace` for `main`,
    /// `<state>/workspace-<id>` for the others.
    pub workspaces: std::collections::BTreeMap<String, PathBuf>,
    /// Characters of each workspace file (AGENTS.md, SOUL.md, ...) the model sees.
    pub workspace_file_max_chars: usize,
    /// Characters of all workspace files together the model sees.
    pub workspace_total_max_chars: usize,
    /// The tools the model is offered and how their calls run.
    pub tools: ToolsConfig,
    /// Summarising older turns when a session nears the model's context window.
    pub compaction: CompactionConfig,
    /// Per agent, what differs from the above (`[agent.agents.<id>]`).
    pub agents: std::collections::BTreeMap<String, PerAgent>,
}

/// `[agent.agents.<id>]`: an agent's own model and thinking level (its workspace is
/// `[agent.workspaces]`, its tools `[sandbox.agents.<id>]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerAgent {
    pub model: Option<String>,
    pub thinking: Option<String>,
}

/// `[agent.compaction]`: when a session's prompt passes `threshold` of the room the
/// model's window leaves for it (`context_window` less the answer, see
/// `[agent.models]`), its older turns are summarised by the model and the newest ones,
/// up to `keep` of that room, kept verbatim.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompactionConfig {
    pub enabled: bool,
    pub threshold: f64,
    pub keep: f64,
}

impl Default for CompactionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold: 0.8,
            keep: 0.3,
        }
    }
}

/// `[agent.tools]`: which of the sandbox's tools the model is offered, and the limits
/// of the tool-call loop.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    /// Offer tools at all.
    pub enabled: bool,
    /// Tools offered (names, `*` wildcards, `group:fs`-style groups); empty: all.
    pub allow: Vec<String>,
    /// Tools never offered, whatever `allow` says.
    pub deny: Vec<String>,
    /// Model calls in one turn; a turn still calling tools after this many ends
    /// with a clear error.
    pub max_iterations: u32,
    /// The same call (tool and arguments) this many times in one turn is a loop: the
    /// turn ends with a clear error.
    pub loop_threshold: u32,
    /// The longest one tool call may take before the agent stops waiting.
    pub timeout_secs: u64,
    /// Bytes of one tool result the model sees; the rest is cut with a note.
    pub result_max_bytes: usize,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            allow: Vec::new(),
            deny: Vec::new(),
            max_iterations: 25,
            loop_threshold: 3,
            timeout_secs: 300,
            result_max_bytes: 32 * 1024,
        }
    }
}

/// The thinking levels, least first.
pub const THINKING_LEVELS: &[&str] = &["off", "minimal", "low", "medium", "high"];

/// The tool groups policies may name, OpenClaw's: `group:fs` and the others.
pub const TOOL_GROUPS: &[(&str, &[&str])] = &[
    ("group:fs", &["read", "write", "edit", "apply_patch", "ls"]),
    ("group:runtime", &["exec", "process"]),
    ("group:web", &["web_fetch", "web_search"]),
    ("group:memory", &["memory_search", "memory_get"]),
    ("group:sessions", &["sessions_list", "sessions_history"]),
    ("group:messaging", &["message"]),
];

impl ToolsConfig {
    /// Whether a policy entry (a name, a `*` wildcard pattern or a group) covers `tool`.
    fn covers(entry: &str, tool: &str) -> bool {
        if let Some((_, members)) = TOOL_GROUPS.iter().find(|(g, _)| *g == entry) {
            return members.contains(&tool);
        }
        match entry.split_once('*') {
            None => entry == tool,
            Some((pre, post)) => {
                tool.len() >= pre.len() + post.len()
                    && tool.starts_with(pre)
                    && tool.ends_with(post)
            }
        }
    }

    /// Whether the model may be offered `tool`: denied never, else allowed when
    /// `allow` is empty or covers it.
    pub fn permits(&self, tool: &str) -> bool {
        self.enabled
            && !self.deny.iter().any(|d| Self::covers(d, tool))
            && (self.allow.is_empty() || self.allow.iter().any(|a| Self::covers(a, tool)))
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            model: "gpt-4o-mini".into(),
            provider: ProviderConfig::default(),
            anthropic: ApiEndpoint::default(),
            gemini: ApiEndpoint::default(),
            fallback_models: Vec::new(),
            turn_timeout_secs: 600,
            models: Default::default(),
            concurrency: 256,
            ack_wait_secs: 10,
            max_deliver: 5,
            history_limit: 40,
            system_prompt: None,
            max_tokens: None,
            workspaces: Default::default(),
            workspace_file_max_chars: 20_000,
            workspace_total_max_chars: 150_000,
            tools: ToolsConfig::default(),
            compaction: CompactionConfig::default(),
            agents: Default::default(),
            thinking: "off".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// OpenAI-compatible base URL including `/v1` (`OPENAI_BASE_URL`). Unset: no provider.
    pub base_url: Option<String>,
    /// `OPENAI_API_KEY`.
    pub api_key: Option<SecretString>,
    /// More keys (auth profiles), tried in order after `api_key`.
    pub api_keys: Vec<SecretString>,
    /// Per-request timeout of a model call.
    pub timeout_secs: u64,
    /// Retries of a model call on 5xx/network errors within one delivery, before the
    /// next fallback model.
    pub max_retries: u32,
    /// A stream that sends nothing for this long is aborted (the idle watchdog).
    pub idle_timeout_secs: u64,
    /// The longest a provider's `Retry-After` cools a key down.
    pub max_retry_after_secs: u64,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            base_url: None,
            api_key: None,
            api_keys: Vec::new(),
            timeout_secs: 120,
            max_retries: 2,
            idle_timeout_secs: 60,
            max_retry_after_secs: 300,
        }
    }
}

/// A configured value, unless empty (an empty variable counts as unset).
fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A configured secret, unless empty.
fn set_secret(v: &Option<SecretString>) -> Option<&str> {
    v.as_ref()
        .map(|k| k.expose_secret())
        .filter(|s| !s.is_empty())
}

impl ProviderConfig {
    /// The base URL when one is configured.
    pub fn base_url(&self) -> Option<&str> {
        set(&self.base_url)
    }

    pub fn api_key(&self) -> Option<&str> {
        set_secret(&self.api_key)
    }
}

/// A model's declaration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// US dollars per million input (prompt) tokens.
    pub input_usd_per_mtok: f64,
    /// US dollars per million output (completion) tokens.
    pub output_usd_per_mtok: f64,
    /// The most tokens an answer may have (`max_tokens` of each call), when
    /// `agent.max_tokens` is unset.
    pub max_output_tokens: Option<u32>,
    /// Tokens the model reads and writes in one call: history beyond it (less the
    /// answer's room) is left out, oldest first.
    pub context_window: Option<u32>,
}

impl ModelSpec {
    /// The cost in US dollars of these tokens.
    pub fn cost_usd(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.input_usd_per_mtok
            + completion_tokens as f64 * self.output_usd_per_mtok)
            / 1_000_000.0
    }
}

impl AgentConfig {
    /// The declaration of `model` (`provider/model`; a bare name is the OpenAI
    /// endpoint's).
    pub fn model_spec(&self, model: &str) -> Option<&ModelSpec> {
        self.models.get(model).or_else(|| {
            model
                .strip_prefix("openai/")
                .and_then(|bare| self.models.get(bare))
                .or_else(|| self.models.get(&format!("openai/{model}")))
        })
    }
}

/// A provider API's endpoint: its base URL (without the API version path) and key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiEndpoint {
    pub base_url: Option<String>,
    pub api_key: Option<SecretString>,
    /// More keys (auth profiles), tried in order after `api_key`.
    pub api_keys: Vec<SecretString>,
}

impl ApiEndpoint {
    /// The configured base URL.
    pub fn base_url(&self) -> Option<&str> {
        set(&self.base_url)
    }

    pub fn api_key(&self) -> Option<&str> {
        set_secret(&self.api_key)
    }
}

impl AgentConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        positive("agent.concurrency", self.concurrency as u64)?;
        positive("agent.ack_wait_secs", self.ack_wait_secs)?;
        positive("agent.max_deliver", self.max_deliver.max(0) as u64)?;
        positive(
            "agent.workspace_file_max_chars",
            self.workspace_file_max_chars as u64,
        )?;
        positive(
            "agent.workspace_total_max_chars",
            self.workspace_total_max_chars as u64,
        )?;
        positive(
            "agent.tools.max_iterations",
            u64::from(self.tools.max_iterations),
        )?;
        positive(
            "agent.tools.loop_threshold",
            u64::from(self.tools.loop_threshold),
        )?;
        positive("agent.tools.timeout_secs", self.tools.timeout_secs)?;
        if !THINKING_LEVELS.contains(&self.thinking.as_str()) {
            return Err(ConfigError::Invalid {
                field: "agent.thinking",
                reason: format!("one of {}", THINKING_LEVELS.join(", ")),
            });
        }
        let c = &self.compaction;
        if !(c.threshold > 0.0 && c.threshold <= 1.0 && c.keep >= 0.0 && c.keep < c.threshold) {
            return Err(ConfigError::Invalid {
                field: "agent.compaction",
                reason: "threshold must be in (0, 1] and keep in [0, threshold)".into(),
            });
        }
        positive(
            "agent.tools.result_max_bytes",
            self.tools.result_max_bytes as u64,
        )?;
        if let Some(a) = self.workspaces.keys().find(|a| !crate::is_token(a)) {
            return Err(ConfigError::Invalid {
                field: "agent.workspaces",
                reason: format!("`{a}` is not a valid agent id"),
            });
        }
        for (field, url) in [
            ("agent.provider.base_url", self.provider.base_url()),
            ("agent.anthropic.base_url", self.anthropic.base_url()),
            ("agent.gemini.base_url", self.gemini.base_url()),
        ] {
            if let Some(u) =
                url.filter(|u| !(u.starts_with("http://") || u.starts_with("https://")))
            {
                return Err(ConfigError::Invalid {
                    field,
                    reason: format!("`{u}` must start with http:// or https://"),
                });
            }
        }
        if let Some(m) = self
            .fallback_models
            .iter()
            .find(|m| m.trim().is_empty() || m.ends_with('/'))
        {
            return Err(ConfigError::Invalid {
                field: "agent.fallback_models",
                reason: format!("`{m}`: name a model as provider/model"),
            });
        }
        positive("agent.turn_timeout_secs", self.turn_timeout_secs)?;
        for (name, m) in &self.models {
            let prices = [m.input_usd_per_mtok, m.output_usd_per_mtok];
            if name.trim().is_empty() || prices.iter().any(|p| !p.is_finite() || *p < 0.0) {
                return Err(ConfigError::Invalid {
                    field: "agent.models",
                    reason: format!("`{name}`: a model name, and prices of 0 or more"),
                });
            }
            if m.max_output_tokens == Some(0) || m.context_window == Some(0) {
                return Err(ConfigError::Invalid {
                    field: "agent.models",
                    reason: format!(
                        "`{name}`: max_output_tokens and context_window must be at least 1"
                    ),
                });
            }
        }
        positive(
            "agent.provider.idle_timeout_secs",
            self.provider.idle_timeout_secs,
        )?;
        if self.model.trim().is_empty() || self.model.ends_with('/') {
            return Err(ConfigError::Invalid {
                field: "agent.model",
                reason: format!(
                    "`{}`: name a model, e.g. `anthropic/claude-sonnet-4-5` (CLAWBUS_MODEL)",
                    self.model
                ),
            });
        }
        Ok(())
    }
}
