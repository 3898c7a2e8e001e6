//! The platform accounts the channels service runs: `[channels.<channel>]` holds the
//! default account's credentials beside the channel's access policy (as OpenClaw's
//! `channels.telegram.botToken`), `[channels.<channel>.accounts.<id>]` further ones.

use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::Deserialize;

use crate::{ChannelPolicy, Config, ConfigError};

/// Platforms the channels service has an adapter for.
pub const ADAPTERS: &[&str] = &["discord", "irc", "matrix", "signal", "slack", "telegram"];

/// The Discord REST API's root.
pub const DISCORD_API_ROOT: &str = "https://discord.com/api/v10";

/// The Slack Web API's root.
pub const SLACK_API_ROOT: &str = "https://slack.com/api";

/// The Telegram Bot API's root.
pub const TELEGRAM_API_ROOT: &str = "https://api.telegram.org";

/// `[channels.<channel>.accounts.<id>]`: one more account (bot) on a platform.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelAccount {
    /// Telegram: the bot's token from @BotFather; Matrix: the account's access token.
    #[serde(alias = "botToken", alias = "access_token", alias = "accessToken")]
    pub bot_token: Option<SecretString>,
    /// The platform API's root URL (a local Bot API server; Matrix: the homeserver,
    /// required).
    #[serde(
        alias = "apiRoot",
        alias = "homeserver",
        alias = "http_url",
        alias = "httpUrl"
    )]
    pub api_root: Option<String>,
    /// `false` keeps the account configured but not run.
    pub enabled: Option<bool>,
    /// IRC: the server, `host:port` (6697 is TLS by convention).
    pub server: Option<String>,
    /// IRC: connect with TLS (default true).
    pub tls: Option<bool>,
    /// IRC: the bot's nickname.
    pub nick: Option<String>,
    /// IRC: the server password (`PASS`), when the server wants one.
    pub password: Option<SecretString>,
    /// IRC: identify to NickServ with this password after connecting.
    #[serde(alias = "nickservPassword")]
    pub nickserv_password: Option<SecretString>,
    /// IRC: channels to join (`#family`).
    pub join: Vec<String>,
    /// IRC: a PEM file of certificate authorities trusted besides the web's roots (a
    /// network with its own CA).
    #[serde(alias = "tlsCaFile")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Telegram: receive updates by webhook at this public HTTPS URL instead of long
    /// polling.
    #[serde(alias = "webhookUrl")]
    pub webhook_url: Option<String>,
    /// Telegram: the secret Telegram sends with each webhook call (required with a
    /// webhook; 16-256 characters of `A-Za-z0-9_-`).
    #[serde(alias = "webhookSecret")]
    pub webhook_secret: Option<SecretString>,
    /// Telegram: where the webhook listener binds (a reverse proxy forwards the public
    /// URL to it). Default `127.0.0.1:8787`.
    #[serde(alias = "webhookListen")]
    pub webhook_listen: Option<String>,
    /// Signal: the account's phone number (`+15551234567`), as signal-cli knows it.
    #[serde(alias = "account", default, deserialize_with = "phone_number")]
    pub number: Option<String>,
    /// Slack: the app's signing secret; the gateway checks every Events API call with it.
    #[serde(alias = "signingSecret")]
    pub signing_secret: Option<SecretString>,
    /// Slack: an app-level token (`xapp-…`) for Socket Mode: the gateway opens a
    /// WebSocket to Slack instead of taking Events API calls.
    #[serde(alias = "appToken")]
    pub app_token: Option<SecretString>,
}

/// A phone number as a string; a bare number (what an environment variable such as
/// `CLAWBUS__CHANNELS__SIGNAL__ACCOUNT=+15551234567` parses to) gets its `+` back.
pub(crate) fn phone_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Number {
        Text(String),
        Digits(u64),
    }
    Ok(Option::<Number>::deserialize(d)?.map(|n| match n {
        Number::Text(s) => s,
        Number::Digits(n) => format!("+{n}"),
    }))
}

/// A Telegram account's webhook.
#[derive(Debug, Clone)]
pub struct WebhookSpec {
    pub url: String,
    /// The URL's path, where the listener answers.
    pub path: String,
    pub secret: SecretString,
    pub listen: String,
}

/// An IRC account's connection.
#[derive(Debug, Clone)]
pub struct IrcSpec {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub nick: String,
    pub password: Option<SecretString>,
    pub nickserv_password: Option<SecretString>,
    pub join: Vec<String>,
    pub ca_file: Option<std::path::PathBuf>,
}

/// Settings of one channel's adapter (`[channels.<channel>]` `poll_timeout_secs`,
/// `text_chunk_limit`, `typing`).
#[derive(Debug, Clone)]
pub struct AdapterSettings {
    /// Seconds a long poll (`getUpdates`) waits for news.
    pub poll_timeout_secs: u64,
    /// Characters per platform message; longer replies go in several, never split
    /// inside a code block. Capped at the platform's own limit.
    pub text_chunk_limit: usize,
    /// Send a typing indicator while a turn runs.
    pub typing: bool,
    /// Show the answer while it is written (`partial`), or only when complete (`off`).
    pub stream: bool,
}

/// One account the channels service runs.
#[derive(Debug, Clone)]
pub struct AccountSpec {
    pub channel: String,
    pub account: String,
    /// The platform's API token (Telegram); empty for IRC.
    pub token: SecretString,
    pub api_root: String,
    /// IRC: the connection.
    pub irc: Option<IrcSpec>,
    /// Telegram: updates by webhook rather than long polling.
    pub webhook: Option<WebhookSpec>,
    /// Signal: the account's number.
    pub number: Option<String>,
    /// Slack: the signing secret of the Events API calls.
    pub signing_secret: Option<SecretString>,
    /// Slack: the app-level token of Socket Mode.
    pub app_token: Option<SecretString>,
    pub settings: AdapterSettings,
}

/// `host:port`, with `port` when none is given.
fn host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    let s = s.trim();
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (s, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')))
    .then(|| (host.to_owned(), port))
}

/// An IRC nickname or channel: no spaces, commas, control characters or colons at the
/// start, within the usual length.
fn irc_name_ok(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with(':')
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
}

impl ChannelPolicy {
    /// The accounts of channel `channel`: the default one (credentials on the channel
    /// itself) and those under `accounts`, enabled and with credentials.
    fn account_specs(&self, channel: &str) -> Vec<AccountSpec> {
        let default = ChannelAccount {
            bot_token: self.bot_token.clone(),
            api_root: self.api_root.clone(),
            enabled: self.enabled,
            server: self.server.clone(),
            tls: self.tls,
            nick: self.nick.clone(),
            password: self.password.clone(),
            nickserv_password: self.nickserv_password.clone(),
            join: self.join.clone(),
            tls_ca_file: self.tls_ca_file.clone(),
            webhook_url: self.webhook_url.clone(),
            webhook_secret: self.webhook_secret.clone(),
            webhook_listen: self.webhook_listen.clone(),
            number: self.number.clone(),
            signing_secret: self.signing_secret.clone(),
            app_token: self.app_token.clone(),
        };
        let mut all: BTreeMap<&str, &ChannelAccount> = BTreeMap::new();
        all.insert("default", &default);
        for (id, a) in &self.accounts {
            all.insert(id, a);
        }
        all.into_iter()
            .filter(|(_, a)| a.enabled != Some(false))
            .filter_map(|(id, a)| {
                let irc = if channel == "irc" {
                    let tls = a.tls.unwrap_or(true);
                    let (host, port) =
                        host_port(a.server.as_deref()?, if tls { 6697 } else { 6667 })?;
                    Some(IrcSpec {
                        host,
                        port,
                        tls,
                        nick: a.nick.clone().unwrap_or_else(|| "clawbus".into()),
                        password: a.password.clone(),
                        nickserv_password: a.nickserv_password.clone(),
                        join: a.join.clone(),
                        ca_file: a.tls_ca_file.clone(),
                    })
                } else {
                    None
                };
                let token = match (&irc, channel) {
                    (Some(_), _) => SecretString::from(""),
                    // signal-cli's daemon holds the keys; the adapter needs its URL and
                    // the account's number.
                    (None, "signal") => {
                        a.number.as_ref()?;
                        a.bot_token
                            .clone()
                            .unwrap_or_else(|| SecretString::from(""))
                    }
                    _ => a.bot_token.clone()?,
                };
                if channel == "signal" && a.api_root.is_none() {
                    return None;
                }
                // A Matrix account names its homeserver.
                if channel == "matrix" && a.api_root.is_none() {
                    return None;
                }
                let webhook = match (&a.webhook_url, &a.webhook_secret) {
                    (Some(url), Some(secret)) => Some(WebhookSpec {
                        url: url.clone(),
                        path: url::Url::parse(url).ok()?.path().to_owned(),
                        secret: secret.clone(),
                        listen: a
                            .webhook_listen
                            .clone()
                            .unwrap_or_else(|| "127.0.0.1:8787".into()),
                    }),
                    _ => None,
                };
                Some(AccountSpec {
                    channel: channel.to_owned(),
                    account: id.to_owned(),
                    token,
                    irc,
                    webhook,
                    number: a.number.clone(),
                    signing_secret: a.signing_secret.clone(),
                    app_token: a.app_token.clone(),
                    api_root: a.api_root.clone().unwrap_or_else(|| {
                        match channel {
                            "slack" => SLACK_API_ROOT,
                            "discord" => DISCORD_API_ROOT,
                            _ => TELEGRAM_API_ROOT,
                        }
                        .to_owned()
                    }),
                    settings: AdapterSettings {
                        poll_timeout_secs: self.poll_timeout_secs,
                        text_chunk_limit: self.text_chunk_limit,
                        typing: self.typing,
                        stream: self.stream_mode == "partial",
                    },
                })
            })
            .collect()
    }

    pub(crate) fn validate_adapter(&self, channel: &str) -> Result<(), ConfigError> {
        let has_credentials = self.bot_token.is_some()
            || self.server.is_some()
            || self.number.is_some()
            || self
                .accounts
                .values()
                .any(|a| a.bot_token.is_some() || a.server.is_some());
        let all = std::iter::once((
            "default",
            self.server.as_deref(),
            self.nick.as_deref(),
            &self.join,
        ))
        .chain(
            self.accounts
                .iter()
                .map(|(k, a)| (k.as_str(), a.server.as_deref(), a.nick.as_deref(), &a.join)),
        );
        for (id, server, nick, join) in all {
            let shown = |s: &str| s.chars().take(64).collect::<String>();
            if let Some(s) = server {
                if host_port(s, 6697).is_none() {
                    return Err(ConfigError::Invalid {
                        field: "channels.server",
                        reason: format!("`{}` ({id}) is not host:port", shown(s)),
                    });
                }
            }
            if let Some(n) = nick {
                if !irc_name_ok(n, 30) || n.starts_with('#') {
                    return Err(ConfigError::Invalid {
                        field: "channels.nick",
                        reason: format!("`{}` ({id}) is not an IRC nickname", shown(n)),
                    });
                }
            }
            for j in join {
                if !irc_name_ok(j, 50) || !j.starts_with(['#', '&']) {
                    return Err(ConfigError::Invalid {
                        field: "channels.join",
                        reason: format!("`{}` ({id}) is not an IRC channel", shown(j)),
                    });
                }
            }
        }
        if has_credentials && !ADAPTERS.contains(&channel) {
            return Err(ConfigError::Invalid {
                field: "channels",
                reason: format!(
                    "`{}` has credentials but no adapter; adapters: {}",
                    channel.chars().take(32).collect::<String>(),
                    ADAPTERS.join(", ")
                ),
            });
        }
        for n in std::iter::once(&self.number)
            .chain(self.accounts.values().map(|a| &a.number))
            .flatten()
        {
            let digits = n.strip_prefix('+').unwrap_or("");
            if !(6..=15).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(ConfigError::Invalid {
                    field: "channels.number",
                    reason: format!(
                        "`{}` is not a phone number in international form (+15551234567)",
                        n.chars().take(32).collect::<String>()
                    ),
                });
            }
        }
        if channel == "signal"
            && (self.number.is_some() && self.api_root.is_none()
                || self
                    .accounts
                    .values()
                    .any(|a| a.number.is_some() && a.api_root.is_none()))
        {
            return Err(ConfigError::Invalid {
                field: "channels.http_url",
                reason: "a Signal account needs its signal-cli daemon's URL (http_url)".into(),
            });
        }
        if channel == "matrix" {
            let missing = (self.bot_token.is_some() && self.api_root.is_none())
                || self
                    .accounts
                    .values()
                    .any(|a| a.bot_token.is_some() && a.api_root.is_none());
            if missing {
                return Err(ConfigError::Invalid {
                    field: "channels.homeserver",
                    reason: "a Matrix account needs its homeserver URL".into(),
                });
            }
        }
        for id in self.accounts.keys() {
            if !crate::is_token(id) {
                return Err(ConfigError::Invalid {
                    field: "channels.accounts",
                    reason: format!(
                        "account id `{}` must be 1-64 characters of [A-Za-z0-9_-]",
                        id.chars().take(32).collect::<String>()
                    ),
                });
            }
        }
        let hooks = std::iter::once((
            "default",
            &self.webhook_url,
            &self.webhook_secret,
            &self.webhook_listen,
        ))
        .chain(self.accounts.iter().map(|(k, a)| {
            (
                k.as_str(),
                &a.webhook_url,
                &a.webhook_secret,
                &a.webhook_listen,
            )
        }));
        for (id, url, secret, listen) in hooks {
            let invalid =
                |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
            if let Some(u) = url {
                match url::Url::parse(u) {
                    Ok(p) if p.scheme() == "https" || p.host_str() == Some("127.0.0.1") => {}
                    _ => {
                        return Err(invalid(
                            "channels.webhook_url",
                            format!(
                                "`{}` ({id}) is not an https URL",
                                u.chars().take(64).collect::<String>()
                            ),
                        ))
                    }
                }
                let Some(sec) = secret else {
                    return Err(invalid(
                        "channels.webhook_secret",
                        format!(
                            "a webhook ({id}) needs a secret: 16-256 characters of A-Za-z0-9_-"
                        ),
                    ));
                };
                let sec = secrecy::ExposeSecret::expose_secret(sec);
                if sec.len() < crate::MIN_SECRET_CHARS
                    || sec.len() > 256
                    || !sec
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(invalid(
                        "channels.webhook_secret",
                        format!("the secret ({id}) must be 16-256 characters of A-Za-z0-9_-"),
                    ));
                }
            }
            if let Some(l) = listen {
                if l.parse::<std::net::SocketAddr>().is_err() {
                    return Err(invalid(
                        "channels.webhook_listen",
                        format!(
                            "`{}` ({id}) is not host:port",
                            l.chars().take(64).collect::<String>()
                        ),
                    ));
                }
            }
        }
        for secret in std::iter::once(&self.signing_secret)
            .chain(self.accounts.values().map(|a| &a.signing_secret))
            .flatten()
        {
            let s = secrecy::ExposeSecret::expose_secret(secret);
            crate::token::check_secret("channels.signing_secret", s)?;
        }
        for root in std::iter::once(&self.api_root)
            .chain(self.accounts.values().map(|a| &a.api_root))
            .flatten()
        {
            match url::Url::parse(root) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(ConfigError::Invalid {
                        field: "channels.api_root",
                        reason: format!(
                            "`{}` is not an http(s) URL",
                            root.chars().take(64).collect::<String>()
                        ),
                    })
                }
            }
        }
        crate::routing::one_of(
            "channels.stream_mode",
            &self.stream_mode,
            &["off", "partial"],
        )?;
        if !(1..=600).contains(&self.poll_timeout_secs) {
            return Err(ConfigError::Invalid {
                field: "channels.poll_timeout_secs",
                reason: format!("{} is not between 1 and 600", self.poll_timeout_secs),
            });
        }
        if !(64..=100_000).contains(&self.text_chunk_limit) {
            return Err(ConfigError::Invalid {
                field: "channels.text_chunk_limit",
                reason: format!("{} is not between 64 and 100000", self.text_chunk_limit),
            });
        }
        Ok(())
    }
}

impl Config {
    /// Every account the channels service runs, in a stable order (channel, then
    /// account): its position is the account's partition, so replicas of the service
    /// must share one configuration.
    pub fn channel_accounts(&self) -> Vec<AccountSpec> {
        self.channels
            .iter()
            .filter(|(c, _)| ADAPTERS.contains(&c.as_str()))
            .flat_map(|(c, p)| p.account_specs(c))
            .collect()
    }
}
