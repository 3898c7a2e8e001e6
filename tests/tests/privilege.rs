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
            vec![
                api("STREAM.INFO.CLAW_IN"),
                api("CONSUMER.LIST.CLAW_EVT"),
                api("DIRECT.GET.CLAW_DLQ"),
            ],
            vec![
                api("CONSUMER.MSG.NEXT.CLAW_IN.router-p0"),
                api("CONSUMER.DELETE.CLAW_IN.router-p0"),
                api("STREAM.DELETE.CLAW_DLQ"),
                api("STREAM.PURGE.CLAW_DLQ"),
                api("DIRECT.GET.CLAW_EVT.claw.v1.evt.run.0.x"),
                api("DIRECT.GET.KV_claw_pairing.$KV.claw_pairing.x"),
                api("DIRECT.GET.KV_claw_approvals.$KV.claw_approvals.pending.x"),
                api("CONSUMER.CREATE.KV_claw_approvals"),
                api("CONSUMER.CREATE.CLAW_IN.spy.claw.v1.in.>"),
            ],
        ),
        (
            "admin",
            vec![
                api("STREAM.INFO.KV_claw_pairing"),
                api("DIRECT.GET.KV_claw_cron.$KV.claw_cron.job.x"),
            ],
            vec![
                api("STREAM.INFO.CLAW_IN"),
                api("DIRECT.GET.CLAW_DLQ"),
                api("DIRECT.GET.CLAW_EVT.claw.v1.evt.run.0.x"),
                api("DIRECT.GET.KV_claw_sessions.$KV.claw_sessions.x"),
                api("STREAM.PURGE.KV_claw_pairing"),
                api("CONSUMER.CREATE.CLAW_OUT.spy.claw.v1.out.>"),
            ],
        ),
        (
            "provision",
            vec![
                api("INFO"),
                api("STREAM.INFO.CLAW_IN"),
                api("STREAM.CREATE.CLAW_DLQ"),
            ],
            vec![
                api("DIRECT.GET.CLAW_EVT"),
                api("STREAM.MSG.GET.CLAW_IN"),
                api("STREAM.MSG.DELETE.CLAW_IN"),
                api("CONSUMER.MSG.NEXT.CLAW_IN.router-p0"),
                api("STREAM.PURGE.CLAW_IN"),
                api("STREAM.PURGE.CLAW_DLQ"),
                api("STREAM.DELETE.CLAW_DLQ"),
                api("STREAM.UPDATE.CLAW_DLQ"),
                api("STREAM.SNAPSHOT.CLAW_IN"),
                api("STREAM.RESTORE.CLAW_COPY"),
                api("STREAM.CREATE.CLAW_COPY"),
                api("STREAM.NAMES"),
                api("CONSUMER.CREATE.CLAW_IN"),
                api("CONSUMER.CREATE.CLAW_IN.spy.claw.v1.in.>"),
                api("CONSUMER.DELETE.CLAW_IN.router-p0"),
                api("CONSUMER.INFO.CLAW_IN.router-p0"),
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
    let forged: [(&str, &str); 11] = [
        ("gateway", "claw.v1.turn.0.forged"),
        ("gateway", "claw.v1.evt.transcript.forged"),
        ("store", "claw.v1.in.http.default"),
        ("router", "claw.v1.evt.run.forged"),
        ("operator", "claw.v1.in.http.default"),
        // The operator reads; it neither speaks in a chat nor lets anyone in.
        ("operator", "claw.v1.out.telegram.default"),
        ("operator", "$KV.claw_pairing.allow.telegram.default.666"),
        ("operator", "$KV.claw_approvals.pending.forged"),
        ("operator", "$KV.claw_cron.job.forged"),
        // The admin tells approved senders on their platform, never answers an HTTP
        // client of the gateway.
        ("admin", "claw.v1.out.http.default"),
        ("provision", "claw.v1.in.http.default"),
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

/// A tool turn through the sandbox, with an approval the owner gives through the CLI as
/// the `admin` user: the sandbox and the admin need no rights beyond theirs, and the
/// read-only `operator` cannot decide it.
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
    let cli_as = |user: &str, args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(clawbus_testkit::bin_dir().join("clawbus"));
        cmd.arg("approvals")
            .args(args)
            .env_clear()
            .env("CLAWBUS_HOME", s.state.path())
            .env("NATS_URL", &s.nats.url)
            .env("CLAWBUS__NATS__USER", user)
            .env("CLAWBUS__NATS__PASSWORD", s.password(user).unwrap());
        async move {
            let out = cmd.output().await.unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr)
        }
    };
    let cli = |args: Vec<String>| cli_as("admin", args);
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
    let id = id.into_inner().unwrap();
    let out = cli_as("operator", vec!["allow".into(), id.clone()]).await;
    assert!(!out.contains("allowed once"), "the operator decided: {out}");
    let out = cli(vec!["allow".into(), id]).await;
    assert!(out.contains("allowed once"), "{out}");
    let v = call.await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Done: hi", "{v}");
    let violations = s.nats.violations();
    assert!(
        violations.iter().all(|l| l.contains("user:operator\"")),
        "only the operator's attempt was refused: {violations:#?}"
    );
}

/// The provisioning user's power, tried by someone holding its password: it can neither
/// read messages through a push consumer delivering to its own inbox (a new one, or a
/// fixed consumer turned into one) nor shrink, purge, delete or snapshot a stream.
#[tokio::test]
async fn provisioning_cannot_read_shrink_or_remove_what_it_provisioned() {
    use async_nats::jetstream::consumer::push;
    use futures::StreamExt;
    let s = auth_suite(1).await;
    // A dead letter to lose, and inbound messages to read.
    let router = async_nats::jetstream::new(user(&s, "router").await);
    router
        .publish("claw.v1.dlq.router", "a dead letter".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        s.chat(&user_msg("secret 1")).send().await.unwrap().status(),
        200
    );

    let provision = user(&s, "provision").await;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(provision.clone());
    let mut spy = provision.subscribe("_INBOX_provision.spy").await.unwrap();
    let push = |name: &str, filter: &str| push::Config {
        durable_name: Some(name.into()),
        deliver_subject: "_INBOX_provision.spy".into(),
        filter_subject: filter.into(),
        ..Default::default()
    };
    let inbound = js.get_stream("CLAW_IN").await.unwrap();
    let own = inbound.create_consumer(push("spy", "claw.v1.in.>")).await;
    assert!(own.is_err(), "a push consumer of its own");
    let fixed = clawbus_bus::topology::ConsumerDecl::router(0, 1).filter_subjects[0].clone();
    let turned = inbound.create_consumer(push("router-p0", &fixed)).await;
    assert!(turned.is_err(), "router-p0 turned into a push consumer");
    let mut dlq = js.get_stream("CLAW_DLQ").await.unwrap();
    let mut shrunk = dlq.info().await.unwrap().config.clone();
    let declared = shrunk.clone();
    shrunk.max_messages = 1;
    shrunk.max_age = Duration::from_secs(1);
    assert!(js.update_stream(&shrunk).await.is_err(), "limits shrunk");
    assert!(dlq.purge().await.is_err(), "dead letters purged");
    assert!(
        js.delete_stream("CLAW_DLQ").await.is_err(),
        "stream deleted"
    );
    assert!(
        !answered(
            &provision,
            "$JS.API.STREAM.SNAPSHOT.CLAW_IN",
            r#"{"deliver_subject":"_INBOX_provision.spy","chunk_size":1024}"#
        )
        .await,
        "snapshot"
    );
    // More inbound messages: none reaches the spy's inbox.
    assert_eq!(
        s.chat(&user_msg("secret 2")).send().await.unwrap().status(),
        200
    );
    let leaked = tokio::time::timeout(Duration::from_secs(2), spy.next()).await;
    assert!(leaked.is_err(), "the spy's inbox got {leaked:?}");

    // As the operator sees it: the dead letter and the declared limits are there, no
    // consumer was added, router-p0 is still a pull consumer.
    let js = async_nats::jetstream::new(user(&s, "operator").await);
    let info = js
        .get_stream("CLAW_DLQ")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, 1);
    assert_eq!(info.config.max_age, declared.max_age);
    assert_eq!(info.config.max_messages, declared.max_messages);
    let inbound = js.get_stream("CLAW_IN").await.unwrap();
    let names: Vec<String> = inbound.consumer_names().map(|n| n.unwrap()).collect().await;
    assert!(!names.iter().any(|n| n == "spy"), "{names:?}");
    let p0 = inbound
        .consumer_info("router-p0")
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(p0.deliver_subject, None);
    let refused = s
        .nats
        .violations()
        .iter()
        .filter(|l| l.contains("user:provision\""))
        .count();
    assert!(refused >= 4, "{:#?}", s.nats.violations());
}
