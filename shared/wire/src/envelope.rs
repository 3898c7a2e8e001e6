//! The envelope every bus message travels in, and its encoding.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest encoded message accepted by [`decode`]; larger payloads are rejected before
/// any parsing. It matches nats-server's default `max_payload`.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;
/// Longest message text the router accepts into a turn (bytes): with the model's
/// answer, a turn's transcript entries fit in one event.
pub const MAX_TEXT_BYTES: usize = 256 * 1024;
/// Deepest nesting of arrays and maps accepted by [`decode`]. Every message kind is a
/// few levels deep; a hostile payload nesting hundreds of levels would otherwise
/// overflow a worker thread's stack while decoding (a crash, not an error). Checked
/// during decoding, before any recursion goes past it.
pub const MAX_DEPTH: usize = 64;

/// A message kind: a Rust type with a stable name and major version on the wire.
pub trait Kind: Serialize + DeserializeOwned {
    /// The `kind` field of the envelope, e.g. `inbound_message`.
    const KIND: &'static str;
    /// Major version; readers reject envelopes with a higher one.
    const VERSION: u16 = 1;
}

/// `{v, kind, id, ts, body}`: the frame of every bus message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Major schema version of `body`.
    pub v: u16,
    /// Message kind, one of the `Kind::KIND` names.
    pub kind: String,
    /// Deterministic message id; also sent as `Nats-Msg-Id` so JetStream dedupes retries.
    pub id: String,
    /// Creation time, milliseconds since the Unix epoch.
    pub ts: i64,
    pub body: T,
}

impl<T: Kind> Envelope<T> {
    /// Wraps `body` with the kind's name and version.
    pub fn new(id: impl Into<String>, ts: i64, body: T) -> Self {
        Self {
            v: T::VERSION,
            kind: T::KIND.to_owned(),
            id: id.into(),
            ts,
            body,
        }
    }
}

/// The envelope header without a typed body, for routing and error reports.
#[derive(Debug, Clone, Deserialize)]
pub struct RawEnvelope {
    pub v: u16,
    pub kind: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub ts: i64,
}

/// Why a payload could not be decoded. Every variant is permanent: retrying the same
/// bytes gives the same answer, so consumers dead-letter such messages.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized { size: usize, limit: usize },
    #[error("malformed MessagePack envelope: {0}")]
    Malformed(String),
    #[error("expected message kind `{expected}`, got `{got}`")]
    WrongKind { expected: &'static str, got: String },
    #[error("unsupported version {got} of `{kind}` (this reader knows up to v{known})")]
    UnknownVersion { kind: String, got: u16, known: u16 },
    #[error("encoding failed: {0}")]
    Encode(String),
}

/// Encodes an envelope as a MessagePack map (`to_vec_named`).
pub fn encode<T: Kind>(env: &Envelope<T>) -> Result<Vec<u8>, WireError> {
    rmp_serde::to_vec_named(env).map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes only the envelope header, whatever the body.
pub fn decode_any(bytes: &[u8]) -> Result<RawEnvelope, WireError> {
    decode_bounded(bytes)
}

/// Decodes any MessagePack value of at most [`MAX_PAYLOAD_BYTES`] and [`MAX_DEPTH`]
/// levels: what every reader of bytes it did not write itself uses (bus messages, KV
/// entries).
pub fn decode_bounded<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    check_size(bytes)?;
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // The counter stops one level short of the number given.
    de.set_max_depth(MAX_DEPTH + 1);
    T::deserialize(&mut de).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Decodes an envelope of kind `T`, checking its size, kind and version first.
pub fn decode<T: Kind>(bytes: &[u8]) -> Result<Envelope<T>, WireError> {
    let head = decode_any(bytes)?;
    if head.kind != T::KIND {
        return Err(WireError::WrongKind {
            expected: T::KIND,
            got: head.kind,
        });
    }
    if head.v > T::VERSION || head.v == 0 {
        return Err(WireError::UnknownVersion {
            kind: head.kind,
            got: head.v,
            known: T::VERSION,
        });
    }
    decode_bounded(bytes)
}

fn check_size(bytes: &[u8]) -> Result<(), WireError> {
    if bytes.len() > MAX_PAYLOAD_BYTES {
        return Err(WireError::Oversized {
            size: bytes.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    Ok(())
}
