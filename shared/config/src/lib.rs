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
//! Config structs deny unknown fields so a typo fails loudly at start-up. Each section
//! is a module with its types, defaults and own `validate` (`agent`, `gateway`,
//! `router`, `store`, `nats`, `admin`, `sandbox`, `routing`, `channels`, `http`);
//! `Config::validate` calls each. The standard variables are one table,
//! [`STANDARD_VARIABLES`] (`env.rs`).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::Deserialize;

mod admin;
mod agent;
mod channels;
mod check;
mod env;
mod gateway;
mod http;
mod nats;
mod router;
mod routing;
mod sandbox;
mod services;
mod store;
mod token;
pub use admin::{AdminConfig, LogConfig};
pub use agent::{
    AgentConfig, ApiEndpoint, CompactionConfig, ModelSpec, PerAgent, ProviderConfig, ToolsConfig,
    THINKING_LEVELS, TOOL_GROUPS,
};
pub use channels::{
    AccountSpec, AdapterSettings, ChannelAccount, IrcSpec, WebhookSpec, ADAPTERS, TELEGRAM_API_ROOT,
};
pub use env::STANDARD_VARIABLES;
pub use gateway::{GatewayConfig, HooksConfig};
pub use http::HttpConfig;
pub use nats::NatsConfig;
pub use router::RouterConfig;
pub use routing::{
    minute_of_day, parse_debounce, parse_duration, ActiveHours, Binding, BindingMatch,
    ChannelPolicy, CommandsConfig, GroupPolicy, HeartbeatConfig, MessagesConfig, PeerMatch,
    QueueConfig, ResetPolicy, SessionConfig, MAX_QUEUE_CAP, QUEUE_DROPS, QUEUE_MODES,
};
pub use sandbox::{SandboxConfig, PROFILES};
pub use services::{nats_server_env, Service, SERVICES, WITHHELD};
pub use store::StoreConfig;
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
        env::merge(fig)
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
        if let Some(r) = &self.replica {
            check::token("replica", r)?;
        }
        self.nats.credentials()?;
        self.gateway.validate()?;
        self.admin.validate()?;
        self.router.validate()?;
        self.agent.validate()?;
        self.store.validate()?;
        self.log.validate()?;
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
        self.messages.queue.validate()
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
