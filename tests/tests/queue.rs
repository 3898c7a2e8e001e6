//! Queue modes, each observed at the provider emulator: messages sent while a run goes
//! on either join it at its next model call (`steer`), run after it one by one
//! (`followup`), run after it as one (`collect`), or stop it (`interrupt`, `/stop`).

use std::time::Duration;

use clawbus_testkit::{wait_for, Service, Suite, ToolResponder};
use clawbus_tests::channel::FakeChannel;
use serde_json::Value;

const OPEN: &[(&str, &str)] = &[("CLAWBUS__CHANNELS__TEST__DM_POLICY", "open")];

async fn suite() -> (Suite, ToolResponder, FakeChannel) {
    let s = clawbus_tests::suite_with_own_tools("openai/emulator-1", OPEN).await;
    let tools = ToolResponder::start(&s.nats.url, None).await.unwrap();
    let ch = FakeChannel::new(&s, "test", "bot1").await;
    (s, tools, ch)
}

/// The user messages of the provider's last call.
fn last_users(s: &Suite) -> Vec<String> {
    let last: Value = s.emu().requests().pop().unwrap();
    last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits until the router has made `n` turns (queued in the turn stream).
async fn routed_turns(s: &Suite, n: f64) -> bool {
    let url = format!("{}/metrics", s.replica_admin_url((Service::Router, 0)));
    wait_for(Duration::from_secs(20), || async {
        let page = s.get_text(&url).await;
        page.lines()
            .find_map(|l| {
                l.strip_prefix("clawbus_router_messages_total{outcome=\"turn\"} ")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .is_some_and(|v| v >= n)
    })
    .await
}

async fn set_queue(ch: &FakeChannel, mode: &str) {
    let r = ch.ask(ch.dm("u", &format!("/queue {mode}"))).await;
    let first = mode.split_whitespace().next().unwrap();
    assert!(
        r.starts_with("Queue for this session: ") && r.contains(first),
        "{r}"
    );
}

#[tokio::test]
async fn collect_runs_the_messages_sent_meanwhile_as_one() {
    let (s, _tools, ch) = suite().await;
    set_queue(&ch, "collect").await;
    s.emu().hold();
    let first = ch.send(ch.dm("u", "first")).await;
    assert!(wait_for(Duration::from_secs(20), || async { s.emu().held() == 1 }).await);
    let second = ch.send(ch.dm("u", "second")).await;
    let third = ch.send(ch.dm("u", "third")).await;
    assert!(routed_turns(&s, 3.0).await);
    s.emu().release();
    assert_eq!(ch.reply(&first).await.text, "Echo: first");
    let merged = ch.reply(&second).await.text;
    assert!(
        merged.contains("second") && merged.contains("third"),
        "{merged}"
    );
    assert_eq!(s.emu().requests().len(), 2, "two runs for three messages");
    let users = last_users(&s);
    assert!(users.last().unwrap().contains("second") && users.last().unwrap().contains("third"));
    // The absorbed message gets no reply of its own, and never runs later.
    assert_eq!(ch.ask(ch.dm("u", "after")).await, "Echo: after");
    assert!(ch.all().iter().all(|r| r.inbound_id != third));
    assert_eq!(s.emu().requests().len(), 3);
}

#[tokio::test]
async fn followup_runs_each_message_on_its_own_in_order() {
    let (s, _tools, ch) = suite().await;
    set_queue(&ch, "followup").await;
    s.emu().hold();
    let first = ch.send(ch.dm("u", "one")).await;
    assert!(wait_for(Duration::from_secs(20), || async { s.emu().held() == 1 }).await);
    let second = ch.send(ch.dm("u", "two")).await;
    let third = ch.send(ch.dm("u", "three")).await;
    assert!(routed_turns(&s, 3.0).await);
    s.emu().release();
    for (id, text) in [(first, "one"), (second, "two"), (third, "three")] {
        assert_eq!(ch.reply(&id).await.text, format!("Echo: {text}"));
    }
    assert_eq!(s.emu().requests().len(), 3);
    assert_eq!(last_users(&s), ["one", "two", "three"]);
}

#[tokio::test]
async fn steer_brings_a_message_into_the_run_at_its_next_model_call() {
    let (s, tools, ch) = suite().await;
    set_queue(&ch, "steer").await;
    tools.hold();
    let run = ch
        .send(ch.dm(
            "u",
            r#"tools: [[{"name":"slow","arguments":{"text":"working"}}]]"#,
        ))
        .await;
    assert!(wait_for(Duration::from_secs(20), || async { tools.held() == 1 }).await);
    let steer = ch.send(ch.dm("u", "also check the tests")).await;
    assert!(routed_turns(&s, 2.0).await);
    tools.release();
    // The run's next model call answered the message that joined it.
    assert_eq!(ch.reply(&run).await.text, "Echo: also check the tests");
    // It came after the tool result.
    let last: Value = s.emu().requests().pop().unwrap();
    let msgs = last["messages"].as_array().unwrap();
    let n = msgs.len();
    assert_eq!(msgs[n - 1]["role"], "user", "{last}");
    assert_eq!(msgs[n - 1]["content"], "also check the tests");
    assert_eq!(msgs[n - 2]["role"], "tool", "{last}");
    // It ran in that run only: no run, no reply of its own.
    assert_eq!(ch.ask(ch.dm("u", "next")).await, "Echo: next");
    assert!(ch.all().iter().all(|r| r.inbound_id != steer));
    assert_eq!(
        s.emu().requests().len(),
        3,
        "two calls of the steered run, one of the next"
    );
}

#[tokio::test]
async fn interrupt_and_stop_end_the_run_in_progress() {
    let (s, _tools, ch) = suite().await;
    set_queue(&ch, "interrupt").await;
    s.emu().hold();
    let long = ch.send(ch.dm("u", "a long task")).await;
    assert!(wait_for(Duration::from_secs(20), || async { s.emu().held() == 1 }).await);
    let newer = ch.send(ch.dm("u", "never mind, do this")).await;
    // The older run stops at once; the newer one runs (its model call is held too).
    assert!(
        wait_for(Duration::from_secs(20), || async {
            s.emu().requests().len() == 2
        })
        .await
    );
    s.emu().release();
    assert_eq!(ch.reply(&newer).await.text, "Echo: never mind, do this");
    assert!(
        ch.all().iter().all(|r| r.inbound_id != long),
        "{:?}",
        ch.all()
    );
    // The stopped message stays in the session: the next run sees it.
    assert!(last_users(&s).contains(&"a long task".to_owned()));
    // `/stop` ends a run whatever the mode.
    set_queue(&ch, "followup").await;
    s.emu().hold();
    let calls = s.emu().requests().len();
    let stopped = ch.send(ch.dm("u", "stop me")).await;
    // (The stopped run's request may still count as held at the emulator: count calls.)
    assert!(
        wait_for(Duration::from_secs(20), || async {
            s.emu().requests().len() == calls + 1
        })
        .await
    );
    assert!(ch.ask(ch.dm("u", "/stop")).await.contains("Stopping"));
    s.emu().release();
    assert_eq!(
        ch.ask(ch.dm("u", "still there?")).await,
        "Echo: still there?"
    );
    assert!(ch.all().iter().all(|r| r.inbound_id != stopped));
    assert_eq!(s.emu().requests().len(), calls + 2);
}

#[tokio::test]
async fn queued_messages_survive_a_killed_agent_and_router() {
    let (mut s, _tools, ch) = suite().await;
    set_queue(&ch, "collect").await;
    s.emu().hold();
    let first = ch.send(ch.dm("u", "first")).await;
    assert!(
        wait_for(Duration::from_secs(20), || async {
            s.emu().requests().len() == 1
        })
        .await
    );
    let second = ch.send(ch.dm("u", "second")).await;
    let third = ch.send(ch.dm("u", "third")).await;
    assert!(routed_turns(&s, 3.0).await);
    // While the first runs and two wait: kill -9 the agent and the router.
    s.kill9_replica((Service::Agent, 0)).await.unwrap();
    s.kill9_replica((Service::Router, 0)).await.unwrap();
    s.emu().release();
    s.restart_replica((Service::Router, 0)).await.unwrap();
    s.restart_replica((Service::Agent, 0)).await.unwrap();
    // Nothing lost, nothing twice: the first runs again (taking the others with it,
    // as they wait behind it now), every message answered in exactly one reply.
    let answered = wait_for(Duration::from_secs(30), || async {
        ch.all().iter().any(|r| r.text.contains("third"))
    })
    .await;
    assert!(answered, "{:?}", ch.all());
    let replies = ch.all();
    for text in ["first", "second", "third"] {
        let n = replies.iter().filter(|r| r.text.contains(text)).count();
        assert_eq!(n, 1, "{text}: {replies:?}");
    }
    let ids = [first, second, third];
    assert!(replies
        .iter()
        .all(|r| !r.text.contains("third") || ids.contains(&r.inbound_id)));
    // And still one run at a time, in order, afterwards.
    assert_eq!(ch.ask(ch.dm("u", "after")).await, "Echo: after");
}

/// Sends `texts` while a run holds the session; returns their inbound ids.
async fn queue_behind_a_held_run(
    s: &Suite,
    ch: &FakeChannel,
    first: &str,
    texts: &[&str],
) -> Vec<String> {
    let before = s.emu().requests().len();
    s.emu().hold();
    let mut ids = vec![ch.send(ch.dm("u", first)).await];
    assert!(
        wait_for(Duration::from_secs(20), || async {
            s.emu().requests().len() > before
        })
        .await
    );
    for t in texts {
        ids.push(ch.send(ch.dm("u", t)).await);
    }
    ids
}

#[tokio::test]
async fn a_full_queue_drops_by_its_policy_old_new_or_summarize() {
    let (s, _tools, ch) = suite().await;
    let mut routed = 0.0;
    // Each phase: one run held, four messages behind it, a cap of two.
    for (policy, runs, dropped) in [
        ("old", vec!["a0", "a3", "a4"], vec!["a1", "a2"]),
        ("new", vec!["b0", "b1", "b2"], vec!["b3", "b4"]),
        ("summarize", vec!["c0", "c1", "c4"], vec!["c2", "c3"]),
    ] {
        set_queue(&ch, &format!("followup cap:2 drop:{policy} debounce:0")).await;
        let p = &policy[..1];
        let p = if p == "s" {
            "c"
        } else if p == "o" {
            "a"
        } else {
            "b"
        };
        let texts: Vec<String> = (1..5).map(|i| format!("{p}{i}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let calls = s.emu().requests().len();
        let ids = queue_behind_a_held_run(&s, &ch, &format!("{p}0"), &refs).await;
        routed += 5.0;
        assert!(routed_turns(&s, routed).await);
        s.emu().release();
        // The runs that happen, in order, each answering its message.
        let last = ids[texts.iter().position(|t| t == runs[2]).unwrap() + 1].clone();
        let reply = ch.reply(&last).await;
        assert_eq!(reply.text, format!("Echo: {}", runs[2]), "{policy}");
        let asked: Vec<String> = s.emu().requests()[calls..]
            .iter()
            .map(|r| {
                let m = r["messages"].as_array().unwrap();
                m.last().unwrap()["content"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(asked.len(), 3, "{policy}: {asked:?}");
        assert_eq!(asked[0], runs[0]);
        assert_eq!(asked[2], runs[2]);
        if policy == "summarize" {
            // c1 and c2 in brief, then c3 in full, in c1's run.
            assert!(
                asked[1].starts_with("[2 earlier messages were dropped from a full queue (cap 2)"),
                "{}",
                asked[1]
            );
            assert!(asked[1].contains("\n- c1\n- c2\n\nc3"), "{}", asked[1]);
        } else {
            assert_eq!(asked[1], runs[1], "{policy}");
        }
        // The dropped ones never get a reply of their own.
        for d in &dropped {
            let id = &ids[texts.iter().position(|t| t == d).unwrap() + 1];
            assert!(
                ch.all().iter().all(|r| &r.inbound_id != id),
                "{policy}: {d} answered"
            );
        }
    }
    // Counted by policy.
    let page = s
        .get_text(&format!(
            "{}/metrics",
            s.replica_admin_url((Service::Agent, 0))
        ))
        .await;
    for policy in ["old", "new", "summarize"] {
        let line = format!("clawbus_agent_queue_dropped_messages_total{{policy=\"{policy}\"}} 2");
        assert!(page.contains(&line), "{line}");
    }
}

#[tokio::test]
async fn a_queued_run_waits_until_the_session_is_quiet() {
    let (s, _tools, ch) = suite().await;
    // A long debounce: the second message's run waits for quiet, and a third message
    // arriving in that time joins it.
    set_queue(&ch, "collect debounce:5s").await;
    let ids = queue_behind_a_held_run(&s, &ch, "first", &["second"]).await;
    assert!(routed_turns(&s, 2.0).await);
    s.emu().release();
    assert_eq!(ch.reply(&ids[0]).await.text, "Echo: first");
    // The first run is over; the second has not started yet.
    let third = ch.send(ch.dm("u", "third")).await;
    let merged = ch.reply(&ids[1]).await.text;
    assert!(
        merged.contains("second") && merged.contains("third"),
        "{merged}"
    );
    assert_eq!(s.emu().requests().len(), 2, "two runs for three messages");
    assert!(ch.all().iter().all(|r| r.inbound_id != third));
}
