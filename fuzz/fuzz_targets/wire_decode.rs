//! Every wire kind decoded from arbitrary bytes: an error or a value, never a panic,
//! an overflow or a hang; what decodes encodes again and decodes to the same value.
#![no_main]

use clawbus_wire::*;
use libfuzzer_sys::fuzz_target;

fn roundtrip<T: Kind + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(env) = decode::<T>(bytes) {
        let again = encode(&env).expect("a decoded envelope encodes");
        let back = decode::<T>(&again).expect("an encoded envelope decodes");
        assert_eq!(back.body, env.body);
    }
}

fuzz_target!(|bytes: &[u8]| {
    let _ = decode_any(bytes);
    roundtrip::<InboundMessage>(bytes);
    roundtrip::<RunControl>(bytes);
    roundtrip::<TurnRequest>(bytes);
    roundtrip::<OutboundMessage>(bytes);
    roundtrip::<TranscriptEvent>(bytes);
    roundtrip::<RunEvent>(bytes);
    roundtrip::<DeltaEvent>(bytes);
    roundtrip::<ToolCall>(bytes);
    roundtrip::<ToolResult>(bytes);
    roundtrip::<Approval>(bytes);
    roundtrip::<ToolListRequest>(bytes);
    roundtrip::<ToolListResponse>(bytes);
    roundtrip::<HistoryRequest>(bytes);
    roundtrip::<SessionsRequest>(bytes);
    roundtrip::<SessionsResponse>(bytes);
    roundtrip::<UsageRequest>(bytes);
    roundtrip::<UsageResponse>(bytes);
    roundtrip::<HistoryResponse>(bytes);
});
