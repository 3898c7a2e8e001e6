//! Reading signal-cli's event stream: Server-Sent Events read line by line as bytes
//! (each field decoded on its own, so bytes that are not UTF-8 spoil one event, never
//! the stream), and each `receive` event's JSON read into an inbound message or
//! refused with why, for the adapter to park it in the dead letters with its bytes.

use clawbus_wire::{ChatKind, ChatRef, InboundMessage, ReplyRef, Sender};
use serde_json::Value;

use super::{message_id, GROUP};

/// One Server-Sent Event as it came.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `id:` (what a reconnecting client names in `Last-Event-ID`), when it had a
    /// usable one: visible ASCII, at most [`MAX_ID`] bytes.
    pub id: Option<String>,
    /// Its `event:` type (lossily decoded: it only selects).
    pub event: String,
    /// Its `data:` lines as bytes, joined by `\n`, at most the reader's limit.
    pub data: Vec<u8>,
    /// True when data was cut at the limit (the event is parked, never read).
    pub cut: bool,
}

/// The longest event id kept (it goes into a request header).
pub const MAX_ID: usize = 128;

/// Cuts a byte stream into Server-Sent Events (the WHATWG `text/event-stream` rules
/// for lines ending in LF or CR LF), holding at most about `max` bytes whatever the
/// stream sends: a longer line or event is cut and said so, never buffered whole.
#[derive(Debug)]
pub struct SseReader {
    max: usize,
    line: Vec<u8>,
    /// The line in progress went over the limit: the rest of it is dropped.
    overlong: bool,
    event: SseEvent,
    data_lines: usize,
}

impl SseReader {
    pub fn new(max: usize) -> Self {
        SseReader {
            max,
            line: Vec::new(),
            overlong: false,
            event: SseEvent::default(),
            data_lines: 0,
        }
    }

    /// Takes the next bytes of the stream; gives the events they completed.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while !chunk.is_empty() {
            match chunk.iter().position(|b| *b == b'\n') {
                Some(nl) => {
                    self.take(&chunk[..nl]);
                    chunk = &chunk[nl + 1..];
                    if let Some(ev) = self.end_line() {
                        out.push(ev);
                    }
                }
                None => {
                    self.take(chunk);
                    break;
                }
            }
        }
        out
    }

    fn take(&mut self, part: &[u8]) {
        // Room for the field name besides the limit's worth of value.
        let room = (self.max + 16).saturating_sub(self.line.len());
        if part.len() > room {
            self.line.extend_from_slice(&part[..room]);
            self.overlong = true;
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn end_line(&mut self) -> Option<SseEvent> {
        let mut line = std::mem::take(&mut self.line);
        let overlong = std::mem::take(&mut self.overlong);
        if !overlong && line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            // A blank line ends the event; one without data is no event.
            let ev = std::mem::take(&mut self.event);
            let lines = std::mem::take(&mut self.data_lines);
            return (lines > 0).then_some(ev);
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(0) => return None, // a comment: keep-alive
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (&line[..], &[][..]),
        };
        match field {
            b"data" => {
                if self.data_lines > 0 {
                    self.event.data.push(b'\n');
                }
                self.data_lines += 1;
                let room = self.max.saturating_sub(self.event.data.len());
                self.event
                    .data
                    .extend_from_slice(&value[..value.len().min(room)]);
                self.event.cut |= overlong || value.len() > room;
            }
            b"id" => {
                self.event.id = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| !overlong && v.len() <= MAX_ID)
                    .filter(|v| v.bytes().all(|b| b.is_ascii_graphic()))
                    .map(str::to_owned);
            }
            b"event" => self.event.event = String::from_utf8_lossy(value).into_owned(),
            _ => {} // `retry` and unknown fields
        }
        None
    }
}

/// The inbound message of a `receive` event's data (signal-cli's `{envelope,
/// account}`); `Ok(None)` for receipts, typing, sync messages, the bot's own and other
/// events without text for the agent; `Err` (why) for data that cannot be read: not
/// UTF-8, not JSON, no envelope, a message whose fields have the wrong types or that
/// names no author, time or usable chat.
pub fn parse_receive(
    data: &[u8],
    account: &str,
    me: &str,
) -> Result<Option<InboundMessage>, String> {
    let text = std::str::from_utf8(data).map_err(|e| format!("not UTF-8: {e}"))?;
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    to_inbound(&v, account, me)
}

/// A string field: absent (or null) is `None`, another type is unreadable.
fn opt_str<'a>(v: &'a Value, field: &str) -> Result<Option<&'a str>, String> {
    match &v[field] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        other => Err(format!("`{field}` is not text but {}", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Text that can name a chat to answer (what a send's recipient accepts).
fn usable_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && !s.chars().any(char::is_control)
}

pub(super) fn to_inbound(
    v: &Value,
    account: &str,
    me: &str,
) -> Result<Option<InboundMessage>, String> {
    let env = &v["envelope"];
    if !env.is_object() {
        return Err("no envelope".into());
    }
    let dm = &env["dataMessage"];
    if dm.is_null() {
        return Ok(None); // receipts, typing, sync messages
    }
    if !dm.is_object() {
        return Err(format!("`dataMessage` is {}", kind(dm)));
    }
    let Some(text) = opt_str(dm, "message")? else {
        return Ok(None); // a reaction, an attachment alone
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    let source = match opt_str(env, "sourceNumber")? {
        Some(s) => Some(s),
        None => match opt_str(env, "sourceUuid")? {
            Some(s) => Some(s),
            None => opt_str(env, "source")?,
        },
    };
    let source = source
        .filter(|s| usable_id(s))
        .ok_or("a message without a usable author")?;
    if source == me {
        return Ok(None);
    }
    let ts = dm["timestamp"]
        .as_i64()
        .or_else(|| env["timestamp"].as_i64())
        .ok_or("a message without its time")?;
    let group = &dm["groupInfo"];
    let (chat, kind) = if group.is_null() {
        (source.to_owned(), ChatKind::Direct)
    } else {
        let g = opt_str(group, "groupId")?
            .filter(|g| usable_id(g))
            .ok_or("a group message without a usable group id")?;
        (format!("{GROUP}{g}"), ChatKind::Group)
    };
    let mentions_bot = dm["mentions"].as_array().is_some_and(|ms| {
        ms.iter()
            .any(|m| m["number"].as_str() == Some(me) || m["uuid"].as_str() == Some(me))
    });
    let quote = &dm["quote"];
    let reply_to = quote["id"].as_i64().map(|qid| {
        let author = quote["authorNumber"]
            .as_str()
            .or_else(|| quote["author"].as_str())
            .unwrap_or_default();
        ReplyRef {
            message_id: message_id(author, qid),
            text: quote["text"].as_str().map(str::to_owned),
            from_bot: author == me,
        }
    });
    Ok(Some(InboundMessage {
        channel: "signal".into(),
        account: account.into(),
        message_id: message_id(source, ts),
        chat: ChatRef {
            id: chat,
            kind,
            title: group["groupName"].as_str().map(str::to_owned),
            ..Default::default()
        },
        sender: Sender {
            id: source.to_owned(),
            display_name: env["sourceName"].as_str().map(str::to_owned),
            is_bot: false,
        },
        reply_to,
        text: text.to_owned(),
        mentions_bot,
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ME: &str = "+15550000000";

    fn read(v: Value) -> Result<Option<InboundMessage>, String> {
        to_inbound(&v, "default", ME)
    }

    #[test]
    fn direct_and_group_messages_with_mentions_and_quotes() {
        let v = json!({"envelope": {"source": "+15551111111", "sourceNumber": "+15551111111",
            "sourceName": "Ada", "timestamp": 1700, "dataMessage": {"timestamp": 1700, "message": "hi"}},
            "account": ME});
        let m = read(v).unwrap().unwrap();
        assert_eq!(
            (m.chat.id.as_str(), m.chat.kind),
            ("+15551111111", ChatKind::Direct)
        );
        assert_eq!(m.message_id, "+15551111111/1700");
        let v = json!({"envelope": {"sourceNumber": "+15551111111", "timestamp": 1701,
            "dataMessage": {"timestamp": 1701, "message": "\u{fffc} dinner?",
                "mentions": [{"number": ME, "start": 0, "length": 1}],
                "quote": {"id": 1650, "authorNumber": ME, "text": "earlier"},
                "groupInfo": {"groupId": "Zm9vYmFy", "type": "DELIVER"}}}});
        let m = read(v).unwrap().unwrap();
        assert_eq!(
            (m.chat.id.as_str(), m.chat.kind),
            ("group:Zm9vYmFy", ChatKind::Group)
        );
        assert!(m.mentions_bot);
        let r = m.reply_to.unwrap();
        assert!(r.from_bot);
        assert_eq!(
            super::super::parse_message_id(&r.message_id),
            Some((ME, 1650))
        );
    }

    #[test]
    fn receipts_typing_and_own_messages_are_skipped() {
        for v in [
            json!({"envelope": {"sourceNumber": "+1555", "timestamp": 1, "receiptMessage": {"when": 1}}}),
            json!({"envelope": {"sourceNumber": "+1555", "timestamp": 1, "typingMessage": {"action": "STARTED"}}}),
            json!({"envelope": {"sourceNumber": ME, "timestamp": 1, "dataMessage": {"timestamp": 1, "message": "me"}}}),
            json!({"envelope": {"sourceNumber": "+1555", "timestamp": 1, "dataMessage": {"timestamp": 1, "message": "   "}}}),
            json!({"envelope": {"sourceNumber": "+1555", "timestamp": 1, "dataMessage": {"timestamp": 1, "reaction": {}}}}),
        ] {
            assert_eq!(read(v.clone()), Ok(None), "{v}");
        }
    }

    #[test]
    fn messages_that_cannot_be_read_say_why() {
        for v in [
            json!("garbage"),
            json!({"account": ME}),
            json!({"envelope": {"sourceNumber": "+1555", "timestamp": 1, "dataMessage": "hi"}}),
            json!({"envelope": {"sourceNumber": "+1555", "timestamp": 1, "dataMessage": {"timestamp": 1, "message": 5}}}),
            json!({"envelope": {"sourceNumber": 7, "timestamp": 1, "dataMessage": {"timestamp": 1, "message": "x"}}}),
            json!({"envelope": {"sourceNumber": "+1555", "dataMessage": {"message": "no time"}}}),
            json!({"envelope": {"timestamp": 1, "dataMessage": {"timestamp": 1, "message": "no source"}}}),
            json!({"envelope": {"sourceNumber": "+1\n555", "timestamp": 1, "dataMessage": {"timestamp": 1, "message": "x"}}}),
            json!({"envelope": {"sourceNumber": "+1555", "timestamp": 1, "dataMessage": {"timestamp": 1, "message": "x", "groupInfo": {"groupId": 3}}}}),
        ] {
            assert!(read(v.clone()).is_err(), "{v}");
        }
        assert!(parse_receive(b"{\"envelope\":{\xff}}", "default", ME)
            .unwrap_err()
            .starts_with("not UTF-8"));
        let lone = br#"{"envelope":{"sourceNumber":"+1555","timestamp":1,"dataMessage":{"timestamp":1,"message":"\ud800"}}}"#;
        assert!(parse_receive(lone, "default", ME)
            .unwrap_err()
            .starts_with("not JSON"));
    }

    #[test]
    fn the_stream_is_cut_into_events_whatever_the_chunks() {
        let stream: &[u8] = b": keep-alive\n\nid: 1\nevent: receive\ndata: {\"a\":\r\ndata: 1}\n\nid: 2\r\nevent: receive\r\ndata: \xff\xfe\r\n\r\nretry: 5\nid: bad id\nevent: other\ndata: x\n\n";
        let whole = SseReader::new(1024).feed(stream);
        assert_eq!(whole.len(), 3, "{whole:?}");
        assert_eq!(whole[0].id.as_deref(), Some("1"));
        assert_eq!(whole[0].data, b"{\"a\":\n1}");
        assert_eq!(whole[1].data, b"\xff\xfe");
        assert_eq!(
            (whole[2].id.as_deref(), whole[2].event.as_str()),
            (None, "other")
        );
        for at in 0..stream.len() {
            let mut r = SseReader::new(1024);
            let mut got = r.feed(&stream[..at]);
            got.extend(r.feed(&stream[at..]));
            assert_eq!(got, whole, "split at {at}");
        }
    }

    #[test]
    fn an_oversized_event_is_cut_and_the_next_one_read() {
        let mut r = SseReader::new(64);
        let mut got = r.feed(b"id: 1\nevent: receive\ndata: ");
        for _ in 0..1000 {
            got.extend(r.feed(&[b'x'; 1024]));
        }
        got.extend(r.feed(b"\n\nid: 2\nevent: receive\ndata: ok\n\n"));
        assert_eq!(got.len(), 2);
        assert!(got[0].cut && got[0].data.len() == 64 && got[0].id.as_deref() == Some("1"));
        assert!(!got[1].cut && got[1].data == b"ok");
        assert!(
            r.line.capacity() < 4096,
            "the reader held {}",
            r.line.capacity()
        );
    }
}
