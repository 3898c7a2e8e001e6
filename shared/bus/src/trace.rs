//! Minimal W3C trace context: ids travel in the `traceparent` header so a turn can be
//! followed across services in the logs, without pulling in an OpenTelemetry SDK.

use async_nats::HeaderMap;
use rand::RngCore;

/// A trace id and the span id of the current hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    pub span_id: String,
}

impl TraceContext {
    /// A new root trace.
    pub fn root() -> Self {
        let mut b = [0u8; 24];
        rand::rng().fill_bytes(&mut b);
        Self {
            trace_id: hex(&b[..16]),
            span_id: hex(&b[16..]),
        }
    }

    /// A child span of this trace.
    pub fn child(&self) -> Self {
        let mut b = [0u8; 8];
        rand::rng().fill_bytes(&mut b);
        Self {
            trace_id: self.trace_id.clone(),
            span_id: hex(&b),
        }
    }

    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }

    /// Parses a `traceparent` value; `None` when it is not a valid version-00 header.
    pub fn parse(v: &str) -> Option<Self> {
        let parts: Vec<&str> = v.trim().split('-').collect();
        let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.len() == 4
            && parts[0] == "00"
            && ok(parts[1], 32)
            && ok(parts[2], 16)
            && ok(parts[3], 2)
        {
            if parts[1].bytes().all(|b| b == b'0') {
                return None;
            }
            return Some(Self {
                trace_id: parts[1].to_ascii_lowercase(),
                span_id: parts[2].to_ascii_lowercase(),
            });
        }
        None
    }

    /// The context of a received message, or a new root when it carries none.
    pub fn from_headers(h: Option<&HeaderMap>) -> Self {
        h.and_then(|h| h.get("traceparent"))
            .and_then(|v| Self::parse(v.as_str()))
            .unwrap_or_else(Self::root)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects_garbage() {
        let t = TraceContext::root();
        assert_eq!(TraceContext::parse(&t.traceparent()), Some(t.clone()));
        assert_eq!(t.child().trace_id, t.trace_id);
        for bad in [
            "",
            "00-xyz-abc-01",
            "01-00000000000000000000000000000001-0000000000000001-01",
            "00-00000000000000000000000000000000-0000000000000001-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
    }
}
