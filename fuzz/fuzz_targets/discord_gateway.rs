//! One Discord gateway payload read as the connection reads it: a JSON value, or its
//! sequence number (when that much is readable) and why not, never a panic; a
//! sequence number given for an unreadable payload is the one it carried.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    match clawbus_channels::discord::read_event(text) {
        Ok(_) => {}
        Err((Some(seq), _)) => assert!(text.contains(&seq.to_string())),
        Err((None, _)) => {}
    }
});
