//! Least privilege (DESIGN.md invariant 6): the suite runs against the nats-server
//! configuration shipped in `deploy/nats/nats-server.conf`, each service as its own NATS
//! user, and a user cannot publish outside its subjects.

use std::path::PathBuf;
use std::time::Duration;

use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts, SERVICES};
use clawbus_tests::{stream_messages_with, user_msg};

fn password(s: Service) -> String {
    format!("pw-{}-secret", s.name())
}

async fn connect_as(url: &str, user: &str, pw: &str) -> anyhow::Result<async_nats::Client> {
    Ok(async_nats::ConnectOptions::new()
        .user_and_password(user.into(), pw.into())
        .connect(url)
        .await?)
}

#[tokio::test]
async fn every_service_runs_as_its_own_user_with_only_its_subjects() {
    let conf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats/nats-server.conf");
    let nats_env = SERVICES
        .iter()
        .map(|s| {
            (
                format!("CLAWBUS_NATS_{}_PASSWORD", s.name().to_uppercase()),
                password(*s),
            )
        })
        .collect();
    let mut service_env = Vec::new();
    for s in SERVICES {
        service_env.push((s, "CLAWBUS__NATS__USER".to_owned(), s.name().to_owned()));
        service_env.push((s, "CLAWBUS__NATS__PASSWORD".to_owned(), password(s)));
    }
    let s = Suite::start(SuiteOpts {
        nats_config: Some((conf, nats_env)),
        service_env,
        ..Default::default()
    })
    .await
    .unwrap();
    let r = s
        .chat(&user_msg("with least privilege"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Echo: with least privilege"
    );

    let url = format!("nats://127.0.0.1:{}", s.nats.port);
    // Anonymous access is refused.
    assert!(async_nats::connect(&url).await.is_err());
    assert!(connect_as(&url, "gateway", "wrong").await.is_err());

    // The gateway may not inject turns, replies or transcript entries.
    let gw = connect_as(&url, "gateway", &password(Service::Gateway))
        .await
        .unwrap();
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(gw.clone());
    for subject in [
        "claw.v1.turn.0.abc",
        "claw.v1.out.telegram.bot",
        "claw.v1.evt.transcript.abc",
    ] {
        let res = match js.publish(subject, "x".into()).await {
            Ok(ack) => ack.await.map(|_| ()),
            Err(e) => Err(async_nats::jetstream::context::PublishError::with_source(
                async_nats::jetstream::context::PublishErrorKind::Other,
                e,
            )),
        };
        assert!(res.is_err(), "gateway published on {subject}");
    }
    // ... but its own subject works.
    let ok = js
        .publish("claw.v1.in.http.default", "not an envelope".into())
        .await
        .unwrap()
        .await;
    assert!(ok.is_ok());
    // Had an injected turn or transcript entry got through, its consumer would have
    // dead-lettered it like the router does the gateway's junk.
    let ok = wait_for(Duration::from_secs(10), || async {
        stream_messages_as_admin(&s, "CLAW_DLQ", ">").await.len() == 1
    })
    .await;
    assert!(ok);
    // Had anything else got through, it would be queued or in flight now: wait until
    // the router's consumer and the turn queue are idle before counting.
    assert!(
        wait_for(Duration::from_secs(10), || async {
            idle_as_admin(&s).await
        })
        .await,
        "the suite settled"
    );
    let dlq = stream_messages_as_admin(&s, "CLAW_DLQ", ">").await;
    let subjects: Vec<String> = dlq
        .iter()
        .filter_map(|m| m.header("Clawbus-Dlq-Subject"))
        .collect();
    assert_eq!(subjects, vec!["claw.v1.in.http.default"]);
    assert!(
        stream_messages_as_admin(&s, "CLAW_OUT", "claw.v1.out.telegram.>")
            .await
            .is_empty()
    );
    assert!(
        stream_messages_as_admin(&s, "CLAW_EVT", "claw.v1.evt.transcript.*.abc")
            .await
            .is_empty()
    );
    // The store may not publish inbound messages.
    let st = connect_as(&url, "store", &password(Service::Store))
        .await
        .unwrap();
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(st);
    let res = match js.publish("claw.v1.in.http.default", "x".into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(res, "store published an inbound message");
}

async fn stream_messages_as_admin(
    s: &Suite,
    stream: &str,
    filter: &str,
) -> Vec<clawbus_tests::Stored> {
    // The agent user may use the JetStream API; use it as the inspecting client.
    let url = format!("nats://127.0.0.1:{}", s.nats.port);
    let c = connect_as(&url, "agent", &password(Service::Agent))
        .await
        .unwrap();
    stream_messages_with(c, stream, filter).await.unwrap()
}

/// No inbound message pending at the router and no turn queued.
async fn idle_as_admin(s: &Suite) -> bool {
    let url = format!("nats://127.0.0.1:{}", s.nats.port);
    let c = connect_as(&url, "agent", &password(Service::Agent))
        .await
        .unwrap();
    let js = async_nats::jetstream::new(c);
    clawbus_tests::stream_is_empty(&js, "CLAW_TURN").await
        && clawbus_tests::consumer_is_idle(&js, "CLAW_IN", "router").await
}
