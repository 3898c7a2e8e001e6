//! The router's policies with real processes: pairing, group mention gating with
//! context, bindings to several agents, session keys and resets, and commands —
//! messages published as a channel adapter would, replies read where it would.

use std::time::Duration;

use clawbus_testkit::{wait_for, Service, Suite};
use clawbus_tests::channel::FakeChannel;
use clawbus_tests::cli;

async fn suite(toml: &str) -> (Suite, tempfile::TempDir) {
    clawbus_tests::suite_with_config(toml).await
}

/// The user messages the provider saw, each call's last.
fn asked(s: &Suite) -> Vec<String> {
    s.emu()
        .requests()
        .iter()
        .filter_map(|r| {
            r["messages"]
                .as_array()?
                .iter()
                .rev()
                .find(|m| m["role"] == "user")?["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// The router's count of messages with `outcome`.
async fn routed(s: &Suite, outcome: &str) -> f64 {
    let page = s
        .get_text(&format!(
            "{}/metrics",
            s.replica_admin_url((Service::Router, 0))
        ))
        .await;
    let needle = format!("clawbus_router_messages_total{{outcome=\"{outcome}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn code_in(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("Your pairing code: "))
        .unwrap_or_else(|| panic!("no code in {text}"))
        .trim()
        .to_owned()
}

#[tokio::test]
async fn pairing_keeps_strangers_out_until_the_owner_approves() {
    let (s, _dir) = suite("").await;
    let ch = FakeChannel::new(&s, "test", "bot1").await;
    // An unknown sender gets a code, the agent nothing; asking again gives the same.
    let first = ch.ask(ch.dm("alice", "hello")).await;
    let code = code_in(&first);
    assert!(first.contains("clawbus pairing approve test"), "{first}");
    assert_eq!(code_in(&ch.ask(ch.dm("alice", "hello?")).await), code);
    assert!(s.emu().requests().is_empty(), "nothing reached the model");
    let (ok, list) = cli(&s, &["pairing", "list"]).await;
    assert!(
        ok && list.contains(&code) && list.contains("alice"),
        "{list}"
    );
    // Wrong codes and channels are refused clearly.
    for args in [
        ["pairing", "approve", "test", "NOPE"],
        ["pairing", "approve", "test", "ABCDEFGH"],
        ["pairing", "approve", "bad.chan", code.as_str()],
        ["pairing", "approve", "other", code.as_str()],
    ] {
        let (ok, out) = cli(&s, &args).await;
        assert!(!ok && !out.is_empty(), "{args:?}: {out}");
    }
    let (ok, out) = cli(&s, &["pairing", "approve", "test", &code.to_lowercase()]).await;
    assert!(ok && out.contains("approved alice"), "{out}");
    // The requester is told, and from now on talks to the agent.
    let told = wait_for(Duration::from_secs(10), || async {
        ch.replies_in("alice")
            .iter()
            .any(|r| r.text.contains("You are approved"))
    })
    .await;
    assert!(told, "{:?}", ch.all());
    assert_eq!(ch.ask(ch.dm("alice", "hi again")).await, "Echo: hi again");
    // At most three requests pending per account; the fourth stranger hears nothing.
    for who in ["b", "c", "d"] {
        code_in(&ch.ask(ch.dm(who, "let me in")).await);
    }
    let dropped = routed(&s, "dropped").await;
    ch.send(ch.dm("e", "me too")).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            routed(&s, "dropped").await > dropped
        })
        .await
    );
    assert!(ch.replies_in("e").is_empty());
    // A code older than an hour is no longer approved.
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let kv = js
        .get_key_value(clawbus_bus::topology::KV_PAIRING)
        .await
        .unwrap();
    let old = clawbus_bus::pairing::Request {
        code: "ZZZZ2345".into(),
        channel: "test".into(),
        account: "bot1".into(),
        sender_id: "late".into(),
        sender_name: None,
        chat_id: "late".into(),
        created_ms: clawbus_wire::now_ms() - clawbus_bus::pairing::CODE_TTL_MS - 1,
    };
    kv.put(
        format!("pending.test.bot1.{}", old.code),
        serde_json::to_vec(&old).unwrap().into(),
    )
    .await
    .unwrap();
    let (ok, out) = cli(&s, &["pairing", "approve", "test", &old.code]).await;
    assert!(!ok && out.contains("expired"), "{out}");
    assert!(!cli(&s, &["pairing", "list"]).await.1.contains(&old.code));
}

#[tokio::test]
async fn an_allowlist_and_disabled_direct_messages_drop_in_silence() {
    let (s, _dir) = suite(
        r#"
[channels.test]
dmPolicy = "allowlist"
allowFrom = ["friend"]

[channels.quiet]
dm_policy = "disabled"
"#,
    )
    .await;
    let test = FakeChannel::new(&s, "test", "bot1").await;
    let quiet = FakeChannel::new(&s, "quiet", "bot1").await;
    assert_eq!(test.ask(test.dm("friend", "hi")).await, "Echo: hi");
    test.send(test.dm("stranger", "hi")).await;
    quiet.send(quiet.dm("friend", "hi")).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            routed(&s, "dropped").await >= 2.0
        })
        .await
    );
    assert!(test.replies_in("stranger").is_empty() && quiet.all().is_empty());
    assert_eq!(asked(&s), ["hi"]);
}

#[tokio::test]
async fn an_unmentioned_group_message_stays_silent_and_becomes_context() {
    let (s, _dir) = suite(
        r#"
[channels.test]
groupPolicy = "allowlist"
mentionPatterns = ["\\bclaw\\b"]

[channels.test.groups.family]

[channels.test.groups.noisy]
requireMention = false
"#,
    )
    .await;
    let ch = FakeChannel::new(&s, "test", "bot1").await;
    ch.send(ch.group("family", "ann", "the door is blue")).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            routed(&s, "context").await >= 1.0
        })
        .await
    );
    assert!(ch.all().is_empty() && s.emu().requests().is_empty());
    // A native mention answers, with what was said before as context.
    let mut m = ch.group("family", "bob", "what colour is the door?");
    m.mentions_bot = true;
    let reply = ch.ask(m).await;
    assert!(reply.contains("[Addressed to you]"), "{reply}");
    let seen = asked(&s).pop().unwrap();
    assert!(
        seen.contains("ANN: the door is blue") && seen.ends_with("BOB: what colour is the door?"),
        "{seen}"
    );
    // The context went with it; a pattern counts as a mention, a reply to the bot too.
    let reply = ch.ask(ch.group("family", "bob", "hey claw, again")).await;
    assert_eq!(reply, "Echo: hey claw, again");
    let mut m = ch.group("family", "ann", "thanks");
    m.reply_to = Some(clawbus_wire::ReplyRef {
        message_id: "x".into(),
        text: None,
        from_bot: true,
    });
    assert_eq!(ch.ask(m).await, "Echo: thanks");
    // A group without mention gating answers everything; one not allowed, nothing.
    assert_eq!(ch.ask(ch.group("noisy", "cat", "meow")).await, "Echo: meow");
    let dropped = routed(&s, "dropped").await;
    ch.send(ch.group("strangers", "eve", "claw, hello")).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            routed(&s, "dropped").await > dropped
        })
        .await
    );
    assert!(ch.replies_in("strangers").is_empty());
    // Messages from bots never reach the agent.
    let mut bot = ch.group("noisy", "otherbot", "beep");
    bot.sender.is_bot = true;
    ch.send(bot).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            routed(&s, "dropped").await > dropped + 1.0
        })
        .await
    );
}

#[tokio::test]
async fn bindings_route_three_senders_to_three_agents() {
    let (s, _dir) = suite(
        r#"
[router]
agents = ["main", "work", "family"]

[session]
dmScope = "per-channel-peer"

[channels.test]
dmPolicy = "open"
groupPolicy = "open"
requireMention = false

[[bindings]]
agentId = "work"
match = { channel = "test", peer = { kind = "direct", id = "boss" } }

[[bindings]]
agentId = "family"
match = { channel = "test", peer = { kind = "group", id = "*" } }
"#,
    )
    .await;
    let ch = FakeChannel::new(&s, "test", "bot1").await;
    let boss = ch.send(ch.dm("boss", "status report")).await;
    let kid = ch.send(ch.group("home", "kid", "dinner?")).await;
    let me = ch.send(ch.dm("me", "hello")).await;
    let mut sessions = Vec::new();
    for id in [boss, kid, me] {
        sessions.push(ch.reply(&id).await.session_key);
    }
    assert_eq!(
        sessions,
        [
            "agent:work:test:direct:boss",
            "agent:family:test:group:home",
            "agent:main:test:direct:me"
        ]
    );
    // Each agent has its own workspace.
    for dir in ["workspace", "workspace-work", "workspace-family"] {
        assert!(s.state.path().join(dir).join("AGENTS.md").exists(), "{dir}");
    }
}

#[tokio::test]
async fn commands_answer_without_the_model_and_new_starts_afresh() {
    let (s, _dir) = suite(
        r#"
[channels.test]
dmPolicy = "open"

[agent.models."emulator-2"]
context_window = 8000
"#,
    )
    .await;
    let ch = FakeChannel::new(&s, "test", "bot1").await;
    assert_eq!(
        ch.ask(ch.dm("u", "remember the blue door")).await,
        "Echo: remember the blue door"
    );
    let status = ch.ask(ch.dm("u", "/status")).await;
    assert!(
        status.contains("Agent: main") && status.contains("Session: agent:main:main"),
        "{status}"
    );
    assert!(ch.ask(ch.dm("u", "/help")).await.contains("/new"));
    // (The store applies the run's event right after the reply went out.)
    let counted = wait_for(Duration::from_secs(10), || async {
        ch.ask(ch.dm("u", "/usage"))
            .await
            .starts_with("Usage of this session: 1 runs")
    })
    .await;
    assert!(counted, "{}", ch.ask(ch.dm("u", "/usage")).await);
    // Session settings reach the model call.
    assert!(ch
        .ask(ch.dm("u", "/model emulator-2"))
        .await
        .contains("emulator-2"));
    assert!(ch.ask(ch.dm("u", "/think high")).await.contains("high"));
    ch.ask(ch.dm("u", "which model?")).await;
    let last = s.emu().requests().pop().unwrap();
    assert_eq!(last["model"], "emulator-2", "{last}");
    assert_eq!(last["reasoning_effort"], "high", "{last}");
    assert_eq!(asked(&s).len(), 2, "commands did not call the model");
    // Hostile and unknown commands get a clear answer.
    for (text, needle) in [
        ("/frobnicate now", "Unknown command /frobnicate"),
        ("/model evil/model", "Unknown model"),
        ("/model a b", "Usage: /model"),
        ("/think turbo", "Unknown thinking level"),
        ("/approve 123", "for the owner only"),
        ("/queue sideways", "Unknown queue mode"),
    ] {
        let id = ch.send(ch.dm("u", text)).await;
        let r = ch.reply(&id).await;
        assert!(r.text.contains(needle), "{text}: {}", r.text);
        assert_eq!(r.error.map(|e| e.code), Some("command_refused".into()));
    }
    // `/new` alone starts afresh without a model call; the next turn has no history.
    let calls = s.emu().requests().len();
    assert_eq!(ch.ask(ch.dm("u", "/new")).await, "New session started.");
    assert_eq!(s.emu().requests().len(), calls);
    ch.ask(ch.dm("u", "what door?")).await;
    let last = s.emu().requests().pop().unwrap();
    let text = last["messages"].to_string();
    assert!(
        !text.contains("blue door") && text.contains("what door?"),
        "{text}"
    );
    // `/reset <message>` starts afresh with that message.
    ch.ask(ch.dm("u", "/reset first of the new")).await;
    let last = s.emu().requests().pop().unwrap();
    let text = last["messages"].to_string();
    assert!(
        !text.contains("what door") && text.contains("first of the new"),
        "{text}"
    );
}

#[tokio::test]
async fn an_idle_session_starts_afresh_by_itself() {
    let (s, _dir) = suite(
        r#"
[channels.test]
dmPolicy = "open"

[session.reset]
mode = "idle"
idle_minutes = 1
"#,
    )
    .await;
    let ch = FakeChannel::new(&s, "test", "bot1").await;
    ch.ask(ch.dm("u", "the code is 42")).await;
    ch.ask(ch.dm("u", "still here")).await;
    assert!(s.emu().requests().pop().unwrap()["messages"]
        .to_string()
        .contains("the code is 42"));
    // The session was last active two minutes ago (set as a quiet night would).
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let kv = js
        .get_key_value(clawbus_bus::topology::KV_SESSIONS)
        .await
        .unwrap();
    let key = format!(
        "s.{}",
        clawbus_bus::subjects::session_token("agent:main:main")
    );
    let mut st: serde_json::Value =
        serde_json::from_slice(&kv.get(&key).await.unwrap().unwrap()).unwrap();
    st["last_active_ms"] = (clawbus_wire::now_ms() - 120_000).into();
    kv.put(&key, serde_json::to_vec(&st).unwrap().into())
        .await
        .unwrap();
    // The router sees it (its replicas keep the state in step by a watch).
    let seen = wait_for(Duration::from_secs(10), || async {
        ch.ask(ch.dm("u", "/status"))
            .await
            .contains("Last message: 2 min ago")
    })
    .await;
    assert!(seen);
    ch.ask(ch.dm("u", "what was the code?")).await;
    let text = s.emu().requests().pop().unwrap()["messages"].to_string();
    assert!(!text.contains("the code is 42"), "{text}");
}

#[tokio::test]
async fn the_household_example_routes_as_the_readme_says() {
    let toml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/household.toml"
    ))
    .unwrap();
    let (s, _dir) = suite(&toml).await;
    let tg = FakeChannel::new(&s, "telegram", "bot").await;
    let alice = tg.send(tg.dm("111", "hi, it's Alice")).await;
    let bob = tg.send(tg.dm("222", "hi, it's Bob")).await;
    assert_eq!(
        tg.reply(&alice).await.session_key,
        "agent:main:telegram:direct:alice"
    );
    assert_eq!(
        tg.reply(&bob).await.session_key,
        "agent:main:telegram:direct:222"
    );
    // The family group: unaddressed talk is context, "claw" addresses the family agent.
    tg.send(tg.group("-1001234", "222", "we need milk")).await;
    let asked_now = tg
        .send(tg.group("-1001234", "111", "claw, what do we need?"))
        .await;
    let r = tg.reply(&asked_now).await;
    assert_eq!(r.session_key, "agent:family:telegram:group:-1001234");
    assert!(r.text.contains("222: we need milk"), "{}", r.text);
    // A stranger, and another group, hear nothing.
    let before = routed(&s, "dropped").await;
    tg.send(tg.dm("333", "let me in")).await;
    tg.send(tg.group("-999", "111", "claw?")).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            routed(&s, "dropped").await >= before + 2.0
        })
        .await
    );
    assert!(tg.replies_in("333").is_empty() && tg.replies_in("-999").is_empty());
}
