//! Inbound: a MESSAGE_CREATE as an inbound message, and the threads the account has
//! seen (a thread is a channel of its own whose parent decides the allowlist).

use std::collections::{HashMap, VecDeque};

use clawbus_wire::{ChatKind, ChatRef, InboundMessage, ReplyRef, Sender};
use serde_json::Value;

use super::snowflake;

/// Threads remembered, at most (the oldest are forgotten beyond).
const MAX_THREADS: usize = 10_000;

/// The threads the gateway told of (THREAD_CREATE, THREAD_UPDATE, THREAD_LIST_SYNC and
/// the active threads of GUILD_CREATE): thread channel id → parent channel id.
#[derive(Default)]
pub(super) struct Threads {
    parents: HashMap<String, String>,
    order: VecDeque<String>,
}

impl Threads {
    /// Learns what dispatch `t` with data `d` says of threads.
    pub fn learn(&mut self, t: &str, d: &Value) {
        match t {
            "THREAD_CREATE" | "THREAD_UPDATE" => self.add(d),
            "THREAD_LIST_SYNC" | "GUILD_CREATE" => {
                for th in d["threads"].as_array().into_iter().flatten() {
                    self.add(th);
                }
            }
            "THREAD_DELETE" => {
                if let Some(id) = d["id"].as_str() {
                    self.parents.remove(id);
                }
            }
            _ => {}
        }
    }

    /// A thread channel (types 10, 11 and 12) and its parent.
    fn add(&mut self, ch: &Value) {
        let (Some(id), Some(parent)) = (ch["id"].as_str(), ch["parent_id"].as_str()) else {
            return;
        };
        if !matches!(ch["type"].as_u64(), Some(10..=12)) || !snowflake(id) || !snowflake(parent) {
            return;
        }
        if self
            .parents
            .insert(id.to_owned(), parent.to_owned())
            .is_none()
        {
            self.order.push_back(id.to_owned());
            while self.order.len() > MAX_THREADS {
                if let Some(old) = self.order.pop_front() {
                    self.parents.remove(&old);
                }
            }
        }
    }

    /// The parent channel of `channel` when it is a thread.
    pub fn parent(&self, channel: &str) -> Option<&str> {
        self.parents.get(channel).map(String::as_str)
    }
}

/// The inbound message of a MESSAGE_CREATE, or `None` for bots (this one included),
/// system messages and empty content.
///
/// A message in a thread is one of the thread's parent channel (its allowlist entry,
/// its bindings) with the thread as `thread_id`: the session is the thread's, the reply
/// goes into the thread.
pub(super) fn to_inbound(
    d: &Value,
    account: &str,
    me: &str,
    threads: &Threads,
) -> Option<InboundMessage> {
    let author = &d["author"];
    let (id, channel, author_id) = (
        d["id"].as_str()?,
        d["channel_id"].as_str()?,
        author["id"].as_str()?,
    );
    if author["bot"] == true || author_id == me || !snowflake(id) || !snowflake(channel) {
        return None;
    }
    let content = d["content"].as_str()?;
    if content.trim().is_empty() {
        return None;
    }
    let guild = d["guild_id"].as_str().map(str::to_owned);
    let mentioned = d["mentions"]
        .as_array()
        .is_some_and(|ms| ms.iter().any(|m| m["id"].as_str() == Some(me)));
    let reply_to = d["referenced_message"]["id"].as_str().map(|rid| ReplyRef {
        message_id: rid.to_owned(),
        text: d["referenced_message"]["content"]
            .as_str()
            .map(str::to_owned),
        from_bot: d["referenced_message"]["author"]["id"].as_str() == Some(me),
    });
    let text = if me.is_empty() {
        content.to_owned()
    } else {
        content
            .replace(&format!("<@{me}>"), "")
            .replace(&format!("<@!{me}>"), "")
            .trim()
            .to_owned()
    };
    let (chat, thread_id) = match threads.parent(channel) {
        Some(parent) => (parent.to_owned(), Some(channel.to_owned())),
        None => (channel.to_owned(), None),
    };
    Some(InboundMessage {
        channel: "discord".into(),
        account: account.into(),
        message_id: id.to_owned(),
        thread_id,
        chat: ChatRef {
            id: chat,
            kind: if guild.is_some() {
                ChatKind::Group
            } else {
                ChatKind::Direct
            },
            guild_id: guild,
            ..Default::default()
        },
        sender: Sender {
            id: author_id.to_owned(),
            display_name: author["global_name"]
                .as_str()
                .or_else(|| author["username"].as_str())
                .map(str::to_owned),
            is_bot: false,
        },
        reply_to,
        text: if text.is_empty() {
            content.to_owned()
        } else {
            text
        },
        mentions_bot: mentioned,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn guild_and_direct_messages_mentions_and_replies() {
        let d = json!({"id": "111", "channel_id": "222", "guild_id": "333", "content": "<@42> lunch?",
            "author": {"id": "7", "username": "ada"}, "mentions": [{"id": "42"}],
            "referenced_message": {"id": "100", "content": "earlier", "author": {"id": "42"}}});
        let m = to_inbound(&d, "default", "42", &Threads::default()).unwrap();
        assert_eq!(
            (m.chat.kind, m.chat.guild_id.as_deref()),
            (ChatKind::Group, Some("333"))
        );
        assert!(m.mentions_bot);
        assert_eq!(m.text, "lunch?");
        assert!(m.reply_to.unwrap().from_bot);
        let dm = json!({"id": "112", "channel_id": "223", "content": "hi", "author": {"id": "7"}});
        assert_eq!(
            to_inbound(&dm, "default", "42", &Threads::default())
                .unwrap()
                .chat
                .kind,
            ChatKind::Direct
        );
    }

    #[test]
    fn bots_odd_ids_and_empty_messages_are_skipped() {
        for d in [
            json!({"id": "1", "channel_id": "2", "content": "x", "author": {"id": "9", "bot": true}}),
            json!({"id": "1", "channel_id": "2", "content": "x", "author": {"id": "42"}}),
            json!({"id": "1", "channel_id": "../x", "content": "x", "author": {"id": "7"}}),
            json!({"id": "1", "channel_id": "2", "content": "  ", "author": {"id": "7"}}),
            json!({"id": "1", "channel_id": "2", "author": {"id": "7"}}),
        ] {
            assert!(
                to_inbound(&d, "default", "42", &Threads::default()).is_none(),
                "{d}"
            );
        }
    }

    #[test]
    fn threads_are_learnt_from_dispatches_and_their_messages_belong_to_the_parent() {
        let mut t = Threads::default();
        t.learn(
            "GUILD_CREATE",
            &json!({"id": "60", "threads": [
            {"id": "71", "type": 11, "parent_id": "70"},
            {"id": "72", "type": 0, "parent_id": "70"},
            {"id": "../x", "type": 11, "parent_id": "70"}]}),
        );
        t.learn(
            "THREAD_CREATE",
            &json!({"id": "73", "type": 12, "parent_id": "70"}),
        );
        assert_eq!((t.parent("71"), t.parent("73")), (Some("70"), Some("70")));
        assert_eq!(
            (t.parent("72"), t.parent("../x")),
            (None, None),
            "not threads"
        );
        t.learn(
            "THREAD_DELETE",
            &json!({"id": "71", "type": 11, "parent_id": "70"}),
        );
        assert_eq!(t.parent("71"), None);
        let d = json!({"id": "5", "channel_id": "73", "guild_id": "60", "content": "hi",
            "author": {"id": "7", "username": "ada"}});
        let m = to_inbound(&d, "default", "42", &t).unwrap();
        assert_eq!(
            (m.chat.id.as_str(), m.thread_id.as_deref()),
            ("70", Some("73"))
        );
        for i in 0..MAX_THREADS as u64 + 10 {
            t.learn(
                "THREAD_CREATE",
                &json!({"id": (1000 + i).to_string(), "type": 11, "parent_id": "70"}),
            );
        }
        assert!(t.parents.len() <= MAX_THREADS);
    }
}
