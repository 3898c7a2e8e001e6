use super::*;
use clawbus_config::{Binding, BindingMatch, PeerMatch};
use clawbus_wire::{ChatRef, Sender};

fn msg(text: &str) -> InboundMessage {
    InboundMessage {
        channel: "telegram".into(),
        account: "bot1".into(),
        message_id: "42".into(),
        chat: ChatRef {
            id: "c1".into(),
            ..Default::default()
        },
        text: text.into(),
        ..Default::default()
    }
}

#[test]
fn direct_chats_use_the_main_session() {
    let r = resolve(&Config::default(), &msg("hi")).unwrap();
    assert_eq!(r.session_key, "agent:main:main");
    assert_eq!(r.agent_id, "main");
    assert!(r.partition < 16);
}

#[test]
fn groups_get_their_own_session() {
    let mut m = msg("hi");
    m.chat.kind = ChatKind::Group;
    let r = resolve(&Config::default(), &m).unwrap();
    assert_eq!(r.session_key, "agent:main:telegram:group:c1");
}

#[test]
fn session_hint_must_belong_to_the_agent() {
    let mut m = msg("hi");
    m.session_key = Some("agent:main:openai-user:bob".into());
    assert_eq!(
        resolve(&Config::default(), &m).unwrap().session_key,
        "agent:main:openai-user:bob"
    );
    m.session_key = Some("agent:other:x".into());
    assert!(matches!(
        resolve(&Config::default(), &m),
        Err(RouteError::InvalidSessionKey(_))
    ));
    m.session_key = Some("agent:main:has space".into());
    assert!(matches!(
        resolve(&Config::default(), &m),
        Err(RouteError::InvalidSessionKey(_))
    ));
    m.session_key = Some(format!("agent:main:{}", "x".repeat(300)));
    assert!(matches!(
        resolve(&Config::default(), &m),
        Err(RouteError::InvalidSessionKey(_))
    ));
}

#[test]
fn hostile_and_empty_input_is_refused() {
    assert_eq!(
        resolve(&Config::default(), &msg("  ")),
        Err(RouteError::EmptyText)
    );
    let big = "x".repeat(MAX_TEXT_BYTES + 1);
    assert!(matches!(
        resolve(&Config::default(), &msg(&big)),
        Err(RouteError::TextTooLong(_))
    ));
    let mut m = msg("hi");
    m.agent_id = Some("ghost".into());
    assert_eq!(
        resolve(&Config::default(), &m),
        Err(RouteError::UnknownAgent("ghost".into()))
    );
}

fn from(channel: &str, sender: &str, kind: ChatKind, chat: &str) -> InboundMessage {
    InboundMessage {
        channel: channel.into(),
        account: "bot1".into(),
        message_id: "1".into(),
        chat: ChatRef {
            id: chat.into(),
            kind,
            ..Default::default()
        },
        sender: Sender {
            id: sender.into(),
            ..Default::default()
        },
        text: "hi".into(),
        ..Default::default()
    }
}

#[test]
fn dm_scopes_and_identity_links_shape_the_session_key() {
    let mut cfg = Config::default();
    let alice_tg = from("telegram", "123", ChatKind::Direct, "123");
    let alice_dc = from("discord", "456", ChatKind::Direct, "d-456");
    let key = |cfg: &Config, m: &InboundMessage| resolve(cfg, m).unwrap().session_key;
    assert_eq!(key(&cfg, &alice_tg), "agent:main:main");
    cfg.session.dm_scope = "per-peer".into();
    assert_eq!(key(&cfg, &alice_tg), "agent:main:direct:123");
    cfg.session.dm_scope = "per-channel-peer".into();
    assert_eq!(key(&cfg, &alice_tg), "agent:main:telegram:direct:123");
    cfg.session.dm_scope = "per-account-channel-peer".into();
    assert_eq!(key(&cfg, &alice_tg), "agent:main:telegram:bot1:direct:123");
    cfg.session.dm_scope = "per-peer".into();
    cfg.session.identity_links.insert(
        "alice".into(),
        vec!["telegram:123".into(), "discord:456".into()],
    );
    assert_eq!(key(&cfg, &alice_tg), "agent:main:direct:alice");
    assert_eq!(key(&cfg, &alice_dc), "agent:main:direct:alice");
    // Groups, channels, threads and Telegram topics.
    let mut g = from("telegram", "123", ChatKind::Group, "-100");
    assert_eq!(key(&cfg, &g), "agent:main:telegram:group:-100");
    g.thread_id = Some("42".into());
    assert_eq!(key(&cfg, &g), "agent:main:telegram:group:-100:topic:42");
    let mut c = from("discord", "1", ChatKind::Channel, "chan 1");
    c.thread_id = Some("9".into());
    assert_eq!(key(&cfg, &c), "agent:main:discord:channel:chan_1:thread:9");
}

#[test]
fn bindings_pick_the_most_specific_match() {
    let mut cfg = Config::default();
    cfg.router.agents = ["main", "work", "family", "bob", "guild", "acct"]
        .map(String::from)
        .to_vec();
    let bind = |agent: &str, m: BindingMatch| Binding {
        agent_id: agent.into(),
        matches: m,
    };
    cfg.bindings = vec![
        bind(
            "work",
            BindingMatch {
                channel: Some("slack".into()),
                ..Default::default()
            },
        ),
        bind(
            "acct",
            BindingMatch {
                channel: Some("telegram".into()),
                account_id: Some("bot2".into()),
                ..Default::default()
            },
        ),
        bind(
            "family",
            BindingMatch {
                channel: Some("telegram".into()),
                peer: Some(PeerMatch {
                    kind: "group".into(),
                    id: "*".into(),
                }),
                ..Default::default()
            },
        ),
        bind(
            "bob",
            BindingMatch {
                channel: Some("telegram".into()),
                peer: Some(PeerMatch {
                    kind: "direct".into(),
                    id: "777".into(),
                }),
                ..Default::default()
            },
        ),
        bind(
            "guild",
            BindingMatch {
                channel: Some("discord".into()),
                guild_id: Some("G1".into()),
                ..Default::default()
            },
        ),
    ];
    let agent = |m: &InboundMessage| resolve(&cfg, m).unwrap().agent_id;
    assert_eq!(agent(&from("slack", "u", ChatKind::Direct, "d")), "work");
    assert_eq!(
        agent(&from("telegram", "777", ChatKind::Direct, "777")),
        "bob"
    );
    assert_eq!(agent(&from("telegram", "1", ChatKind::Direct, "1")), "main");
    assert_eq!(
        agent(&from("telegram", "1", ChatKind::Group, "-5")),
        "family"
    );
    let mut other_account = from("telegram", "1", ChatKind::Direct, "1");
    other_account.account = "bot2".into();
    assert_eq!(agent(&other_account), "acct");
    // A peer match beats an account match.
    other_account.sender.id = "777".into();
    assert_eq!(agent(&other_account), "bob");
    let mut in_guild = from("discord", "1", ChatKind::Channel, "c");
    in_guild.chat.guild_id = Some("G1".into());
    assert_eq!(agent(&in_guild), "guild");
    // A thread's parent chat matches a peer binding of the parent.
    cfg.bindings.push(bind(
        "work",
        BindingMatch {
            channel: Some("discord".into()),
            peer: Some(PeerMatch {
                kind: "channel".into(),
                id: "parent".into(),
            }),
            ..Default::default()
        },
    ));
    let mut thread = from("discord", "1", ChatKind::Channel, "t1");
    thread.chat.parent_id = Some("parent".into());
    thread.chat.guild_id = Some("G1".into());
    assert_eq!(resolve(&cfg, &thread).unwrap().agent_id, "work");
}
