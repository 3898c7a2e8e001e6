//! A Slack Events API body and a Socket Mode frame read as the gateway reads them: an
//! event, nothing, or why not, never a panic; a message names a channel and timestamp
//! that can name it on the bus, and its text comes from the event.
#![no_main]

use clawbus_gateway::slack::{parse_event, SlackEvent};
use clawbus_gateway::slack_socket::{read_frame, Frame};
use libfuzzer_sys::fuzz_target;

fn check(ev: &Result<SlackEvent, String>, source: &str) {
    if let Ok(SlackEvent::Message(m)) = ev {
        let (channel, ts) = m.message_id.split_once(':').expect("channel:ts");
        assert_eq!(channel, m.chat.id);
        assert!(clawbus_bus::subjects::is_token(channel));
        assert!(!ts.is_empty() && ts.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
        // The text is the event's, with the bot's mention taken out.
        let v: serde_json::Value = serde_json::from_str(source).expect("it was read");
        let text = v["event"]["text"]
            .as_str()
            .or(v["payload"]["event"]["text"].as_str())
            .expect("a message has text");
        assert!(m.mentions_bot || text == m.text || text.contains("<@"));
    }
}

fuzz_target!(|raw: &[u8]| {
    let ev = parse_event(raw, "default");
    if let Ok(s) = std::str::from_utf8(raw) {
        check(&ev, s);
        if let Frame::Envelope { event, .. } = read_frame(s, "default") {
            check(&event, s);
        }
    }
});
