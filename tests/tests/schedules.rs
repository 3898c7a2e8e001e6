//! Schedules: cron jobs fired once per slot by several router replicas and across a
//! router's kill -9, one-shot jobs announced to a chat, heartbeats whose
//! `HEARTBEAT_OK` stays quiet, and the `clawbus cron` command line's errors.

use std::time::Duration;

use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts};
use clawbus_tests::channel::FakeChannel;
use clawbus_tests::{cli, outbound_messages};

/// How many provider calls had `text` as their last user message.
fn calls_with(s: &Suite, text: &str) -> usize {
    s.emu()
        .requests()
        .iter()
        .filter(|r| {
            r["messages"]
                .as_array()
                .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
                .is_some_and(|m| m["content"] == text)
        })
        .count()
}

fn added_id(out: &str) -> String {
    out.strip_prefix("added ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned()
}

#[tokio::test]
async fn a_cron_job_fires_once_per_slot_with_two_routers_and_a_restart() {
    let mut s = Suite::start(SuiteOpts {
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let (ok, out) = cli(
        &s,
        &[
            "cron",
            "add",
            "--name",
            "tick",
            "--every",
            "2s",
            "--message",
            "tick",
            "--session",
            "isolated",
        ],
    )
    .await;
    assert!(ok, "{out}");
    let id = added_id(&out);
    let (ok, list) = cli(&s, &["cron", "list"]).await;
    assert!(
        ok && list.contains(&id) && list.contains("every 2s"),
        "{list}"
    );
    assert!(
        wait_for(Duration::from_secs(30), || async {
            calls_with(&s, "tick") >= 3
        })
        .await
    );
    s.kill9_replica((Service::Router, 0)).await.unwrap();
    s.restart_replica((Service::Router, 0)).await.unwrap();
    let fired = calls_with(&s, "tick");
    assert!(
        wait_for(Duration::from_secs(30), || async {
            calls_with(&s, "tick") >= fired + 3
        })
        .await
    );
    let (ok, out) = cli(&s, &["cron", "rm", &id]).await;
    assert!(ok, "{out}");
    // Every slot answered once, none skipped, none twice.
    let url = s.nats.url.clone();
    let settled = wait_for(Duration::from_secs(20), || async {
        outbound_messages(&url, "claw.v1.out.cron.default")
            .await
            .is_ok_and(|o| o.len() == calls_with(&s, "tick"))
    })
    .await;
    assert!(settled, "one reply per provider call");
    let mut slots: Vec<i64> = outbound_messages(&url, "claw.v1.out.cron.default")
        .await
        .unwrap()
        .iter()
        .map(|o| o.run_id.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    slots.sort();
    assert!(slots.len() >= 6, "{slots:?}");
    for w in slots.windows(2) {
        assert_eq!(w[1] - w[0], 2000, "slots in a row, once each: {slots:?}");
    }
    // Isolated runs start afresh: each call saw only its own message.
    let last = s.emu().requests().pop().unwrap();
    let users = last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "user")
        .count();
    assert_eq!(users, 1, "{last}");
    assert!(cli(&s, &["cron", "list"]).await.1.contains("no cron jobs"));
}

#[tokio::test]
async fn a_one_shot_job_is_announced_once_and_a_quiet_heartbeat_is_not() {
    let (s, _dir) = clawbus_tests::suite_with_config(
        r#"
[channels.test]
dmPolicy = "open"

[heartbeat]
every = "2s"
prompt = "HEARTBEAT_OK"
"#,
    )
    .await;
    let ch = FakeChannel::new(&s, "test", "bot1").await;
    // Alice writes once: her chat is where the main session's heartbeat answers.
    assert_eq!(ch.ask(ch.dm("alice", "hello")).await, "Echo: hello");
    let (ok, out) = cli(
        &s,
        &[
            "cron",
            "add",
            "--name",
            "reminder",
            "--at",
            "1s",
            "--message",
            "take the cake out",
            "--announce",
            "--channel",
            "test",
            "--account",
            "bot1",
            "--to",
            "alice",
        ],
    )
    .await;
    assert!(ok, "{out}");
    let announced = wait_for(Duration::from_secs(20), || async {
        ch.replies_in("alice")
            .iter()
            .any(|r| r.text == "Echo: take the cake out")
    })
    .await;
    assert!(announced, "{:?}", ch.all());
    // Done: the one-shot job is gone.
    let gone = wait_for(Duration::from_secs(10), || async {
        cli(&s, &["cron", "list"]).await.1.contains("no cron jobs")
    })
    .await;
    assert!(gone);
    // Heartbeats reach the model, and their HEARTBEAT_OK answers reach nobody.
    assert!(
        wait_for(Duration::from_secs(20), || async {
            calls_with(&s, "HEARTBEAT_OK") >= 2
        })
        .await
    );
    assert!(
        ch.all().iter().all(|r| !r.text.contains("HEARTBEAT_OK")),
        "{:?}",
        ch.all()
    );
    assert_eq!(calls_with(&s, "take the cake out"), 1);
}

#[tokio::test]
async fn the_cron_command_line_refuses_bad_jobs_clearly() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    for args in [
        &[
            "cron",
            "add",
            "--name",
            "x",
            "--cron",
            "99 * * * *",
            "--message",
            "m",
        ][..],
        &[
            "cron",
            "add",
            "--name",
            "x",
            "--cron",
            "* * * * *",
            "--tz",
            "Mars/Base",
            "--message",
            "m",
        ],
        &[
            "cron",
            "add",
            "--name",
            "x",
            "--every",
            "0s",
            "--message",
            "m",
        ],
        &[
            "cron",
            "add",
            "--name",
            "x",
            "--at",
            "someday",
            "--message",
            "m",
        ],
        &["cron", "add", "--name", "x", "--every", "5m"],
        &[
            "cron",
            "add",
            "--name",
            "x",
            "--every",
            "5m",
            "--message",
            "m",
            "--agent",
            "ghost",
        ],
        &[
            "cron",
            "add",
            "--name",
            "x",
            "--every",
            "5m",
            "--message",
            "m",
            "--session",
            "session:agent:other:s",
        ],
        &["cron", "rm", "no-such-job"],
        &["cron", "rm", "a.b>"],
        &["cron", "frobnicate"],
    ] {
        let (ok, out) = cli(&s, args).await;
        assert!(!ok && !out.trim().is_empty(), "{args:?}: {out}");
    }
    assert!(cli(&s, &["cron", "list"]).await.1.contains("no cron jobs"));
}
