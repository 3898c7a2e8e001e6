//! Who may talk to which agent, in which session: `[session]`, `[[bindings]]`,
//! `[channels.<channel>]` and `[commands]`, with OpenClaw's names (`dmScope`,
//! `identityLinks`, `dmPolicy`, `allowFrom`, `groupPolicy`, `requireMention`,
//! `mentionPatterns`, ... are accepted as written there, or in snake case).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::ConfigError;

/// `[session]`: how messages map to sessions, and when a session starts afresh.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// How direct messages are grouped: `main` (all share `agent:<id>:<mainKey>`),
    /// `per-peer`, `per-channel-peer`, `per-account-channel-peer`.
    #[serde(alias = "dmScope")]
    pub dm_scope: String,
    /// The direct-message session's name under `main` (`agent:<id>:main`).
    #[serde(alias = "mainKey")]
    pub main_key: String,
    /// One person's identities on several channels: `alice = ["telegram:123",
    /// "discord:456"]` makes both `alice` in per-peer session keys.
    #[serde(alias = "identityLinks")]
    pub identity_links: BTreeMap<String, Vec<String>>,
    /// When a session starts afresh by itself (besides `/new` and `/reset`).
    pub reset: ResetPolicy,
    /// Per chat type (`direct`, `group`, `thread`), over `reset`.
    #[serde(alias = "resetByType")]
    pub reset_by_type: BTreeMap<String, ResetPolicy>,
    /// Per channel, over `reset_by_type` and `reset`.
    #[serde(alias = "resetByChannel")]
    pub reset_by_channel: BTreeMap<String, ResetPolicy>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            dm_scope: "main".into(),
            main_key: "main".into(),
            identity_links: BTreeMap::new(),
            reset: ResetPolicy::default(),
            reset_by_type: BTreeMap::new(),
            reset_by_channel: BTreeMap::new(),
        }
    }
}

/// A session reset policy: `none`, `daily` (the first message after `at_hour`, UTC,
/// starts a new session) or `idle` (a message after `idle_minutes` of silence does).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResetPolicy {
    pub mode: String,
    #[serde(alias = "atHour")]
    pub at_hour: u32,
    #[serde(alias = "idleMinutes")]
    pub idle_minutes: u64,
}

impl Default for ResetPolicy {
    fn default() -> Self {
        Self {
            mode: "none".into(),
            at_hour: 4,
            idle_minutes: 120,
        }
    }
}

/// `[[bindings]]`: messages matching `match` go to `agent_id`. The most specific
/// match wins: peer, parent peer (a thread's chat), peer wildcard, guild, team,
/// account, channel; nothing matching goes to the default agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    #[serde(alias = "agentId")]
    pub agent_id: String,
    #[serde(rename = "match")]
    pub matches: BindingMatch,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BindingMatch {
    pub channel: Option<String>,
    #[serde(alias = "accountId")]
    pub account_id: Option<String>,
    pub peer: Option<PeerMatch>,
    #[serde(alias = "guildId")]
    pub guild_id: Option<String>,
    #[serde(alias = "teamId")]
    pub team_id: Option<String>,
}

/// A chat: its kind (`direct`, `group`, `channel`) and id (`*`: any of that kind).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerMatch {
    pub kind: String,
    pub id: String,
}

/// `[channels.<channel>]`: who may reach the agents through a channel. The `http`
/// channel (the gateway, which checks its own token) is not subject to these.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelPolicy {
    /// Direct messages: `pairing` (an unknown sender gets a code for the owner to
    /// approve), `allowlist` (only `allow_from` and approved senders), `open`,
    /// `disabled`.
    #[serde(alias = "dmPolicy")]
    pub dm_policy: String,
    /// Senders allowed in direct messages (platform ids; `*` for anyone).
    #[serde(alias = "allowFrom")]
    pub allow_from: Vec<String>,
    /// Groups: `open`, `allowlist` (only the groups in `groups`), `disabled`.
    #[serde(alias = "groupPolicy")]
    pub group_policy: String,
    /// Senders allowed in groups (empty: anyone in an allowed group).
    #[serde(alias = "groupAllowFrom")]
    pub group_allow_from: Vec<String>,
    /// Allowed groups by id (`*`: every group), with their own settings.
    pub groups: BTreeMap<String, GroupPolicy>,
    /// In groups, answer only when mentioned (a native mention, a reply to the bot, or
    /// text matching `mention_patterns`).
    #[serde(alias = "requireMention")]
    pub require_mention: bool,
    /// Regular expressions (case-insensitive) that count as mentioning the bot.
    #[serde(alias = "mentionPatterns")]
    pub mention_patterns: Vec<String>,
    /// Unmentioned group messages kept as context for the next mentioned one.
    #[serde(alias = "historyLimit")]
    pub history_limit: usize,
    /// The default account's bot token (Telegram; `TELEGRAM_BOT_TOKEN`) or access
    /// token (Matrix). The channels service runs an adapter for every account with
    /// credentials.
    #[serde(alias = "botToken", alias = "access_token", alias = "accessToken")]
    pub bot_token: Option<secrecy::SecretString>,
    /// The platform API's root URL for the default account (default the platform's;
    /// Matrix: the homeserver).
    #[serde(
        alias = "apiRoot",
        alias = "homeserver",
        alias = "http_url",
        alias = "httpUrl"
    )]
    pub api_root: Option<String>,
    /// `false` keeps the default account configured but not run.
    pub enabled: Option<bool>,
    /// Further accounts (bots) on this channel, by account id.
    pub accounts: BTreeMap<String, crate::channels::ChannelAccount>,
    /// Seconds a long poll waits for news.
    #[serde(alias = "pollTimeoutSecs")]
    pub poll_timeout_secs: u64,
    /// Characters per platform message (capped at the platform's limit).
    #[serde(alias = "textChunkLimit")]
    pub text_chunk_limit: usize,
    /// A typing indicator while a turn runs.
    pub typing: bool,
    /// Telegram: `partial` shows the answer as it is written (a draft message edited
    /// as text arrives, turned into the reply at the end); `off` (default) sends the
    /// reply when it is complete.
    #[serde(alias = "streamMode")]
    pub stream_mode: String,
    /// IRC (the default account): the server `host:port`.
    pub server: Option<String>,
    /// IRC: TLS (default true).
    pub tls: Option<bool>,
    /// IRC: the bot's nickname (default `clawbus`).
    pub nick: Option<String>,
    /// IRC: the server password.
    pub password: Option<secrecy::SecretString>,
    /// IRC: identify to NickServ with this password.
    #[serde(alias = "nickservPassword")]
    pub nickserv_password: Option<secrecy::SecretString>,
    /// IRC: channels to join.
    pub join: Vec<String>,
    /// IRC: certificate authorities (PEM) trusted besides the web's roots.
    #[serde(alias = "tlsCaFile")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Telegram: updates by webhook at this public URL (with `webhook_secret`).
    #[serde(alias = "webhookUrl")]
    pub webhook_url: Option<String>,
    /// Telegram: the webhook's secret token.
    #[serde(alias = "webhookSecret")]
    pub webhook_secret: Option<secrecy::SecretString>,
    /// Telegram: where the webhook listener binds (default `127.0.0.1:8787`).
    #[serde(alias = "webhookListen")]
    pub webhook_listen: Option<String>,
    /// Signal: the account's phone number, as signal-cli knows it.
    #[serde(
        alias = "account",
        default,
        deserialize_with = "crate::channels::phone_number"
    )]
    pub number: Option<String>,
    /// Slack: the app's signing secret (the gateway checks Events API calls with it).
    #[serde(alias = "signingSecret")]
    pub signing_secret: Option<secrecy::SecretString>,
    /// Slack: an app-level token (`xapp-…`): Socket Mode instead of the Events API.
    #[serde(alias = "appToken")]
    pub app_token: Option<secrecy::SecretString>,
}

impl Default for ChannelPolicy {
    fn default() -> Self {
        Self {
            dm_policy: "pairing".into(),
            allow_from: Vec::new(),
            group_policy: "allowlist".into(),
            group_allow_from: Vec::new(),
            groups: BTreeMap::new(),
            require_mention: true,
            mention_patterns: Vec::new(),
            history_limit: 50,
            bot_token: None,
            api_root: None,
            enabled: None,
            accounts: BTreeMap::new(),
            poll_timeout_secs: 30,
            text_chunk_limit: 4000,
            typing: true,
            stream_mode: "off".into(),
            server: None,
            tls: None,
            nick: None,
            password: None,
            nickserv_password: None,
            join: Vec::new(),
            tls_ca_file: None,
            webhook_url: None,
            webhook_secret: None,
            webhook_listen: None,
            number: None,
            signing_secret: None,
            app_token: None,
        }
    }
}

/// `[channels.<channel>.groups.<id>]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupPolicy {
    #[serde(alias = "requireMention")]
    pub require_mention: Option<bool>,
    #[serde(alias = "allowFrom")]
    pub allow_from: Option<Vec<String>>,
}

/// `[heartbeat]`: a turn in each listed agent's main session every `every` inside
/// the active hours, answered where its owner last wrote; an answer of `HEARTBEAT_OK`
/// is not delivered.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    /// `30m`, `1h`, ...; empty or `0`: no heartbeat.
    pub every: String,
    #[serde(alias = "activeHours")]
    pub active_hours: ActiveHours,
    /// Agents with a heartbeat (empty: the default agent).
    pub agents: Vec<String>,
    /// The heartbeat turn's message (default: read HEARTBEAT.md, reply HEARTBEAT_OK
    /// when nothing needs attention).
    pub prompt: Option<String>,
}

/// Hours of the day (`HH:MM`, in `timezone`) in which heartbeats run; `start` after
/// `end` spans midnight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActiveHours {
    pub start: String,
    pub end: String,
    pub timezone: String,
}

impl Default for ActiveHours {
    fn default() -> Self {
        Self {
            start: "00:00".into(),
            end: "24:00".into(),
            timezone: "UTC".into(),
        }
    }
}

impl HeartbeatConfig {
    /// The interval in ms (0: off).
    pub fn every_ms(&self) -> i64 {
        match self.every.trim() {
            "" | "0" => 0,
            s => parse_duration(s).unwrap_or(0),
        }
    }

    /// The agents with a heartbeat.
    pub fn agents(&self, default_agent: &str) -> Vec<String> {
        if self.agents.is_empty() {
            vec![default_agent.to_owned()]
        } else {
            self.agents.clone()
        }
    }

    pub(crate) fn validate(&self, agents: &[String]) -> Result<(), ConfigError> {
        let invalid = |field, reason: String| ConfigError::Invalid { field, reason };
        if !matches!(self.every.trim(), "" | "0") {
            let ms = parse_duration(&self.every).map_err(|e| invalid("heartbeat.every", e))?;
            if ms < 1_000 {
                return Err(invalid("heartbeat.every", "must be at least 1s".into()));
            }
        }
        for (field, v) in [
            ("heartbeat.active_hours.start", &self.active_hours.start),
            ("heartbeat.active_hours.end", &self.active_hours.end),
        ] {
            minute_of_day(v).ok_or_else(|| invalid(field, format!("`{v}` is not HH:MM")))?;
        }
        if let Some(a) = self.agents.iter().find(|a| !agents.contains(a)) {
            return Err(invalid(
                "heartbeat.agents",
                format!("`{a}` is not in router.agents"),
            ));
        }
        Ok(())
    }
}

/// `HH:MM` (00:00-24:00) as minutes since midnight.
pub fn minute_of_day(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let digits = |t: &str, n| (n..=2).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(h, 1) || !digits(m, 2) {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then(|| h * 60 + m)
}

/// A duration such as `30s`, `5m`, `2h`, `1d` (or a combination, `1h30m`), in ms.
pub fn parse_duration(s: &str) -> Result<i64, String> {
    let bad = || format!("`{s}` is not a duration (30s, 5m, 2h, 1d, 1h30m)");
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(bad()),
        };
        let n: i64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() || total <= 0 {
        return Err(bad());
    }
    Ok(total)
}

/// The queue modes: what becomes of a session's messages while a run goes on.
pub const QUEUE_MODES: &[&str] = &["steer", "followup", "collect", "interrupt"];

/// `[messages]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagesConfig {
    pub queue: QueueConfig,
}

/// `[messages.queue]`: what becomes of a chat session's messages while a run goes on
/// (`/queue` sets a session's own). The gateway's requests each run on their own
/// (`followup`, no cap: each has a client waiting for it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub mode: String,
    #[serde(alias = "byChannel")]
    pub by_channel: BTreeMap<String, String>,
    /// A queued run starts only once the session has been quiet this long.
    #[serde(alias = "debounceMs")]
    pub debounce_ms: u32,
    /// Messages a session may have queued; beyond it `drop` decides.
    pub cap: u32,
    /// Which go when the queue is over its cap: `old` (the oldest), `new` (the
    /// newest), `summarize` (the oldest, one line each of them given to the next run).
    pub drop: String,
}

/// The drop policies of a full queue.
pub const QUEUE_DROPS: &[&str] = &["old", "new", "summarize"];

/// Bounds of the queue options (config and `/queue`).
pub const MAX_QUEUE_CAP: u32 = 1000;
pub const MAX_QUEUE_DEBOUNCE_MS: u32 = 60_000;

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            mode: "steer".into(),
            by_channel: BTreeMap::new(),
            debounce_ms: 500,
            cap: 20,
            drop: "summarize".into(),
        }
    }
}

impl QueueConfig {
    /// The mode of a channel's sessions.
    pub fn mode_for(&self, channel: &str) -> &str {
        self.by_channel.get(channel).unwrap_or(&self.mode)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for m in std::iter::once(&self.mode).chain(self.by_channel.values()) {
            one_of("messages.queue.mode", m, QUEUE_MODES)?;
        }
        one_of("messages.queue.drop", &self.drop, QUEUE_DROPS)?;
        if self.cap == 0 || self.cap > MAX_QUEUE_CAP {
            return Err(ConfigError::Invalid {
                field: "messages.queue.cap",
                reason: format!("{} is not between 1 and {MAX_QUEUE_CAP}", self.cap),
            });
        }
        if self.debounce_ms > MAX_QUEUE_DEBOUNCE_MS {
            return Err(ConfigError::Invalid {
                field: "messages.queue.debounce_ms",
                reason: format!("{} is over {MAX_QUEUE_DEBOUNCE_MS}", self.debounce_ms),
            });
        }
        Ok(())
    }
}

/// A debounce such as `0`, `750ms`, `2s` or `1m`, in ms (at most a minute).
pub fn parse_debounce(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let ms = if s == "0" {
        Some(0)
    } else if let Some(n) = s.strip_suffix("ms") {
        n.parse::<u32>().ok()
    } else {
        parse_duration(s).ok().and_then(|v| u32::try_from(v).ok())
    };
    match ms {
        Some(v) if v <= MAX_QUEUE_DEBOUNCE_MS => Ok(v),
        _ => Err(format!(
            "`{}` is not a debounce (0, 750ms, 2s, up to 1m)",
            s.chars().take(32).collect::<String>()
        )),
    }
}

/// `[commands]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// Who may use owner-only commands (`/approve`), as `<channel>:<sender id>`.
    /// Messages through the gateway (its token) are the owner's.
    #[serde(alias = "ownerAllowFrom")]
    pub owner_allow_from: Vec<String>,
}

const DM_SCOPES: &[&str] = &[
    "main",
    "per-peer",
    "per-channel-peer",
    "per-account-channel-peer",
];

pub(crate) fn one_of(field: &'static str, v: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    if allowed.contains(&v) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field,
            reason: format!("`{v}` is not one of {}", allowed.join(", ")),
        })
    }
}

impl SessionConfig {
    /// The reset policy of a chat type (`direct`, `group`, `thread`) on a channel.
    pub fn reset_for(&self, channel: &str, chat_type: &str) -> &ResetPolicy {
        self.reset_by_channel
            .get(channel)
            .or_else(|| self.reset_by_type.get(chat_type))
            .unwrap_or(&self.reset)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        one_of("session.dm_scope", &self.dm_scope, DM_SCOPES)?;
        if !crate::is_token(&self.main_key) {
            return Err(ConfigError::Invalid {
                field: "session.main_key",
                reason: "must be letters, digits, `_` or `-`".into(),
            });
        }
        for p in std::iter::once(&self.reset)
            .chain(self.reset_by_type.values())
            .chain(self.reset_by_channel.values())
        {
            one_of("session.reset.mode", &p.mode, &["none", "daily", "idle"])?;
            if p.at_hour > 23 {
                return Err(ConfigError::Invalid {
                    field: "session.reset.at_hour",
                    reason: "must be 0-23".into(),
                });
            }
            if p.mode == "idle" && p.idle_minutes == 0 {
                return Err(ConfigError::Invalid {
                    field: "session.reset.idle_minutes",
                    reason: "must be at least 1".into(),
                });
            }
        }
        for t in self.reset_by_type.keys() {
            one_of("session.reset_by_type", t, &["direct", "group", "thread"])?;
        }
        Ok(())
    }
}

impl ChannelPolicy {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        one_of(
            "channels.dm_policy",
            &self.dm_policy,
            &["pairing", "allowlist", "open", "disabled"],
        )?;
        one_of(
            "channels.group_policy",
            &self.group_policy,
            &["open", "allowlist", "disabled"],
        )?;
        for p in &self.mention_patterns {
            regex::RegexBuilder::new(p)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| ConfigError::Invalid {
                    field: "channels.mention_patterns",
                    reason: format!("`{p}`: {e}"),
                })?;
        }
        Ok(())
    }
}

/// Checks bindings against the agents that exist.
pub(crate) fn validate_bindings(
    bindings: &[Binding],
    agents: &[String],
) -> Result<(), ConfigError> {
    for b in bindings {
        if !agents.contains(&b.agent_id) {
            return Err(ConfigError::Invalid {
                field: "bindings.agent_id",
                reason: format!("`{}` is not in router.agents", b.agent_id),
            });
        }
        if let Some(p) = &b.matches.peer {
            one_of(
                "bindings.match.peer.kind",
                &p.kind,
                &["direct", "group", "channel"],
            )?;
        }
    }
    Ok(())
}
