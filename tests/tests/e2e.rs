//! End to end: HTTP → gateway → router → agent → provider emulator → back, with a real
//! nats-server and every service as its own process.

use std::time::Duration;

use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts};
use clawbus_tests::{
    outbound_messages, run_status, sse_events, streamed_text, transcript, user_msg,
};
use serde_json::{json, Value};

#[tokio::test]
async fn chat_completion_plain_and_streamed() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let r = s.chat(&user_msg("hello there")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: hello there");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));

    let mut body = user_msg("stream me please");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.chat(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let (events, done) = sse_events(&text);
    assert!(done, "stream ends with [DONE]: {text}");
    assert!(events
        .iter()
        .all(|e| e["object"] == "chat.completion.chunk"));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(streamed_text(&events), "Echo: stream me please");
    assert!(events
        .iter()
        .any(|e| e["choices"][0]["finish_reason"] == "stop"));
    assert!(
        events.last().unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    // The agent streamed from the provider too.
    assert!(s.emu().requests().iter().all(|r| r["stream"] == true));

    let r = s
        .http
        .get(format!("{}/v1/models", s.gateway_url))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["clawbus", "clawbus:main"]);
}

#[tokio::test]
async fn a_session_remembers_and_the_transcript_is_in_sqlite() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let key = "agent:main:e2e-memory";
    for text in ["my name is Ada", "what is my name?"] {
        let r = s.chat_in(key, text).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let reqs = s.emu().requests();
    assert_eq!(reqs.len(), 2);
    // After the system prompt (the workspace context, see workspace.rs): the history.
    let second: Vec<(String, String)> = reqs[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] != "system")
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_owned(),
                m["content"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        second,
        vec![
            ("user".into(), "my name is Ada".into()),
            ("assistant".into(), "Echo: my name is Ada".into()),
            ("user".into(), "what is my name?".into()),
        ]
    );
    let db = clawbus_tests::storage(&s).await;
    let ok = wait_for(Duration::from_secs(10), || async {
        transcript(&db, key).await.is_ok_and(|t| t.len() == 4)
    })
    .await;
    assert!(ok, "transcript: {:?}", transcript(&db, key).await);
    let t = transcript(&db, key).await.unwrap();
    assert_eq!(t[3], ("assistant".into(), "Echo: what is my name?".into()));
    let runs = run_status(&db, key).await.unwrap();
    assert_eq!(
        runs,
        vec![("completed".into(), None), ("completed".into(), None)]
    );
    // One event message per turn: the run event carries both transcript entries.
    let events = clawbus_tests::stream_messages(&s.nats.url, "CLAW_EVT", "claw.v1.evt.>")
        .await
        .unwrap();
    assert_eq!(events.len(), 2, "{events:?}");

    // The second turn's history came from the agent's cache, checked against the
    // session's last transcript sequence. An entry appended by someone else makes the
    // cache stale: the next turn must read the store and see it.
    let m = s.admin_get(Service::Agent, "/metrics").await;
    assert!(
        m.contains("clawbus_agent_history_loads_total{source=\"cache\"} 1"),
        "{m}"
    );
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let injected = clawbus_wire::Envelope::new(
        "other-writer:1",
        1,
        clawbus_wire::TranscriptEvent {
            session_key: key.into(),
            entry_id: "other-writer:1".into(),
            run_id: "other".into(),
            agent_id: "main".into(),
            role: clawbus_wire::Role::User,
            content: "note from elsewhere".into(),
        },
    );
    js.publish(
        clawbus_bus::subjects::transcript(key),
        clawbus_wire::encode(&injected).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let r = s.chat_in(key, "third").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let third = s.emu().requests()[2].to_string();
    assert!(third.contains("note from elsewhere"), "{third}");
    let m = s.admin_get(Service::Agent, "/metrics").await;
    assert!(
        m.contains("clawbus_agent_history_loads_total{source=\"store\"} 1"),
        "{m}"
    );

    // The OpenAI `user` field selects a stable session as well.
    for text in ["one", "two"] {
        let mut b = user_msg(text);
        b["user"] = json!("bob");
        assert_eq!(s.chat(&b).send().await.unwrap().status(), 200);
    }
    let last = clawbus_tests::last_conversation(&s).len();
    assert_eq!(last, 3, "second turn of bob carries his first turn");
}

#[tokio::test]
async fn requests_without_the_token_get_401() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let url = format!("{}/v1/chat/completions", s.gateway_url);
    let none = s
        .http
        .post(&url)
        .json(&user_msg("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    let v: Value = none.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let wrong = s
        .http
        .post(&url)
        .bearer_auth("nope")
        .json(&user_msg("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let models = s
        .http
        .get(format!("{}/v1/models", s.gateway_url))
        .send()
        .await
        .unwrap();
    assert_eq!(models.status(), 401);
    // Health stays open for probes.
    assert_eq!(
        s.http
            .get(format!("{}/livez", s.gateway_url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        s.http
            .get(format!("{}/readyz", s.gateway_url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        s.emu().requests().is_empty(),
        "nothing reached the provider"
    );
}

#[tokio::test]
async fn bad_http_input_gets_clear_errors_and_nothing_crashes() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    let url = format!("{}/v1/chat/completions", s.gateway_url);
    // No connection reuse: the gateway closes a connection whose oversized body it
    // refused without reading it.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let post = |body: reqwest::Body| {
        fresh
            .post(&url)
            .bearer_auth(&s.token)
            .header("content-type", "application/json")
            .body(body)
    };
    let cases: Vec<(reqwest::Body, u16, &str)> = vec![
        ("{not json".into(), 400, "invalid JSON"),
        ("".into(), 400, "invalid JSON"),
        (r#"{"model":"clawbus"}"#.into(), 400, "messages"),
        (
            r#"{"model":"clawbus","messages":[]}"#.into(),
            400,
            "at least one",
        ),
        (
            r#"{"model":"gpt-17","messages":[{"role":"user","content":"x"}]}"#.into(),
            404,
            "does not exist",
        ),
        (
            r#"{"model":"clawbus:ghost","messages":[{"role":"user","content":"x"}]}"#.into(),
            404,
            "does not exist",
        ),
        (
            r#"{"model":"clawbus","messages":[{"role":"user","content":{"a":1}}]}"#.into(),
            400,
            "content",
        ),
        (
            r#"{"model":"clawbus","messages":[{"role":"assistant","content":"x"}]}"#.into(),
            400,
            "role `user`",
        ),
        (
            format!(
                r#"{{"model":"clawbus","user":"{}","messages":[{{"role":"user","content":"x"}}]}}"#,
                "u".repeat(500)
            )
            .into(),
            400,
            "user",
        ),
        (vec![b'['; 2 * 1024 * 1024].into(), 413, "exceeds"),
    ];
    for (body, status, needle) in cases {
        let r = post(body).send().await.unwrap();
        assert_eq!(
            r.status().as_u16(),
            status,
            "expected {status} for case `{needle}`"
        );
        let v: Value = r.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "`{msg}` should mention `{needle}`");
    }
    // Under the body limit, but too big for the bus once wrapped: refused up front.
    let mut big = user_msg("x");
    big["messages"] = serde_json::json!([
        {"role": "user", "content": "a".repeat(200_000)},
        {"role": "assistant", "content": "b".repeat(200_000)},
        {"role": "user", "content": "c".repeat(200_000)},
        {"role": "assistant", "content": "d".repeat(200_000)},
        {"role": "user", "content": "e".repeat(200_000)}
    ]);
    let big_gw = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = big_gw
        .post(&url)
        .bearer_auth(&s.token)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    for bad in [
        "agent:other:x",
        "agent:main:",
        "agent:main:has space",
        "has space",
        "agent:",
    ] {
        let r = s.chat_in(bad, "x").send().await.unwrap();
        assert_eq!(r.status(), 400, "session key {bad}");
    }
    assert!(s.emu().requests().is_empty());
    // A bare name is a session of the requested agent.
    for text in ["bare one", "bare two"] {
        let r = s.chat_in("notes", text).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let last = s.emu().requests().last().cloned().unwrap();
    assert!(
        last["messages"].to_string().contains("bare one"),
        "the bare name kept its session: {last}"
    );
    assert!(s.all_alive());
    let r = s.chat(&user_msg("still fine")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn provider_failures_are_retried_or_reported() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    // A 500 is transient: the turn is redelivered and succeeds.
    s.emu().fail_next(&[500]);
    let r = s.chat(&user_msg("flaky")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: flaky");
    assert_eq!(s.emu().requests().len(), 2);
    // A 401 from the provider is permanent: one clear error, no retry.
    s.emu().fail_next(&[401]);
    let r = s.chat(&user_msg("denied")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "provider_auth_failed");
    assert_eq!(s.emu().requests().len(), 3);
}

#[tokio::test]
async fn without_a_provider_every_turn_explains_how_to_configure_one() {
    let s = Suite::start(SuiteOpts {
        provider: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let r = s.chat_in("agent:main:np", "hello?").send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "provider_not_configured");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("OPENAI_BASE_URL"));
    let mut b = user_msg("stream?");
    b["stream"] = json!(true);
    let text = s.chat(&b).send().await.unwrap().text().await.unwrap();
    assert!(
        text.contains("provider_not_configured") && text.contains("[DONE]"),
        "{text}"
    );
    let db = clawbus_tests::storage(&s).await;
    let ok = wait_for(Duration::from_secs(10), || async {
        run_status(&db, "agent:main:np").await.is_ok_and(|r| {
            r == vec![(
                "failed".to_owned(),
                Some("provider_not_configured".to_owned()),
            )]
        })
    })
    .await;
    assert!(ok);
    // The user's message is kept; no assistant entry was invented.
    assert_eq!(
        transcript(&db, "agent:main:np").await.unwrap(),
        vec![("user".into(), "hello?".into())]
    );
}

#[tokio::test]
async fn health_and_metrics_on_admin_ports() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    assert_eq!(
        s.chat(&user_msg("count me")).send().await.unwrap().status(),
        200
    );
    // The store receives the turn's event asynchronously (the reply does not wait for
    // it to be applied).
    assert!(
        wait_for(Duration::from_secs(10), || async {
            s.admin_get(Service::Store, "/metrics")
                .await
                .contains("clawbus_bus_messages_received_total{consumer=\"store\"} 1")
        })
        .await,
        "the store applied the turn's event"
    );
    for svc in clawbus_testkit::SERVICES {
        let base = s.admin_url(svc);
        assert_eq!(
            s.http
                .get(format!("{base}/livez"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        let ready = s.http.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(
            ready.status(),
            200,
            "{svc:?}: {}",
            ready.text().await.unwrap_or_default()
        );
        let m = s
            .http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // Each service reports its own traffic: the store consumes, the others publish.
        let own = match svc {
            Service::Store => "clawbus_bus_messages_received_total{consumer=\"store\"} 1",
            // The agent asked it for the tools of the turn.
            Service::Sandbox => "clawbus_sandbox_registry_requests_total 1",
            // No channel account is configured: it runs none.
            Service::Channels => "clawbus_channels_accounts_owned 0",
            _ => "clawbus_bus_published_total",
        };
        assert!(m.contains(own), "{svc:?} lacks {own}:\n{m}");
    }
    let agent = s.admin_get(Service::Agent, "/metrics").await;
    assert!(
        agent.contains("clawbus_bus_messages_received_total{consumer=\"agent\"} 1"),
        "{agent}"
    );
    assert!(agent.contains("clawbus_agent_turns_total{status=\"completed\"} 1"));
    assert!(agent.contains("clawbus_bus_handler_duration_seconds_bucket"));
    let gw = s.admin_get(Service::Gateway, "/metrics").await;
    assert!(
        gw.contains(
            "clawbus_gateway_http_requests_total{route=\"chat_completions\",status=\"200\"} 1"
        ),
        "{gw}"
    );
    // Every metric the shipped Grafana dashboard queries is one the services export.
    let mut exported = String::new();
    for svc in clawbus_testkit::SERVICES {
        exported.push_str(&s.admin_get(svc, "/metrics").await);
    }
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/dashboards/clawbus.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("clawbus_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&format!("\n{name}")),
                    "dashboard queries {name}, which no service exports"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8);
    let outs = outbound_messages(&s.nats.url, "claw.v1.out.http.default")
        .await
        .unwrap();
    assert_eq!(outs.len(), 1);
}

#[tokio::test]
async fn sigterm_stops_every_service_cleanly() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    assert_eq!(
        s.chat(&user_msg("before stop"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    for svc in clawbus_testkit::SERVICES {
        let status = s.terminate(svc).await.unwrap();
        assert!(status.success(), "{svc:?} exited with {status}");
    }
}

#[tokio::test]
async fn a_stopping_gateway_finishes_requests_in_flight() {
    let mut s = Suite::start(SuiteOpts::default()).await.unwrap();
    s.emu().hold();
    let req = s.chat(&user_msg("in flight"));
    let call = tokio::spawn(async move {
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    assert!(wait_for(Duration::from_secs(10), || async { s.emu().held() >= 1 }).await);
    let emu = s.emulator.take().unwrap();
    // Release the model call once the gateway is shutting down (its readiness drops).
    let (http, readyz) = (
        s.http.clone(),
        format!("{}/readyz", s.admin_url(Service::Gateway)),
    );
    let releaser = tokio::spawn(async move {
        let stopping = wait_for(Duration::from_secs(10), || async {
            !http
                .get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        })
        .await;
        emu.release();
        (emu, stopping)
    });
    let status = s.terminate(Service::Gateway).await.unwrap();
    assert!(status.success(), "{status}");
    let (code, v) = call.await.unwrap();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: in flight");
    let (emu, stopping) = releaser.await.unwrap();
    assert!(stopping, "the gateway reported not ready while draining");
    drop(emu);
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_get_429() {
    let s = Suite::start(SuiteOpts {
        env: vec![("CLAWBUS__GATEWAY__MAX_IN_FLIGHT".into(), "2".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    s.emu().hold();
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let req = s.chat_in(&format!("agent:main:busy{i}"), "wait");
            tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || async { s.emu().held() == 2 }).await,
        "two requests in flight"
    );
    let r = s.chat(&user_msg("one too many")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_requests");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    s.emu().release();
    for c in calls {
        assert_eq!(c.await.unwrap(), 200);
    }
    // The slots are free again.
    assert_eq!(s.chat(&user_msg("now")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn long_replies_travel_in_chunks_and_arrive_whole() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let db = clawbus_tests::storage(&s).await;
    // The longest message text the gateway takes: a reply just over one chunk.
    let max = "x".repeat(262_144);
    let r = s.chat_in("agent:main:long", &max).send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{}", v["error"]);
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        format!("Echo: {max}"),
        "joined in order"
    );
    // A model writing at length (500 KB of the 512 KiB an answer may have): still one
    // run event with both entries.
    let r = s
        .chat_in("agent:main:huge", "repeat 500000 abcdefghij")
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{}", v["error"]);
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(answer.len(), "Echo: ".len() + 500_000);
    assert!(answer.starts_with("Echo: abcdefghijabc") && answer.ends_with("ghij"));
    let outs = outbound_messages(&s.nats.url, "claw.v1.out.http.default")
        .await
        .unwrap();
    for (key, chunks) in [("agent:main:long", 2), ("agent:main:huge", 2)] {
        let mine: Vec<_> = outs.iter().filter(|o| o.session_key == key).collect();
        assert_eq!(mine.len(), chunks, "{key}: chunks on the bus");
        assert!(mine.last().unwrap().last && !mine[0].last, "{key}");
        assert!(
            wait_for(Duration::from_secs(10), || async {
                transcript(&db, key).await.is_ok_and(|t| t.len() == 2)
            })
            .await,
            "{key}: both entries stored"
        );
    }
    let t = transcript(&db, "agent:main:huge").await.unwrap();
    assert_eq!(t[0], ("user".into(), "repeat 500000 abcdefghij".into()));
    assert_eq!(t[1], ("assistant".into(), answer.to_owned()));
}

#[tokio::test]
async fn finish_reason_is_the_models() {
    // The agent asks for at most 3 tokens: the emulator (like OpenAI) cuts the answer
    // and says `length`, which the client must see rather than a made-up `stop`.
    let s = Suite::start(SuiteOpts {
        env: vec![("CLAWBUS__AGENT__MAX_TOKENS".into(), "3".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = s.chat(&user_msg("a long question")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["choices"][0]["message"]["content"], "Echo: a long",
        "12 bytes"
    );
    assert_eq!(s.emu().requests()[0]["max_tokens"], 3);
    let mut body = user_msg("another long question");
    body["stream"] = json!(true);
    let text = s.chat(&body).send().await.unwrap().text().await.unwrap();
    let (events, done) = sse_events(&text);
    assert!(done);
    let finishes: Vec<&Value> = events
        .iter()
        .map(|e| &e["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec!["length"], "one finish, the model's");
    assert_eq!(streamed_text(&events), "Echo: anothe");
}
