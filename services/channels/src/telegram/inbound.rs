//! A Telegram update as an inbound message of the suite.

use clawbus_wire::{ChatKind, ChatRef, InboundMessage, ReplyRef, Sender};

use super::api::{Entity, Message, Update, User};

/// The bot as Telegram knows it (from `getMe`).
#[derive(Debug, Clone)]
pub struct Me {
    pub id: i64,
    /// Without the `@`.
    pub username: String,
}

impl From<&User> for Me {
    fn from(u: &User) -> Me {
        Me {
            id: u.id,
            username: u.username.clone().unwrap_or_default(),
        }
    }
}

/// The platform message id of a Telegram message: ids are unique per chat only.
pub fn message_id(chat_id: i64, id: i64) -> String {
    format!("{chat_id}:{id}")
}

/// The message id within its chat, from [`message_id`]'s form.
pub fn parse_message_id(s: &str) -> Option<i64> {
    s.rsplit(':').next()?.parse().ok()
}

/// The inbound message of `u`, or `None` for updates that carry no text for an agent
/// (service messages, stickers, edits).
pub fn to_inbound(u: &Update, account: &str, me: &Me) -> Option<InboundMessage> {
    let m = u.message.as_ref()?;
    let (text, entities) = match (&m.text, &m.caption) {
        (Some(t), _) => (t.as_str(), &m.entities),
        (None, Some(c)) => (c.as_str(), &m.caption_entities),
        _ => return None,
    };
    if text.trim().is_empty() {
        return None;
    }
    let from = m.from.as_ref();
    let kind = match m.chat.kind.as_str() {
        "private" => ChatKind::Direct,
        "group" | "supergroup" => ChatKind::Group,
        "channel" => ChatKind::Channel,
        _ => ChatKind::Unknown,
    };
    let mentions_bot = entities.iter().any(|e| mentions(e, text, me));
    Some(InboundMessage {
        channel: "telegram".into(),
        account: account.into(),
        message_id: message_id(m.chat.id, m.message_id),
        chat: ChatRef {
            id: m.chat.id.to_string(),
            kind,
            title: m.chat.title.clone(),
            ..Default::default()
        },
        sender: Sender {
            id: from
                .map(|f| f.id.to_string())
                .unwrap_or_else(|| m.chat.id.to_string()),
            display_name: from.map(display_name),
            is_bot: from.is_some_and(|f| f.is_bot),
        },
        // Forum topics are threads of their group; replies in a plain group carry
        // a thread id too, which is not a topic.
        thread_id: m
            .message_thread_id
            .filter(|_| m.is_topic_message && m.chat.is_forum)
            .map(|t| t.to_string()),
        reply_to: m.reply_to_message.as_ref().map(|r| reply_ref(r, me)),
        text: strip_command_target(text, &me.username),
        mentions_bot,
        ..Default::default()
    })
}

fn reply_ref(r: &Message, me: &Me) -> ReplyRef {
    ReplyRef {
        message_id: message_id(r.chat.id, r.message_id),
        text: r.text.clone().or_else(|| r.caption.clone()),
        from_bot: r.from.as_ref().is_some_and(|f| f.id == me.id),
    }
}

fn display_name(u: &User) -> String {
    match (&u.last_name, &u.username) {
        (Some(l), _) => format!("{} {l}", u.first_name),
        (None, _) if !u.first_name.is_empty() => u.first_name.clone(),
        (None, Some(n)) => n.clone(),
        _ => u.id.to_string(),
    }
}

/// The part of `text` an entity covers (offsets in UTF-16 code units).
fn entity_text(text: &str, e: &Entity) -> Option<String> {
    let units: Vec<u16> = text.encode_utf16().collect();
    let end = e.offset.checked_add(e.length)?;
    units.get(e.offset..end).map(String::from_utf16_lossy)
}

/// True when entity `e` names this bot: `@username`, a mention of its user, or a
/// command addressed to it (`/status@username`).
fn mentions(e: &Entity, text: &str, me: &Me) -> bool {
    match e.kind.as_str() {
        "text_mention" => e.user.as_ref().is_some_and(|u| u.id == me.id),
        "mention" => entity_text(text, e).is_some_and(|t| {
            !me.username.is_empty() && t.eq_ignore_ascii_case(&format!("@{}", me.username))
        }),
        "bot_command" => entity_text(text, e).is_some_and(|t| {
            !me.username.is_empty()
                && t.to_ascii_lowercase()
                    .ends_with(&format!("@{}", me.username.to_ascii_lowercase()))
        }),
        _ => false,
    }
}

/// `/status@my_bot rest` → `/status rest`: in groups Telegram appends the bot's name
/// to commands; the router knows them without it.
fn strip_command_target(text: &str, username: &str) -> String {
    if !text.starts_with('/') || username.is_empty() {
        return text.to_owned();
    }
    let (first, rest) = text
        .split_once(char::is_whitespace)
        .map_or((text, ""), |(a, b)| (a, b));
    match first.split_once('@') {
        Some((cmd, target)) if target.eq_ignore_ascii_case(username) => {
            if rest.is_empty() {
                cmd.to_owned()
            } else {
                format!("{cmd} {rest}")
            }
        }
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Me {
        Me {
            id: 42,
            username: "clawbot".into(),
        }
    }

    fn update(json: serde_json::Value) -> Update {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_private_message_becomes_a_direct_message() {
        let u = update(serde_json::json!({"update_id": 7, "message": {
            "message_id": 5, "date": 1, "text": "hi",
            "from": {"id": 1001, "is_bot": false, "first_name": "Ada", "last_name": "L"},
            "chat": {"id": 1001, "type": "private", "first_name": "Ada"}}}));
        let m = to_inbound(&u, "default", &me()).unwrap();
        assert_eq!(m.message_id, "1001:5");
        assert_eq!(
            (m.chat.id.as_str(), m.chat.kind),
            ("1001", ChatKind::Direct)
        );
        assert_eq!(m.sender.display_name.as_deref(), Some("Ada L"));
        assert!(!m.mentions_bot && m.thread_id.is_none());
    }

    #[test]
    fn mentions_count_after_astral_characters_by_utf16_offsets() {
        // 😀 is two UTF-16 units: the mention starts at offset 3.
        let u = update(serde_json::json!({"update_id": 1, "message": {
            "message_id": 9, "date": 1, "text": "😀 @ClawBot hello",
            "entities": [{"type": "mention", "offset": 3, "length": 8}],
            "from": {"id": 5, "first_name": "B"},
            "chat": {"id": -100, "type": "supergroup", "title": "Family"}}}));
        let m = to_inbound(&u, "default", &me()).unwrap();
        assert!(m.mentions_bot);
        assert_eq!(m.chat.kind, ChatKind::Group);
        // Another bot's name is no mention.
        let u = update(serde_json::json!({"update_id": 1, "message": {
            "message_id": 9, "date": 1, "text": "@otherbot hi",
            "entities": [{"type": "mention", "offset": 0, "length": 9}],
            "from": {"id": 5, "first_name": "B"}, "chat": {"id": -100, "type": "group"}}}));
        assert!(!to_inbound(&u, "default", &me()).unwrap().mentions_bot);
    }

    #[test]
    fn replies_to_the_bot_topics_and_addressed_commands() {
        let u = update(serde_json::json!({"update_id": 1, "message": {
            "message_id": 10, "date": 1, "text": "/status@clawbot now",
            "entities": [{"type": "bot_command", "offset": 0, "length": 15}],
            "message_thread_id": 77, "is_topic_message": true,
            "reply_to_message": {"message_id": 3, "date": 1, "text": "earlier",
                "from": {"id": 42, "is_bot": true, "first_name": "Claw"},
                "chat": {"id": -5, "type": "supergroup"}},
            "from": {"id": 5, "first_name": "B"},
            "chat": {"id": -5, "type": "supergroup", "is_forum": true}}}));
        let m = to_inbound(&u, "default", &me()).unwrap();
        assert_eq!(m.text, "/status now");
        assert!(m.mentions_bot);
        assert_eq!(m.thread_id.as_deref(), Some("77"));
        let r = m.reply_to.unwrap();
        assert!(r.from_bot);
        assert_eq!(r.message_id, "-5:3");
        assert_eq!(parse_message_id(&r.message_id), Some(3));
    }

    #[test]
    fn updates_without_text_and_hostile_entities_are_harmless() {
        let u = update(serde_json::json!({"update_id": 1, "message": {
            "message_id": 1, "date": 1, "chat": {"id": 1, "type": "private"}}}));
        assert!(to_inbound(&u, "default", &me()).is_none());
        assert!(to_inbound(&update(serde_json::json!({"update_id": 2})), "d", &me()).is_none());
        // Entities pointing past the text, or overflowing, are ignored.
        let u = update(serde_json::json!({"update_id": 1, "message": {
            "message_id": 1, "date": 1, "text": "hi",
            "entities": [{"type": "mention", "offset": 1, "length": 99},
                         {"type": "mention", "offset": usize::MAX, "length": 2}],
            "chat": {"id": 1, "type": "private"}}}));
        let m = to_inbound(&u, "default", &me()).unwrap();
        assert!(!m.mentions_bot);
        assert_eq!(m.sender.id, "1");
    }
}
