//! Every wire kind decoded from arbitrary bytes: an error or a value, never a panic,
//! an overflow or a hang; what decodes encodes again, and that encoding decodes and
//! encodes to the same bytes (compared as bytes: a NaN is not equal to itself).
#![no_main]

use clawbus_wire::*;
use libfuzzer_sys::fuzz_target;

fn roundtrip<T: Kind>(bytes: &[u8]) {
    if let Ok(env) = decode::<T>(bytes) {
        let again = encode(&env).expect("a decoded envelope encodes");
        let back = decode::<T>(&again).expect("an encoded envelope decodes");
        assert_eq!(encode(&back).expect("and encodes again"), again);
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
