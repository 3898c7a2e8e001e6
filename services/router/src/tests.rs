use super::*;
use clawbus_wire::ChatRef;

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
    let r = resolve(&RouterConfig::default(), &msg("hi")).unwrap();
    assert_eq!(r.session_key, "agent:main:main");
    assert_eq!(r.agent_id, "main");
    assert!(r.partition < 16);
}

#[test]
fn groups_get_their_own_session() {
    let mut m = msg("hi");
    m.chat.kind = ChatKind::Group;
    let r = resolve(&RouterConfig::default(), &m).unwrap();
    assert_eq!(r.session_key, "agent:main:telegram:group:c1");
}

#[test]
fn session_hint_must_belong_to_the_agent() {
    let mut m = msg("hi");
    m.session_key = Some("agent:main:openai-user:bob".into());
    assert_eq!(
        resolve(&RouterConfig::default(), &m).unwrap().session_key,
        "agent:main:openai-user:bob"
    );
    m.session_key = Some("agent:other:x".into());
    assert!(matches!(
        resolve(&RouterConfig::default(), &m),
        Err(RouteError::InvalidSessionKey(_))
    ));
    m.session_key = Some("agent:main:has space".into());
    assert!(matches!(
        resolve(&RouterConfig::default(), &m),
        Err(RouteError::InvalidSessionKey(_))
    ));
    m.session_key = Some(format!("agent:main:{}", "x".repeat(300)));
    assert!(matches!(
        resolve(&RouterConfig::default(), &m),
        Err(RouteError::InvalidSessionKey(_))
    ));
}

#[test]
fn hostile_and_empty_input_is_refused() {
    assert_eq!(
        resolve(&RouterConfig::default(), &msg("  ")),
        Err(RouteError::EmptyText)
    );
    let big = "x".repeat(MAX_TEXT_BYTES + 1);
    assert!(matches!(
        resolve(&RouterConfig::default(), &msg(&big)),
        Err(RouteError::TextTooLong(_))
    ));
    let mut m = msg("hi");
    m.agent_id = Some("ghost".into());
    assert_eq!(
        resolve(&RouterConfig::default(), &m),
        Err(RouteError::UnknownAgent("ghost".into()))
    );
}
