//! The channels service's Discord adapter against an emulator of Discord's gateway
//! WebSocket and REST API, with every service of the suite as a real process: pairing
//! in a DM, guild mentions, 2000-character chunks with code fences intact, a cut
//! connection resumed without losing what was said meanwhile, a rate limit, a bad token.

use std::time::Duration;

use clawbus_testkit::discord::{DiscordEmulator, DiscordSent};
use clawbus_testkit::{wait_for, Service, Suite};
use futures::StreamExt;

const TOKEN: &str = "MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.test-token";

async fn suite(dc: &DiscordEmulator, token: &str, extra: &[(&str, &str)]) -> Suite {
    let root = dc.api_root();
    let env = [
        ("CLAWBUS__CHANNELS__DISCORD__BOT_TOKEN", token),
        ("CLAWBUS__CHANNELS__DISCORD__API_ROOT", root.as_str()),
    ];
    clawbus_tests::channel_suite(&env, extra).await
}

async fn wait_sent(dc: &DiscordEmulator, channel: &str, n: usize) -> Vec<DiscordSent> {
    clawbus_tests::wait_count(&format!("messages to {channel}"), n, || dc.sent_to(channel)).await
}

async fn linked(dc: &DiscordEmulator) {
    assert!(
        wait_for(Duration::from_secs(30), || async { dc.linked() }).await,
        "the bot never connected"
    );
}

#[tokio::test]
async fn a_stranger_pairs_in_a_dm_then_gets_replies() {
    let dc = DiscordEmulator::start(TOKEN).await.unwrap();
    let s = suite(&dc, TOKEN, &[]).await;
    linked(&dc).await;
    dc.say("500", None, "7", "hello", false);
    let first = wait_sent(&dc, "500", 1).await;
    clawbus_tests::approve_pairing(&s, "discord", &first[0].1).await;
    wait_sent(&dc, "500", 2).await;
    let asked = dc.say("500", None, "7", "ping @everyone", false);
    let sent = wait_sent(&dc, "500", 3).await;
    assert_eq!(sent[2].1, "Echo: ping @everyone");
    assert_eq!(
        sent[2].2.as_deref(),
        Some(asked.as_str()),
        "a reply to the message"
    );
}

#[tokio::test]
async fn guild_mentions_long_replies_in_chunks_and_a_rate_limit() {
    let dc = DiscordEmulator::start(TOKEN).await.unwrap();
    let s = suite(
        &dc,
        TOKEN,
        &[("CLAWBUS__CHANNELS__DISCORD__GROUP_POLICY", "open")],
    )
    .await;
    linked(&dc).await;
    dc.say("600", Some("60"), "7", "just talking", false);
    dc.rate_limit(1);
    let code: String = (0..150)
        .map(|i| format!("let v{i} = {i}; // <{i}>\n"))
        .collect();
    dc.say(
        "600",
        Some("60"),
        "7",
        &format!("review:\n```rust\n{code}```\nend"),
        true,
    );
    let ok = wait_for(Duration::from_secs(30), || async {
        dc.sent_to("600").iter().any(|m| m.1.contains("end"))
    })
    .await;
    assert!(ok, "{:?}", dc.sent());
    let sent = dc.sent_to("600");
    assert!(sent.len() >= 2, "{} pieces", sent.len());
    let all: String = sent
        .iter()
        .map(|m| m.1.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for m in &sent {
        assert!(m.1.chars().count() <= 2000);
        assert_eq!(
            m.1.matches("```").count() % 2,
            0,
            "a fence cut open: {}",
            m.1
        );
    }
    for i in 0..150 {
        assert_eq!(
            all.matches(&format!("let v{i} = {i}; // <{i}>")).count(),
            1,
            "line {i}"
        );
    }
    assert_eq!(
        s.emu().requests().len(),
        1,
        "the unmentioned message only as context"
    );
    assert!(s.emu().requests()[0].to_string().contains("just talking"));
}

#[tokio::test]
async fn a_cut_connection_resumes_and_loses_nothing() {
    let dc = DiscordEmulator::start(TOKEN).await.unwrap();
    let s = suite(
        &dc,
        TOKEN,
        &[("CLAWBUS__CHANNELS__DISCORD__DM_POLICY", "open")],
    )
    .await;
    linked(&dc).await;
    dc.say("700", None, "7", "before", false);
    wait_sent(&dc, "700", 1).await;
    dc.drop_link();
    dc.say("700", None, "7", "while cut", false);
    let resumed = wait_for(Duration::from_secs(30), || async { dc.logins().1 >= 1 }).await;
    assert!(resumed, "no resume: {:?}", dc.logins());
    let sent = wait_sent(&dc, "700", 2).await;
    assert_eq!(sent[1].1, "Echo: while cut");
    assert_eq!(dc.logins().0, 1, "resumed, not identified again");
    let metrics = format!("{}/metrics", s.replica_admin_url((Service::Channels, 0)));
    let up = wait_for(Duration::from_secs(10), || async {
        s.get_text(&metrics)
            .await
            .contains("clawbus_channels_account_up{account=\"default\",channel=\"discord\"} 1")
    })
    .await;
    assert!(up, "{}", s.get_text(&metrics).await);
}

#[tokio::test]
async fn a_bad_token_is_reported_and_nothing_crashes() {
    let dc = DiscordEmulator::start(TOKEN).await.unwrap();
    let s = suite(&dc, "not-the-token", &[]).await;
    let metrics = format!("{}/metrics", s.replica_admin_url((Service::Channels, 0)));
    let refused = wait_for(Duration::from_secs(20), || async {
        let p = s.get_text(&metrics).await;
        p.contains("clawbus_channels_account_up{account=\"default\",channel=\"discord\"} 0")
            && p.contains("reason=\"unauthorized\"")
    })
    .await;
    assert!(refused, "{}", s.get_text(&metrics).await);
    let log = std::fs::read_to_string(s.state.path().join("logs/channels.log")).unwrap();
    assert!(!log.contains("not-the-token"), "the token reached the log");
}

#[tokio::test]
async fn replies_sent_again_after_a_crash_are_kept_once_by_their_nonces() {
    let dc = DiscordEmulator::start(TOKEN).await.unwrap();
    let mut s = suite(
        &dc,
        TOKEN,
        &[
            ("CLAWBUS__CHANNELS__DISCORD__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__DISCORD__TEXT_CHUNK_LIMIT", "100"),
        ],
    )
    .await;
    linked(&dc).await;
    let words = clawbus_tests::numbered_words(120);
    dc.say("800", None, "7", &words, false);
    let done = wait_for(Duration::from_secs(30), || async {
        dc.sent_to("800").iter().any(|m| m.1.contains("w119"))
    })
    .await;
    assert!(done, "{:?}", dc.sent());
    let pieces = dc.sent_to("800").len();
    assert!(pieces >= 5, "{pieces}");
    // As if the process had died after sending every piece but before recording any:
    // the records go, and the reply consumer starts over from the first reply.
    s.kill9_replica((Service::Channels, 0)).await.unwrap();
    clawbus_tests::forget_deliveries(&s, "channels-discord-default").await;
    s.restart(Service::Channels).await.unwrap();
    // The pieces went out again (records written anew) and Discord kept one of each.
    let identified = wait_for(Duration::from_secs(30), || async { dc.logins().0 >= 2 }).await;
    assert!(identified, "the restarted replica never identified");
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let kv = js.get_key_value("claw_deliveries").await.unwrap();
    let recorded = wait_for(Duration::from_secs(30), || async {
        let mut n = 0;
        if let Ok(mut ks) = kv.keys().await {
            while let Some(Ok(_)) = ks.next().await {
                n += 1;
            }
        }
        n >= pieces
    })
    .await;
    assert!(recorded, "the reply was not delivered again");
    assert_eq!(dc.sent_to("800").len(), pieces, "a piece shown twice");
}

#[tokio::test]
async fn with_partial_streaming_a_draft_is_edited_into_the_first_piece() {
    let dc = DiscordEmulator::start(TOKEN).await.unwrap();
    let s = suite(
        &dc,
        TOKEN,
        &[
            ("CLAWBUS__CHANNELS__DISCORD__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__DISCORD__STREAM_MODE", "partial"),
        ],
    )
    .await;
    linked(&dc).await;
    // The model stops halfway through its answer: the draft shows what it wrote, in
    // reply to the question.
    s.emu().hold_midstream();
    let asked = dc.say("650", None, "7", "repeat 3000 streaming words", false);
    let drafted = wait_for(Duration::from_secs(30), || async {
        dc.sent_to("650")
            .first()
            .is_some_and(|m| m.1.starts_with("Echo: streaming") && m.1.ends_with(" …"))
    })
    .await;
    assert!(drafted, "no draft: {:?}", dc.sent());
    assert_eq!(dc.sent_to("650")[0].2.as_deref(), Some(asked.as_str()));
    s.emu().release();
    // The answer (3,000 characters: two pieces) replaces the draft with its first
    // piece; the second comes as a new message.
    let want = clawbus_testkit::emulator::reply_for(&[
        serde_json::json!({"role": "user", "content": "repeat 3000 streaming words"}),
    ]);
    // Pieces are cut at spaces: compared without them.
    let bare = |t: &str| t.split_whitespace().collect::<String>();
    let done = wait_for(Duration::from_secs(30), || async {
        bare(
            &dc.sent_to("650")
                .iter()
                .map(|m| m.1.clone())
                .collect::<String>(),
        ) == bare(&want)
    })
    .await;
    let sent = dc.sent_to("650");
    assert!(done, "{sent:?}");
    assert_eq!(sent.len(), 2, "the draft and one more piece");
    assert!(sent.iter().all(|m| m.1.chars().count() <= 2000));
    assert!(dc.edits() >= 1);
}

/// Messages the router dropped so far (not allowed).
async fn dropped(s: &Suite) -> f64 {
    let page = s
        .get_text(&format!(
            "{}/metrics",
            s.replica_admin_url((Service::Router, 0))
        ))
        .await;
    page.lines()
        .find_map(|l| {
            l.strip_prefix("clawbus_router_messages_total{outcome=\"dropped\"} ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn allowlisted_channels_guilds_and_threads_under_them_are_answered_others_not() {
    let dc = DiscordEmulator::start(TOKEN).await.unwrap();
    let s = suite(
        &dc,
        TOKEN,
        &[
            ("CLAWBUS__CHANNELS__DISCORD__GROUP_POLICY", "allowlist"),
            // One channel of guild 60 (mentions needed), all of guild 61 (not needed).
            (
                "CLAWBUS__CHANNELS__DISCORD__GROUPS__700__REQUIRE_MENTION",
                "true",
            ),
            (
                "CLAWBUS__CHANNELS__DISCORD__GROUPS__61__REQUIRE_MENTION",
                "false",
            ),
        ],
    )
    .await;
    linked(&dc).await;
    // A channel of guild 60 not on the list: nothing, mention or not.
    dc.say("800", Some("60"), "7", "anyone?", true);
    let was_dropped = wait_for(Duration::from_secs(30), || async {
        dropped(&s).await >= 1.0
    })
    .await;
    assert!(was_dropped, "the message was not dropped");
    // The listed channel answers a mention.
    dc.say("700", Some("60"), "7", "hello there", true);
    assert_eq!(wait_sent(&dc, "700", 1).await[0].1, "Echo: hello there");
    // A thread under it is allowed by its parent, and answered in the thread, in a
    // session of its own.
    let thread = dc.thread("700", "60", "plans");
    dc.say(&thread, Some("60"), "7", "in the thread", true);
    assert_eq!(wait_sent(&dc, &thread, 1).await[0].1, "Echo: in the thread");
    // Every channel of guild 61, without a mention.
    dc.say("900", Some("61"), "8", "no mention needed", false);
    assert_eq!(
        wait_sent(&dc, "900", 1).await[0].1,
        "Echo: no mention needed"
    );
    assert!(dc.sent_to("800").is_empty());
    let asked = clawbus_tests::last_asked(&s);
    assert!(!asked.iter().any(|a| a.contains("anyone?")), "{asked:?}");
    let runs = s.emu().requests().len();
    assert_eq!(runs, 3, "{asked:?}");
}
