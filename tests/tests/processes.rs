//! Background `exec` sessions and the `process` tool: a command left running, fed,
//! polled, paged, killed and cleared; sessions that belong to their agent; calls that
//! reach another sandbox replica than the one holding the session.

use std::time::Duration;

use clawbus_testkit::{wait_for, SuiteOpts};
use clawbus_tests::toolbox::{refused, text, ToolBox};
use serde_json::{json, Value};

/// The `sessionId` a backgrounded `exec` answered with.
fn session_id(r: &clawbus_wire::ToolResult) -> String {
    let t = text(r);
    assert!(t.starts_with("status: running"), "{t}");
    t.lines()
        .find_map(|l| l.strip_prefix("sessionId: "))
        .unwrap_or_else(|| panic!("no sessionId in {t}"))
        .to_owned()
}

/// Polls until the session's output so far contains `what`; everything polled.
async fn poll_until(b: &ToolBox, agent: &str, id: &str, what: &str) -> String {
    let seen = std::sync::Mutex::new(String::new());
    let n = std::sync::atomic::AtomicU64::new(0);
    let found = wait_for(Duration::from_secs(20), || async {
        let k = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = b
            .call_as(
                agent,
                &format!("poll:{id}:{k}"),
                "process",
                &json!({"action": "poll", "sessionId": id}).to_string(),
            )
            .await;
        assert!(r.ok, "{}", text(&r));
        let mut s = seen.lock().unwrap();
        s.push_str(&text(&r));
        s.contains(what)
    })
    .await;
    let s = seen.into_inner().unwrap();
    assert!(found, "`{what}` never came: {s}");
    s
}

async fn process(b: &ToolBox, args: Value) -> clawbus_wire::ToolResult {
    b.call("process", args).await
}

#[tokio::test]
async fn a_background_command_is_fed_polled_paged_killed_and_cleared() {
    let b = ToolBox::start(&[("CLAWBUS__ROUTER__AGENTS", "[\"main\",\"other\"]")]).await;
    // Started in the background at once; it waits for its input.
    let r = b
        .call(
            "exec",
            json!({"command": "echo ready; read line; echo got $line; for i in 1 2 3 4 5; do echo line $i; done", "background": true}),
        )
        .await;
    let id = session_id(&r);
    let r = process(&b, json!({"action": "list"})).await;
    assert!(
        text(&r).contains(&id) && text(&r).contains("running"),
        "{}",
        text(&r)
    );
    poll_until(&b, "main", &id, "ready").await;
    let r = process(
        &b,
        json!({"action": "write", "sessionId": id, "data": "hello\n", "eof": true}),
    )
    .await;
    assert!(r.ok, "{}", text(&r));
    let out = poll_until(&b, "main", &id, "exited with code 0").await;
    assert!(out.contains("got hello") && out.contains("line 5"), "{out}");
    // Polling again gives nothing new; the log pages the whole output by lines.
    let r = process(&b, json!({"action": "poll", "sessionId": id})).await;
    assert!(text(&r).contains("(no new output)"), "{}", text(&r));
    let r = process(
        &b,
        json!({"action": "log", "sessionId": id, "offset": 2, "limit": 2}),
    )
    .await;
    assert!(text(&r).ends_with("line 1\nline 2"), "{}", text(&r));
    let r = process(&b, json!({"action": "log", "sessionId": id, "limit": 1})).await;
    assert!(text(&r).ends_with("line 5"), "{}", text(&r));
    // Another agent does not see it, and cannot touch it.
    let r = b
        .call_as(
            "other",
            "o-1",
            "process",
            &json!({"action": "list"}).to_string(),
        )
        .await;
    assert!(!text(&r).contains(&id), "{}", text(&r));
    let r = b
        .call_as(
            "other",
            "o-2",
            "process",
            &json!({"action": "kill", "sessionId": id}).to_string(),
        )
        .await;
    assert!(refused(&r, "invalid_arguments"), "{}", text(&r));
    let r = process(&b, json!({"action": "clear", "sessionId": id})).await;
    assert!(r.ok, "{}", text(&r));
    let r = process(&b, json!({"action": "list"})).await;
    assert!(!text(&r).contains(&id), "{}", text(&r));

    // A command still running after yieldMs goes on in the background; kill stops it
    // and everything it started.
    let r = b
        .call(
            "exec",
            json!({"command": "echo begun; sleep 290 & sleep 291", "yieldMs": 300}),
        )
        .await;
    let id = session_id(&r);
    assert!(text(&r).contains("begun"), "{}", text(&r));
    let r = process(&b, json!({"action": "clear", "sessionId": id})).await;
    assert!(
        refused(&r, "invalid_arguments"),
        "a running one is not cleared"
    );
    let r = process(&b, json!({"action": "kill", "sessionId": id})).await;
    assert!(r.ok, "{}", text(&r));
    poll_until(&b, "main", &id, "status: killed").await;
    let gone = wait_for(Duration::from_secs(5), || async {
        let ps = std::process::Command::new("pgrep")
            .args(["-f", "sleep 29[01]"])
            .output()
            .unwrap();
        ps.stdout.is_empty()
    })
    .await;
    assert!(gone, "a killed session left processes behind");
    // One that ends within its yield answers like a foreground command.
    let r = b
        .call(
            "exec",
            json!({"command": "echo quick; exit 3", "yieldMs": 5000}),
        )
        .await;
    assert_eq!(text(&r), "quick\n\n[exit code 3]");
    // A background command past its timeout is killed.
    let r = b
        .call(
            "exec",
            json!({"command": "sleep 100", "background": true, "timeout": 1}),
        )
        .await;
    let id = session_id(&r);
    poll_until(&b, "main", &id, "killed after 1 s (timeout)").await;
    let r = process(&b, json!({"action": "remove", "sessionId": id})).await;
    assert!(r.ok, "{}", text(&r));

    // Hostile and mistaken calls get clear errors.
    for (args, code) in [
        (json!({"action": "explode"}), "invalid_arguments"),
        (json!({"action": "poll"}), "invalid_arguments"),
        (
            json!({"action": "poll", "sessionId": "deadbeef-nowhere"}),
            "invalid_arguments",
        ),
        (
            json!({"action": "poll", "sessionId": "x-a.b>"}),
            "invalid_arguments",
        ),
        (
            json!({"action": "poll", "sessionId": 7}),
            "invalid_arguments",
        ),
        (json!({"action": "list", "extra": 1}), "invalid_arguments"),
    ] {
        let r = process(&b, args.clone()).await;
        assert!(refused(&r, code), "{args}: {}", text(&r));
    }
    let r = b
        .call(
            "exec",
            json!({"command": "cat > /dev/null", "background": true}),
        )
        .await;
    let id = session_id(&r);
    let r = process(
        &b,
        json!({"action": "write", "sessionId": id, "data": "x".repeat(70_000)}),
    )
    .await;
    assert!(refused(&r, "invalid_arguments"), "{}", text(&r));
    let r = process(&b, json!({"action": "remove", "sessionId": id})).await;
    assert!(r.ok, "{}", text(&r));
}

#[tokio::test]
async fn a_long_command_moves_to_the_background_by_itself_unless_process_is_denied() {
    let b = ToolBox::start(&[
        ("CLAWBUS__SANDBOX__EXEC_YIELD_MS", "300"),
        ("CLAWBUS__ROUTER__AGENTS", "[\"main\",\"plain\"]"),
        ("CLAWBUS__SANDBOX__AGENTS__plain__DENY", "[\"process\"]"),
    ])
    .await;
    let r = b
        .call("exec", json!({"command": "sleep 2; echo late"}))
        .await;
    let id = session_id(&r);
    poll_until(&b, "main", &id, "late").await;
    // Without the process tool, exec stays in the foreground and refuses to background.
    let r = b
        .call_as(
            "plain",
            "p-1",
            "exec",
            r#"{"command":"sleep 1; echo waited"}"#,
        )
        .await;
    assert_eq!(text(&r), "waited\n");
    let r = b
        .call_as(
            "plain",
            "p-2",
            "exec",
            r#"{"command":"true","background":true}"#,
        )
        .await;
    assert!(refused(&r, "denied"), "{}", text(&r));
}

#[tokio::test]
async fn process_calls_reach_the_replica_holding_the_session() {
    let b = ToolBox::with(SuiteOpts {
        replicas: 2,
        ..Default::default()
    })
    .await;
    let r = b
        .call(
            "exec",
            json!({"command": "echo up; sleep 60", "background": true}),
        )
        .await;
    let id = session_id(&r);
    let up = wait_for(Duration::from_secs(20), || async {
        text(&process(&b, json!({"action": "log", "sessionId": id})).await).contains("up")
    })
    .await;
    assert!(up, "the command started");
    // Calls spread over both replicas; each one finds the session.
    let polls: Vec<_> = (0..12)
        .map(|_| process(&b, json!({"action": "log", "sessionId": id})))
        .collect();
    for r in futures::future::join_all(polls).await {
        assert!(r.ok && text(&r).contains("up"), "{}", text(&r));
    }
    let r = process(&b, json!({"action": "list"})).await;
    assert!(text(&r).contains(&id), "{}", text(&r));
    // Killing the replica ends its sessions: they are listed as lost once it is back.
    let holder = id.split_once('-').unwrap().1.to_owned();
    let i: usize = holder.rsplit('-').next().unwrap().parse().unwrap();
    let mut b = b;
    b.s.kill9_replica((clawbus_testkit::Service::Sandbox, i))
        .await
        .unwrap();
    // (A request may still reach the killed replica until the server notices.)
    let n = std::sync::atomic::AtomicU64::new(0);
    let told = wait_for(Duration::from_secs(30), || async {
        let k = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let args = json!({"action": "poll", "sessionId": id}).to_string();
        b.try_call_as(
            "main",
            &format!("after-kill-{k}"),
            "process",
            &args,
            Duration::from_secs(3),
        )
        .await
        .is_some_and(|r| refused(&r, "invalid_arguments") && text(&r).contains("does not answer"))
    })
    .await;
    assert!(
        told,
        "a poll of a session on a killed replica is refused clearly"
    );
    b.s.restart_replica((clawbus_testkit::Service::Sandbox, i))
        .await
        .unwrap();
    let listed = wait_for(Duration::from_secs(20), || async {
        text(&process(&b, json!({"action": "list"})).await).contains("lost")
    })
    .await;
    assert!(listed, "the session is listed as lost");
}
