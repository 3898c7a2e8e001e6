//! The gateway's webhooks: `/hooks/agent` runs a turn and delivers it where asked (or
//! where the main session's owner last wrote), `/hooks/wake` puts a system event into
//! the main session now or at the next heartbeat; their own token, and clear errors
//! for everything else.

use std::time::Duration;

use clawbus_testkit::{wait_for, Suite, SuiteOpts};
use clawbus_tests::channel::FakeChannel;
use serde_json::{json, Value};

const HOOK_TOKEN: &str = "hook-secret-0123456789";

async fn suite(extra: &str) -> (Suite, tempfile::TempDir) {
    clawbus_tests::suite_with_config(&format!(
        r#"
[router]
agents = ["main", "other"]

[channels.test]
dmPolicy = "open"

[hooks]
enabled = true
token = "{HOOK_TOKEN}"
allowedAgentIds = ["main"]
{extra}
"#
    ))
    .await
}

async fn hook(s: &Suite, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut req = s.http.post(format!("{}{path}", s.gateway_url)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn asked(s: &Suite, needle: &str) -> bool {
    s.emu()
        .requests()
        .iter()
        .any(|r| r["messages"].to_string().contains(needle))
}

#[tokio::test]
async fn webhooks_run_turns_deliver_them_and_wake_the_main_session() {
    let (s, _dir) = suite("[heartbeat]\nevery = \"2s\"\nprompt = \"HEARTBEAT_OK\"\n").await;
    let ch = FakeChannel::new(&s, "test", "bot1").await;
    // Alice's chat becomes where the main session's owner last wrote.
    assert_eq!(ch.ask(ch.dm("alice", "hello")).await, "Echo: hello");
    let (status, v) = hook(
        &s,
        "/hooks/agent",
        Some(HOOK_TOKEN),
        json!({"message": "summarise the inbox", "name": "Email"}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    assert!(v["runId"].as_str().unwrap().starts_with("run:http:"), "{v}");
    let delivered = |chat: &'static str, text: &'static str| {
        let ch = &ch;
        async move {
            wait_for(Duration::from_secs(20), || async {
                ch.replies_in(chat).iter().any(|r| r.text == text)
            })
            .await
        }
    };
    assert!(
        delivered("alice", "Echo: [Email] summarise the inbox").await,
        "{:?}",
        ch.all()
    );
    // To a chat of its choosing; or nowhere.
    let (status, _) = hook(
        &s,
        "/hooks/agent",
        Some(HOOK_TOKEN),
        json!({"message": "ping bob", "channel": "test", "account": "bot1", "to": "bob"}),
    )
    .await;
    assert_eq!(status, 202);
    assert!(delivered("bob", "Echo: ping bob").await, "{:?}", ch.all());
    let (status, _) = hook(
        &s,
        "/hooks/agent",
        Some(HOOK_TOKEN),
        json!({"message": "keep this to yourself", "deliver": false}),
    )
    .await;
    assert_eq!(status, 202);
    assert!(
        wait_for(Duration::from_secs(20), || async {
            asked(&s, "keep this to yourself")
        })
        .await
    );
    assert!(ch.all().iter().all(|r| !r.text.contains("keep this")));
    // A wake now runs in the main session and answers Alice.
    let (status, _) = hook(
        &s,
        "/hooks/wake",
        Some(HOOK_TOKEN),
        json!({"text": "new mail from Bob", "mode": "now"}),
    )
    .await;
    assert_eq!(status, 202);
    assert!(
        delivered("alice", "Echo: System event: new mail from Bob").await,
        "{:?}",
        ch.all()
    );
    // A wake for the next heartbeat comes with it (a quiet one here).
    let (status, _) = hook(
        &s,
        "/hooks/wake",
        Some(HOOK_TOKEN),
        json!({"text": "the package arrived", "mode": "next-heartbeat"}),
    )
    .await;
    assert_eq!(status, 202);
    assert!(
        wait_for(Duration::from_secs(20), || async {
            asked(
                &s,
                "System events since the last heartbeat:\\n- the package arrived",
            )
        })
        .await
    );
    assert!(ch.all().iter().all(|r| !r.text.contains("HEARTBEAT_OK")));
}

#[tokio::test]
async fn webhooks_refuse_bad_tokens_and_bad_payloads() {
    let (s, _dir) = suite("").await;
    let ok = json!({"message": "hi"});
    assert_eq!(hook(&s, "/hooks/agent", None, ok.clone()).await.0, 401);
    assert_eq!(
        hook(&s, "/hooks/agent", Some(&s.token), ok.clone()).await.0,
        401,
        "the gateway's token is not the hooks'"
    );
    let r = s
        .http
        .post(format!("{}/hooks/agent?token={HOOK_TOKEN}", s.gateway_url))
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "no tokens in URLs");
    let r = s
        .http
        .post(format!("{}/hooks/agent", s.gateway_url))
        .header("x-openclaw-token", HOOK_TOKEN)
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for (path, body, status) in [
        ("/hooks/agent", json!({}), 400),
        ("/hooks/agent", json!({"message": "  "}), 400),
        (
            "/hooks/agent",
            json!({"message": "x", "agentId": "ghost"}),
            400,
        ),
        (
            "/hooks/agent",
            json!({"message": "x", "agentId": "other"}),
            403,
        ),
        (
            "/hooks/agent",
            json!({"message": "x", "sessionKey": "mine"}),
            400,
        ),
        (
            "/hooks/agent",
            json!({"message": "x", "channel": "bad.chan", "to": "a"}),
            400,
        ),
        (
            "/hooks/agent",
            json!({"message": "x", "channel": "test"}),
            400,
        ),
        ("/hooks/agent", json!({"message": "x", "surprise": 1}), 400),
        (
            "/hooks/agent",
            json!({"message": "x", "timeoutSeconds": 0}),
            400,
        ),
        (
            "/hooks/agent",
            json!({"message": "x", "timeoutSeconds": 86_401}),
            400,
        ),
        (
            "/hooks/agent",
            json!({"message": "x", "timeoutSeconds": -5}),
            400,
        ),
        (
            "/hooks/agent",
            json!({"message": "x", "timeoutSeconds": "10"}),
            400,
        ),
        ("/hooks/wake", json!({"text": "x", "mode": "later"}), 400),
        ("/hooks/wake", json!({"text": ""}), 400),
        ("/hooks/wake", json!({"mode": "now"}), 400),
    ] {
        let (got, v) = hook(&s, path, Some(HOOK_TOKEN), body.clone()).await;
        assert_eq!(
            got,
            status,
            "{path} {}: {v}",
            body.to_string().chars().take(80).collect::<String>()
        );
    }
    let r = s
        .http
        .post(format!("{}/hooks/agent", s.gateway_url))
        .bearer_auth(HOOK_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // An oversized body is refused before it is read whole (its own connection: the
    // server closes it).
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = fresh
        .post(format!("{}/hooks/agent", s.gateway_url))
        .bearer_auth(HOOK_TOKEN)
        .json(&json!({"message": "x".repeat(2_000_000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Without [hooks] enabled there are no hooks.
    let plain = Suite::start(SuiteOpts::default()).await.unwrap();
    assert_eq!(
        hook(&plain, "/hooks/agent", Some(HOOK_TOKEN), ok).await.0,
        404
    );
}

#[tokio::test]
async fn a_hooks_timeout_seconds_ends_its_run_long_before_the_agents_turn_timeout() {
    // The agent's own turn timeout is ten minutes (the default).
    let (s, _dir) = suite("").await;
    let (status, v) = hook(
        &s,
        "/hooks/agent",
        Some(HOOK_TOKEN),
        json!({"message": "hang", "timeoutSeconds": 1, "deliver": false}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let key = v["sessionKey"].as_str().unwrap().to_owned();
    let db = clawbus_tests::storage(&s).await;
    let ended = wait_for(Duration::from_secs(30), || async {
        clawbus_tests::run_status(&db, &key)
            .await
            .unwrap_or_default()
            .iter()
            .any(|(status, _)| status != "running" && status != "queued")
    })
    .await;
    let runs = clawbus_tests::run_status(&db, &key).await.unwrap();
    assert!(ended, "the run did not end: {runs:?}");
    assert_eq!(
        runs[0],
        ("failed".to_owned(), Some("turn_timeout".to_owned())),
        "{runs:?}"
    );
}
