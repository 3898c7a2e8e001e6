//! A server-sent events decoder (the subset OpenAI-compatible servers use): `data:`
//! lines joined per event, events separated by a blank line, comments ignored.

/// Incremental SSE decoder: feed bytes, take complete event data payloads.
#[derive(Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    data: Vec<String>,
}

/// Longest line accepted; a longer one is a protocol error, not an allocation.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

impl SseDecoder {
    /// Adds bytes; returns the data of every event completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line =
                String::from_utf8(line).map_err(|_| "event stream is not UTF-8".to_owned())?;
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(v) = line.strip_prefix("data:") {
                self.data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
            }
            // `event:`, `id:`, `retry:` and `:` comments carry nothing we use.
        }
        if self.buf.len() > MAX_LINE_BYTES {
            return Err(format!(
                "event stream line longer than {MAX_LINE_BYTES} bytes"
            ));
        }
        Ok(events)
    }

    /// Data of a final event not followed by a blank line.
    pub fn finish(&mut self) -> Option<String> {
        if !self.buf.is_empty() {
            let line = String::from_utf8_lossy(&self.buf)
                .trim_end_matches('\r')
                .to_owned();
            self.buf.clear();
            if let Some(v) = line.strip_prefix("data:") {
                self.data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
            }
        }
        (!self.data.is_empty()).then(|| std::mem::take(&mut self.data).join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_chunks() {
        let mut d = SseDecoder::default();
        assert!(d.feed(b"data: {\"a\"").unwrap().is_empty());
        assert_eq!(
            d.feed(b":1}\n\n: comment\n\ndata: [DONE]\r\n\r\n").unwrap(),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn multi_line_data_and_trailing_event() {
        let mut d = SseDecoder::default();
        assert_eq!(
            d.feed(b"event: x\ndata: a\ndata: b\n\n").unwrap(),
            vec!["a\nb"]
        );
        assert!(d.feed(b"data: tail").unwrap().is_empty());
        assert_eq!(d.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn rejects_garbage() {
        let mut d = SseDecoder::default();
        assert!(d.feed(&[0xff, 0xfe, b'\n']).is_err());
        let mut d = SseDecoder::default();
        assert!(d.feed(&vec![b'x'; MAX_LINE_BYTES + 1]).is_err());
    }
}
