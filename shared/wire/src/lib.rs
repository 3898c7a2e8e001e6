//! Wire types of every message that travels the clawbus bus.
//!
//! Every message is an [`Envelope`] `{v, kind, id, ts, body}` encoded with
//! `rmp_serde::to_vec_named` (MessagePack maps, never positional arrays) so that
//! readers built before a field was added still decode newer payloads, and newer
//! readers decode older payloads through `#[serde(default)]`.
//!
//! Rules for changing these types (see `schemas/README.md`):
//! - additive only: a new field is optional or has a default;
//! - enums carry an `Unknown` catch-all so a new variant never breaks an old reader;
//! - wire structs never deny unknown fields;
//! - a breaking change is a new envelope version `v` and a new subject version.

#![forbid(unsafe_code)]

mod envelope;
mod kinds;
mod messages;

pub use envelope::{
    decode, decode_any, decode_bounded, encode, Envelope, Kind, RawEnvelope, WireError, MAX_DEPTH,
    MAX_PAYLOAD_BYTES, MAX_TEXT_BYTES,
};
pub use kinds::{visit_kinds, KindVisitor, KINDS};
pub use messages::*;

/// Current major version of every message kind; it also appears in subjects (`claw.v1.…`).
pub const WIRE_VERSION: u16 = 1;

/// Name of the NATS header carrying the schema id (`<kind>/v<version>`).
pub const SCHEMA_HEADER: &str = "Clawbus-Schema";

/// Schema id of a kind, as carried in [`SCHEMA_HEADER`].
pub fn schema_id<T: Kind>() -> String {
    format!("{}/v{}", T::KIND, T::VERSION)
}

/// Milliseconds since the Unix epoch (the envelope `ts`); 0 if the clock is before 1970.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
