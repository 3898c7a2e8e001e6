//! Channel accounts under hostile platforms and rolling changes, every service a real
//! process: a platform event the adapter cannot read is dead-lettered with its raw
//! bytes and passed (the bot keeps answering), and replicas configured with different
//! account lists run every account exactly once.

use std::time::Duration;

use clawbus_testkit::telegram::TelegramEmulator;
use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts};

const TOKEN: &str = "123456:test-token";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn metrics(s: &Suite, replica: usize) -> String {
    s.get_text(&format!(
        "{}/metrics",
        s.replica_admin_url((Service::Channels, replica))
    ))
    .await
}

/// The value of the metric line starting with `series` (0 when absent).
fn metric(page: &str, series: &str) -> i64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The dead letters, read by sequence as the operator reads them.
async fn dead_letters(s: &Suite) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let operator = s
        .connect_as("operator", s.password("operator"))
        .await
        .unwrap();
    let mut dlq = async_nats::jetstream::new(operator)
        .get_stream("CLAW_DLQ")
        .await
        .unwrap();
    let state = dlq.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = dlq.direct_get(seq).await {
            out.push(m);
        }
    }
    out
}

#[tokio::test]
async fn unreadable_telegram_updates_are_dead_lettered_and_the_bot_answers_the_next() {
    let tg = TelegramEmulator::start(TOKEN).await.unwrap();
    let s = Suite::start(SuiteOpts {
        env: env(&[
            ("TELEGRAM_BOT_TOKEN", TOKEN),
            ("CLAWBUS__CHANNELS__TELEGRAM__API_ROOT", &tg.api_root()),
            ("CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__TELEGRAM__POLL_TIMEOUT_SECS", "2"),
        ]),
        // The channels service as its own NATS user: it may park what it cannot read.
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let chat = r#"{"id":700,"type":"private","first_name":"Eve"}"#;
    let hostile = [
        // A lone surrogate: no JSON library reads it as text.
        format!(r#"{{"message_id":1,"chat":{chat},"text":"hi \ud800 there"}}"#),
        // A negative entity offset.
        format!(
            r#"{{"message_id":2,"chat":{chat},"text":"hi","entities":[{{"type":"bold","offset":-1,"length":1}}]}}"#
        ),
        // A field of the wrong type.
        format!(r#"{{"message_id":"three","chat":{chat},"text":"hi"}}"#),
    ];
    let ids: Vec<i64> = hostile.iter().map(|m| tg.push_raw(m)).collect();
    tg.dm(701, "after the hostile ones");
    let sent = clawbus_tests::wait_count("replies", 1, || tg.sent_to(701)).await;
    assert_eq!(sent[0].text, "Echo: after the hostile ones");
    // Each is parked with its raw bytes and its update id.
    let parked = dead_letters(&s).await;
    assert_eq!(parked.len(), 3, "{parked:?}");
    for (p, (id, raw)) in parked.iter().zip(ids.iter().zip(&hostile)) {
        assert_eq!(p.subject.as_str(), "claw.v1.dlq.channels");
        let h = &p.headers;
        assert_eq!(
            h.get("Clawbus-Dlq-Event-Id").unwrap().as_str(),
            id.to_string()
        );
        assert!(h.get("Clawbus-Dlq-Reason").is_some());
        let want = format!(r#"{{"update_id":{id},"message":{raw}}}"#);
        assert_eq!(std::str::from_utf8(&p.payload).unwrap(), want);
    }
    // The offset moved past them: nothing is asked again, the account stays up.
    let passed = wait_for(Duration::from_secs(10), || async { tg.unconfirmed() == 0 }).await;
    assert!(passed, "{} updates left unconfirmed", tg.unconfirmed());
    let page = metrics(&s, 0).await;
    let labels = r#"{account="default",channel="telegram"}"#;
    assert_eq!(
        metric(
            &page,
            &format!("clawbus_channels_unreadable_events_total{labels}")
        ),
        3
    );
    assert_eq!(
        metric(&page, &format!("clawbus_channels_account_up{labels}")),
        1
    );
    assert_eq!(
        metric(
            &page,
            r#"clawbus_channels_platform_errors_total{account="default",channel="telegram",reason="poll"}"#
        ),
        0
    );
}

#[tokio::test]
async fn replicas_with_different_account_lists_run_every_bot_once() {
    // Four bots, each its own Telegram; replica 0 knows a, b, c and replica 1 b, c, d
    // (a rolling change that removes a and adds d): every account's position differs
    // between the two lists.
    let names = ["a", "b", "c", "d"];
    let mut bots = Vec::new();
    for n in names {
        bots.push(
            TelegramEmulator::start(&format!("100{n}:token-{n}"))
                .await
                .unwrap(),
        );
    }
    let account = |i: usize| -> Vec<(String, String)> {
        let n = names[i];
        let key = format!(
            "CLAWBUS__CHANNELS__TELEGRAM__ACCOUNTS__{}",
            n.to_uppercase()
        );
        vec![
            (format!("{key}__BOT_TOKEN"), format!("100{n}:token-{n}")),
            (format!("{key}__API_ROOT"), bots[i].api_root()),
        ]
    };
    let mut replica_env = Vec::new();
    for (replica, accounts) in [(0, [0, 1, 2]), (1, [1, 2, 3])] {
        for i in accounts {
            for (k, v) in account(i) {
                replica_env.push(((Service::Channels, replica), k, v));
            }
        }
    }
    let s = Suite::start(SuiteOpts {
        env: env(&[
            ("CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__TELEGRAM__POLL_TIMEOUT_SECS", "2"),
        ]),
        replicas: 2,
        replica_env,
        ..Default::default()
    })
    .await
    .unwrap();
    // Every bot answers, a (only on replica 0) and d (only on replica 1) included.
    for (i, bot) in bots.iter().enumerate() {
        bot.dm(800 + i as i64, &format!("hello {}", names[i]));
    }
    for (i, bot) in bots.iter().enumerate() {
        let chat = 800 + i as i64;
        let sent = clawbus_tests::wait_count("replies", 1, || bot.sent_to(chat)).await;
        assert_eq!(sent[0].text, format!("Echo: hello {}", names[i]));
    }
    // Settled: the two replicas hold the four accounts between them.
    let owned = |page: &str| metric(page, "clawbus_channels_accounts_owned ");
    let settled = wait_for(Duration::from_secs(30), || async {
        owned(&metrics(&s, 0).await) + owned(&metrics(&s, 1).await) == 4
    })
    .await;
    assert!(
        settled,
        "accounts owned: {} + {}",
        owned(&metrics(&s, 0).await),
        owned(&metrics(&s, 1).await)
    );
    // From now on one poller per bot: a second would end the first's long poll with
    // 409 Conflict (as Telegram does), counted by the bot's emulator.
    let before: Vec<(u64, u64)> = bots.iter().map(|b| (b.conflicts(), b.polls())).collect();
    let polled = wait_for(Duration::from_secs(30), || async {
        bots.iter()
            .zip(&before)
            .all(|(b, (_, polls))| b.polls() >= polls + 4)
    })
    .await;
    assert!(polled, "a bot stopped polling");
    for ((bot, (conflicts, _)), name) in bots.iter().zip(&before).zip(names) {
        assert_eq!(
            bot.conflicts(),
            *conflicts,
            "bot {name} was polled by two replicas at once"
        );
        assert!(bot.waiting_polls() <= 1, "bot {name}: two polls waiting");
    }
    // And each message was answered once.
    for (i, bot) in bots.iter().enumerate() {
        bot.dm(800 + i as i64, "again");
        let sent = clawbus_tests::wait_count("replies", 2, || bot.sent_to(800 + i as i64)).await;
        assert_eq!(sent.len(), 2, "bot {}: {sent:?}", names[i]);
    }
}

#[tokio::test]
async fn an_unreadable_discord_event_is_dead_lettered_and_the_bot_answers_the_next() {
    use clawbus_testkit::discord::DiscordEmulator;
    let token = "MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.test-token";
    let dc = DiscordEmulator::start(token).await.unwrap();
    let s = Suite::start(SuiteOpts {
        env: env(&[
            ("CLAWBUS__CHANNELS__DISCORD__BOT_TOKEN", token),
            ("CLAWBUS__CHANNELS__DISCORD__API_ROOT", &dc.api_root()),
            ("CLAWBUS__CHANNELS__DISCORD__DM_POLICY", "open"),
        ]),
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let linked = wait_for(Duration::from_secs(30), || async { dc.linked() }).await;
    assert!(linked, "the bot never connected");
    let hostile = r#"{"id":"90","channel_id":"600","content":"\ud800","author":{"id":"7","username":"eve"},"type":0}"#;
    let seq = dc.dispatch_raw("MESSAGE_CREATE", hostile);
    dc.say("600", None, "7", "after the hostile one", false);
    let sent = clawbus_tests::wait_count("replies", 1, || dc.sent_to("600")).await;
    assert_eq!(sent[0].1, "Echo: after the hostile one");
    let parked = dead_letters(&s).await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(
        parked[0]
            .headers
            .get("Clawbus-Dlq-Event-Id")
            .unwrap()
            .as_str(),
        seq.to_string()
    );
    let want = format!(r#"{{"op":0,"t":"MESSAGE_CREATE","s":{seq},"d":{hostile}}}"#);
    assert_eq!(std::str::from_utf8(&parked[0].payload).unwrap(), want);
    let page = metrics(&s, 0).await;
    assert_eq!(
        metric(
            &page,
            r#"clawbus_channels_unreadable_events_total{account="default",channel="discord"}"#
        ),
        1
    );
    // The link was never dropped over it.
    assert_eq!(dc.logins().1, 0, "the bot resumed: {:?}", dc.logins());
}

/// Waits until the account of `channel` is up on replica 0 (its platform connection
/// made), so events sent from now on reach it.
async fn wait_up(s: &Suite, channel: &str) {
    let series = format!(r#"clawbus_channels_account_up{{account="default",channel="{channel}"}}"#);
    let up = wait_for(Duration::from_secs(30), || async {
        metric(&metrics(s, 0).await, &series) == 1
    })
    .await;
    assert!(up, "the {channel} account never came up");
}

#[tokio::test]
async fn unreadable_signal_events_are_dead_lettered_and_the_bot_answers_the_next() {
    use clawbus_testkit::signal::SignalEmulator;
    let bot = "+15550000000";
    let sig = SignalEmulator::start(bot).await.unwrap();
    let url = sig.url();
    let s = Suite::start(SuiteOpts {
        env: env(&[
            ("CLAWBUS__CHANNELS__SIGNAL__HTTP_URL", &url),
            ("CLAWBUS__CHANNELS__SIGNAL__ACCOUNT", bot),
            ("CLAWBUS__CHANNELS__SIGNAL__DM_POLICY", "open"),
        ]),
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    wait_up(&s, "signal").await;
    let envelope = |text: &[u8]| -> Vec<u8> {
        let mut d = br#"{"envelope":{"sourceNumber":"+15552222222","timestamp":5,"dataMessage":{"timestamp":5,"message":""#.to_vec();
        d.extend_from_slice(text);
        d.extend_from_slice(br#""}},"account":"+15550000000"}"#);
        d
    };
    let hostile = [
        // Bytes that are not UTF-8 (signal-cli's stream was read lossily: they became
        // U+FFFD and the event was answered garbled, or skipped unseen).
        envelope(b"caf\xe9 \xff"),
        // A lone surrogate: no JSON library reads it as text (skipped unseen).
        envelope(br"hi \ud800 there"),
        // A message of the wrong type (skipped unseen).
        br#"{"envelope":{"sourceNumber":"+15552222222","timestamp":6,"dataMessage":{"timestamp":6,"message":{"text":"x"}}}}"#.to_vec(),
    ];
    let ids: Vec<i64> = hostile.iter().map(|d| sig.emit_raw(d)).collect();
    let after = "+15553333333";
    sig.dm(after, "after the hostile ones");
    let sent = clawbus_tests::wait_count("replies", 1, || sig.sent_to(after)).await;
    assert_eq!(sent[0].1, "Echo: after the hostile ones");
    assert!(
        sig.sent_to("+15552222222").is_empty(),
        "a hostile event was answered"
    );
    let parked = dead_letters(&s).await;
    assert_eq!(parked.len(), 3, "{parked:?}");
    for (p, (id, raw)) in parked.iter().zip(ids.iter().zip(&hostile)) {
        assert_eq!(p.subject.as_str(), "claw.v1.dlq.channels");
        let h = &p.headers;
        assert_eq!(
            h.get("Clawbus-Dlq-Event-Id").unwrap().as_str(),
            id.to_string()
        );
        assert!(h
            .get("Clawbus-Dlq-Reason")
            .unwrap()
            .as_str()
            .contains("Signal"));
        assert_eq!(
            &p.payload[..],
            &raw[..],
            "the raw bytes, as signal-cli sent them"
        );
    }
    let page = metrics(&s, 0).await;
    let labels = r#"{account="default",channel="signal"}"#;
    assert_eq!(
        metric(
            &page,
            &format!("clawbus_channels_unreadable_events_total{labels}")
        ),
        3
    );
    assert_eq!(
        metric(&page, &format!("clawbus_channels_account_up{labels}")),
        1
    );
}

#[tokio::test]
async fn irc_text_in_latin_1_is_read_as_latin_1() {
    use clawbus_testkit::irc::{IrcClient, IrcServer};
    let server = IrcServer::start().await.unwrap();
    let addr = server.addr();
    let _s = Suite::start(SuiteOpts {
        env: env(&[
            ("CLAWBUS__CHANNELS__IRC__SERVER", &addr),
            ("CLAWBUS__CHANNELS__IRC__TLS", "false"),
            ("CLAWBUS__CHANNELS__IRC__NICK", "clawbot"),
            ("CLAWBUS__CHANNELS__IRC__JOIN", "[\"#family\"]"),
            ("CLAWBUS__CHANNELS__IRC__GROUP_POLICY", "open"),
        ]),
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let ada = IrcClient::connect(&addr, "ada").await.unwrap();
    ada.join("#family").await.unwrap();
    assert!(ada.wait_joined("clawbot", Duration::from_secs(30)).await);
    // An old client's Latin-1, relayed by the server byte for byte (it was read as
    // UTF-8 lossily: "caf\u{fffd} cr\u{fffd}me").
    ada.say_bytes("#family", b"clawbot: caf\xe9 cr\xe8me \x80 5")
        .await
        .unwrap();
    let reply = ada
        .wait_from("clawbot", Duration::from_secs(30), |t| {
            t.starts_with("Echo:")
        })
        .await
        .unwrap_or_else(|| panic!("no reply: {:?}", ada.privmsgs()));
    assert!(reply.2.ends_with("café crème € 5"), "{reply:?}");
}

#[tokio::test]
async fn irc_lines_that_are_no_message_are_dead_lettered_and_the_connection_goes_on() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    // A server of our own: ngircd never relays a NUL, an overlong line or a line
    // without a command, but a hostile or broken server (or a bouncer) may send them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let s = Suite::start(SuiteOpts {
        env: env(&[
            ("CLAWBUS__CHANNELS__IRC__SERVER", &addr),
            ("CLAWBUS__CHANNELS__IRC__TLS", "false"),
            ("CLAWBUS__CHANNELS__IRC__NICK", "clawbot"),
            ("CLAWBUS__CHANNELS__IRC__DM_POLICY", "open"),
        ]),
        auth: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let (conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .expect("the bot never connected")
        .unwrap();
    let (r, mut w) = conn.into_split();
    let mut r = BufReader::new(r);
    async fn read_line(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Vec<u8> {
        let mut line = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), r.read_until(b'\n', &mut line))
            .await
            .expect("the bot said nothing")
            .unwrap();
        line
    }
    while !read_line(&mut r).await.starts_with(b"USER ") {}
    w.write_all(b":irc.test 001 clawbot :Welcome\r\n")
        .await
        .unwrap();
    let mut overlong = b":eve!e@h PRIVMSG clawbot :".to_vec();
    overlong.extend(std::iter::repeat_n(b'x', 20_000));
    overlong.extend_from_slice(b"\r\n");
    let hostile: Vec<Vec<u8>> = vec![
        b":eve!e@h PRIVMSG clawbot :a\0b\r\n".to_vec(),
        overlong.clone(),
        b":eve!e@h\r\n".to_vec(),
        b"@time=x\r\n".to_vec(),
        b":eve!e@h 12 clawbot :x\r\n".to_vec(),
    ];
    for h in &hostile {
        w.write_all(h).await.unwrap();
    }
    w.write_all(b":ada!a@h PRIVMSG clawbot :caf\xe9?\r\n")
        .await
        .unwrap();
    // Answered on the same connection: the bot never dropped it over them.
    loop {
        let l = read_line(&mut r).await;
        if l.starts_with(b"PRIVMSG ada :") {
            assert_eq!(l, "PRIVMSG ada :Echo: café?\r\n".as_bytes());
            break;
        }
    }
    let parked = dead_letters(&s).await;
    assert_eq!(parked.len(), hostile.len(), "{parked:?}");
    for (p, raw) in parked.iter().zip(&hostile) {
        assert_eq!(p.subject.as_str(), "claw.v1.dlq.channels");
        let reason = p.headers.get("Clawbus-Dlq-Reason").unwrap().as_str();
        assert!(reason.starts_with("not an IRC message"), "{reason}");
        // An overlong line is kept up to the limit of a line, the rest dropped.
        let kept = &raw[..raw.len().min(8191 + 512)];
        assert_eq!(&p.payload[..], kept);
    }
    let page = metrics(&s, 0).await;
    assert_eq!(
        metric(
            &page,
            r#"clawbus_channels_unreadable_events_total{account="default",channel="irc"}"#
        ),
        hostile.len() as i64
    );
}
