//! Golden fixtures in `schemas/fixtures`: every kind decodes, encodes byte-identically,
//! and matches its JSON Schema; older and newer payloads still decode.
//!
//! `CLAWBUS_BLESS=1 cargo test -p clawbus-wire --test fixtures` rewrites the current
//! fixtures (never the legacy ones, which stand for payloads already in the wild).

use std::collections::BTreeSet;
use std::path::PathBuf;

use clawbus_wire::*;
use serde::Serialize;
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn bless() -> bool {
    std::env::var_os("CLAWBUS_BLESS").is_some()
}

fn inbound() -> InboundMessage {
    InboundMessage {
        channel: "telegram".into(),
        account: "bot1".into(),
        message_id: "1001".into(),
        chat: ChatRef {
            id: "-100200".into(),
            kind: ChatKind::Group,
            title: Some("Team".into()),
            parent_id: None,
            guild_id: None,
            team_id: Some("T1".into()),
        },
        sender: Sender {
            id: "42".into(),
            display_name: Some("Ada".into()),
            is_bot: false,
        },
        thread_id: Some("7".into()),
        reply_to: Some(ReplyRef {
            message_id: "1000".into(),
            text: Some("earlier".into()),
            from_bot: true,
        }),
        text: "hello @bot".into(),
        mentions_bot: true,
        session_key: None,
        agent_id: Some("main".into()),
        stream: false,
        system: None,
        context: vec![],
        tools: vec![],
        tool_choice: None,
        hook: Some(clawbus_wire::Hook {
            kind: "agent".into(),
            deliver: true,
            channel: Some("last".into()),
            ..Default::default()
        }),
    }
}

fn read_call() -> FunctionCall {
    FunctionCall {
        id: "call_1".into(),
        name: "read".into(),
        arguments: r#"{"path":"notes.txt"}"#.into(),
        signature: None,
    }
}

fn usage() -> Usage {
    Usage {
        prompt_tokens: 12,
        completion_tokens: 5,
        total_tokens: 17,
        ..Default::default()
    }
}

/// The kinds [`check`] was given.
static CHECKED: std::sync::Mutex<BTreeSet<&str>> = std::sync::Mutex::new(BTreeSet::new());

/// Checks a fixture: golden bytes equal the encoding, decoding gives the value back,
/// and the decoded map satisfies the kind's JSON Schema.
fn check<T: Kind + PartialEq + std::fmt::Debug>(id: &str, body: T) {
    CHECKED.lock().unwrap().insert(T::KIND);
    let env = Envelope::new(id, 1_790_000_000_000, body);
    let bytes = encode(&env).unwrap();
    let path = dir()
        .join("fixtures")
        .join(format!("{}.v{}.msgpack", T::KIND, T::VERSION));
    if bless() {
        std::fs::write(&path, &bytes).unwrap();
    }
    let golden = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (bless with CLAWBUS_BLESS=1)", path.display()));
    assert_eq!(golden, bytes, "{}: encoding changed", T::KIND);
    let back: Envelope<T> = decode(&golden).unwrap();
    assert_eq!(back, env);
    let as_json: Value = rmp_serde::from_slice(&golden).unwrap();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join(format!("{}.v{}.schema.json", T::KIND, T::VERSION)))
            .unwrap(),
    )
    .unwrap();
    validate(&schema, &as_json, T::KIND).unwrap_or_else(|e| panic!("{}: {e}", T::KIND));
}

/// A small JSON Schema check: `type`, `required`, `properties`, `items`, `enum`, `$ref`
/// to `#/$defs/...` — what the schemas in `schemas/` use.
fn validate(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    validate_in(schema, schema, v, path)
}

fn validate_in(root: &Value, s: &Value, v: &Value, path: &str) -> Result<(), String> {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let name = r.strip_prefix("#/$defs/").ok_or("only local $defs refs")?;
        return validate_in(root, &root["$defs"][name], v, path);
    }
    if let Some(types) = s.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            return Err(format!("{path}: expected {types:?}, got {v}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{path}: {v} not in {e:?}"));
        }
    }
    if let Some(req) = s.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if v.get(r).is_none() {
                return Err(format!("{path}: missing required `{r}`"));
            }
        }
    }
    if let (Some(props), Some(obj)) = (
        s.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) {
        for (k, val) in obj {
            match props.get(k) {
                Some(ps) => validate_in(root, ps, val, &format!("{path}.{k}"))?,
                None => return Err(format!("{path}: field `{k}` is not in the schema")),
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate_in(root, items, x, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

#[test]
fn every_kind_has_a_stable_golden_fixture() {
    check("telegram:bot1:1001", inbound());
    check(
        "turn:telegram:bot1:1001",
        TurnRequest {
            run_id: "run:telegram:bot1:1001".into(),
            session_key: "agent:main:telegram:group:-100200".into(),
            agent_id: "main".into(),
            inbound_id: "telegram:bot1:1001".into(),
            inbound: inbound(),
            reset: true,
            model: Some("anthropic/claude-sonnet-4-5".into()),
            thinking: Some("low".into()),
            heartbeat: false,
            queue: Some("steer".into()),
            queue_options: Some(QueueOptions {
                debounce_ms: 500,
                cap: 20,
                drop: "summarize".into(),
            }),
        },
    );
    check(
        "run:telegram:bot1:1001:out:0",
        OutboundMessage {
            run_id: "run:telegram:bot1:1001".into(),
            session_key: "agent:main:telegram:group:-100200".into(),
            channel: "telegram".into(),
            account: "bot1".into(),
            chat_id: "-100200".into(),
            thread_id: Some("7".into()),
            reply_to_message_id: Some("1001".into()),
            inbound_id: "telegram:bot1:1001".into(),
            chunk: 0,
            last: true,
            text: "Hi Ada!".into(),
            error: None,
            usage: Some(usage()),
            model: Some("gpt-4o-mini".into()),
            finish_reason: Some("stop".into()),
            tool_calls: vec![],
        },
    );
    check(
        "run:x:assistant",
        TranscriptEvent {
            session_key: "agent:main:main".into(),
            entry_id: "run:x:assistant".into(),
            run_id: "run:x".into(),
            agent_id: "main".into(),
            role: Role::Assistant,
            content: "Hi Ada!".into(),
        },
    );
    check(
        "run:x:failed",
        RunEvent {
            run_id: "run:x".into(),
            session_key: "agent:main:main".into(),
            agent_id: "main".into(),
            status: RunStatus::Failed,
            model: Some("gpt-4o-mini".into()),
            usage: None,
            cost_usd: Some(0.0123),
            error: Some(ErrorInfo {
                code: "provider_rate_limited".into(),
                message: "429".into(),
            }),
            attempt: 5,
            duration_ms: 1234,
            entries: vec![
                RunEntry {
                    entry_id: "run:x:summary".into(),
                    role: Role::System,
                    content: "Ada asked about notes.txt before.".into(),
                    summary: Some(Summary { first_kept_seq: 12 }),
                    ..Default::default()
                },
                RunEntry {
                    entry_id: "run:x:user".into(),
                    role: Role::User,
                    content: "what is in notes.txt?".into(),
                    ..Default::default()
                },
                RunEntry {
                    entry_id: "run:x:step:0".into(),
                    role: Role::Assistant,
                    content: "Let me look.".into(),
                    tool_calls: vec![read_call()],
                    ..Default::default()
                },
                RunEntry {
                    entry_id: "run:x:step:1".into(),
                    role: Role::Tool,
                    content: "hello".into(),
                    tool_call_id: Some("call_1".into()),
                    name: Some("read".into()),
                    ..Default::default()
                },
            ],
        },
    );
    check(
        "run:x:delta:1:0",
        DeltaEvent {
            run_id: "run:x".into(),
            inbound_id: "http:default:1".into(),
            attempt: 1,
            offset: 6,
            text: "Ada".into(),
            chat_id: "-100200".into(),
            thread_id: Some("7".into()),
        },
    );
    check(
        "run:x:tool:0",
        ToolCall {
            call_id: "run:x:tool:0".into(),
            run_id: "run:x".into(),
            session_key: "agent:main:main".into(),
            tool: "exec".into(),
            arguments: r#"{"command":"ls"}"#.into(),
            agent_id: "main".into(),
            sender: Some("telegram:42".into()),
        },
    );
    check(
        "run:x:tool:0:result",
        ToolResult {
            call_id: "run:x:tool:0".into(),
            ok: true,
            content: "README.md\n".into(),
            error: None,
        },
    );
    check(
        "run:x:history",
        HistoryRequest {
            session_key: "agent:main:main".into(),
            limit: 40,
            min_seq: Some(17),
        },
    );
    check(
        "history:1",
        HistoryResponse {
            entries: vec![
                HistoryEntry {
                    entry_id: "run:w:user".into(),
                    run_id: "run:w".into(),
                    role: Role::User,
                    content: "hello".into(),
                    seq: 16,
                    ts: 1_790_000_000_000,
                    ..Default::default()
                },
                HistoryEntry {
                    entry_id: "run:w:step:0".into(),
                    run_id: "run:w".into(),
                    role: Role::Assistant,
                    content: String::new(),
                    seq: 16,
                    ts: 1_790_000_000_000,
                    tool_calls: vec![read_call()],
                    ..Default::default()
                },
            ],
            error: None,
        },
    );
    check(
        "3f2a9c0b11d4",
        Approval {
            id: "3f2a9c0b11d4".into(),
            call_id: "run:x:tool:3".into(),
            agent_id: "main".into(),
            session_key: "agent:main:main".into(),
            tool: "exec".into(),
            command: "rm -rf build".into(),
            state: ApprovalState::Pending,
            requested_at: 1_790_000_000_000,
            expires_at: 1_790_000_300_000,
        },
    );
    check(
        "ctl:agent:main:main:1",
        clawbus_wire::RunControl {
            session_key: "agent:main:main".into(),
            action: "cancel".into(),
            except_run_id: Some("run:telegram:bot1:1002".into()),
            reason: "interrupted by a newer message".into(),
        },
    );
    check(
        "usage:agent:main:main:1",
        clawbus_wire::UsageRequest {
            session_key: "agent:main:main".into(),
        },
    );
    check(
        "usage:agent:main:main:1:answer",
        clawbus_wire::UsageResponse {
            runs: 3,
            prompt_tokens: 1200,
            completion_tokens: 300,
            total_tokens: 1500,
            cost_usd: Some(0.0125),
            error: None,
        },
    );
    check(
        "sessions:main:1",
        clawbus_wire::SessionsRequest {
            agent_id: "main".into(),
            limit: 50,
            active_minutes: Some(60),
        },
    );
    check(
        "sessions:main:1:answer",
        clawbus_wire::SessionsResponse {
            sessions: vec![clawbus_wire::SessionInfo {
                session_key: "agent:main:main".into(),
                messages: 12,
                last_ts: 1_790_000_000_000,
            }],
            error: None,
        },
    );
    check(
        "tools:main:1",
        ToolListRequest {
            agent_id: "main".into(),
            sender: Some("telegram:42".into()),
        },
    );
    check(
        "tools:main:1:answer",
        ToolListResponse {
            tools: vec![ToolSpec {
                name: "read".into(),
                description: "Read a file of the workspace".into(),
                parameters: r#"{"type":"object","properties":{"path":{"type":"string"}},"required":["path"]}"#.into(),
            }],
            error: None,
        },
    );
    // Every kind of the wire's list, and only those, has its fixture checked here.
    let listed: BTreeSet<&str> = KINDS.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        *CHECKED.lock().unwrap(),
        listed,
        "a kind without a fixture check"
    );
}

/// An inbound message as the first release wrote it, before the optional fields
/// (thread, reply, session hint, agent, stream, system, context) existed.
#[derive(Serialize)]
struct LegacyInbound {
    channel: String,
    account: String,
    message_id: String,
    chat: LegacyChat,
    sender: LegacySender,
    text: String,
}

#[derive(Serialize)]
struct LegacyChat {
    id: String,
}

#[derive(Serialize)]
struct LegacySender {
    id: String,
}

/// A fixture that stands for payloads already in the wild: written only when blessing
/// and missing, never silently (a lost fixture fails the test), and never rewritten.
fn write_once(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = dir().join("fixtures").join(name);
    if bless() && !path.exists() {
        std::fs::write(&path, bytes).unwrap();
    }
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (a fixture of payloads in the wild; restore it from git)",
            path.display()
        )
    })
}

#[test]
fn the_schemas_and_fixtures_are_those_of_the_listed_kinds() {
    let listed: BTreeSet<String> = KINDS.iter().map(|(k, v)| format!("{k}.v{v}")).collect();
    let stems = |dir: PathBuf, suffix: &str| -> BTreeSet<String> {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(suffix).map(str::to_owned)
            })
            .collect()
    };
    assert_eq!(
        stems(dir(), ".schema.json"),
        listed,
        "a JSON Schema per kind, no other"
    );
    assert_eq!(
        stems(dir().join("fixtures"), ".msgpack")
            .into_iter()
            .filter(|s| !s.contains(".legacy") && !s.contains(".future"))
            .collect::<BTreeSet<_>>(),
        listed,
        "a golden fixture per kind, no other"
    );
    let table = std::fs::read_to_string(dir().join("README.md")).unwrap();
    for (kind, _) in KINDS {
        assert!(
            table.contains(&format!("\n| `{kind}` |")),
            "{kind} has no row in schemas/README.md"
        );
    }
}

#[test]
fn a_payload_from_before_optional_fields_still_decodes() {
    let legacy = LegacyInbound {
        channel: "irc".into(),
        account: "libera".into(),
        message_id: "m1".into(),
        chat: LegacyChat {
            id: "#clawbus".into(),
        },
        sender: LegacySender { id: "nick".into() },
        text: "hi".into(),
    };
    let env = Envelope {
        v: 1,
        kind: "inbound_message".to_owned(),
        id: "irc:libera:m1".into(),
        ts: 1,
        body: legacy,
    };
    let bytes = write_once(
        "inbound_message.v1.legacy.msgpack",
        &rmp_serde::to_vec_named(&env).unwrap(),
    );
    let got: Envelope<InboundMessage> = decode(&bytes).unwrap();
    assert_eq!(got.body.text, "hi");
    assert_eq!(got.body.chat.kind, ChatKind::Direct);
    assert!(got.body.thread_id.is_none() && got.body.context.is_empty() && !got.body.stream);
}

#[test]
fn an_outbound_message_from_before_finish_reason_still_decodes() {
    let bytes = std::fs::read(dir().join("fixtures/outbound_message.v1.legacy.msgpack")).unwrap();
    let got: Envelope<OutboundMessage> = decode(&bytes).unwrap();
    assert_eq!(got.body.text, "Hi Ada!");
    assert_eq!(got.body.finish_reason, None);
}

#[test]
fn a_run_event_from_before_entries_still_decodes() {
    // Written by agents that published each transcript entry on its own.
    let bytes = std::fs::read(dir().join("fixtures/run_event.v1.legacy.msgpack")).unwrap();
    let got: Envelope<RunEvent> = decode(&bytes).unwrap();
    assert_eq!(got.body.run_id, "run:x");
    assert_eq!(got.body.status, RunStatus::Failed);
    assert!(got.body.entries.is_empty());
}

#[test]
fn a_delta_from_before_chat_ids_still_decodes() {
    // Written by agents that did not name the chat answered: no draft for it.
    let bytes = std::fs::read(dir().join("fixtures/delta_event.v1.legacy.msgpack")).unwrap();
    let got: Envelope<DeltaEvent> = decode(&bytes).unwrap();
    assert_eq!(got.body.text, "Ada");
    assert!(got.body.chat_id.is_empty() && got.body.thread_id.is_none());
}

#[test]
fn unknown_fields_and_variants_decode() {
    // A newer writer added a field and a role this reader has never heard of.
    let v = serde_json::json!({
        "v": 1, "kind": "transcript_event", "id": "e1", "ts": 1, "from_the_future": [1, 2, 3],
        "body": {"session_key": "agent:main:main", "entry_id": "e1", "run_id": "r", "agent_id": "main",
                 "role": "critic", "content": "hm", "confidence": 0.5}
    });
    let bytes = write_once(
        "transcript_event.v1.future.msgpack",
        &rmp_serde::to_vec_named(&v).unwrap(),
    );
    let got: Envelope<TranscriptEvent> = decode(&bytes).unwrap();
    assert_eq!(got.body.role, Role::Unknown);
    assert_eq!(got.body.content, "hm");

    let v = serde_json::json!({"v": 1, "kind": "run_event", "id": "r:x", "ts": 1,
        "body": {"run_id": "r", "session_key": "s", "agent_id": "a", "status": "paused", "extra": {"x": 1}}});
    let got: Envelope<RunEvent> = decode(&rmp_serde::to_vec_named(&v).unwrap()).unwrap();
    assert_eq!(got.body.status, RunStatus::Unknown);
}

#[test]
fn hostile_payloads_get_clear_errors() {
    assert!(matches!(
        decode::<TurnRequest>(b"\xc1\xc1 not msgpack"),
        Err(WireError::Malformed(_))
    ));
    assert!(matches!(
        decode::<TurnRequest>(b""),
        Err(WireError::Malformed(_))
    ));
    let big = vec![0u8; MAX_PAYLOAD_BYTES + 1];
    assert!(matches!(
        decode::<TurnRequest>(&big),
        Err(WireError::Oversized { .. })
    ));
    let env = Envelope::new("x", 1, inbound());
    let bytes = encode(&env).unwrap();
    assert!(matches!(
        decode::<TurnRequest>(&bytes),
        Err(WireError::WrongKind { .. })
    ));
    let mut future = Envelope::new("x", 1, inbound());
    future.v = 2;
    assert!(matches!(
        decode::<InboundMessage>(&encode(&future).unwrap()),
        Err(WireError::UnknownVersion { got: 2, .. })
    ));
    // Right kind and version, wrong body shape.
    let v = serde_json::json!({"v": 1, "kind": "inbound_message", "id": "x", "ts": 1, "body": {"text": 5}});
    assert!(matches!(
        decode::<InboundMessage>(&rmp_serde::to_vec_named(&v).unwrap()),
        Err(WireError::Malformed(_))
    ));
    // Deeply nested garbage must not overflow the stack.
    let mut nested = vec![0x91u8; 100_000];
    nested.push(0xc0);
    assert!(decode::<InboundMessage>(&nested).is_err());
}

/// An envelope of kind `inbound_message` whose body's `text` (and an unknown field)
/// nests `depth` arrays.
fn nested_envelope(depth: usize, field: &str) -> Vec<u8> {
    let mut b = vec![0x85];
    for (k, v) in [
        ("v", &[0x01u8][..]),
        ("kind", b"\xafinbound_message"),
        ("id", b"\xa1x"),
        ("ts", &[0x00]),
    ] {
        b.push(0xa0 | k.len() as u8);
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(v);
    }
    b.extend_from_slice(b"\xa4body\x81");
    b.push(0xa0 | field.len() as u8);
    b.extend_from_slice(field.as_bytes());
    b.extend(std::iter::repeat_n(0x91, depth));
    b.push(0xc0);
    b
}

#[test]
fn deep_nesting_is_refused_before_it_can_overflow_a_small_stack() {
    // 900 levels overflowed a router worker's stack in a debug build; run the decoder
    // on a thread with a quarter of a tokio worker's stack to prove it no longer
    // recurses that deep, in a known field and in an unknown one it would skip.
    let outcome = std::thread::Builder::new()
        .stack_size(512 * 1024)
        .spawn(|| {
            let mut errors = Vec::new();
            for depth in [MAX_DEPTH + 1, 900, 2_000, 100_000] {
                for field in ["text", "zz_unknown"] {
                    let bytes = nested_envelope(depth, field);
                    errors.push(decode::<InboundMessage>(&bytes).map(|_| ()));
                    errors.push(clawbus_wire::decode_any(&bytes).map(|_| ()));
                }
            }
            errors
        })
        .unwrap()
        .join()
        .expect("decoding must not overflow the stack");
    for e in outcome {
        match e {
            Err(WireError::Malformed(m)) => assert!(m.contains("depth"), "{m}"),
            other => panic!("expected a depth error, got {other:?}"),
        }
    }
    // A shallow unknown field is still skipped as the additive rule requires.
    let ok = decode::<InboundMessage>(&nested_envelope(8, "zz_unknown"));
    assert!(
        !matches!(ok, Err(WireError::Malformed(ref m)) if m.contains("depth")),
        "{ok:?}"
    );
}

#[test]
fn encoding_uses_maps_not_arrays() {
    let bytes = encode(&Envelope::new("x", 1, usage_holder())).unwrap();
    // fixmap with 5 entries: v, kind, id, ts, body
    assert_eq!(bytes[0], 0x85);
}

fn usage_holder() -> ToolResult {
    ToolResult {
        call_id: "c".into(),
        ok: false,
        content: String::new(),
        error: None,
    }
}
