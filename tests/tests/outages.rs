//! Every platform down for a minute at once, with every service of the suite as a real
//! process: Telegram, Discord, Slack and Signal (emulators) and Matrix (a real Synapse)
//! behind proxies that cut the suite off from them, and the IRC server (a real ngircd)
//! stopped. Replies written during the outage wait; what people write meanwhile waits
//! at the platform; afterwards everything arrives once, in order, and nothing went to
//! the dead letters.

use std::time::{Duration, Instant};

use clawbus_testkit::discord::DiscordEmulator;
use clawbus_testkit::irc::{IrcClient, IrcServer};
use clawbus_testkit::matrix::MatrixServer;
use clawbus_testkit::outage::Outage;
use clawbus_testkit::signal::SignalEmulator;
use clawbus_testkit::slack::{message_event, SlackEmulator};
use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts, TelegramEmulator};
use clawbus_tests::{post_slack_event, unix_now};
use serde_json::Value;

/// How long the platforms are down.
const OUTAGE: Duration = Duration::from_secs(60);
const TG_TOKEN: &str = "123456:outage-test-token";
const DC_TOKEN: &str = "MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.outage-test";
const SLACK_TOKEN: &str = "xoxb-outage-test";
const SLACK_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const SIGNAL_BOT: &str = "+15550000000";
const ADA: &str = "+15551111111";
const BOT_NICK: &str = "clawbot";
const CHANNELS: [&str; 6] = ["telegram", "discord", "slack", "signal", "irc", "matrix"];

/// The platform errors the channels process counted for `channel` so far.
fn errors(metrics: &str, channel: &str) -> f64 {
    let label = format!("channel=\"{channel}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("clawbus_channels_platform_errors_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn every_platform_down_for_a_minute_loses_and_repeats_nothing() {
    let tg = TelegramEmulator::start(TG_TOKEN).await.unwrap();
    let dc = DiscordEmulator::start(DC_TOKEN).await.unwrap();
    let slack = SlackEmulator::start(SLACK_TOKEN).await.unwrap();
    let sig = SignalEmulator::start(SIGNAL_BOT).await.unwrap();
    let mut irc = IrcServer::start().await.unwrap();
    let hs = MatrixServer::start().await.unwrap();
    let bot = hs.register("clawbot").await.unwrap();
    let ada = hs.register("ada").await.unwrap();
    // The suite reaches the platforms through proxies that can cut it off; the people
    // reach them directly.
    let tg_net = Outage::start(tg.addr).await.unwrap();
    let dc_rest = Outage::start(dc.rest).await.unwrap();
    let dc_gateway = Outage::start(dc.gateway).await.unwrap();
    dc.set_gateway_url(&format!("ws://{}", dc_gateway.addr));
    let slack_net = Outage::start(slack.addr).await.unwrap();
    let sig_net = Outage::start(sig.addr).await.unwrap();
    let hs_net = Outage::start(([127, 0, 0, 1], hs.port).into())
        .await
        .unwrap();
    let nets = [
        &tg_net,
        &dc_rest,
        &dc_gateway,
        &slack_net,
        &sig_net,
        &hs_net,
    ];
    let mut env: Vec<(String, String)> = vec![
        ("TELEGRAM_BOT_TOKEN".into(), TG_TOKEN.into()),
        (
            "CLAWBUS__CHANNELS__TELEGRAM__API_ROOT".into(),
            tg_net.http_url(),
        ),
        (
            "CLAWBUS__CHANNELS__TELEGRAM__POLL_TIMEOUT_SECS".into(),
            "2".into(),
        ),
        (
            "CLAWBUS__CHANNELS__DISCORD__BOT_TOKEN".into(),
            DC_TOKEN.into(),
        ),
        (
            "CLAWBUS__CHANNELS__DISCORD__API_ROOT".into(),
            format!("{}/api/v10", dc_rest.http_url()),
        ),
        (
            "CLAWBUS__CHANNELS__SLACK__BOT_TOKEN".into(),
            SLACK_TOKEN.into(),
        ),
        (
            "CLAWBUS__CHANNELS__SLACK__SIGNING_SECRET".into(),
            SLACK_SECRET.into(),
        ),
        (
            "CLAWBUS__CHANNELS__SLACK__API_ROOT".into(),
            format!("{}/api", slack_net.http_url()),
        ),
        (
            "CLAWBUS__CHANNELS__SIGNAL__HTTP_URL".into(),
            sig_net.http_url(),
        ),
        (
            "CLAWBUS__CHANNELS__SIGNAL__ACCOUNT".into(),
            SIGNAL_BOT.into(),
        ),
        ("CLAWBUS__CHANNELS__IRC__SERVER".into(), irc.addr()),
        ("CLAWBUS__CHANNELS__IRC__TLS".into(), "false".into()),
        ("CLAWBUS__CHANNELS__IRC__NICK".into(), BOT_NICK.into()),
        (
            "CLAWBUS__CHANNELS__IRC__JOIN".into(),
            "[\"#family\"]".into(),
        ),
        (
            "CLAWBUS__CHANNELS__MATRIX__HOMESERVER".into(),
            hs_net.http_url(),
        ),
        (
            "CLAWBUS__CHANNELS__MATRIX__ACCESS_TOKEN".into(),
            bot.token.clone(),
        ),
        (
            "CLAWBUS__CHANNELS__MATRIX__POLL_TIMEOUT_SECS".into(),
            "2".into(),
        ),
    ];
    // A session per person (by default every direct chat is the owner's main session).
    env.push((
        "CLAWBUS__SESSION__DM_SCOPE".into(),
        "per-channel-peer".into(),
    ));
    for c in CHANNELS {
        env.push((
            format!("CLAWBUS__CHANNELS__{}__DM_POLICY", c.to_uppercase()),
            "open".into(),
        ));
    }
    let s = Suite::start(SuiteOpts {
        env,
        ..Default::default()
    })
    .await
    .unwrap();
    let room = ada.create_room(&[&bot.user_id], true).await.unwrap();
    let joined = wait_for(Duration::from_secs(30), || async {
        ada.members(&room)
            .await
            .is_ok_and(|m| m.contains(&bot.user_id))
    })
    .await;
    assert!(joined, "the Matrix bot never joined");
    let bob = IrcClient::connect(&irc.addr(), "bob").await.unwrap();
    bob.join("#family").await.unwrap();
    let bot_on_irc = bob.wait_joined(BOT_NICK, Duration::from_secs(30)).await;
    assert!(bot_on_irc, "the IRC bot never joined: {:?}", bob.lines());
    let dc_linked = wait_for(Duration::from_secs(30), || async { dc.linked() }).await;
    assert!(dc_linked, "the Discord bot never connected");

    // Each of the six people says something; the model answers.
    let mut slack_ts = 0;
    let mut say = |text: &'static str| {
        slack_ts += 1;
        let ts = format!("1700000100.{slack_ts:06}");
        let (tg, dc, sig, ada, room, s) = (&tg, &dc, &sig, &ada, &room, &s);
        async move {
            tg.dm(900, text);
            dc.say("900", None, "7", text, false);
            sig.dm(ADA, text);
            ada.say(room, text).await.unwrap();
            let ev = message_event("D9", "UBOB", text, &ts, false);
            let r = post_slack_event(s, &ev, SLACK_SECRET, unix_now()).await;
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    say("before").await;
    bob.say(BOT_NICK, "before").await.unwrap();

    // Replies on each platform, as the people see them.
    let replies = || async {
        let matrix: Vec<String> = ada
            .messages(&room)
            .await
            .unwrap_or_default()
            .iter()
            .filter(|e| e["sender"] == bot.user_id.as_str())
            .map(|e| body(e).to_owned())
            .collect();
        vec![
            (
                "telegram",
                tg.sent_to(900)
                    .into_iter()
                    .map(|m| m.text)
                    .collect::<Vec<_>>(),
            ),
            (
                "discord",
                dc.sent_to("900").into_iter().map(|m| m.1).collect(),
            ),
            (
                "slack",
                slack.posted_to("D9").into_iter().map(|m| m.1).collect(),
            ),
            (
                "signal",
                sig.sent_to(ADA).into_iter().map(|m| m.1).collect(),
            ),
            ("matrix", matrix),
        ]
    };
    let answered = |n: usize| {
        let replies = &replies;
        async move { replies().await.iter().all(|(_, r)| r.len() >= n) }
    };
    assert!(
        wait_for(Duration::from_secs(30), || answered(1)).await,
        "{:?}",
        replies().await
    );
    assert!(bob
        .wait_from(BOT_NICK, Duration::from_secs(30), |t| t == "Echo: before")
        .await
        .is_some());

    // The next answers are being written when every platform goes away.
    s.emu().hold();
    say("during").await;
    bob.say(BOT_NICK, "during").await.unwrap();
    let asked = wait_for(Duration::from_secs(30), || async { s.emu().held() >= 6 }).await;
    assert!(asked, "{} turns held", s.emu().held());
    let metrics_url = format!("{}/metrics", s.replica_admin_url((Service::Channels, 0)));
    let page = s.get_text(&metrics_url).await;
    let before: Vec<f64> = CHANNELS.iter().map(|c| errors(&page, c)).collect();
    let down_at = Instant::now();
    for n in nets {
        n.set_down(true);
    }
    irc.stop();
    drop(bob);
    s.emu().release();
    // People go on writing where the platform keeps their messages for the bot.
    say("while down").await;

    // A minute, in which every adapter found its platform gone.
    let noticed = wait_for(OUTAGE + Duration::from_secs(30), || async {
        let page = s.get_text(&metrics_url).await;
        down_at.elapsed() >= OUTAGE
            && CHANNELS
                .iter()
                .zip(&before)
                .all(|(c, b)| errors(&page, c) > *b)
    })
    .await;
    let page = s.get_text(&metrics_url).await;
    assert!(noticed, "an adapter never noticed the outage: {page}");
    assert!(
        replies().await.iter().all(|(_, r)| r.len() == 1),
        "a reply got through the outage: {:?}",
        replies().await
    );

    // Back: everything arrives, once, in order.
    for n in nets {
        n.set_down(false);
    }
    irc.restart().await.unwrap();
    let bob = IrcClient::connect(&irc.addr(), "bob").await.unwrap();
    let want = ["Echo: before", "Echo: during", "Echo: while down"];
    let up_at = Instant::now();
    let delivered = wait_for(Duration::from_secs(90), || answered(3)).await;
    let got = replies().await;
    eprintln!(
        "Everything delivered {:.1} s after the platforms came back",
        up_at.elapsed().as_secs_f64()
    );
    assert!(
        delivered,
        "not everything arrived after the outage: {got:?}"
    );
    for (platform, r) in &got {
        assert_eq!(r, &want, "{platform}");
    }
    let irc_reply = bob
        .wait_from(BOT_NICK, Duration::from_secs(60), |t| t == "Echo: during")
        .await;
    assert!(irc_reply.is_some(), "IRC: {:?}", bob.lines());
    let asked = clawbus_tests::last_asked(&s);
    for (text, times) in [("before", 6), ("during", 6), ("while down", 5)] {
        assert_eq!(
            asked.iter().filter(|a| *a == text).count(),
            times,
            "`{text}` asked of the model: {asked:?}"
        );
    }
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    assert!(
        clawbus_tests::stream_is_empty(&js, "CLAW_DLQ").await,
        "a reply went to the dead letters"
    );
    assert!(bob
        .privmsgs()
        .iter()
        .filter(|m| m.0 == BOT_NICK)
        .all(|m| m.2 == "Echo: during"));
}
