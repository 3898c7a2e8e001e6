//! Configuration of every clawbus service, read in one place.
//!
//! Layers, later ones winning:
//! 1. built-in defaults (a laptop setup: everything on 127.0.0.1, SQLite under the state
//!    directory);
//! 2. a TOML file: `$CLAWBUS_CONFIG`, else `<state_dir>/clawbus.toml` when it exists;
//! 3. the standard variables users already have: `OPENAI_BASE_URL`, `OPENAI_API_KEY`,
//!    `CLAWBUS_MODEL`, `NATS_URL`, `CLAWBUS_GATEWAY_TOKEN`, `CLAWBUS_HOME`;
//! 4. `CLAWBUS__`-prefixed variables, `__` separating sections
//!    (`CLAWBUS__AGENT__CONCURRENCY=32`).
//!
//! Config structs deny unknown fields so a typo fails loudly at start-up.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

mod channels;
mod http;
mod routing;
mod sandbox;
mod services;
mod token;
pub use channels::{
    AccountSpec, AdapterSettings, ChannelAccount, IrcSpec, WebhookSpec, ADAPTERS, TELEGRAM_API_ROOT,
};
pub use http::HttpConfig;
pub use routing::{
    minute_of_day, parse_debounce, parse_duration, ActiveHours, Binding, BindingMatch,
    ChannelPolicy, CommandsConfig, GroupPolicy, HeartbeatConfig, MessagesConfig, PeerMatch,
    QueueConfig, ResetPolicy, SessionConfig, MAX_QUEUE_CAP, QUEUE_DROPS, QUEUE_MODES,
};
pub use sandbox::{SandboxConfig, PROFILES};
pub use services::{nats_server_env, Service, SERVICES, WITHHELD};
pub use token::{ensure_gateway_token, secret_matches, GatewayToken, MIN_SECRET_CHARS};

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("invalid configuration: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The whole configuration; each service reads its section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where state lives (nats store, SQLite database, token, pid files).
    /// Default `$CLAWBUS_HOME`, else `~/.clawbus`.
    pub state_dir: Option<PathBuf>,
    /// This process's replica id among the replicas of its service, in logs, metrics
    /// and partition ownership. Default `<hostname>-<pid>`; `clawbus up` sets
    /// `<service>-<i>`.
    pub replica: Option<String>,
    pub nats: NatsConfig,
    pub gateway: GatewayConfig,
    pub router: RouterConfig,
    pub agent: AgentConfig,
    pub store: StoreConfig,
    pub sandbox: SandboxConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    /// How messages map to sessions and when sessions start afresh.
    pub session: SessionConfig,
    /// Which agent a channel, account or chat goes to.
    pub bindings: Vec<Binding>,
    /// Who may reach the agents through each channel (`[channels.telegram]`, ...).
    pub channels: std::collections::BTreeMap<String, ChannelPolicy>,
    pub commands: CommandsConfig,
    pub heartbeat: HeartbeatConfig,
    pub hooks: HooksConfig,
    pub messages: MessagesConfig,
    /// Timeouts and connection caps of every HTTP listener.
    pub http: HttpConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<SecretString>,
    /// A file holding the password (a container secret, or what `clawbus up` writes
    /// under `<state_dir>/credentials`); instead of `password`.
    pub password_file: Option<PathBuf>,
    /// Stream replicas (1 on a laptop, 3 on a cluster).
    pub replicas: usize,
}

impl NatsConfig {
    /// The user and password to connect with: none, or both (`password` or the first
    /// line of `password_file`).
    pub fn credentials(&self) -> Result<Option<(String, SecretString)>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            field: "nats.password_file",
            reason,
        };
        let password = match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "set nats.password or nats.password_file, not both".into(),
                ))
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| invalid(format!("{}: {e}", f.display())))?;
                let line = text.lines().next().unwrap_or("").trim().to_owned();
                if line.is_empty() {
                    return Err(invalid(format!("{} is empty", f.display())));
                }
                Some(SecretString::from(line))
            }
            (None, None) => None,
        };
        match (self.user.as_deref().filter(|u| !u.is_empty()), password) {
            (Some(u), Some(p)) => Ok(Some((u.to_owned(), p))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::Invalid {
                field: "nats.user",
                reason: "needs nats.password or nats.password_file".into(),
            }),
            (None, Some(_)) => Err(ConfigError::Invalid {
                field: "nats.password",
                reason: "needs nats.user".into(),
            }),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            password_file: None,
            replicas: 1,
        }
    }
}

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

    fn validate(&self) -> Result<(), ConfigError> {
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://<path>` or `postgres://…` (also `DATABASE_URL`); default
    /// `sqlite://<state_dir>/clawbus.db`.
    pub database_url: Option<String>,
}

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

/// Default state directory: `$CLAWBUS_HOME`, else `$HOME/.clawbus`.
pub fn default_state_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("CLAWBUS_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".clawbus")
}

/// `CLAWBUS_FALLBACK_MODELS=a/x,b/y` as `agent.fallback_models` (when set).
fn fallback_models_env() -> Figment {
    match std::env::var("CLAWBUS_FALLBACK_MODELS") {
        Ok(v) => {
            let models: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect();
            Figment::from(Serialized::default("agent.fallback_models", models))
        }
        Err(_) => Figment::new(),
    }
}

impl Config {
    /// Loads the configuration from the file and environment of this process.
    pub fn load() -> Result<Config, ConfigError> {
        let file = std::env::var_os("CLAWBUS_CONFIG")
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
            .or_else(|| Some(default_state_dir().join("clawbus.toml")).filter(|p| p.exists()));
        Self::from_figment(Self::figment(file.as_deref()))
    }

    /// The layered figment (file, standard variables, `CLAWBUS__` variables).
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut fig = Figment::new();
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        fig.merge(
            Env::raw()
                .only(&["OPENAI_BASE_URL"])
                .map(|_| "agent.provider.base_url".into()),
        )
        .merge(
            Env::raw()
                .only(&["OPENAI_API_KEY"])
                .map(|_| "agent.provider.api_key".into()),
        )
        .merge(
            Env::raw()
                .only(&["CLAWBUS_MODEL"])
                .map(|_| "agent.model".into()),
        )
        .merge(
            Env::raw()
                .only(&["ANTHROPIC_BASE_URL"])
                .map(|_| "agent.anthropic.base_url".into()),
        )
        .merge(
            Env::raw()
                .only(&["ANTHROPIC_API_KEY"])
                .map(|_| "agent.anthropic.api_key".into()),
        )
        .merge(
            Env::raw()
                .only(&["GEMINI_BASE_URL"])
                .map(|_| "agent.gemini.base_url".into()),
        )
        .merge(
            Env::raw()
                .only(&["GEMINI_API_KEY"])
                .map(|_| "agent.gemini.api_key".into()),
        )
        .merge(
            Env::raw()
                .only(&["TELEGRAM_BOT_TOKEN"])
                .map(|_| "channels.telegram.bot_token".into()),
        )
        .merge(fallback_models_env())
        .merge(Env::raw().only(&["NATS_URL"]).map(|_| "nats.url".into()))
        .merge(
            Env::raw()
                .only(&["DATABASE_URL"])
                .map(|_| "store.database_url".into()),
        )
        .merge(
            Env::raw()
                .only(&["CLAWBUS_GATEWAY_TOKEN"])
                .map(|_| "gateway.token".into()),
        )
        .merge(
            Env::raw()
                .only(&["CLAWBUS_HOME"])
                .map(|_| "state_dir".into()),
        )
        .merge(Env::prefixed("CLAWBUS__").split("__"))
    }

    /// Extracts and validates a configuration.
    pub fn from_figment(fig: Figment) -> Result<Config, ConfigError> {
        let cfg: Config = fig.extract().map_err(Box::new)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// This process's replica id: configured, else `<hostname>-<pid>`.
    pub fn replica_id(&self) -> String {
        if let Some(r) = &self.replica {
            return r.clone();
        }
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let host = if host.is_empty() { "host".into() } else { host };
        format!("{host}-{}", std::process::id())
    }

    /// The workspace directory of `agent`: `[agent.workspaces] <agent>`, else
    /// `<state>/workspace` for `main` and `<state>/workspace-<agent>` for the others.
    pub fn workspace_dir(&self, agent: &str) -> PathBuf {
        if let Some(d) = self.agent.workspaces.get(agent) {
            return d.clone();
        }
        let name = if agent == "main" {
            "workspace".to_owned()
        } else {
            format!("workspace-{agent}")
        };
        self.state_dir().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(default_state_dir)
    }

    /// The database URL, defaulting to SQLite in the state directory.
    pub fn database_url(&self) -> String {
        match &self.store.database_url {
            Some(u) if !u.trim().is_empty() => u.clone(),
            _ => format!("sqlite://{}", self.state_dir().join("clawbus.db").display()),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let addr = |field: &'static str, v: &str| -> Result<(), ConfigError> {
            v.parse::<SocketAddr>()
                .map(|_| ())
                .map_err(|e| ConfigError::Invalid {
                    field,
                    reason: format!("`{v}` is not host:port ({e})"),
                })
        };
        addr("gateway.bind", &self.gateway.bind)?;
        addr("admin.gateway", &self.admin.gateway)?;
        addr("admin.router", &self.admin.router)?;
        addr("admin.agent", &self.admin.agent)?;
        addr("admin.store", &self.admin.store)?;
        addr("admin.sandbox", &self.admin.sandbox)?;
        addr("admin.channels", &self.admin.channels)?;
        self.sandbox.validate()?;
        self.session.validate()?;
        for (name, c) in &self.channels {
            c.validate()?;
            c.validate_adapter(name)?;
        }
        routing::validate_bindings(&self.bindings, &self.router.agents)?;
        self.heartbeat.validate(&self.router.agents)?;
        self.hooks.validate()?;
        self.http.validate()?;
        self.messages.queue.validate()?;
        let positive = |field: &'static str, v: u64| {
            if v == 0 {
                Err(ConfigError::Invalid {
                    field,
                    reason: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("router.concurrency", self.router.concurrency as u64)?;
        positive("agent.concurrency", self.agent.concurrency as u64)?;
        positive("agent.ack_wait_secs", self.agent.ack_wait_secs)?;
        positive("agent.max_deliver", self.agent.max_deliver.max(0) as u64)?;
        positive("gateway.max_body_bytes", self.gateway.max_body_bytes as u64)?;
        positive(
            "agent.workspace_file_max_chars",
            self.agent.workspace_file_max_chars as u64,
        )?;
        positive(
            "agent.workspace_total_max_chars",
            self.agent.workspace_total_max_chars as u64,
        )?;
        positive(
            "agent.tools.max_iterations",
            u64::from(self.agent.tools.max_iterations),
        )?;
        positive(
            "agent.tools.loop_threshold",
            u64::from(self.agent.tools.loop_threshold),
        )?;
        positive("agent.tools.timeout_secs", self.agent.tools.timeout_secs)?;
        if !THINKING_LEVELS.contains(&self.agent.thinking.as_str()) {
            return Err(ConfigError::Invalid {
                field: "agent.thinking",
                reason: format!("one of {}", THINKING_LEVELS.join(", ")),
            });
        }
        let c = &self.agent.compaction;
        if !(c.threshold > 0.0 && c.threshold <= 1.0 && c.keep >= 0.0 && c.keep < c.threshold) {
            return Err(ConfigError::Invalid {
                field: "agent.compaction",
                reason: "threshold must be in (0, 1] and keep in [0, threshold)".into(),
            });
        }
        positive(
            "agent.tools.result_max_bytes",
            self.agent.tools.result_max_bytes as u64,
        )?;
        if let Some(a) = self.agent.workspaces.keys().find(|a| !is_token(a)) {
            return Err(ConfigError::Invalid {
                field: "agent.workspaces",
                reason: format!("`{a}` is not a valid agent id"),
            });
        }
        positive(
            "gateway.request_timeout_secs",
            self.gateway.request_timeout_secs,
        )?;
        positive("gateway.max_in_flight", self.gateway.max_in_flight as u64)?;
        if let Some(u) = self
            .store
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
        if !is_token(&self.gateway.account) {
            return Err(ConfigError::Invalid {
                field: "gateway.account",
                reason: "letters, digits, `-` and `_` only, 1-64 characters".into(),
            });
        }
        if let Some(r) = self.replica.as_deref().filter(|r| !is_token(r)) {
            return Err(ConfigError::Invalid {
                field: "replica",
                reason: format!("`{r}`: letters, digits, `-` and `_` only, 1-64 characters"),
            });
        }
        if !is_token(&self.router.default_agent) {
            return Err(ConfigError::Invalid {
                field: "router.default_agent",
                reason: "letters, digits, `-` and `_` only, 1-64 characters".into(),
            });
        }
        if let Some(a) = self.router.agents.iter().find(|a| !is_token(a)) {
            return Err(ConfigError::Invalid {
                field: "router.agents",
                reason: format!("`{a}` is not a valid agent id"),
            });
        }
        if !self.router.agents.contains(&self.router.default_agent) {
            return Err(ConfigError::Invalid {
                field: "router.default_agent",
                reason: format!("`{}` is not in router.agents", self.router.default_agent),
            });
        }
        for (field, url) in [
            ("agent.provider.base_url", self.agent.provider.base_url()),
            ("agent.anthropic.base_url", self.agent.anthropic.base_url()),
            ("agent.gemini.base_url", self.agent.gemini.base_url()),
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
            .agent
            .fallback_models
            .iter()
            .find(|m| m.trim().is_empty() || m.ends_with('/'))
        {
            return Err(ConfigError::Invalid {
                field: "agent.fallback_models",
                reason: format!("`{m}`: name a model as provider/model"),
            });
        }
        positive("agent.turn_timeout_secs", self.agent.turn_timeout_secs)?;
        for (name, m) in &self.agent.models {
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
            self.agent.provider.idle_timeout_secs,
        )?;
        if self.agent.model.trim().is_empty() || self.agent.model.ends_with('/') {
            return Err(ConfigError::Invalid {
                field: "agent.model",
                reason: format!(
                    "`{}`: name a model, e.g. `anthropic/claude-sonnet-4-5` (CLAWBUS_MODEL)",
                    self.agent.model
                ),
            });
        }
        self.nats.credentials()?;
        if !matches!(self.log.format.as_str(), "json" | "pretty") {
            return Err(ConfigError::Invalid {
                field: "log.format",
                reason: "`json` or `pretty`".into(),
            });
        }
        Ok(())
    }
}

/// True for ids usable as a NATS subject token: `[A-Za-z0-9_-]{1,64}`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests;
