//! Every message kind, listed once: its Rust type and its name on the wire. The list
//! implements [`Kind`] for each type, so a kind cannot exist outside it; the schema
//! and fixture tests (`tests/fixtures.rs`) and the decoder's fuzz target go through it,
//! so a new kind without a JSON Schema in `schemas/` or a golden fixture fails them.

use crate::messages::*;
use crate::Kind;

/// Something done with every message kind's type ([`visit_kinds`]).
pub trait KindVisitor {
    fn visit<T: Kind>(&mut self);
}

macro_rules! kinds {
    ($($ty:ident = $name:literal),+ $(,)?) => {
        $(impl Kind for $ty {
            const KIND: &'static str = $name;
        })+

        /// Every message kind's name and major version.
        pub const KINDS: &[(&str, u16)] = &[$(($name, <$ty as Kind>::VERSION)),+];

        /// Calls `v.visit::<T>()` for every message kind `T`, in the order of [`KINDS`].
        pub fn visit_kinds(v: &mut impl KindVisitor) {
            $(v.visit::<$ty>();)+
        }
    };
}

kinds! {
    InboundMessage = "inbound_message",
    RunControl = "run_control",
    TurnRequest = "turn_request",
    OutboundMessage = "outbound_message",
    TranscriptEvent = "transcript_event",
    RunEvent = "run_event",
    DeltaEvent = "delta_event",
    ToolCall = "tool_call",
    ToolResult = "tool_result",
    Approval = "approval",
    ToolListRequest = "tool_list_request",
    ToolListResponse = "tool_list_response",
    HistoryRequest = "history_request",
    SessionsRequest = "sessions_request",
    SessionsResponse = "sessions_response",
    UsageRequest = "usage_request",
    UsageResponse = "usage_response",
    HistoryResponse = "history_response",
}
