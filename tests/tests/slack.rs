//! Slack end to end: events signed as Slack signs them, posted to the gateway's Events
//! API endpoint; replies posted by the channels service to an emulator of the Web API;
//! every service of the suite a real process. Signatures, replays, the URL
//! handshake, retries, pairing, mentions, rate limits.

use std::time::Duration;

use clawbus_testkit::slack::{message_event, sign, Posted, SlackEmulator};
use clawbus_testkit::{wait_for, Suite, SuiteOpts};
use clawbus_tests::{post_slack_event as post, unix_now as now};
use serde_json::Value;

const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const TOKEN: &str = "xoxb-test-token";

async fn suite(slack: &SlackEmulator, extra: &[(&str, &str)]) -> Suite {
    let root = slack.api_root();
    let env = [
        ("CLAWBUS__CHANNELS__SLACK__BOT_TOKEN", TOKEN),
        ("CLAWBUS__CHANNELS__SLACK__SIGNING_SECRET", SECRET),
        ("CLAWBUS__CHANNELS__SLACK__API_ROOT", root.as_str()),
    ];
    clawbus_tests::channel_suite(&env, extra).await
}

async fn wait_posted(slack: &SlackEmulator, channel: &str, n: usize) -> Vec<Posted> {
    clawbus_tests::wait_count(&format!("posts to {channel}"), n, || {
        slack.posted_to(channel)
    })
    .await
}

#[tokio::test]
async fn only_signed_fresh_calls_get_in_and_the_handshake_answers() {
    let slack = SlackEmulator::start(TOKEN).await.unwrap();
    let s = suite(&slack, &[("CLAWBUS__CHANNELS__SLACK__DM_POLICY", "open")]).await;
    let hs = serde_json::json!({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"});
    let r = post(&s, &hs, SECRET, now()).await;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["challenge"],
        hs["challenge"]
    );
    let ev = message_event("D1", "UADA", "forged", "1700000000.000100", false);
    // Wrong secret, a replay from ten minutes ago, no headers at all: refused.
    assert_eq!(
        post(&s, &ev, "not-the-secret", now())
            .await
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        post(&s, &ev, SECRET, now() - 600).await.status().as_u16(),
        401
    );
    let bare = s
        .http
        .post(format!("{}/slack/events", s.gateway_url))
        .body(ev.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status().as_u16(), 401);
    // A body changed after signing: refused.
    let ts = now();
    let sig = sign(SECRET, ts, &ev.to_string());
    let tampered = ev.to_string().replace("forged", "FORGED");
    let r = s
        .http
        .post(format!("{}/slack/events", s.gateway_url))
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", sig)
        .body(tampered)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Signed garbage: parked in the dead letters and confirmed (an error would have
    // Slack send it again and again).
    let ts = now();
    let r = s
        .http
        .post(format!("{}/slack/events", s.gateway_url))
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", sign(SECRET, ts, "{nope"))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Slack retrying a delivery (same message): one turn, one reply.
    let ok = message_event("D1", "UADA", "real", "1700000000.000200", false);
    for _ in 0..3 {
        assert_eq!(post(&s, &ok, SECRET, now()).await.status().as_u16(), 200);
    }
    let posted = wait_posted(&slack, "D1", 1).await;
    assert_eq!(posted[0].1, "Echo: real");
    post(
        &s,
        &message_event("D1", "UADA", "after", "1700000000.000300", false),
        SECRET,
        now(),
    )
    .await;
    let posted = wait_posted(&slack, "D1", 2).await;
    assert_eq!(posted.len(), 2, "{posted:?}");
    let asked: Vec<String> = clawbus_tests::last_asked(&s);
    assert_eq!(
        asked,
        ["real", "after"],
        "forged and repeated events never ran"
    );
}

#[tokio::test]
async fn pairing_then_channel_mentions_in_threads_with_mrkdwn_and_rate_limits() {
    let slack = SlackEmulator::start(TOKEN).await.unwrap();
    let s = suite(
        &slack,
        &[("CLAWBUS__CHANNELS__SLACK__GROUP_POLICY", "open")],
    )
    .await;
    post(
        &s,
        &message_event("D7", "UBOB", "hello", "1700000001.000100", false),
        SECRET,
        now(),
    )
    .await;
    let first = wait_posted(&slack, "D7", 1).await;
    clawbus_tests::approve_pairing(&s, "slack", &first[0].1).await;
    wait_posted(&slack, "D7", 2).await;
    post(
        &s,
        &message_event("D7", "UBOB", "say **this**", "1700000001.000200", false),
        SECRET,
        now(),
    )
    .await;
    assert_eq!(wait_posted(&slack, "D7", 3).await[2].1, "Echo: say *this*");
    // In a channel: unmentioned stays silent, a mention in a thread is answered there.
    post(
        &s,
        &message_event(
            "C9",
            "UBOB",
            "team lunch friday",
            "1700000002.000100",
            false,
        ),
        SECRET,
        now(),
    )
    .await;
    slack.rate_limit_posts(1);
    let mut ev = message_event("C9", "UBOB", "who is coming?", "1700000002.000300", true);
    ev["event"]["thread_ts"] = "1700000002.000200".into();
    post(&s, &ev, SECRET, now()).await;
    let posted = wait_posted(&slack, "C9", 1).await;
    assert_eq!(posted.len(), 1);
    assert!(posted[0].1.contains("who is coming?"), "{posted:?}");
    assert_eq!(posted[0].2.as_deref(), Some("1700000002.000200"));
}

#[tokio::test]
async fn socket_mode_takes_events_acknowledges_them_and_reconnects_when_asked() {
    let slack = SlackEmulator::start(TOKEN).await.unwrap();
    let s = Suite::start(SuiteOpts {
        env: vec![
            ("CLAWBUS__CHANNELS__SLACK__BOT_TOKEN".into(), TOKEN.into()),
            (
                "CLAWBUS__CHANNELS__SLACK__APP_TOKEN".into(),
                clawbus_testkit::slack::APP_TOKEN.into(),
            ),
            (
                "CLAWBUS__CHANNELS__SLACK__API_ROOT".into(),
                slack.api_root(),
            ),
            ("CLAWBUS__CHANNELS__SLACK__DM_POLICY".into(), "open".into()),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || async {
            slack.socket_connections() >= 1
        })
        .await
    );
    let id = slack.push_event(message_event(
        "D5",
        "UADA",
        "via socket",
        "1700000005.000100",
        false,
    ));
    assert_eq!(wait_posted(&slack, "D5", 1).await[0].1, "Echo: via socket");
    assert!(slack.acked(&id), "the envelope was not acknowledged");
    // Slack asks for a new connection: the gateway opens one and goes on.
    slack.ask_reconnect();
    assert!(
        wait_for(Duration::from_secs(20), || async {
            slack.socket_connections() >= 2
        })
        .await
    );
    let id = slack.push_event(message_event(
        "D5",
        "UADA",
        "again",
        "1700000005.000200",
        false,
    ));
    assert_eq!(wait_posted(&slack, "D5", 2).await[1].1, "Echo: again");
    assert!(wait_for(Duration::from_secs(10), || async { slack.acked(&id) }).await);
    assert_eq!(clawbus_tests::last_asked(&s), ["via socket", "again"]);
}

#[tokio::test]
async fn channels_killed_while_posting_a_long_reply_posts_every_piece_once() {
    let slack = SlackEmulator::start(TOKEN).await.unwrap();
    let mut s = suite(
        &slack,
        &[
            ("CLAWBUS__CHANNELS__SLACK__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__SLACK__TEXT_CHUNK_LIMIT", "100"),
        ],
    )
    .await;
    // The first three pieces go out; the fourth is in flight when the process dies.
    slack.hold_posts_after(3);
    let words = clawbus_tests::numbered_words(120);
    post(
        &s,
        &message_event("D9", "UADA", &words, "1700000009.000100", false),
        SECRET,
        now(),
    )
    .await;
    assert!(wait_for(Duration::from_secs(30), || async { slack.held() >= 1 }).await);
    s.kill9_replica((clawbus_testkit::Service::Channels, 0))
        .await
        .unwrap();
    slack.release_failing();
    s.restart(clawbus_testkit::Service::Channels).await.unwrap();
    let done = wait_for(Duration::from_secs(60), || async {
        slack.posted_to("D9").iter().any(|p| p.1.contains("w119"))
    })
    .await;
    assert!(done, "{:?}", slack.posted_to("D9"));
    let texts: Vec<String> = slack.posted_to("D9").into_iter().map(|p| p.1).collect();
    clawbus_tests::assert_each_word_once(&texts, 120);
}

#[tokio::test]
async fn with_partial_streaming_a_draft_in_the_thread_is_updated_into_the_reply() {
    let slack = SlackEmulator::start(TOKEN).await.unwrap();
    let s = suite(
        &slack,
        &[
            ("CLAWBUS__CHANNELS__SLACK__GROUP_POLICY", "open"),
            ("CLAWBUS__CHANNELS__SLACK__STREAM_MODE", "partial"),
        ],
    )
    .await;
    s.emu().hold_midstream();
    let mut ev = message_event(
        "C5",
        "UBOB",
        "repeat 400 streaming words",
        "1700000005.000300",
        true,
    );
    ev["event"]["thread_ts"] = "1700000005.000100".into();
    assert!(post(&s, &ev, SECRET, now()).await.status().is_success());
    // The draft shows what the model wrote so far, in the thread asked in.
    let drafted = wait_for(Duration::from_secs(30), || async {
        slack
            .posted_to("C5")
            .first()
            .is_some_and(|p| p.1.starts_with("Echo: streaming") && p.1.ends_with(" …"))
    })
    .await;
    assert!(drafted, "no draft: {:?}", slack.posted());
    assert_eq!(
        slack.posted_to("C5")[0].2.as_deref(),
        Some("1700000005.000100")
    );
    s.emu().release();
    // chat.update turns the draft into the answer: one message.
    let want = clawbus_testkit::emulator::reply_for(&[
        serde_json::json!({"role": "user", "content": "repeat 400 streaming words"}),
    ]);
    let replaced = wait_for(Duration::from_secs(30), || async {
        slack
            .posted_to("C5")
            .first()
            .is_some_and(|p| p.1 == want.trim_end())
    })
    .await;
    assert!(replaced, "{want:?} wanted: {:?}", slack.posted());
    assert_eq!(
        slack.posted_to("C5").len(),
        1,
        "the reply came as a second post"
    );
    assert!(slack.updates() >= 1);
}

#[tokio::test]
async fn a_long_reply_with_code_comes_in_pieces_with_its_fences_intact() {
    let slack = SlackEmulator::start(TOKEN).await.unwrap();
    let s = suite(
        &slack,
        &[
            ("CLAWBUS__CHANNELS__SLACK__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__SLACK__TEXT_CHUNK_LIMIT", "1000"),
        ],
    )
    .await;
    let ev = message_event("D4", "UADA", "code 200", "1700000004.000100", false);
    post(&s, &ev, SECRET, now()).await;
    let ok = wait_for(Duration::from_secs(30), || async {
        slack
            .posted_to("D4")
            .iter()
            .any(|p| p.1.contains("The end."))
    })
    .await;
    assert!(ok, "{:?}", slack.posted());
    let texts: Vec<String> = slack.posted_to("D4").into_iter().map(|p| p.1).collect();
    assert!(texts.len() >= 3, "{} pieces", texts.len());
    for t in &texts {
        assert!(t.chars().count() <= 1000);
        assert_eq!(t.matches("```").count() % 2, 0, "a fence cut open: {t}");
    }
    clawbus_tests::assert_code_lines_once(&texts, 200);
}

#[tokio::test]
async fn signed_events_that_cannot_be_read_are_parked_and_confirmed_and_the_next_answered() {
    let slack = SlackEmulator::start(TOKEN).await.unwrap();
    let root = slack.api_root();
    let s = Suite::start(SuiteOpts {
        env: [
            ("CLAWBUS__CHANNELS__SLACK__BOT_TOKEN", TOKEN),
            ("CLAWBUS__CHANNELS__SLACK__SIGNING_SECRET", SECRET),
            (
                "CLAWBUS__CHANNELS__SLACK__APP_TOKEN",
                clawbus_testkit::slack::APP_TOKEN,
            ),
            ("CLAWBUS__CHANNELS__SLACK__API_ROOT", root.as_str()),
            ("CLAWBUS__CHANNELS__SLACK__DM_POLICY", "open"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec(),
        // The gateway as its own NATS user: it may park what it cannot read.
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let event = |id: &str, text: &str| {
        format!(
            r#"{{"type":"event_callback","team_id":"T1","event_id":"{id}","event":{{"type":"message","user":"UEVE","text":{text},"channel":"D9","channel_type":"im","ts":"1700000009.000100"}}}}"#
        )
    };
    // Events API: a lone surrogate (no JSON library reads it; it was refused 400 and
    // Slack sent it again and again) and a text of the wrong type (dropped unseen).
    let hostile = [
        event("Ev91", r#""hi \ud800""#),
        event("Ev92", r#"{"rich":"text"}"#),
    ];
    for body in &hostile {
        let ts = now();
        let r = s
            .http
            .post(format!("{}/slack/events", s.gateway_url))
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sign(SECRET, ts, body))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{body}");
    }
    // Socket Mode: the same, acknowledged once parked.
    assert!(
        wait_for(Duration::from_secs(20), || async {
            slack.socket_connections() >= 1
        })
        .await
    );
    let raw = r#"{"type":"event_callback","event":{"type":"message","user":"UEVE","text":"\udc00","channel":"D9","ts":"1.2"}}"#;
    let id = slack.push_raw_event(raw);
    assert!(wait_for(Duration::from_secs(20), || async { slack.acked(&id) }).await);
    // And the next message is answered.
    post(
        &s,
        &message_event("D1", "UADA", "after them", "1700000009.000200", false),
        SECRET,
        now(),
    )
    .await;
    assert_eq!(wait_posted(&slack, "D1", 1).await[0].1, "Echo: after them");
    assert!(slack.posted_to("D9").is_empty());
    // Parked with their raw bytes, on the gateway's dead letters.
    let operator = s
        .connect_as("operator", s.password("operator"))
        .await
        .unwrap();
    let mut dlq = async_nats::jetstream::new(operator)
        .get_stream("CLAW_DLQ")
        .await
        .unwrap();
    let state = dlq.info().await.unwrap().state.clone();
    let mut parked = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = dlq.direct_get(seq).await {
            parked.push(m);
        }
    }
    assert_eq!(parked.len(), 3, "{parked:?}");
    for p in &parked {
        assert_eq!(p.subject.as_str(), "claw.v1.dlq.gateway");
    }
    assert_eq!(&parked[0].payload[..], hostile[0].as_bytes());
    assert_eq!(&parked[1].payload[..], hostile[1].as_bytes());
    assert_eq!(
        parked[1]
            .headers
            .get("Clawbus-Dlq-Event-Id")
            .unwrap()
            .as_str(),
        "Ev92"
    );
    assert!(std::str::from_utf8(&parked[2].payload)
        .unwrap()
        .contains(raw));
    assert_eq!(
        parked[2]
            .headers
            .get("Clawbus-Dlq-Event-Id")
            .unwrap()
            .as_str(),
        id
    );
}
