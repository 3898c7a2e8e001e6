//! Which agent a message goes to (`[[bindings]]`) and in which session (OpenClaw's
//! session keys, `[session] dm_scope` and `identity_links`). Pure: no I/O.

use clawbus_bus::{subjects, topology};
use clawbus_config::{Binding, Config};
use clawbus_wire::{ChatKind, InboundMessage};

use crate::RouteError;

pub use clawbus_wire::MAX_TEXT_BYTES;
/// Longest accepted session key (bytes).
pub const MAX_SESSION_KEY_BYTES: usize = 256;

/// The routing decision for one inbound message.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub agent_id: String,
    pub session_key: String,
    pub partition: u32,
    /// `direct`, `group` or `thread`: which reset policy applies.
    pub chat_type: &'static str,
}

/// The kind of a chat as bindings name it.
pub fn peer_kind(kind: ChatKind) -> &'static str {
    match kind {
        ChatKind::Group => "group",
        ChatKind::Channel => "channel",
        ChatKind::Direct | ChatKind::Unknown => "direct",
    }
}

/// How specific a binding's match of `m` is (lower wins), or `None` when it does not
/// match: peer, parent peer, peer wildcard, guild, team, account, channel.
fn specificity(b: &Binding, m: &InboundMessage) -> Option<u8> {
    let w = &b.matches;
    if w.channel.as_deref().is_some_and(|c| c != m.channel) {
        return None;
    }
    if w.account_id.as_deref().is_some_and(|a| a != m.account) {
        return None;
    }
    if let Some(p) = &w.peer {
        let kind = peer_kind(m.chat.kind);
        if p.kind != kind {
            return None;
        }
        // A direct chat is its sender (and, on most platforms, a chat of the same id).
        let exact = p.id == m.chat.id || (kind == "direct" && p.id == m.sender.id);
        return if exact {
            Some(0)
        } else if m.chat.parent_id.as_deref() == Some(p.id.as_str()) {
            Some(1)
        } else if p.id == "*" {
            Some(2)
        } else {
            None
        };
    }
    if let Some(g) = &w.guild_id {
        return (m.chat.guild_id.as_deref() == Some(g.as_str())).then_some(3);
    }
    if let Some(t) = &w.team_id {
        return (m.chat.team_id.as_deref() == Some(t.as_str())).then_some(4);
    }
    if w.account_id.is_some() {
        return Some(5);
    }
    if w.channel.is_some() {
        return Some(6);
    }
    None
}

/// The agent the bindings give `m`: the most specific match, the first of equals.
pub fn bound_agent<'a>(bindings: &'a [Binding], m: &InboundMessage) -> Option<&'a str> {
    bindings
        .iter()
        .enumerate()
        .filter_map(|(i, b)| specificity(b, m).map(|s| (s, i, b)))
        .min_by_key(|(s, i, _)| (*s, *i))
        .map(|(_, _, b)| b.agent_id.as_str())
}

/// Text safe inside a session key: whitespace and control characters become `_`.
fn key_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The sender as a per-peer session names them: their `identity_links` name when one
/// lists `<channel>:<id>` (or the bare id), else the id.
fn peer_name(cfg: &Config, m: &InboundMessage) -> String {
    let full = format!("{}:{}", m.channel, m.sender.id);
    cfg.session
        .identity_links
        .iter()
        .find(|(_, ids)| ids.iter().any(|i| *i == full || *i == m.sender.id))
        .map_or_else(|| m.sender.id.clone(), |(name, _)| name.clone())
}

/// The session key of a message without one given: direct chats by `dm_scope`,
/// groups and channels by chat, threads and topics appended.
pub fn session_key(cfg: &Config, agent: &str, m: &InboundMessage) -> String {
    let base = match m.chat.kind {
        ChatKind::Direct | ChatKind::Unknown => {
            let peer = key_part(&peer_name(cfg, m));
            match cfg.session.dm_scope.as_str() {
                "per-peer" => format!("agent:{agent}:direct:{peer}"),
                "per-channel-peer" => format!("agent:{agent}:{}:direct:{peer}", m.channel),
                "per-account-channel-peer" => {
                    format!("agent:{agent}:{}:{}:direct:{peer}", m.channel, m.account)
                }
                _ => format!("agent:{agent}:{}", cfg.session.main_key),
            }
        }
        kind => format!(
            "agent:{agent}:{}:{}:{}",
            m.channel,
            peer_kind(kind),
            key_part(&m.chat.id)
        ),
    };
    match &m.thread_id {
        // Telegram forum topics, others' threads.
        Some(t) if m.channel == "telegram" => format!("{base}:topic:{}", key_part(t)),
        Some(t) => format!("{base}:thread:{}", key_part(t)),
        None => base,
    }
}

/// Resolves agent and session key of an inbound message.
pub fn resolve(cfg: &Config, m: &InboundMessage) -> Result<Route, RouteError> {
    // A message without text is only a caller answering its functions' calls.
    if m.text.trim().is_empty() && m.caller_results().is_empty() {
        return Err(RouteError::EmptyText);
    }
    if m.text.len() > MAX_TEXT_BYTES {
        return Err(RouteError::TextTooLong(m.text.len()));
    }
    let router = &cfg.router;
    let agent_id = match &m.agent_id {
        Some(a) if router.agents.iter().any(|x| x == a) => a.clone(),
        Some(a) => return Err(RouteError::UnknownAgent(a.clone())),
        None => bound_agent(&cfg.bindings, m)
            .unwrap_or(&router.default_agent)
            .to_owned(),
    };
    let session_key = match &m.session_key {
        Some(k) => {
            validate_session_key(k)?;
            let prefix = format!("agent:{agent_id}:");
            if !k.starts_with(&prefix) {
                return Err(RouteError::InvalidSessionKey(format!(
                    "must start with `{prefix}`"
                )));
            }
            k.clone()
        }
        None => {
            let k = session_key(cfg, &agent_id, m);
            validate_session_key(&k)?;
            k
        }
    };
    let chat_type = if m.thread_id.is_some() {
        "thread"
    } else if matches!(m.chat.kind, ChatKind::Group | ChatKind::Channel) {
        "group"
    } else {
        "direct"
    };
    let partition = subjects::partition(&session_key, topology::PARTITIONS);
    Ok(Route {
        agent_id,
        session_key,
        partition,
        chat_type,
    })
}

fn validate_session_key(k: &str) -> Result<(), RouteError> {
    if k.is_empty() || k.len() > MAX_SESSION_KEY_BYTES {
        return Err(RouteError::InvalidSessionKey(format!(
            "must be 1-{MAX_SESSION_KEY_BYTES} bytes"
        )));
    }
    if k.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(RouteError::InvalidSessionKey(
            "must not contain whitespace or control characters".into(),
        ));
    }
    Ok(())
}
