//! Who may reach an agent through a channel (`[channels.<channel>]`): direct-message
//! policy with pairing, group policy with allowlists and mention gating. Pure: the
//! caller looks up whether a sender was approved by pairing.

use clawbus_config::{ChannelPolicy, Config};
use clawbus_wire::{ChatKind, InboundMessage};
use regex::{Regex, RegexBuilder};

/// What becomes of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Access {
    /// It goes to the agent.
    Allow,
    /// An unknown sender under `dmPolicy = "pairing"`: they get a code, the agent
    /// nothing.
    Pair,
    /// A group message that did not mention the bot: kept as context for the next
    /// one that does.
    Context,
    /// Dropped without an answer (the reason is logged and counted).
    Drop(&'static str),
}

/// The policies of every configured channel, patterns compiled once.
pub struct Policies {
    channels: std::collections::BTreeMap<String, (ChannelPolicy, Vec<Regex>)>,
    default: (ChannelPolicy, Vec<Regex>),
}

impl Policies {
    pub fn new(cfg: &Config) -> Self {
        let compile = |p: &ChannelPolicy| {
            let patterns = p
                .mention_patterns
                .iter()
                .filter_map(|s| {
                    RegexBuilder::new(s)
                        .case_insensitive(true)
                        .size_limit(1 << 20)
                        .build()
                        .ok()
                })
                .collect();
            (p.clone(), patterns)
        };
        Self {
            channels: cfg
                .channels
                .iter()
                .map(|(k, p)| (k.clone(), compile(p)))
                .collect(),
            default: compile(&ChannelPolicy::default()),
        }
    }

    fn of(&self, channel: &str) -> &(ChannelPolicy, Vec<Regex>) {
        self.channels.get(channel).unwrap_or(&self.default)
    }

    /// Unmentioned group messages kept for a channel.
    pub fn history_limit(&self, channel: &str) -> usize {
        self.of(channel).0.history_limit
    }

    /// Whether the message addresses the bot: a native mention, a reply to the bot,
    /// or a mention pattern.
    pub fn mentioned(&self, m: &InboundMessage) -> bool {
        m.mentions_bot
            || m.reply_to.as_ref().is_some_and(|r| r.from_bot)
            || self.of(&m.channel).1.iter().any(|r| r.is_match(&m.text))
    }

    /// What becomes of `m`; `approved`: the sender was approved by pairing;
    /// `command`: the text is a command (addressed to the bot, no mention needed).
    pub fn decide(&self, m: &InboundMessage, approved: bool, command: bool) -> Access {
        // The gateway checked its own token: its callers are the owner's.
        if m.channel == "http" {
            return Access::Allow;
        }
        if m.sender.is_bot {
            return Access::Drop("sent by a bot");
        }
        let (p, _) = self.of(&m.channel);
        let listed = |list: &[String]| {
            list.iter().any(|a| {
                a == "*" || *a == m.sender.id || *a == format!("{}:{}", m.channel, m.sender.id)
            })
        };
        match m.chat.kind {
            ChatKind::Direct | ChatKind::Unknown => match p.dm_policy.as_str() {
                "disabled" => Access::Drop("direct messages are disabled"),
                "open" => Access::Allow,
                _ if listed(&p.allow_from) || approved => Access::Allow,
                "allowlist" => Access::Drop("sender not on the allowlist"),
                _ => Access::Pair,
            },
            ChatKind::Group | ChatKind::Channel => {
                // The chat, the chat it belongs to, its server (a Discord guild, a
                // Slack workspace: every channel of it), then `*`.
                let group = [
                    Some(&m.chat.id),
                    m.chat.parent_id.as_ref(),
                    m.chat.guild_id.as_ref(),
                    m.chat.team_id.as_ref(),
                ]
                .into_iter()
                .flatten()
                .find_map(|id| p.groups.get(id))
                .or_else(|| p.groups.get("*"));
                match p.group_policy.as_str() {
                    "disabled" => return Access::Drop("groups are disabled"),
                    "allowlist" if group.is_none() => {
                        return Access::Drop("group not on the allowlist")
                    }
                    _ => {}
                }
                let senders = group
                    .and_then(|g| g.allow_from.as_ref())
                    .unwrap_or(&p.group_allow_from);
                if !senders.is_empty() && !listed(senders) {
                    return Access::Drop("sender not allowed in this group");
                }
                let require = group
                    .and_then(|g| g.require_mention)
                    .unwrap_or(p.require_mention);
                if require && !command && !self.mentioned(m) {
                    Access::Context
                } else {
                    Access::Allow
                }
            }
        }
    }
}

/// Whether a sender is an owner: `[commands] owner_allow_from` lists
/// `<channel>:<id>` (or `*`); the gateway's callers always are.
pub fn is_owner(cfg: &Config, m: &InboundMessage) -> bool {
    m.channel == "http"
        || cfg
            .commands
            .owner_allow_from
            .iter()
            .any(|o| o == "*" || *o == format!("{}:{}", m.channel, m.sender.id))
}
