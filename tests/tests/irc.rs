//! The channels service's IRC adapter against a real IRC server (ngircd) and a real IRC
//! client, with every service of the suite as a real process: pairing, channel mention
//! gating, NickServ identification, long replies cut into lines, the server going away
//! and coming back, the channels process killed mid-reply (every line once), a taken
//! nick and taking it back.

use std::time::Duration;

use clawbus_testkit::irc::{IrcClient, IrcServer};
use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts};

const BOT: &str = "clawbot";

async fn suite(server: &IrcServer, extra: &[(&str, &str)]) -> Suite {
    let addr = server.addr();
    let env = [
        ("CLAWBUS__CHANNELS__IRC__SERVER", addr.as_str()),
        ("CLAWBUS__CHANNELS__IRC__TLS", "false"),
        ("CLAWBUS__CHANNELS__IRC__NICK", BOT),
        ("CLAWBUS__CHANNELS__IRC__JOIN", "[\"#family\"]"),
    ];
    clawbus_tests::channel_suite(&env, extra).await
}

/// Waits until the bot is in `#family` (seen from `client`, who joined it: the bot
/// joining after it, or in the channel's names list when it was there first).
async fn bot_joined(client: &IrcClient) {
    let ok = client.wait_joined(BOT, Duration::from_secs(30)).await;
    assert!(ok, "the bot never joined: {:?}", client.lines());
}

#[tokio::test]
async fn a_stranger_pairs_then_talks_to_the_agent_in_private() {
    let server = IrcServer::start().await.unwrap();
    let s = suite(&server, &[]).await;
    let ada = IrcClient::connect(&server.addr(), "ada").await.unwrap();
    ada.join("#family").await.unwrap();
    bot_joined(&ada).await;
    ada.say(BOT, "hello?").await.unwrap();
    let (_, target, _) = ada
        .wait_from(BOT, Duration::from_secs(30), |t| {
            t.starts_with("Your pairing code: ")
        })
        .await
        .unwrap_or_else(|| panic!("no pairing code: {:?}", ada.lines()));
    assert_eq!(target, "ada");
    assert!(s.emu().requests().is_empty(), "nothing reached the agent");
    let said: Vec<String> = ada.privmsgs().into_iter().map(|m| m.2).collect();
    clawbus_tests::approve_pairing(&s, "irc", &said.join("\n")).await;
    ada.say(BOT, "what is the plan?").await.unwrap();
    let reply = ada
        .wait_from(BOT, Duration::from_secs(30), |t| t.starts_with("Echo:"))
        .await
        .unwrap_or_else(|| panic!("no reply: {:?}", ada.privmsgs()));
    assert_eq!(reply.2, "Echo: what is the plan?");
}

#[tokio::test]
async fn in_a_channel_only_messages_addressed_to_the_bot_are_answered() {
    let server = IrcServer::start().await.unwrap();
    let s = suite(&server, &[("CLAWBUS__CHANNELS__IRC__GROUP_POLICY", "open")]).await;
    let ada = IrcClient::connect(&server.addr(), "ada").await.unwrap();
    ada.join("#family").await.unwrap();
    bot_joined(&ada).await;
    ada.say("#family", "anyone seen the keys?").await.unwrap();
    ada.say("#family", &format!("{BOT}: where are the keys?"))
        .await
        .unwrap();
    // The answer comes as lines in the channel: the context, then the question.
    let reply = ada
        .wait_from(BOT, Duration::from_secs(30), |t| {
            t.contains("where are the keys?")
        })
        .await
        .unwrap_or_else(|| panic!("no reply: {:?}", ada.privmsgs()));
    assert_eq!(reply.1, "#family");
    assert!(ada
        .privmsgs()
        .iter()
        .all(|(f, t, _)| f != BOT || t == "#family"));
    // One model call: the unaddressed line came along as context.
    assert_eq!(s.emu().requests().len(), 1);
    assert!(s.emu().requests()[0]
        .to_string()
        .contains("anyone seen the keys?"));
}

#[tokio::test]
async fn the_bot_identifies_to_nickserv_and_long_replies_come_as_lines() {
    let server = IrcServer::start().await.unwrap();
    // NickServ is a service on real networks; here a client of that name records what
    // the bot tells it.
    let nickserv = IrcClient::connect(&server.addr(), "NickServ")
        .await
        .unwrap();
    let _s = suite(
        &server,
        &[
            ("CLAWBUS__CHANNELS__IRC__NICKSERV_PASSWORD", "s3cret-pass"),
            ("CLAWBUS__CHANNELS__IRC__DM_POLICY", "open"),
        ],
    )
    .await;
    let identified = nickserv
        .wait_from(BOT, Duration::from_secs(30), |t| {
            t == "IDENTIFY s3cret-pass"
        })
        .await;
    assert!(identified.is_some(), "{:?}", nickserv.lines());
    let bob = IrcClient::connect(&server.addr(), "bob").await.unwrap();
    // A long answer (IRC users cannot send long lines, so the model writes at length).
    let ask = "repeat 3000 alpha beta gamma delta epsilon";
    let expected = clawbus_testkit::emulator::reply_for(&[
        serde_json::json!({"role": "user", "content": ask}),
    ]);
    bob.say(BOT, ask).await.unwrap();
    let said = || -> Vec<String> {
        bob.privmsgs()
            .into_iter()
            .filter(|(f, _, _)| f == BOT)
            .map(|m| m.2)
            .collect()
    };
    let want: Vec<&str> = expected.split_whitespace().collect();
    let done = wait_for(Duration::from_secs(60), || async {
        said().join(" ").split_whitespace().count() >= want.len()
    })
    .await;
    assert!(done, "{:?}", said());
    let lines = said();
    assert!(lines.len() >= 8, "{} lines", lines.len());
    let got = lines.join(" ");
    assert_eq!(
        got.split_whitespace().collect::<Vec<_>>(),
        want,
        "every word once, in order"
    );
    // IRC lines stay within 512 bytes as the server relays them.
    for l in bob.lines() {
        assert!(l.len() + 2 <= 512, "{} bytes", l.len());
    }
}

#[tokio::test]
async fn the_server_going_away_and_coming_back_loses_no_reply() {
    let mut server = IrcServer::start().await.unwrap();
    let s = suite(&server, &[("CLAWBUS__CHANNELS__IRC__DM_POLICY", "open")]).await;
    let ada = IrcClient::connect(&server.addr(), "ada").await.unwrap();
    ada.join("#family").await.unwrap();
    bot_joined(&ada).await;
    // A turn is running when the server dies; its reply waits for the bot to be back.
    s.emu().hold();
    ada.say(BOT, "remember the milk").await.unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || async {
            !s.emu().requests().is_empty()
        })
        .await
    );
    server.restart().await.unwrap();
    s.emu().release();
    let ada = IrcClient::connect(&server.addr(), "ada").await.unwrap();
    let reply = ada
        .wait_from(BOT, Duration::from_secs(60), |t| t.starts_with("Echo:"))
        .await
        .unwrap_or_else(|| panic!("no reply after the restart: {:?}", ada.lines()));
    assert_eq!(reply.2, "Echo: remember the milk");
    // And the bot talks again afterwards.
    ada.say(BOT, "still there?").await.unwrap();
    assert!(ada
        .wait_from(BOT, Duration::from_secs(30), |t| t == "Echo: still there?")
        .await
        .is_some());
    let page = s
        .get_text(&format!(
            "{}/metrics",
            s.replica_admin_url((Service::Channels, 0))
        ))
        .await;
    assert!(page.contains("clawbus_channels_platform_errors_total{account=\"default\",channel=\"irc\",reason=\"connection\"}"), "{page}");
}

#[tokio::test]
async fn the_bot_connects_with_tls_trusting_only_what_it_is_told() {
    let server = IrcServer::start_tls().await.unwrap();
    let (tls_port, ca) = server.tls.clone().unwrap();
    let tls_addr = format!("127.0.0.1:{tls_port}");
    // Without the network's CA the certificate is refused: the account stays down.
    let s = Suite::start(SuiteOpts {
        env: vec![
            ("CLAWBUS__CHANNELS__IRC__SERVER".into(), tls_addr.clone()),
            ("CLAWBUS__CHANNELS__IRC__NICK".into(), BOT.into()),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let metrics = format!("{}/metrics", s.replica_admin_url((Service::Channels, 0)));
    let refused = wait_for(Duration::from_secs(20), || async {
        s.get_text(&metrics)
            .await
            .contains("clawbus_channels_platform_errors_total{account=\"default\",channel=\"irc\",reason=\"connection\"}")
    })
    .await;
    assert!(refused, "{}", s.get_text(&metrics).await);
    drop(s);
    // With it, the bot talks over TLS.
    let s = suite(
        &server,
        &[
            ("CLAWBUS__CHANNELS__IRC__SERVER", tls_addr.as_str()),
            ("CLAWBUS__CHANNELS__IRC__TLS", "true"),
            ("CLAWBUS__CHANNELS__IRC__TLS_CA_FILE", ca.to_str().unwrap()),
            ("CLAWBUS__CHANNELS__IRC__DM_POLICY", "open"),
        ],
    )
    .await;
    let ada = IrcClient::connect(&server.addr(), "ada").await.unwrap();
    ada.join("#family").await.unwrap();
    bot_joined(&ada).await;
    ada.say(BOT, "over tls?").await.unwrap();
    let reply = ada
        .wait_from(BOT, Duration::from_secs(30), |t| t.starts_with("Echo:"))
        .await
        .unwrap_or_else(|| panic!("no reply: {:?}", ada.lines()));
    assert_eq!(reply.2, "Echo: over tls?");
    drop(s);
}

/// Reply pieces recorded as sent on IRC (keys of `claw_deliveries`).
async fn recorded(s: &Suite) -> usize {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let kv = js.get_key_value("claw_deliveries").await.unwrap();
    let mut n = 0;
    let mut keys = kv.keys().await.unwrap();
    while let Some(Ok(k)) = keys.next().await {
        n += usize::from(k.starts_with("irc.default."));
    }
    n
}

#[tokio::test]
async fn channels_killed_while_sending_a_long_reply_sends_every_line_once() {
    let server = IrcServer::start().await.unwrap();
    let mut s = suite(&server, &[("CLAWBUS__CHANNELS__IRC__DM_POLICY", "open")]).await;
    let bob = IrcClient::connect(&server.addr(), "bob").await.unwrap();
    bob.join("#family").await.unwrap();
    bot_joined(&bob).await;
    // About 9,000 bytes: some 26 lines, paced at 400 ms after the first five.
    bob.say(BOT, "count 1500").await.unwrap();
    // The restarted bot may come back as `clawbot_` while the server still holds the
    // killed connection (ngircd reads a client that sent much only slowly): the
    // reply is the bot's under either nick.
    let from_bot = || -> Vec<String> {
        bob.privmsgs()
            .into_iter()
            .filter(|m| m.0.trim_end_matches('_') == BOT)
            .map(|m| m.2)
            .collect()
    };
    let started = wait_for(Duration::from_secs(30), || async { from_bot().len() >= 8 }).await;
    assert!(started, "{:?}", bob.lines());
    // Kill the process mid-reply at a moment when no line is between written and
    // recorded (IRC has no idempotency key: a line in that instant would come twice,
    // as the README says): stopped, every line it wrote has reached bob, and as many
    // are recorded. Otherwise let it go on a line and look again.
    let channels = (Service::Channels, 0);
    let mut killed = false;
    for _ in 0..20 {
        s.pause_replica(channels, true).unwrap();
        bob.sync().await.unwrap();
        let seen = from_bot().len();
        if recorded(&s).await == seen {
            s.kill9_replica(channels).await.unwrap();
            killed = true;
            break;
        }
        s.pause_replica(channels, false).unwrap();
        assert!(
            wait_for(Duration::from_secs(10), || async {
                from_bot().len() > seen
            })
            .await
        );
    }
    assert!(killed, "never found the process between two lines");
    let before = from_bot();
    assert!(
        !before.iter().any(|l| l.contains("w1499")),
        "the reply was complete before the kill"
    );
    s.restart(Service::Channels).await.unwrap();
    let done = wait_for(Duration::from_secs(60), || async {
        from_bot().iter().any(|l| l.contains("w1499"))
    })
    .await;
    let lines = bob.lines();
    assert!(
        done,
        "the reply was not completed after the restart; bob's last lines: {:?}",
        &lines[lines.len().saturating_sub(6)..]
    );
    let after = from_bot();
    assert!(after.len() > before.len());
    clawbus_tests::assert_each_word_once(&after, 1500);
}

#[tokio::test]
async fn a_bot_whose_nick_is_taken_uses_another_and_takes_its_own_back_when_free() {
    let server = IrcServer::start().await.unwrap();
    let squatter = IrcClient::connect(&server.addr(), BOT).await.unwrap();
    let _s = suite(&server, &[("CLAWBUS__CHANNELS__IRC__DM_POLICY", "open")]).await;
    let ada = IrcClient::connect(&server.addr(), "ada").await.unwrap();
    ada.join("#family").await.unwrap();
    let alt = format!("{BOT}_");
    let joined = ada.wait_joined(&alt, Duration::from_secs(30)).await;
    assert!(joined, "the bot did not come as {alt}: {:?}", ada.lines());
    ada.say(&alt, "who are you?").await.unwrap();
    assert!(ada
        .wait_from(&alt, Duration::from_secs(30), |t| t == "Echo: who are you?")
        .await
        .is_some());
    // The nick comes free: the bot takes it back (it asks every 15 s).
    drop(squatter);
    let renamed = wait_for(Duration::from_secs(40), || async {
        ada.lines()
            .iter()
            .any(|l| l.starts_with(&format!(":{alt}!")) && l.ends_with(&format!("NICK :{BOT}")))
    })
    .await;
    assert!(renamed, "{:?}", ada.lines());
    ada.say(BOT, "and now?").await.unwrap();
    assert!(ada
        .wait_from(BOT, Duration::from_secs(30), |t| t == "Echo: and now?")
        .await
        .is_some());
}

#[tokio::test]
async fn a_reply_with_code_comes_as_one_line_per_code_line() {
    let server = IrcServer::start().await.unwrap();
    let _s = suite(
        &server,
        &[
            ("CLAWBUS__CHANNELS__IRC__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__IRC__TEXT_CHUNK_LIMIT", "100"),
        ],
    )
    .await;
    let bob = IrcClient::connect(&server.addr(), "bob").await.unwrap();
    bob.join("#family").await.unwrap();
    bot_joined(&bob).await;
    // Pieces of at most 100 characters: the code block is cut (and closed and opened
    // again) several times; each of its lines still comes whole.
    bob.say(BOT, "code 20").await.unwrap();
    let end = bob
        .wait_from(BOT, Duration::from_secs(60), |t| t == "The end.")
        .await;
    assert!(end.is_some(), "{:?}", bob.lines());
    let lines: Vec<String> = bob
        .privmsgs()
        .into_iter()
        .filter(|m| m.0 == BOT)
        .map(|m| m.2)
        .collect();
    assert!(lines.iter().all(|l| !l.contains("```")), "{lines:?}");
    clawbus_tests::assert_code_lines_once(&lines, 20);
}
