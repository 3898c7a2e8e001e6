//! Every subject of the suite. Tokens are validated: a subject never carries a secret,
//! a `.`, a wildcard or whitespace from user input — session keys travel as a hash.

/// Version prefix of every subject.
pub const PREFIX: &str = "claw.v1";

/// Store history queries of one event partition (request/reply, core NATS):
/// `claw.v1.store.history.<partition>`, answered by the store replica that owns it.
pub fn store_history(partition: u32) -> String {
    format!("{PREFIX}.store.history.{partition}")
}

/// True for a valid subject token: `[A-Za-z0-9_-]{1,64}`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `claw.v1.in.<channel>.<account>`; `None` when a token is invalid. Accepted, but
/// all such messages route through one router partition; publishers use
/// [`inbound_chat`] so router replicas share the chats.
pub fn inbound(channel: &str, account: &str) -> Option<String> {
    (is_token(channel) && is_token(account)).then(|| format!("{PREFIX}.in.{channel}.{account}"))
}

/// `claw.v1.in.<channel>.<account>.<chat_token>`: the inbound stream stores it as
/// `claw.v1.in.<channel>.<account>.<router partition>.<chat_token>` (a subject
/// transform), and each router partition has its own consumer.
pub fn inbound_chat(channel: &str, account: &str, chat_id: &str) -> Option<String> {
    inbound(channel, account).map(|s| format!("{s}.{}", chat_token(chat_id)))
}

/// The subject token standing for a chat id (64-bit FNV-1a in hex, like a session's):
/// chat ids stay out of subjects.
pub fn chat_token(chat_id: &str) -> String {
    session_token(chat_id)
}

/// True when `subject` is where an inbound message of this channel, account and chat
/// may be stored: `claw.v1.in.<channel>.<account>`, or the stored form of
/// [`inbound_chat`] with `partitions` router chat partitions. The subject is what NATS
/// permissions protect, so a message must not claim another channel, account or chat.
pub fn inbound_matches(
    subject: &str,
    channel: &str,
    account: &str,
    chat_id: &str,
    partitions: u32,
) -> bool {
    let Some(base) = inbound(channel, account) else {
        return false;
    };
    match subject.strip_prefix(base.as_str()) {
        Some("") => true,
        Some(rest) => {
            let token = chat_token(chat_id);
            rest == format!(".{}.{token}", token_partition(&token, partitions))
        }
        None => false,
    }
}

/// `claw.v1.turn.<partition>.<session_token>`.
pub fn turn(partition: u32, session_key: &str) -> String {
    format!("{PREFIX}.turn.{partition}.{}", session_token(session_key))
}

/// `claw.v1.out.<channel>.<account>`; `None` when a token is invalid.
pub fn outbound(channel: &str, account: &str) -> Option<String> {
    (is_token(channel) && is_token(account)).then(|| format!("{PREFIX}.out.{channel}.{account}"))
}

/// `claw.v1.evt.transcript.<session_token>`.
pub fn transcript(session_key: &str) -> String {
    format!("{PREFIX}.evt.transcript.{}", session_token(session_key))
}

/// `claw.v1.evt.run.<session_token>`.
pub fn run(session_key: &str) -> String {
    format!("{PREFIX}.evt.run.{}", session_token(session_key))
}

/// The event partition of a session: the partition token the `CLAW_EVT` stream's
/// subject transform (`{{partition(n,2)}}`, nats-server's FNV-1a 32 of the session
/// token) inserts when it stores `claw.v1.evt.<kind>.<session_token>`.
pub fn event_partition(session_key: &str, partitions: u32) -> u32 {
    token_partition(&session_token(session_key), partitions)
}

/// The partition nats-server's `{{partition(n,k)}}` gives a subject token: FNV-1a 32
/// of the token, mod `n`.
pub fn token_partition(token: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in token.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x01000193);
    }
    h % partitions.max(1)
}

/// The subject a run event of a session is stored under:
/// `claw.v1.evt.run.<event partition>.<session_token>`.
pub fn stored_run(session_key: &str, partitions: u32) -> String {
    stored("run", session_key, partitions)
}

/// The subject a transcript event of a session is stored under.
pub fn stored_transcript(session_key: &str, partitions: u32) -> String {
    stored("transcript", session_key, partitions)
}

fn stored(kind: &str, session_key: &str, partitions: u32) -> String {
    format!(
        "{PREFIX}.evt.{kind}.{}.{}",
        event_partition(session_key, partitions),
        session_token(session_key)
    )
}

/// `claw.v1.evt.delta.<session_token>` (core NATS, not persisted).
pub fn delta(session_key: &str) -> String {
    format!("{PREFIX}.evt.delta.{}", session_token(session_key))
}

/// The sandbox's tool registry (request/reply): which tools an agent may call.
pub const TOOLS_LIST: &str = "claw.v1.tools.list";

/// `claw.v1.tool.<tool>`; `None` when the tool name is not a valid token.
pub fn tool(tool: &str) -> Option<String> {
    is_token(tool).then(|| format!("{PREFIX}.tool.{tool}"))
}

/// An agent's sessions, listed by the store (request/reply, queue group `store`).
pub const STORE_SESSIONS: &str = "claw.v1.store.sessions";

/// A session's token usage, summed by the store (request/reply, queue group `store`).
pub const STORE_USAGE: &str = "claw.v1.store.usage";

/// `claw.v1.ctl.<session_token>`: commands for a session's run in progress (core
/// NATS).
pub fn control(session_key: &str) -> String {
    format!("{PREFIX}.ctl.{}", session_token(session_key))
}

/// `claw.v1.sandbox.process.<replica>`: `process` calls for the background sessions
/// one sandbox replica holds, passed on by the replica a call reached.
pub fn sandbox_process(replica: &str) -> String {
    format!("{PREFIX}.sandbox.process.{replica}")
}

/// `claw.v1.dlq.<consumer>`.
pub fn dead_letter(consumer: &str) -> String {
    format!("{PREFIX}.dlq.{consumer}")
}

/// 64-bit FNV-1a of a session key, in hex: stable across processes and languages.
pub fn session_hash(session_key: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in session_key.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The subject token standing for a session key.
pub fn session_token(session_key: &str) -> String {
    format!("{:016x}", session_hash(session_key))
}

/// The turn partition of a session key.
pub fn partition(session_key: &str, partitions: u32) -> u32 {
    (session_hash(session_key) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_validated() {
        assert_eq!(
            inbound("http", "default").as_deref(),
            Some("claw.v1.in.http.default")
        );
        assert!(inbound("http.evil", "x").is_none());
        assert!(inbound("*", "x").is_none());
        assert!(outbound("tg", ">").is_none());
        assert!(tool("exec").is_some());
        assert!(tool("ex ec").is_none());
    }

    #[test]
    fn inbound_subjects_name_their_chat() {
        let token = chat_token("-100200");
        let s = inbound_chat("telegram", "bot1", "-100200").unwrap();
        assert_eq!(s, format!("claw.v1.in.telegram.bot1.{token}"));
        let stored = format!(
            "claw.v1.in.telegram.bot1.{}.{token}",
            token_partition(&token, 4)
        );
        assert!(inbound_matches(&stored, "telegram", "bot1", "-100200", 4));
        let bare = "claw.v1.in.telegram.bot1";
        assert!(inbound_matches(bare, "telegram", "bot1", "x", 4));
        for (subject, account, chat) in [
            (stored.as_str(), "bot1", "another chat"),
            (stored.as_str(), "bot2", "-100200"),
            ("claw.v1.in.telegram.bot10", "bot1", "x"),
            ("claw.v1.in.telegram.bot1.9.abc", "bot1", "x"),
        ] {
            assert!(
                !inbound_matches(subject, "telegram", account, chat, 4),
                "{subject} {account} {chat}"
            );
        }
        assert!(inbound_chat("tele.gram", "bot1", "x").is_none());
    }

    #[test]
    fn session_subjects_hide_the_key() {
        let key = "agent:main:openai-user:alice@example.com";
        let s = transcript(key);
        assert!(!s.contains("alice"));
        assert_eq!(s.split('.').count(), 5);
        // FNV-1a test vector: the empty string hashes to the offset basis.
        assert_eq!(session_token(""), "cbf29ce484222325");
        assert_eq!(session_token("a"), "af63dc4c8601ec8c");
        assert!(partition(key, 16) < 16);
        // nats-server's partition(): FNV-1a 32 of the token (checked against a real
        // server in tests/tests/bus.rs).
        // FNV-1a 32 test vectors: "" is the offset basis, "a" is 0xe40c292c.
        assert_eq!(token_partition("", 16), 0x811c9dc5 % 16);
        assert_eq!(token_partition("a", 16), 0xe40c292c % 16);
        assert_eq!(
            event_partition(key, 16),
            token_partition(&session_token(key), 16)
        );
        assert_eq!(
            stored_run(key, 16),
            format!(
                "claw.v1.evt.run.{}.{}",
                event_partition(key, 16),
                session_token(key)
            )
        );
        assert_eq!(partition(key, 16), partition(key, 16));
    }
}
