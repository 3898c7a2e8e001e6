//! One Telegram update (a webhook body, or one update of a getUpdates batch) read as
//! the adapter reads it: an update or its id and why not, never a panic; an update's
//! inbound message names the chat and message it came from, and its text is the
//! update's (a `/command@bot` shortened).
#![no_main]

use clawbus_channels::telegram::{api, inbound};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &[u8]| {
    let me = inbound::Me {
        id: 42,
        username: "clawbot".into(),
    };
    let Ok(u) = api::read_update(raw) else {
        return;
    };
    let Some(m) = inbound::to_inbound(&u, "default", &me) else {
        return;
    };
    let msg = u
        .message
        .as_ref()
        .expect("a message becomes an inbound message");
    assert_eq!(m.chat.id, msg.chat.id.to_string());
    assert_eq!(
        inbound::parse_message_id(&m.message_id),
        Some(msg.message_id)
    );
    let text = msg
        .text
        .as_ref()
        .or(msg.caption.as_ref())
        .expect("text or caption");
    assert!(
        text.contains(m.text.as_str()) || m.text.starts_with('/'),
        "{:?} is not from {text:?}",
        m.text
    );
});
