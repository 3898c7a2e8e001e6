//! Least privilege (DESIGN.md invariant 6): the suite runs as `clawbus up` runs it —
//! nats-server refusing anonymous clients, every service as its own NATS user with the
//! rights of `clawbus_bus::rights`, provisioning as its own user — and each user can do
//! its job and nothing else.

use std::time::Duration;

use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts};
use clawbus_tests::user_msg;

async fn auth_suite(replicas: usize) -> Suite {
    Suite::start(SuiteOpts {
        auth: true,
        replicas,
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn user(s: &Suite, name: &str) -> async_nats::Client {
    s.connect_as(name, s.password(name)).await.unwrap()
}

/// Sends one turn per session and checks each answer.
async fn chat_all(s: &Suite, tag: &str, sessions: usize) {
    let turns = (0..sessions).map(|i| async move {
        let text = format!("{tag} {i}");
        let r = s
            .chat_in(&format!("agent:main:{tag}-{i}"), &text)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{text}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            format!("Echo: {text}")
        );
    });
    futures::future::join_all(turns).await;
}

#[tokio::test]
async fn every_service_does_its_job_with_only_its_rights() {
    let mut s = auth_suite(2).await;
    chat_all(&s, "before", 16).await;
    // Failover under the same rights: the survivors take the partitions over (new
    // agent consumers, rewound store consumers, lease and membership keys).
    s.kill9_replica((Service::Agent, 1)).await.unwrap();
    s.kill9_replica((Service::Store, 1)).await.unwrap();
    chat_all(&s, "after", 16).await;
    let db = clawbus_tests::storage(&s).await;
    let stored = wait_for(Duration::from_secs(20), || async {
        let mut all = true;
        for i in 0..16 {
            let t = clawbus_tests::transcript(&db, &format!("agent:main:after-{i}"))
                .await
                .unwrap_or_default();
            all &= t.len() == 2;
        }
        all
    })
    .await;
    assert!(stored, "every turn after the failover was stored");
    // The restarted replicas bind again (a replica id resumes its own leases).
    s.restart_replica((Service::Agent, 1)).await.unwrap();
    s.restart_replica((Service::Store, 1)).await.unwrap();
    chat_all(&s, "rejoined", 8).await;
    assert_eq!(s.nats.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn anonymous_and_wrong_password_clients_are_refused() {
    let s = auth_suite(1).await;
    assert!(async_nats::ConnectOptions::new()
        .connect(s.nats.url.as_str())
        .await
        .is_err());
    for u in clawbus_bus::rights::users() {
        assert!(
            s.connect_as(u, Some("wrong")).await.is_err(),
            "{u} with a wrong password"
        );
    }
    assert!(s.connect_as("nobody", Some("x")).await.is_err());
    let r = s.chat(&user_msg("still works")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = user(&s, "operator").await;
}

/// True when `user`'s request on `subject` gets an answer (the server let it through
/// to JetStream or a responder); a refused publish is dropped, so no answer comes.
async fn answered(c: &async_nats::Client, subject: &str, body: &str) -> bool {
    let req = c.request(subject.to_owned(), body.to_owned().into());
    matches!(
        tokio::time::timeout(Duration::from_secs(2), req).await,
        Ok(Ok(_))
    )
}

#[tokio::test]
async fn each_user_is_refused_what_is_not_its_job() {
    let s = auth_suite(1).await;
    let r = s.chat(&user_msg("one turn")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let api = |rest: &str| format!("$JS.API.{rest}");
    // (user, what it may do, what it may not): JetStream API requests.
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "gateway",
            vec![api("STREAM.INFO.CLAW_OUT")],
            vec![
                api("STREAM.INFO.CLAW_EVT"),
                api("STREAM.DELETE.CLAW_IN"),
                api("CONSUMER.MSG.NEXT.CLAW_IN.router-p0"),
                api("CONSUMER.CREATE.CLAW_OUT.spy.claw.v1.out.>"),
                api("DIRECT.GET.CLAW_EVT"),
                api("DIRECT.GET.KV_claw_runs.$KV.claw_runs.x"),
            ],
        ),
        (
            "router",
            vec![
                api("STREAM.INFO.CLAW_IN"),
                api("CONSUMER.INFO.CLAW_IN.router-p0"),
            ],
            vec![
                api("CONSUMER.MSG.NEXT.CLAW_EVT.store-p0"),
                api("CONSUMER.CREATE.CLAW_IN.spy.claw.v1.in.>"),
                api("DIRECT.GET.CLAW_EVT.claw.v1.evt.run.0.x"),
                api("DIRECT.GET.KV_claw_leases.$KV.claw_leases.agent.p.0"),
                api("STREAM.PURGE.CLAW_TURN"),
            ],
        ),
        (
            "agent",
            vec![
                api("STREAM.INFO.CLAW_TURN"),
                api("CONSUMER.NAMES.CLAW_TURN"),
            ],
            vec![
                api("CONSUMER.CREATE.CLAW_TURN.spy.claw.v1.in.>"),
                api("CONSUMER.CREATE.CLAW_IN.spy.claw.v1.in.>"),
                api("CONSUMER.DELETE.CLAW_IN.router-p0"),
                api("STREAM.DELETE.CLAW_EVT"),
                api("STREAM.PURGE.CLAW_EVT"),
                api("DIRECT.GET.CLAW_DLQ"),
                api("DIRECT.GET.KV_claw_leases.$KV.claw_leases.store.p.0"),
            ],
        ),
        (
            "store",
            vec![
                api("STREAM.INFO.CLAW_EVT"),
                api("CONSUMER.INFO.CLAW_EVT.store-p3"),
            ],
            vec![
                api("CONSUMER.MSG.NEXT.CLAW_IN.router-p0"),
                api("CONSUMER.DELETE.CLAW_EVT.store-p3"),
                api("CONSUMER.CREATE.CLAW_EVT.store-p3.claw.v1.evt.>"),
                api("DIRECT.GET.KV_claw_runs.$KV.claw_runs.x"),
                api("STREAM.INFO.CLAW_IN"),
            ],
        ),
        (
            "operator",
            vec![api("STREAM.INFO.CLAW_IN"), api("CONSUMER.LIST.CLAW_EVT")],
            vec![
                api("CONSUMER.MSG.NEXT.CLAW_IN.router-p0"),
                api("CONSUMER.DELETE.CLAW_IN.router-p0"),
                api("STREAM.DELETE.CLAW_DLQ"),
                api("DIRECT.GET.CLAW_EVT.claw.v1.evt.run.0.x"),
            ],
        ),
        (
            "provision",
            vec![api("STREAM.INFO.CLAW_IN")],
            vec![
                api("DIRECT.GET.CLAW_EVT"),
                api("STREAM.MSG.GET.CLAW_IN"),
                api("CONSUMER.MSG.NEXT.CLAW_IN.router-p0"),
                api("STREAM.PURGE.CLAW_IN"),
            ],
        ),
    ];
    // Asked all at once: a refused request is only known by its silence.
    let mut checks = Vec::new();
    for (name, allowed, refused) in &cases {
        let c = user(&s, name).await;
        for (subject, may) in allowed
            .iter()
            .map(|a| (a, true))
            .chain(refused.iter().map(|r| (r, false)))
        {
            let c = c.clone();
            checks.push(async move { (name, subject, may, answered(&c, subject, "").await) });
        }
    }
    for (name, subject, may, got) in futures::future::join_all(checks).await {
        assert_eq!(got, may, "{name} on {subject}: answered {got}");
    }
    // Publishing outside one's subjects: nothing reaches the streams.
    let forged: [(&str, &str); 5] = [
        ("gateway", "claw.v1.turn.0.forged"),
        ("gateway", "claw.v1.evt.transcript.forged"),
        ("store", "claw.v1.in.http.default"),
        ("router", "claw.v1.evt.run.forged"),
        ("operator", "claw.v1.in.http.default"),
    ];
    for (name, subject) in forged {
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(1))
            .build(user(&s, name).await);
        let stored = match js.publish(subject, "forged".into()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        assert!(!stored, "{name} published on {subject}");
    }
    // Nobody reads another user's inbox (replies, API answers, pull deliveries).
    let spy = user(&s, "router").await;
    let _sub = spy.subscribe("_INBOX_agent.>").await.unwrap();
    spy.flush().await.unwrap();
    let logged = wait_for(Duration::from_secs(10), || async {
        let v = s.nats.violations();
        v.iter()
            .any(|l| l.contains("Subscription Violation") && l.contains("_INBOX_agent"))
            && v.iter()
                .any(|l| l.contains("Publish Violation") && l.contains("claw.v1.turn.0.forged"))
    })
    .await;
    assert!(logged, "{:#?}", s.nats.violations());
    // None of the forged messages got anywhere: a second turn finds the suite as
    // before, and the dead-letter stream is empty.
    let r = s.chat(&user_msg("second turn")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let js = async_nats::jetstream::new(user(&s, "operator").await);
    let dlq = js
        .get_stream("CLAW_DLQ")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(dlq, 0);
}

/// A tool turn through the sandbox, with an approval the operator gives through the CLI:
/// the sandbox and the operator need no rights beyond theirs.
#[tokio::test]
async fn tools_and_approvals_work_with_only_their_rights() {
    let s = Suite::start(SuiteOpts {
        auth: true,
        env: vec![
            ("CLAWBUS__SANDBOX__ASK".into(), "on-miss".into()),
            (
                "CLAWBUS__SANDBOX__EXEC_ALLOWLIST".into(),
                "[\"sleep\"]".into(),
            ),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    // A background command and its listing (the process bucket, the sandbox's subjects).
    let turn = r#"tools: [[{"name":"exec","arguments":{"command":"sleep 30","background":true}}],[{"name":"process","arguments":{"action":"list"}}]]"#;
    let v = s
        .chat_in("agent:main:priv-bg", turn)
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let listed = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(
        listed.contains("running") && listed.contains("sleep 30"),
        "{v}"
    );
    let turn = r#"tools: [[{"name":"write","arguments":{"path":"a.txt","content":"hi"}}],[{"name":"exec","arguments":{"command":"cat a.txt"}}]]"#;
    let req = s.chat_in("agent:main:priv-tools", turn);
    let call = tokio::spawn(async move {
        req.send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    });
    let password = s.password("operator").unwrap().to_owned();
    let cli = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(clawbus_testkit::bin_dir().join("clawbus"));
        cmd.arg("approvals")
            .args(args)
            .env_clear()
            .env("CLAWBUS_HOME", s.state.path())
            .env("NATS_URL", &s.nats.url)
            .env("CLAWBUS__NATS__USER", "operator")
            .env("CLAWBUS__NATS__PASSWORD", &password);
        async move {
            let out = cmd.output().await.unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        }
    };
    let id = std::sync::Mutex::new(String::new());
    let listed = wait_for(Duration::from_secs(30), || async {
        let out = cli(vec!["list".into()]).await;
        match out.lines().find(|l| l.ends_with("cat a.txt")) {
            Some(l) => {
                *id.lock().unwrap() = l.split_whitespace().next().unwrap().to_owned();
                true
            }
            None => false,
        }
    })
    .await;
    assert!(listed, "the exec never waited for approval");
    let out = cli(vec!["allow".into(), id.into_inner().unwrap()]).await;
    assert!(out.contains("allowed once"), "{out}");
    let v = call.await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Done: hi", "{v}");
    assert_eq!(s.nats.violations(), Vec::<String>::new());
}
