//! One IRC server line read as the adapter reads it: decoded (UTF-8, else
//! Windows-1252: every byte a character) or refused, then parsed or refused, never a
//! panic; a parsed message's parameters are pieces of the line; and text sent back is
//! cut into lines that fit and cannot inject a command.
#![no_main]

use clawbus_channels::irc::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &[u8]| {
    let Ok(text) = proto::decode(raw) else {
        return;
    };
    if std::str::from_utf8(raw).is_err() {
        assert_eq!(text.chars().count(), raw.len(), "one character per byte");
    }
    if let Ok(Some(line)) = proto::parse(&text) {
        assert!(!line.command.is_empty() && text.contains(line.command));
        for p in &line.params {
            assert!(text.contains(p));
        }
    }
    for out in proto::lines(&text, 64) {
        assert!(out.len() <= 64, "{out:?}");
        assert!(!out.contains(['\r', '\n', '\0']), "{out:?}");
    }
});
