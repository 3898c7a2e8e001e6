//! Helpers shared by the end-to-end tests.

#![forbid(unsafe_code)]

use std::time::Duration;

pub mod channel;
pub mod toolbox;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use clawbus_store::{Database, TranscriptStore};
use clawbus_testkit::Suite;
use clawbus_wire::{decode, OutboundMessage};
use futures::StreamExt;
use serde_json::{json, Value};

/// A stored message: subject, headers and payload.
#[derive(Debug, Clone)]
pub struct Stored {
    pub subject: String,
    pub headers: Option<async_nats::HeaderMap>,
    pub payload: bytes::Bytes,
}

impl Stored {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.to_string())
    }
}

/// Every message of `stream` on subjects matching `filter`, in order.
pub async fn stream_messages(
    nats_url: &str,
    stream: &str,
    filter: &str,
) -> anyhow::Result<Vec<Stored>> {
    let addrs = clawbus_bus::server_addrs(nats_url)?;
    stream_messages_with(async_nats::connect(addrs.as_slice()).await?, stream, filter).await
}

/// [`stream_messages`] over a given connection (e.g. one with credentials).
pub async fn stream_messages_with(
    client: async_nats::Client,
    stream: &str,
    filter: &str,
) -> anyhow::Result<Vec<Stored>> {
    let js = jetstream::new(client);
    let mut stream = js.get_stream(stream).await?;
    let info = stream.info().await?.clone();
    if info.config.retention == jetstream::stream::RetentionPolicy::WorkQueue {
        // A work queue refuses a consumer overlapping its own: read what is left by
        // sequence instead.
        let mut out = Vec::new();
        if info.state.messages == 0 {
            return Ok(out);
        }
        for seq in info.state.first_sequence..=info.state.last_sequence {
            match stream.direct_get(seq).await {
                Ok(m) if subject_matches(filter, &m.subject) => out.push(Stored {
                    subject: m.subject.to_string(),
                    headers: Some(m.headers.clone()),
                    payload: m.payload.clone(),
                }),
                Ok(_) => {}
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(out);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending as usize;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut msgs = consumer.messages().await?;
    while out.len() < pending {
        match tokio::time::timeout(Duration::from_secs(5), msgs.next()).await {
            Ok(Some(Ok(m))) => out.push(Stored {
                subject: m.subject.to_string(),
                headers: m.headers.clone(),
                payload: m.payload.clone(),
            }),
            _ => break,
        }
    }
    Ok(out)
}

/// Whether a NATS subject matches a filter with `*` and `>` wildcards.
pub fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when `stream` holds no message (a work queue with everything acked).
pub async fn stream_is_empty(js: &jetstream::Context, stream: &str) -> bool {
    match js.get_stream(stream).await {
        Ok(mut st) => st.info().await.is_ok_and(|i| i.state.messages == 0),
        Err(_) => false,
    }
}

/// True when the durable consumer `durable` of `stream` has nothing pending and
/// nothing unacked.
pub async fn consumer_is_idle(js: &jetstream::Context, stream: &str, durable: &str) -> bool {
    let Ok(st) = js.get_stream(stream).await else {
        return false;
    };
    match st
        .get_consumer::<jetstream::consumer::pull::Config>(durable)
        .await
    {
        Ok(mut c) => c
            .info()
            .await
            .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0),
        Err(_) => false,
    }
}

/// Every outbound message stored in `CLAW_OUT` on `subject`, in order.
pub async fn outbound_messages(
    nats_url: &str,
    subject: &str,
) -> anyhow::Result<Vec<OutboundMessage>> {
    stream_messages(nats_url, "CLAW_OUT", subject)
        .await?
        .iter()
        .map(|m| Ok(decode::<OutboundMessage>(&m.payload)?.body))
        .collect()
}

/// The suite's database, opened for queries through the store's own interface (so
/// the same assertions hold on SQLite and on Postgres).
pub async fn storage(s: &Suite) -> Database {
    // Right after a store replica was killed mid-write, a read-only SQLite connection
    // cannot open the database until a writer has recovered its write-ahead log: wait
    // for that rather than fail.
    let url = s.database_url();
    let last = std::sync::Mutex::new(Err(String::new()));
    clawbus_testkit::wait_for(Duration::from_secs(20), || async {
        let r = Database::open_reader(&url).await.map_err(|e| e.to_string());
        let opened = r.is_ok();
        *last.lock().unwrap() = r;
        opened
    })
    .await;
    last.into_inner()
        .unwrap()
        .unwrap_or_else(|e| panic!("the store's database opens: {e}"))
}

/// `(role, content)` of every transcript entry of a session, in order.
pub async fn transcript(db: &Database, session_key: &str) -> anyhow::Result<Vec<(String, String)>> {
    Ok(db
        .history(session_key, 100_000)
        .await?
        .into_iter()
        .map(|e| (e.role.as_str().to_owned(), e.content))
        .collect())
}

/// `(status, error code)` of each run of a session, as stored.
pub async fn run_status(
    db: &Database,
    session_key: &str,
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    Ok(db
        .runs(session_key)
        .await?
        .into_iter()
        .map(|r| (r.status, r.error_code))
        .collect())
}

/// A suite whose agent uses `model` (`provider/model`, pointed at the emulator), with
/// extra environment for every service.
pub async fn suite_with(model: &str, env: &[(&str, &str)]) -> Suite {
    suite_opts(model, env, true).await
}

/// [`suite_with`] without the sandbox service, for a test that answers the tool
/// subjects itself (the testkit's tool responder).
pub async fn suite_with_own_tools(model: &str, env: &[(&str, &str)]) -> Suite {
    suite_opts(model, env, false).await
}

async fn suite_opts(model: &str, env: &[(&str, &str)], sandbox: bool) -> Suite {
    Suite::start(clawbus_testkit::SuiteOpts {
        model: Some(model.into()),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        sandbox,
        ..Default::default()
    })
    .await
    .expect("the suite starts")
}

/// A chat request body with one user message.
pub fn user_msg(text: &str) -> Value {
    json!({"model": "clawbus", "messages": [{"role": "user", "content": text}]})
}

/// Parses an SSE body: the JSON of every `data:` event before `[DONE]`, and whether
/// `[DONE]` came.
pub fn sse_events(body: &str) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    let mut done = false;
    for block in body.split("\n\n") {
        for line in block.lines() {
            if let Some(d) = line.strip_prefix("data: ") {
                if d == "[DONE]" {
                    done = true;
                } else {
                    events.push(serde_json::from_str(d).expect("every SSE event is JSON"));
                }
            }
        }
    }
    (events, done)
}

/// The text carried by a stream's content deltas.
pub fn streamed_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| {
            e.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

/// `(run_id, total_tokens)` of every usage row of a session.
pub async fn usage_rows(db: &Database, session_key: &str) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(db
        .usage(session_key)
        .await?
        .into_iter()
        .map(|u| (u.run_id, u.total_tokens as i64))
        .collect())
}

/// The conversation of the provider's latest request: its messages without the system
/// prompt (which carries the agent's workspace context).
pub fn last_conversation(s: &Suite) -> Vec<Value> {
    s.emu()
        .requests()
        .last()
        .and_then(|r| r["messages"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m["role"] != "system")
        .collect()
}

/// Runs the `clawbus` command line against the suite (anonymous NATS); whether it
/// succeeded, and what it printed.
pub async fn cli(s: &Suite, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(clawbus_testkit::bin_dir().join("clawbus"))
        .args(args)
        .env_clear()
        .env("CLAWBUS_HOME", s.state.path())
        .env("NATS_URL", &s.nats.url)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A suite reading `toml` as its configuration file (`CLAWBUS_CONFIG`; the suite's
/// own settings come from the environment, over it). Keep the directory while the
/// suite runs.
pub async fn suite_with_config(toml: &str) -> (Suite, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clawbus.toml");
    std::fs::write(&path, toml).unwrap();
    let s = Suite::start(clawbus_testkit::SuiteOpts {
        env: vec![("CLAWBUS_CONFIG".into(), path.display().to_string())],
        ..Default::default()
    })
    .await
    .unwrap();
    (s, dir)
}

/// What the model was asked in each call so far: the last message's text of every
/// request the provider emulator received, in order.
pub fn last_asked(s: &Suite) -> Vec<String> {
    s.emu()
        .requests()
        .iter()
        .filter_map(|r| {
            r["messages"].as_array()?.last()?["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Words `w0 … w<n-1>`, space-separated: a long message whose pieces can be counted.
pub fn numbered_words(n: usize) -> String {
    (0..n).map(|i| format!("w{i} ")).collect()
}

/// Asserts that each of `w0 … w<n-1>` occurs exactly once in `pieces` taken together.
pub fn assert_each_word_once<S: AsRef<str>>(pieces: &[S], n: usize) {
    let all: Vec<&str> = pieces
        .iter()
        .flat_map(|p| p.as_ref().split_whitespace())
        .collect();
    for i in 0..n {
        let w = format!("w{i}");
        let count = all.iter().filter(|t| **t == w).count();
        assert_eq!(
            count,
            1,
            "{w} seen {count} times in {} pieces",
            pieces.len()
        );
    }
}

/// As if the channels process had died after sending every piece but before recording
/// any: every delivery record goes, and the account's reply consumer `consumer` is
/// deleted, so the next holder starts over from the first reply.
pub async fn forget_deliveries(s: &Suite, consumer: &str) {
    let js = jetstream::new(s.nats.client().await.unwrap());
    let kv = js.get_key_value("claw_deliveries").await.unwrap();
    let mut keys = kv.keys().await.unwrap();
    while let Some(Ok(k)) = keys.next().await {
        kv.purge(&k).await.unwrap();
    }
    js.get_stream("CLAW_OUT")
        .await
        .unwrap()
        .delete_consumer(consumer)
        .await
        .unwrap();
}

/// Waits (30 s at most) until the channels service has recorded `n` reply pieces (or
/// drafts) as sent: a kill after that point is not in the instant between a platform
/// taking a piece and its record (where platforms without idempotency keys see it
/// twice). Reads the bucket's stream state, as the operator user may under NATS users.
pub async fn wait_recorded(s: &Suite, n: usize) {
    let client = match s.password(clawbus_bus::rights::OPERATOR) {
        Some(p) => s
            .connect_as(clawbus_bus::rights::OPERATOR, Some(p))
            .await
            .unwrap(),
        None => s.nats.client().await.unwrap(),
    };
    let js = jetstream::new(client);
    let ok = clawbus_testkit::wait_for(Duration::from_secs(30), || async {
        match js.get_stream("KV_claw_deliveries").await {
            Ok(mut stream) => stream
                .info()
                .await
                .is_ok_and(|i| i.state.messages >= n as u64),
            Err(_) => false,
        }
    })
    .await;
    assert!(ok, "fewer than {n} reply pieces recorded");
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    clawbus_wire::now_ms() / 1000
}

/// Posts `body` to the gateway's Slack Events API endpoint as Slack would, signed with
/// `secret` at `ts`.
pub async fn post_slack_event(s: &Suite, body: &Value, secret: &str, ts: i64) -> reqwest::Response {
    let text = body.to_string();
    s.http
        .post(format!("{}/slack/events", s.gateway_url))
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", ts.to_string())
        .header(
            "x-slack-signature",
            clawbus_testkit::slack::sign(secret, ts, &text),
        )
        .body(text)
        .send()
        .await
        .unwrap()
}

/// Asserts that each line `let v<i> = *p<i>*;` (`i` below `n`) of the model's answer
/// to `code <n>` arrived whole, on a line of its own, exactly once in `pieces` taken
/// together: outside its code block (a fence cut open between pieces) a line would be
/// Markdown, its `*p<i>*` emphasis, and come without the asterisks.
pub fn assert_code_lines_once<S: AsRef<str>>(pieces: &[S], n: usize) {
    let lines: Vec<&str> = pieces
        .iter()
        .flat_map(|p| p.as_ref().lines())
        .map(str::trim)
        .collect();
    for i in 0..n {
        let want = format!("let v{i} = *p{i}*;");
        let count = lines.iter().filter(|l| **l == want).count();
        assert_eq!(
            count,
            1,
            "`{want}` seen {count} times in {} pieces",
            pieces.len()
        );
    }
}

/// A suite whose services get a channel's settings `env` and the test's `extra`.
pub async fn channel_suite(env: &[(&str, &str)], extra: &[(&str, &str)]) -> Suite {
    let env = env
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Suite::start(clawbus_testkit::SuiteOpts {
        env,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Waits (30 s at most) until `get` gives `n` items or more (what a platform emulator
/// saw sent to a chat); them. Fails naming `what` and showing what there was.
pub async fn wait_count<T: std::fmt::Debug>(
    what: &str,
    n: usize,
    get: impl Fn() -> Vec<T>,
) -> Vec<T> {
    let ok = clawbus_testkit::wait_for(Duration::from_secs(30), || {
        let enough = get().len() >= n;
        async move { enough }
    })
    .await;
    let got = get();
    assert!(ok, "{n} {what} expected, got: {got:?}");
    got
}

/// Approves, through the CLI, the pairing request whose code the bot sent in `message`
/// (a line `Your pairing code: <code>`, the code perhaps in the platform's markup).
pub async fn approve_pairing(s: &Suite, channel: &str, message: &str) {
    let code = message
        .lines()
        .find_map(|l| l.strip_prefix("Your pairing code: "))
        .map(|c| {
            c.trim()
                .trim_start_matches("<code>")
                .trim_end_matches("</code>")
                .trim_matches('`')
                .to_owned()
        })
        .unwrap_or_else(|| panic!("no pairing code in {message}"));
    let (ok, out) = cli(s, &["pairing", "approve", channel, &code]).await;
    assert!(ok, "{out}");
}
