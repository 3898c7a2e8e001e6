//! Delivery guarantees (DESIGN.md invariants 1-3, 5): kill -9 each service mid-turn,
//! publish duplicates and poison, and check that every caller gets exactly one reply,
//! the transcript has exactly one entry per message, and nothing crashes.

use std::time::{Duration, Instant};

use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts};
use clawbus_tests::{outbound_messages, stream_messages, transcript, user_msg};
use clawbus_wire::{encode, ChatRef, Envelope, InboundMessage, OutboundMessage};
use serde_json::Value;

const OUT: &str = "claw.v1.out.http.default";

fn replies_for(outs: &[OutboundMessage], session_key: &str) -> usize {
    outs.iter().filter(|o| o.session_key == session_key).count()
}

async fn wait_transcript(s: &Suite, key: &str, n: usize) -> Vec<(String, String)> {
    let db = clawbus_tests::storage(s).await;
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    // Before counting: every turn finished (the work queue is empty) and the store has
    // applied every event (its consumer has nothing pending), so a duplicate, had one
    // been coming, would be in the table by now.
    let settled = wait_for(Duration::from_secs(30), || async {
        let turns_done = clawbus_tests::stream_is_empty(&js, "CLAW_TURN").await;
        // The store consumer of the session's event partition.
        let consumer = clawbus_bus::topology::ConsumerDecl::store(
            clawbus_bus::subjects::event_partition(key, clawbus_bus::topology::PARTITIONS),
            1,
        )
        .durable;
        let applied = clawbus_tests::consumer_is_idle(&js, "CLAW_EVT", &consumer).await;
        turns_done && applied && transcript(&db, key).await.is_ok_and(|t| t.len() >= n)
    })
    .await;
    assert!(settled, "turns finished and the store caught up");
    transcript(&db, key).await.unwrap()
}

#[tokio::test]
async fn agent_killed_mid_turn_finishes_it_exactly_once() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    let key = "agent:main:crash-agent";
    s.emu().hold();
    let req = s.chat_in(key, "survive this");
    let call =
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() });
    assert!(
        wait_for(Duration::from_secs(10), || async { s.emu().held() >= 1 }).await,
        "provider never called"
    );
    s.kill9(Service::Agent).await.unwrap();
    let killed = Instant::now();
    s.restart(Service::Agent).await.unwrap();
    s.emu().release();
    let v = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("reply within 30 s of the kill")
        .unwrap();
    assert!(killed.elapsed() < Duration::from_secs(30));
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: survive this");
    let t = wait_transcript(&s, key, 2).await;
    assert_eq!(
        t,
        vec![
            ("user".into(), "survive this".into()),
            ("assistant".into(), "Echo: survive this".into())
        ]
    );
    let outs = outbound_messages(&s.nats.url, OUT).await.unwrap();
    assert_eq!(replies_for(&outs, key), 1, "exactly one reply on the bus");
    assert!(
        s.emu().requests().len() >= 2,
        "the restarted agent called the provider again"
    );
}

#[tokio::test]
async fn agent_killed_with_twenty_turns_in_flight_replies_once_each() {
    // Kill the agent while 20 turns are inside their model calls (provably: the
    // provider holds all 20); every caller still gets one reply and the bus carries
    // one reply per turn.
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    s.emu().hold();
    let mut calls = Vec::new();
    for i in 0..20 {
        let req = s.chat_in(&format!("agent:main:many-{i}"), &format!("msg {i}"));
        calls.push(tokio::spawn(async move {
            req.send().await.unwrap().json::<Value>().await.unwrap()
        }));
    }
    assert!(
        wait_for(Duration::from_secs(10), || async { s.emu().held() == 20 }).await,
        "all 20 turns are in their model calls"
    );
    s.kill9(Service::Agent).await.unwrap();
    assert!(
        outbound_messages(&s.nats.url, OUT)
            .await
            .unwrap()
            .is_empty(),
        "the kill interrupted every turn before its reply"
    );
    s.restart(Service::Agent).await.unwrap();
    s.emu().release();
    for (i, c) in calls.into_iter().enumerate() {
        let v = tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            format!("Echo: msg {i}")
        );
    }
    let outs = outbound_messages(&s.nats.url, OUT).await.unwrap();
    assert_eq!(outs.len(), 20, "one reply per turn: {outs:?}");
    assert!(
        s.emu().requests().len() >= 40,
        "the restarted agent ran each interrupted turn again"
    );
    for i in 0..20 {
        let t = wait_transcript(&s, &format!("agent:main:many-{i}"), 2).await;
        assert_eq!(t.len(), 2, "session {i}: {t:?}");
    }
}

#[tokio::test]
async fn store_killed_mid_turn_loses_and_duplicates_nothing() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    let key = "agent:main:crash-store";
    let r = s.chat_in(key, "first").send().await.unwrap();
    assert_eq!(r.status(), 200);
    wait_transcript(&s, key, 2).await;
    // The second turn needs the store for its history; the store dies meanwhile.
    s.emu().hold();
    let req = s.chat_in(key, "second");
    let call =
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() });
    assert!(wait_for(Duration::from_secs(10), || async { s.emu().held() >= 1 }).await);
    s.kill9(Service::Store).await.unwrap();
    let killed = Instant::now();
    s.emu().release();
    // A third turn arrives while the store is down: its history load must wait.
    let req = s.chat_in(key, "third");
    let call3 =
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() });
    // ... and is on the bus while the store is still down.
    let nats = s.nats.url.clone();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            stream_messages(&nats, "CLAW_IN", "claw.v1.in.>")
                .await
                .is_ok_and(|ms| {
                    ms.iter().any(|m| {
                        clawbus_wire::decode::<InboundMessage>(&m.payload)
                            .is_ok_and(|e| e.body.text == "third")
                    })
                })
        })
        .await,
        "the third message arrived"
    );
    s.restart(Service::Store).await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("reply within 30 s")
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: second");
    let v = tokio::time::timeout(Duration::from_secs(30), call3)
        .await
        .expect("reply within 30 s")
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: third");
    assert!(killed.elapsed() < Duration::from_secs(30));
    let t = wait_transcript(&s, key, 6).await;
    let roles: Vec<&str> = t.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles,
        vec![
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant"
        ],
        "{t:?}"
    );
    // The third turn saw the whole history, in order.
    let last = clawbus_tests::last_conversation(&s).len();
    assert_eq!(last, 5);
    assert_eq!(
        replies_for(&outbound_messages(&s.nats.url, OUT).await.unwrap(), key),
        3
    );
}

#[tokio::test]
async fn router_killed_mid_turn_loses_and_duplicates_nothing() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    let key = "agent:main:crash-router";
    s.kill9(Service::Router).await.unwrap();
    let req = s.chat_in(key, "routed later");
    let call =
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() });
    // The message is durable in CLAW_IN before anyone routes it.
    let url = s.nats.url.clone();
    assert!(
        wait_for(Duration::from_secs(10), || async {
            stream_messages(&url, "CLAW_IN", ">")
                .await
                .is_ok_and(|m| m.len() == 1)
        })
        .await
    );
    let killed = Instant::now();
    s.restart(Service::Router).await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("reply within 30 s")
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: routed later");
    assert!(killed.elapsed() < Duration::from_secs(30));
    let t = wait_transcript(&s, key, 2).await;
    assert_eq!(t.len(), 2);
    assert_eq!(
        replies_for(&outbound_messages(&s.nats.url, OUT).await.unwrap(), key),
        1
    );
}

/// A suite whose `test` channel takes every message, direct or in a group, from
/// anyone (the messages these tests publish as an adapter would; the default policies
/// are pairing and a group allowlist with mentions).
fn open_test_channel() -> SuiteOpts {
    SuiteOpts {
        env: [
            ("CLAWBUS__CHANNELS__TEST__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__TEST__GROUP_POLICY", "open"),
            ("CLAWBUS__CHANNELS__TEST__REQUIRE_MENTION", "false"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec(),
        ..Default::default()
    }
}

fn inbound(id: &str, text: &str) -> Envelope<InboundMessage> {
    Envelope::new(
        format!("test:acct:{id}"),
        1,
        InboundMessage {
            channel: "test".into(),
            account: "acct".into(),
            message_id: id.into(),
            chat: ChatRef {
                id: "chat-1".into(),
                ..Default::default()
            },
            text: text.into(),
            ..Default::default()
        },
    )
}

async fn publish(
    js: &async_nats::jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: Vec<u8>,
) -> bool {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", msg_id);
    let ack = js
        .publish_with_headers(subject.to_owned(), h, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    ack.duplicate
}

#[tokio::test]
async fn the_same_inbound_message_twice_yields_one_turn() {
    let s = Suite::start(open_test_channel()).await.unwrap();
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let env = inbound("m-1", "only once");
    let bytes = encode(&env).unwrap();
    assert!(!publish(&js, "claw.v1.in.test.acct", &env.id, bytes.clone()).await);
    let url = s.nats.url.clone();
    let got_reply = wait_for(Duration::from_secs(15), || async {
        outbound_messages(&url, "claw.v1.out.test.acct")
            .await
            .is_ok_and(|o| o.len() == 1)
    })
    .await;
    assert!(got_reply);
    // Republished after the turn finished (a platform redelivery): deduplicated.
    assert!(
        publish(&js, "claw.v1.in.test.acct", &env.id, bytes).await,
        "JetStream reports the duplicate"
    );
    // A different message in the same chat flows normally and proves the pipeline drained.
    let env2 = inbound("m-2", "second message");
    assert!(
        !publish(
            &js,
            "claw.v1.in.test.acct",
            &env2.id,
            encode(&env2).unwrap()
        )
        .await
    );
    assert!(
        wait_for(Duration::from_secs(15), || async {
            outbound_messages(&url, "claw.v1.out.test.acct")
                .await
                .is_ok_and(|o| o.len() >= 2)
        })
        .await
    );
    let outs = outbound_messages(&url, "claw.v1.out.test.acct")
        .await
        .unwrap();
    let texts: Vec<&str> = outs.iter().map(|o| o.text.as_str()).collect();
    assert_eq!(texts, vec!["Echo: only once", "Echo: second message"]);
    let calls = s
        .emu()
        .requests()
        .iter()
        .filter(|r| r.to_string().contains("only once"))
        .count();
    assert_eq!(
        calls, 2,
        "the first turn's text appears in its own call and in the history of the second"
    );
    assert_eq!(s.emu().requests().len(), 2);
    assert_eq!(outs[0].reply_to_message_id.as_deref(), Some("m-1"));
    assert_eq!(outs[0].session_key, "agent:main:main");
}

#[tokio::test]
async fn poison_on_the_bus_is_dead_lettered_and_nothing_crashes() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    // Malformed MessagePack, an unknown major version, a body claiming another channel,
    // and a valid envelope of the wrong kind.
    publish(
        &js,
        "claw.v1.in.test.acct",
        "p1",
        b"\xc1 definitely not msgpack".to_vec(),
    )
    .await;
    let mut future = inbound("p2", "from the future");
    future.v = 9;
    publish(&js, "claw.v1.in.test.acct", "p2", encode(&future).unwrap()).await;
    let spoof = inbound("p3", "spoofed");
    publish(&js, "claw.v1.in.other.acct", "p3", encode(&spoof).unwrap()).await;
    publish(
        &js,
        "claw.v1.turn.0.abc",
        "p4",
        encode(&inbound("p4", "wrong kind")).unwrap(),
    )
    .await;
    publish(&js, "claw.v1.evt.transcript.abc", "p5", b"\x80".to_vec()).await;
    // A run event whose transcript entry has no id (it could never be deduplicated).
    let run = clawbus_wire::Envelope::new(
        "p6",
        1,
        clawbus_wire::RunEvent {
            run_id: "r".into(),
            session_key: "agent:main:main".into(),
            agent_id: "main".into(),
            status: clawbus_wire::RunStatus::Completed,
            model: None,
            usage: None,
            cost_usd: None,
            error: None,
            attempt: 1,
            duration_ms: 0,
            entries: vec![clawbus_wire::RunEntry {
                entry_id: String::new(),
                role: clawbus_wire::Role::User,
                content: "anonymous".into(),
                ..Default::default()
            }],
        },
    );
    publish(&js, "claw.v1.evt.run.abc", "p6", encode(&run).unwrap()).await;
    // A run event whose cost is not a number (it would poison every usage sum).
    let mut nan = run.clone();
    nan.id = "p7".into();
    nan.body.run_id = "r7".into();
    nan.body.entries.clear();
    nan.body.cost_usd = Some(f64::NAN);
    publish(&js, "claw.v1.evt.run.abc", "p7", encode(&nan).unwrap()).await;
    let url = s.nats.url.clone();
    let ok = wait_for(Duration::from_secs(15), || async {
        stream_messages(&url, "CLAW_DLQ", ">")
            .await
            .is_ok_and(|m| m.len() == 7)
    })
    .await;
    let dlq = stream_messages(&url, "CLAW_DLQ", ">").await.unwrap();
    assert!(ok, "dead letters: {dlq:?}");
    let reasons: Vec<String> = dlq
        .iter()
        .map(|m| m.header("Clawbus-Dlq-Reason").unwrap_or_default())
        .collect();
    let find = |subject: &str| {
        dlq.iter()
            .position(|m| m.header("Clawbus-Dlq-Subject").as_deref() == Some(subject))
    };
    assert!(
        reasons.iter().any(|r| r.contains("malformed MessagePack")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("unsupported version 9")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("do not match subject")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("expected message kind `turn_request`")),
        "{reasons:?}"
    );
    // Stored (and dead-lettered) under the event partition the stream adds.
    let stored = format!(
        "claw.v1.evt.transcript.{}.abc",
        clawbus_bus::subjects::token_partition("abc", clawbus_bus::topology::PARTITIONS)
    );
    assert!(find(&stored).is_some(), "{stored}");
    assert!(
        reasons.iter().any(|r| r.contains("empty entry_id")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("cost_usd is not a finite")),
        "{reasons:?}"
    );
    // `clawbus dlq` shows them to an operator.
    let (ok, text) = clawbus_tests::cli(&s, &["dlq"]).await;
    assert!(ok, "{text}");
    assert!(text.starts_with("7 dead letters"), "{text}");
    assert!(
        text.contains("from claw.v1.in.test.acct") && text.contains("malformed MessagePack"),
        "{text}"
    );
    // The original bytes are kept for inspection.
    let p1 = dlq
        .iter()
        .find(|m| m.payload.starts_with(b"\xc1"))
        .expect("payload preserved");
    assert_eq!(p1.subject, "claw.v1.dlq.router");
    assert!(s.all_alive());
    assert_eq!(
        s.chat(&user_msg("after poison"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        s.emu().requests().len() == 1,
        "poison never reached the provider"
    );
}

#[tokio::test]
async fn oversized_messages_are_refused_by_the_bus() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let env = inbound("big", &"x".repeat(2 * 1024 * 1024));
    let bytes = encode(&env).unwrap();
    // The server's max_payload refuses it before any service sees it.
    let res = js
        .publish("claw.v1.in.test.acct".to_owned(), bytes.into())
        .await;
    let refused = match res {
        Err(_) => true,
        Ok(f) => f.await.is_err(),
    };
    assert!(refused);
    // Just under the limit but over the router's text limit: a clear refusal reply.
    let env = inbound("big2", &"y".repeat(300 * 1024));
    publish(&js, "claw.v1.in.test.acct", &env.id, encode(&env).unwrap()).await;
    let url = s.nats.url.clone();
    assert!(
        wait_for(Duration::from_secs(15), || async {
            outbound_messages(&url, "claw.v1.out.test.acct")
                .await
                .is_ok_and(|o| o.len() == 1)
        })
        .await
    );
    let outs = outbound_messages(&url, "claw.v1.out.test.acct")
        .await
        .unwrap();
    assert_eq!(outs[0].error.as_ref().unwrap().code, "message_too_long");
    assert!(s.emu().requests().is_empty());
}

#[tokio::test]
async fn a_store_down_for_good_gets_a_clear_error_not_silence() {
    let mut s = Suite::start(SuiteOpts {
        env: vec![("CLAWBUS__AGENT__MAX_DELIVER".into(), "2".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    let key = "agent:main:store-down";
    let first = s.chat_in(key, "first").send().await.unwrap();
    assert_eq!(first.status(), 200);
    wait_transcript(&s, key, 2).await;
    s.kill9(Service::Store).await.unwrap();
    // A fresh agent has no cached history of the session: it needs the store.
    s.kill9(Service::Agent).await.unwrap();
    s.restart(Service::Agent).await.unwrap();
    let r = s.chat_in(key, "second").send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "history_unavailable");
    assert_eq!(s.emu().requests().len(), 1, "no model call without history");
    s.restart(Service::Store).await.unwrap();
    let r = s.chat_in(key, "third").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The failed turn's message is kept; its reply is the error, not invented text.
    let t = wait_transcript(&s, key, 5).await;
    let roles: Vec<&str> = t.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles,
        vec!["user", "assistant", "user", "user", "assistant"],
        "{t:?}"
    );
}

#[tokio::test]
async fn hostile_history_queries_get_error_replies() {
    use clawbus_wire::{decode, HistoryRequest, HistoryResponse};
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let key = "agent:main:hq";
    assert_eq!(s.chat_in(key, "hello").send().await.unwrap().status(), 200);
    wait_transcript(&s, key, 2).await;
    let nc = s.nats.client().await.unwrap();
    let ask = |payload: Vec<u8>| {
        let nc = nc.clone();
        async move {
            // The replica owning the session's event partition answers.
            let subject = clawbus_bus::subjects::store_history(
                clawbus_bus::subjects::event_partition(key, clawbus_bus::topology::PARTITIONS),
            );
            let r = nc.request(subject, payload.into()).await.unwrap();
            decode::<HistoryResponse>(&r.payload).unwrap().body
        }
    };
    let garbage = ask(b"\x00\xffnot msgpack".to_vec()).await;
    assert_eq!(garbage.error.unwrap().code, "malformed_request");
    // A session asked of another partition's responder: refused, not answered from a
    // replica that may not have applied its latest events.
    let other = (0..)
        .map(|n| format!("agent:main:elsewhere-{n}"))
        .find(|k| {
            clawbus_bus::subjects::event_partition(k, clawbus_bus::topology::PARTITIONS)
                != clawbus_bus::subjects::event_partition(key, clawbus_bus::topology::PARTITIONS)
        })
        .unwrap();
    let misrouted = encode(&Envelope::new(
        "q",
        1,
        HistoryRequest {
            session_key: other,
            limit: 10,
            min_seq: None,
        },
    ))
    .unwrap();
    assert_eq!(ask(misrouted).await.error.unwrap().code, "wrong_partition");
    let req = |session_key: &str, limit: u32, min_seq: Option<u64>| {
        encode(&Envelope::new(
            "q",
            1,
            HistoryRequest {
                session_key: session_key.into(),
                limit,
                min_seq,
            },
        ))
        .unwrap()
    };
    assert_eq!(
        ask(req("", 10, None)).await.error.unwrap().code,
        "invalid_request"
    );
    assert_eq!(
        ask(req(&"k".repeat(600), 10, None))
            .await
            .error
            .unwrap()
            .code,
        "invalid_request"
    );
    // A sequence that will never be applied: a bounded wait, then a clear error.
    assert_eq!(
        ask(req(key, 10, Some(u64::MAX))).await.error.unwrap().code,
        "not_caught_up"
    );
    // SQL metacharacters are data, and a huge limit is capped.
    assert!(ask(req("agent:main:x' OR '1'='1", 10, None))
        .await
        .entries
        .is_empty());
    let all = ask(req(key, u32::MAX, None)).await;
    assert!(all.error.is_none());
    assert_eq!(all.entries.len(), 2);
    let mut s = s;
    assert!(s.all_alive());
}

#[tokio::test]
async fn a_burst_in_one_chat_runs_one_turn_at_a_time_in_order() {
    // Five messages of one chat published back to back, plus a second chat in parallel:
    // each chat's turns reach the provider in arrival order, each one seeing all the
    // turns before it, and the two chats do not wait for each other.
    let s = Suite::start(open_test_channel()).await.unwrap();
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    s.emu().hold();
    let mut acks = Vec::new();
    for i in 0..5 {
        for chat in ["a", "b"] {
            let mut env = inbound(&format!("{chat}-{i}"), &format!("{chat} message {i}"));
            env.body.chat.id = format!("chat-{chat}");
            env.body.chat.kind = clawbus_wire::ChatKind::Group;
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", env.id.as_str());
            acks.push(
                js.publish_with_headers("claw.v1.in.test.acct", h, encode(&env).unwrap().into())
                    .await
                    .unwrap(),
            );
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    // Both chats' first turns are in their model calls at once (the chats run in
    // parallel), and no second turn of either (one turn per chat at a time).
    assert!(
        wait_for(Duration::from_secs(10), || async { s.emu().held() == 2 }).await,
        "the two chats ran side by side"
    );
    assert_eq!(s.emu().requests().len(), 2, "one turn per chat at a time");
    s.emu().release();
    let url = s.nats.url.clone();
    assert!(
        wait_for(Duration::from_secs(20), || async {
            outbound_messages(&url, "claw.v1.out.test.acct")
                .await
                .is_ok_and(|o| o.len() == 10)
        })
        .await
    );
    for chat in ["a", "b"] {
        let calls: Vec<Vec<String>> = s
            .emu()
            .requests()
            .iter()
            .map(|r| {
                r["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["role"] == "user")
                    .map(|m| m["content"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            })
            .filter(|users| {
                users
                    .last()
                    .is_some_and(|u| u.starts_with(&format!("{chat} ")))
            })
            .collect();
        assert_eq!(calls.len(), 5);
        for (i, users) in calls.iter().enumerate() {
            let expected: Vec<String> = (0..=i).map(|j| format!("{chat} message {j}")).collect();
            assert_eq!(
                users, &expected,
                "turn {i} of chat {chat} saw the turns before it, in order"
            );
        }
        let db = clawbus_tests::storage(&s).await;
        let key = format!("agent:main:test:group:chat-{chat}");
        assert!(
            wait_for(Duration::from_secs(10), || async {
                clawbus_tests::usage_rows(&db, &key)
                    .await
                    .is_ok_and(|u| u.len() == 5)
            })
            .await
        );
        let usage = clawbus_tests::usage_rows(&db, &key).await.unwrap();
        assert!(usage.iter().all(|(_, total)| *total > 0), "{usage:?}");
    }
}

#[tokio::test]
async fn a_turn_run_twice_still_replies_and_records_once() {
    // The same turn delivered as two different messages (as after a crash between the
    // agent's publishes and its ack, beyond any stream dedupe): the second finds the
    // answer in the transcript and does not call the model again; the reply,
    // transcript entries and usage exist once.
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let inbound = inbound("twice", "run me twice");
    let key = "agent:main:twice";
    let turn = Envelope::new(
        "ignored",
        1,
        clawbus_wire::TurnRequest {
            run_id: format!("run:{}", inbound.id),
            session_key: key.into(),
            agent_id: "main".into(),
            inbound_id: inbound.id.clone(),
            inbound: inbound.body.clone(),
            ..Default::default()
        },
    );
    let subject = clawbus_bus::subjects::turn(3, key);
    for copy in ["copy-1", "copy-2"] {
        assert!(!publish(&js, &subject, copy, encode(&turn).unwrap()).await);
        let emu = s.emu();
        assert!(
            wait_for(Duration::from_secs(15), || async {
                emu.requests().len() == 1
            })
            .await
        );
    }
    let url = s.nats.url.clone();
    let acked = wait_for(Duration::from_secs(10), || async {
        let mut st = js.get_stream("CLAW_TURN").await.unwrap();
        st.info().await.is_ok_and(|i| i.state.messages == 0)
    })
    .await;
    assert!(acked, "both copies acked (the work queue is empty)");
    assert_eq!(s.emu().requests().len(), 1, "the model was asked once");
    let outs = outbound_messages(&url, "claw.v1.out.test.acct")
        .await
        .unwrap();
    assert_eq!(outs.len(), 1, "{outs:?}");
    let t = wait_transcript(&s, key, 2).await;
    assert_eq!(t.len(), 2, "{t:?}");
    let db = clawbus_tests::storage(&s).await;
    assert_eq!(clawbus_tests::usage_rows(&db, key).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_consumer_that_cannot_pull_makes_readyz_fail_until_it_recovers() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let readyz = |svc: Service| {
        let url = format!("{}/readyz", s.admin_url(svc));
        let http = s.http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    assert_eq!(readyz(Service::Router).await.0, 200);
    // The router works its consumer (holds the partition) ...
    assert!(
        wait_for(Duration::from_secs(20), || async {
            s.admin_get(Service::Router, "/metrics")
                .await
                .contains(&format!(
                    "clawbus_router_partitions_owned {}",
                    clawbus_bus::topology::ROUTER_PARTITIONS
                ))
        })
        .await,
        "the router holds its partitions"
    );
    // ... when an operator (or a lost cluster node) deletes that consumer under it.
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    js.get_stream("CLAW_IN")
        .await
        .unwrap()
        .delete_consumer("router-p4")
        .await
        .unwrap();
    let seen = std::sync::Mutex::new(String::new());
    assert!(
        wait_for(Duration::from_secs(20), || async {
            let (status, body) = readyz(Service::Router).await;
            let hit = status == 503 && body.contains("consumer (router-p4)");
            let entry = format!("[{status}: {}] ", body.trim());
            let mut seen = seen.lock().unwrap();
            if !seen.contains(&entry) {
                seen.push_str(&entry);
            }
            hit
        })
        .await,
        "the router reports that it cannot pull: {}",
        seen.lock().unwrap()
    );
    // It binds its consumer again and is ready once pulls work.
    assert!(
        wait_for(Duration::from_secs(30), || async {
            readyz(Service::Router).await.0 == 200
        })
        .await,
        "ready again"
    );
    let r = s.chat(&user_msg("still routed")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn gateway_killed_mid_turn_loses_nothing() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    let key = "agent:main:crash-gateway";
    s.emu().hold();
    let req = s.chat_in(key, "while the gateway dies");
    let call = tokio::spawn(async move { req.send().await });
    assert!(
        wait_for(Duration::from_secs(10), || async { s.emu().held() >= 1 }).await,
        "the turn is in its model call"
    );
    s.kill9(Service::Gateway).await.unwrap();
    assert!(
        call.await.unwrap().is_err(),
        "the caller's connection died with the gateway"
    );
    s.emu().release();
    // The turn finishes without its gateway: answered on the bus, recorded.
    let t = wait_transcript(&s, key, 2).await;
    assert_eq!(
        t[1],
        ("assistant".into(), "Echo: while the gateway dies".into())
    );
    assert_eq!(
        replies_for(&outbound_messages(&s.nats.url, OUT).await.unwrap(), key),
        1
    );
    // A restarted gateway serves the session with that turn in its history.
    s.restart(Service::Gateway).await.unwrap();
    let r = s.chat_in(key, "and after").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let last = clawbus_tests::last_conversation(&s).len();
    assert_eq!(last, 3, "the interrupted turn is in the history");
}

/// A turn whose agent dies before it calls the model (it is asking the sandbox for
/// its tools) runs once on the restarted agent.
#[tokio::test]
async fn agent_killed_before_the_model_call_finishes_the_turn_once() {
    let mut s = Suite::start(SuiteOpts {
        sandbox: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let tools = clawbus_testkit::ToolResponder::start(&s.nats.url, None)
        .await
        .unwrap();
    let key = "agent:main:crash-before";
    tools.hold_registry();
    let req = s.chat_in(key, "before the model");
    let call =
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() });
    assert!(
        wait_for(Duration::from_secs(10), || async {
            tools.registry_held() >= 1
        })
        .await,
        "the agent never asked for its tools"
    );
    assert!(
        s.emu().requests().is_empty(),
        "killed before the model call"
    );
    s.kill9(Service::Agent).await.unwrap();
    s.restart(Service::Agent).await.unwrap();
    tools.release();
    let v = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("reply within 30 s of the kill")
        .unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Echo: before the model"
    );
    assert_eq!(wait_transcript(&s, key, 2).await.len(), 2);
    let outs = outbound_messages(&s.nats.url, OUT).await.unwrap();
    assert_eq!(replies_for(&outs, key), 1, "exactly one reply on the bus");
}

/// A streamed turn whose agent dies while the model's answer streams in: the caller
/// still gets the whole answer, once.
#[tokio::test]
async fn agent_killed_mid_stream_finishes_the_turn_once() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    let key = "agent:main:crash-stream";
    s.emu().hold_midstream();
    let req = s
        .chat_in(key, "stream me a fairly long answer please")
        .json(&serde_json::json!({
            "model": "clawbus", "stream": true,
            "messages": [{"role": "user", "content": "stream me a fairly long answer please"}],
        }));
    let call = tokio::spawn(async move { req.send().await.unwrap().text().await.unwrap() });
    assert!(
        wait_for(Duration::from_secs(10), || async {
            s.emu().held_midstream() >= 1
        })
        .await,
        "the answer never started streaming"
    );
    s.kill9(Service::Agent).await.unwrap();
    s.restart(Service::Agent).await.unwrap();
    s.emu().release();
    let body = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("stream ends within 30 s of the kill")
        .unwrap();
    let (events, done) = clawbus_tests::sse_events(&body);
    assert!(done, "{body}");
    assert_eq!(
        clawbus_tests::streamed_text(&events),
        "Echo: stream me a fairly long answer please"
    );
    assert_eq!(wait_transcript(&s, key, 2).await.len(), 2);
    let outs = outbound_messages(&s.nats.url, OUT).await.unwrap();
    assert_eq!(replies_for(&outs, key), 1, "exactly one reply on the bus");
}

/// The agent dies while a tool runs. The restarted agent resumes the turn from its
/// checkpoint: the result recorded before the crash is used, the call that was out is
/// never sent again (the model is told it was interrupted), and the model is not asked
/// again for the steps it already took.
#[tokio::test]
async fn agent_killed_while_a_tool_runs_never_runs_a_call_twice() {
    let mut s = Suite::start(SuiteOpts {
        sandbox: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let tools = clawbus_testkit::ToolResponder::start(&s.nats.url, None)
        .await
        .unwrap();
    let key = "agent:main:crash-tool";
    tools.hold();
    let turn = r#"tools: [[{"name":"echo","arguments":{"text":"first"}}],[{"name":"slow","arguments":{"text":"second"}}]]"#;
    let req = s.chat_in(key, turn);
    let call =
        tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() });
    assert!(
        wait_for(Duration::from_secs(10), || async { tools.held() >= 1 }).await,
        "the slow tool never ran"
    );
    s.kill9(Service::Agent).await.unwrap();
    s.restart(Service::Agent).await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("reply within 30 s of the kill")
        .unwrap();
    tools.release();
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(
        answer.starts_with("Done: Error: the call of `slow` was interrupted"),
        "{v}"
    );
    let names: Vec<String> = tools.calls().into_iter().map(|c| c.tool).collect();
    assert_eq!(names, ["echo", "slow"], "each call ran once");
    assert_eq!(
        s.emu().requests().len(),
        3,
        "two model calls before the crash, one after"
    );
    let t = wait_transcript(&s, key, 6).await;
    let roles: Vec<&str> = t.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant"
        ]
    );
    assert_eq!(t[2].1, "first");
    let outs = outbound_messages(&s.nats.url, OUT).await.unwrap();
    assert_eq!(replies_for(&outs, key), 1, "exactly one reply on the bus");
}

/// An `inbound_message` envelope for the gateway's subject whose `text` nests `depth`
/// arrays: what overflowed a router worker's stack while decoding.
fn deeply_nested_inbound(depth: usize) -> Vec<u8> {
    const MARK: &str = "@@nested@@";
    let body = serde_json::json!({
        "channel": "http", "account": "default", "message_id": "deep-1",
        "chat": {"id": "deep"}, "text": MARK,
    });
    let env = serde_json::json!({"v": 1, "kind": "inbound_message", "id": "http:default:deep-1", "ts": 1, "body": body});
    let bytes = rmp_serde::to_vec_named(&env).unwrap();
    let mut mark = vec![0xa0 | MARK.len() as u8];
    mark.extend_from_slice(MARK.as_bytes());
    let at = bytes
        .windows(mark.len())
        .position(|w| w == mark.as_slice())
        .unwrap();
    let mut out = bytes[..at].to_vec();
    out.extend(std::iter::repeat_n(0x91, depth));
    out.push(0xc0);
    out.extend_from_slice(&bytes[at + mark.len()..]);
    out
}

#[tokio::test]
async fn a_deeply_nested_message_from_the_gateway_user_is_dead_lettered_and_the_router_stays_up() {
    let mut s = Suite::start(SuiteOpts {
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let router = s.pid(Service::Router);
    let gateway = s
        .connect_as("gateway", s.password("gateway"))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(gateway);
    // 1,000 levels: within rmp-serde's own limit (1,024), past what a worker's stack
    // held in a debug build (about 900).
    publish(
        &js,
        "claw.v1.in.http.default",
        "deep-1",
        deeply_nested_inbound(1_000),
    )
    .await;
    let operator = async_nats::jetstream::new(
        s.connect_as("operator", s.password("operator"))
            .await
            .unwrap(),
    );
    // Dead letters as the operator reads them: by sequence.
    let dead_letters = || async {
        let mut out = Vec::new();
        let Ok(mut dlq) = operator.get_stream("CLAW_DLQ").await else {
            return out;
        };
        let Ok(info) = dlq.info().await.map(|i| i.state.clone()) else {
            return out;
        };
        for seq in info.first_sequence..=info.last_sequence {
            if let Ok(m) = dlq.direct_get(seq).await {
                out.push(m);
            }
        }
        out
    };
    let dead = wait_for(Duration::from_secs(20), || async {
        dead_letters().await.len() == 1
    })
    .await;
    let dlq = dead_letters().await;
    assert!(dead, "dead letters: {dlq:?}");
    let reason = dlq[0]
        .headers
        .get("Clawbus-Dlq-Reason")
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(reason.contains("depth limit exceeded"), "{reason}");
    assert_eq!(dlq[0].subject.as_str(), "claw.v1.dlq.router");
    assert!(s.all_alive(), "every service stays up");
    assert_eq!(s.pid(Service::Router), router, "the router never restarted");
    let r = s
        .chat(&user_msg("after the deep one"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Echo: after the deep one"
    );
}
