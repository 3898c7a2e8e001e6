//! signal-cli's event stream read as the adapter reads it: bytes cut into events the
//! same whatever the chunks they come in, no event over the limit, and each `receive`
//! event read into a message, nothing, or why not; a message's text is the one the
//! event carried and its chat is one a reply can be sent to.
#![no_main]

use clawbus_channels::signal::events::{parse_receive, SseReader, MAX_ID};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|input: (u16, &[u8])| {
    let (split, stream) = input;
    let whole = SseReader::new(LIMIT).feed(stream);
    let at = usize::from(split) % (stream.len() + 1);
    let mut r = SseReader::new(LIMIT);
    let mut parts = r.feed(&stream[..at]);
    parts.extend(r.feed(&stream[at..]));
    assert_eq!(parts, whole, "events differ when split at {at}");
    for ev in whole {
        assert!(ev.data.len() <= LIMIT);
        assert!(ev
            .id
            .as_ref()
            .is_none_or(|i| i.len() <= MAX_ID && i.bytes().all(|b| b.is_ascii_graphic())));
        let Ok(Some(m)) = parse_receive(&ev.data, "default", "+15550000000") else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&ev.data).expect("it was read");
        assert_eq!(
            v["envelope"]["dataMessage"]["message"].as_str(),
            Some(m.text.as_str())
        );
        assert!(!m.chat.id.is_empty() && !m.chat.id.chars().any(char::is_control));
        assert!(!m.sender.id.is_empty() && m.sender.id != "+15550000000");
    }
});
