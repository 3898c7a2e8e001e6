//! A chat completions body and a Responses body read as the gateway's handlers read
//! them: a request with its prompt, functions and tool choice, or the error the
//! caller is answered with (a 4xx, never a panic).
#![no_main]

use clawbus_gateway::{openai, responses};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &[u8]| {
    match openai::parse_chat(raw) {
        Ok(ask) => {
            assert!(ask.tools.len() <= openai::MAX_TOOLS);
            for t in &ask.tools {
                assert!(openai::valid_function_name(&t.name), "{:?}", t.name);
            }
        }
        Err(e) => assert!(e.body()["error"]["message"].is_string()),
    }
    match responses::parse_responses(raw) {
        Ok(ask) => {
            for t in &ask.tools {
                assert!(openai::valid_function_name(&t.name), "{:?}", t.name);
            }
        }
        Err(e) => assert!(e.body()["error"]["message"].is_string()),
    }
});
