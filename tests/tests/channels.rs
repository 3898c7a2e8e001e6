//! The channels service against the Telegram Bot API emulator, with every service of
//! the suite as a real process: pairing, replies, mention gating, chunking with code
//! blocks intact, kill -9 while a reply is being delivered, the platform down, rate
//! limits.

use std::time::Duration;

use clawbus_testkit::telegram::{Sent, TelegramEmulator, BOT_USERNAME};
use clawbus_testkit::{wait_for, Service, Suite, SuiteOpts};

const TOKEN: &str = "123456:test-token";

async fn suite(extra: &[(&str, &str)]) -> (Suite, TelegramEmulator) {
    suite_with(extra, false).await
}

/// With `auth`, every service runs as its own NATS user with only its rights.
async fn suite_with(extra: &[(&str, &str)], auth: bool) -> (Suite, TelegramEmulator) {
    let tg = TelegramEmulator::start(TOKEN).await.unwrap();
    let mut env: Vec<(String, String)> = vec![
        ("TELEGRAM_BOT_TOKEN".into(), TOKEN.into()),
        (
            "CLAWBUS__CHANNELS__TELEGRAM__API_ROOT".into(),
            tg.api_root(),
        ),
        // Long polls short enough that a stopping replica lets go quickly.
        (
            "CLAWBUS__CHANNELS__TELEGRAM__POLL_TIMEOUT_SECS".into(),
            "2".into(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let s = Suite::start(SuiteOpts {
        env,
        auth,
        ..Default::default()
    })
    .await
    .unwrap();
    (s, tg)
}

/// Waits until the bot sent `n` messages to `chat`; them.
async fn wait_sent(tg: &TelegramEmulator, chat: i64, n: usize) -> Vec<Sent> {
    clawbus_tests::wait_count(&format!("messages to {chat}"), n, || tg.sent_to(chat)).await
}

fn open_dms() -> [(&'static str, &'static str); 1] {
    [("CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY", "open")]
}

#[tokio::test]
async fn a_stranger_gets_a_pairing_code_and_after_approval_the_agents_reply() {
    let (s, tg) = suite(&[]).await;
    tg.dm(501, "hello bot");
    let first = wait_sent(&tg, 501, 1).await;
    assert!(first[0].text.contains("pairing code"), "{}", first[0].text);
    assert!(s.emu().requests().is_empty(), "nothing reaches the agent");
    clawbus_tests::approve_pairing(&s, "telegram", &first[0].text).await;
    // The requester is told, then talks to the agent; the reply answers the message.
    wait_sent(&tg, 501, 2).await;
    let asked = tg.dm(501, "what is 2+2?");
    let sent = wait_sent(&tg, 501, 3).await;
    let reply = &sent[2];
    assert_eq!(reply.text, "Echo: what is 2+2?");
    assert_eq!(reply.parse_mode.as_deref(), Some("HTML"));
    assert_eq!(
        Some(reply.reply_to.unwrap().to_string()),
        asked.split(':').nth(1).map(str::to_owned)
    );
    // The offset moved past what was published: nothing is waiting unconfirmed.
    assert!(wait_for(Duration::from_secs(10), || async { tg.unconfirmed() == 0 }).await);
    // A typing indicator was shown while the turn ran.
    assert!(tg.chat_actions() >= 1);
}

#[tokio::test]
async fn a_group_message_needs_a_mention() {
    let (s, tg) = suite(&[("CLAWBUS__CHANNELS__TELEGRAM__GROUP_POLICY", "open")]).await;
    tg.group(-100, 7, "just chatting", false);
    tg.group(-100, 8, "what did they say?", true);
    let sent = wait_sent(&tg, -100, 1).await;
    assert_eq!(sent.len(), 1, "only the mention is answered: {sent:?}");
    // The unmentioned message came along as context, the mention was the question.
    let req = s.emu().requests();
    assert_eq!(req.len(), 1);
    let text = req[0].to_string();
    assert!(text.contains("just chatting"), "{text}");
    assert!(
        sent[0].text.contains("what did they say?"),
        "{}",
        sent[0].text
    );
    assert!(!text.contains(&format!("Echo: @{BOT_USERNAME}")), "{text}");
}

#[tokio::test]
async fn a_long_reply_with_code_arrives_in_chunks_with_its_fences_intact() {
    let (_s, tg) = suite(&open_dms()).await;
    let code: String = (0..400)
        .map(|i| format!("let value_{i} = {i} * 2; // <&>\n"))
        .collect();
    tg.dm(
        600,
        &format!("Please review:\n\n```rust\n{code}```\n\nThanks!"),
    );
    let ok = wait_for(Duration::from_secs(30), || async {
        tg.sent_to(600).iter().any(|m| m.text.contains("Thanks!"))
    })
    .await;
    assert!(
        ok,
        "the reply's end never arrived: {:?}",
        tg.sent_to(600).len()
    );
    let sent = tg.sent_to(600);
    assert!(sent.len() >= 4, "{} pieces", sent.len());
    let mut all = String::new();
    for m in &sent {
        // Each piece parses as Telegram HTML on its own, within Telegram's limit.
        let visible = clawbus_testkit::telegram::check_html(&m.text).unwrap();
        assert!(visible.chars().count() <= 4096);
        assert_eq!(
            m.text.matches("<pre>").count(),
            m.text.matches("</pre>").count()
        );
        all.push_str(&visible);
    }
    for i in 0..400 {
        assert_eq!(
            all.matches(&format!("let value_{i} = {i} * 2; // <&>"))
                .count(),
            1,
            "line {i}"
        );
    }
    // Only the first piece is a reply to the message.
    assert!(sent[0].reply_to.is_some() && sent[1..].iter().all(|m| m.reply_to.is_none()));
}

#[tokio::test]
async fn channels_killed_while_delivering_sends_every_piece_exactly_once() {
    // Under per-service NATS users: the channels user's rights are enough.
    let (mut s, tg) = suite_with(
        &[
            ("CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__TELEGRAM__TEXT_CHUNK_LIMIT", "200"),
        ],
        true,
    )
    .await;
    // A reply of many pieces: the first three go out, the fourth is held in flight.
    tg.hold_sends_after(3);
    let words = clawbus_tests::numbered_words(300);
    tg.dm(700, &words);
    assert!(wait_for(Duration::from_secs(30), || async { tg.held() >= 1 }).await);
    assert_eq!(tg.sent_to(700).len(), 3);
    let before = tg.sent_to(700).len();
    s.kill9_replica((Service::Channels, 0)).await.unwrap();
    // Telegram never took the held piece.
    tg.release_failing();
    s.restart(Service::Channels).await.unwrap();
    let all = wait_for(Duration::from_secs(60), || async {
        tg.sent_to(700).iter().any(|m| m.text.contains("w299"))
    })
    .await;
    assert!(all, "the reply was not completed after the restart");
    let sent = tg.sent_to(700);
    assert!(sent.len() > before);
    let texts: Vec<&str> = sent.iter().map(|m| m.text.as_str()).collect();
    clawbus_tests::assert_each_word_once(&texts, 300);
    let page = s
        .get_text(&format!(
            "{}/metrics",
            s.replica_admin_url((Service::Channels, 0))
        ))
        .await;
    assert!(
        page.contains("clawbus_channels_redelivered_pieces_skipped_total{account=\"default\",channel=\"telegram\"}"),
        "the restarted replica skipped the recorded pieces"
    );
}

#[tokio::test]
async fn the_platform_down_and_rate_limits_lose_nothing() {
    let (s, tg) = suite(&open_dms()).await;
    tg.dm(800, "before 1");
    tg.dm(800, "before 2");
    wait_sent(&tg, 800, 2).await;
    // Down: the poller cannot read and the replies cannot go; messages wait at the
    // platform, then everything arrives once, in order.
    tg.set_down(true);
    tg.dm(800, "while down 1");
    tg.dm(800, "while down 2");
    let metrics = format!("{}/metrics", s.replica_admin_url((Service::Channels, 0)));
    let failed_polls = || async {
        s.get_text(&metrics)
            .await
            .lines()
            .find(|l| {
                l.starts_with("clawbus_channels_platform_errors_total")
                    && l.contains("reason=\"poll\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        wait_for(Duration::from_secs(20), || async {
            failed_polls().await >= 2.0
        })
        .await
    );
    assert_eq!(tg.sent_to(800).len(), 2, "nothing got through while down");
    tg.set_down(false);
    let sent = wait_sent(&tg, 800, 4).await;
    assert_eq!(sent[2].text, "Echo: while down 1");
    assert_eq!(sent[3].text, "Echo: while down 2");
    // Rate limited: the reply waits for retry_after and arrives once.
    tg.rate_limit_sends(2);
    tg.dm(800, "limited");
    let sent = wait_sent(&tg, 800, 5).await;
    assert_eq!(sent[4].text, "Echo: limited");
    assert_eq!(sent.len(), 5);
}

#[tokio::test]
async fn an_account_with_a_refused_token_leaves_the_others_working() {
    let (s, tg) = {
        let tg = TelegramEmulator::start(TOKEN).await.unwrap();
        let root = tg.api_root();
        let s = Suite::start(SuiteOpts {
            env: vec![
                ("TELEGRAM_BOT_TOKEN".into(), TOKEN.into()),
                ("CLAWBUS__CHANNELS__TELEGRAM__API_ROOT".into(), root.clone()),
                (
                    "CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY".into(),
                    "open".into(),
                ),
                (
                    "CLAWBUS__CHANNELS__TELEGRAM__ACCOUNTS__BAD__BOT_TOKEN".into(),
                    "999:revoked".into(),
                ),
                (
                    "CLAWBUS__CHANNELS__TELEGRAM__ACCOUNTS__BAD__API_ROOT".into(),
                    root,
                ),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
        (s, tg)
    };
    tg.dm(900, "still here?");
    assert_eq!(wait_sent(&tg, 900, 1).await[0].text, "Echo: still here?");
    let metrics = format!("{}/metrics", s.replica_admin_url((Service::Channels, 0)));
    let page = || async { s.get_text(&metrics).await };
    let refused = wait_for(Duration::from_secs(20), || async {
        let p = page().await;
        p.contains("clawbus_channels_account_up{account=\"bad\",channel=\"telegram\"} 0")
            && p.contains(
                "clawbus_channels_platform_errors_total{account=\"bad\",channel=\"telegram\",reason=\"unauthorized\"}",
            )
    })
    .await;
    assert!(refused, "{}", page().await);
    assert!(page()
        .await
        .contains("clawbus_channels_account_up{account=\"default\",channel=\"telegram\"} 1"));
    // The token never reaches the logs.
    let log = std::fs::read_to_string(s.state.path().join("logs/channels.log")).unwrap();
    assert!(
        !log.contains("999:revoked") && !log.contains(TOKEN),
        "a token in the log"
    );
}

#[tokio::test]
async fn an_adapter_in_python_speaking_only_the_schemas_talks_to_the_agent() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let pytools = root.join(".tools/py");
    assert!(
        pytools.join("nats").exists(),
        "{} lacks nats-py: run `make setup`",
        pytools.display()
    );
    let (s, _dir) =
        clawbus_tests::suite_with_config("[channels.console]\ndm_policy = \"open\"\n").await;
    let receipts = s.state.path().join("console.receipts");
    let run = |input: &'static str| {
        let mut cmd = tokio::process::Command::new("python3");
        cmd.arg(root.join("examples/console_adapter.py"))
            .args(["--wait", "30", "--user", "ada", "--receipts"])
            .arg(&receipts)
            .env("PYTHONPATH", &pytools)
            .env("NATS_URL", &s.nats.url)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        async move {
            use tokio::io::AsyncWriteExt;
            let mut child = cmd.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.as_bytes()).await.unwrap();
            drop(stdin);
            let out = child.wait_with_output().await.unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(out.status.success(), "adapter failed: {stderr}");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let lines = run("hello from python\nsecond line\n").await;
    let texts: Vec<&str> = lines.iter().filter_map(|l| l["text"].as_str()).collect();
    assert_eq!(
        texts,
        ["Echo: hello from python", "Echo: second line"],
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l["last"] == true));
    // The router saw a console sender: the session is the agent's main one, and the
    // replies were recorded before they were acked.
    let recorded = std::fs::read_to_string(&receipts).unwrap();
    assert_eq!(recorded.lines().count(), 2, "{recorded}");
    // A second run resumes the same durable consumer and shows only new replies.
    let again = run("third\n").await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["text"], "Echo: third");
}

#[tokio::test]
async fn updates_by_webhook_need_the_secret_and_arrive_once() {
    let port = clawbus_testkit::free_port();
    let url = format!("http://127.0.0.1:{port}/tg/hook");
    let (s, tg) = suite(&[
        ("CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY", "open"),
        ("CLAWBUS__CHANNELS__TELEGRAM__WEBHOOK_URL", &url),
        (
            "CLAWBUS__CHANNELS__TELEGRAM__WEBHOOK_SECRET",
            "hook-secret-0123_1",
        ),
        (
            "CLAWBUS__CHANNELS__TELEGRAM__WEBHOOK_LISTEN",
            &format!("127.0.0.1:{port}"),
        ),
    ])
    .await;
    // The bot registered its webhook with the secret; Telegram now pushes updates.
    assert!(wait_for(Duration::from_secs(20), || async { tg.webhook().is_some() }).await);
    assert_eq!(
        tg.webhook().unwrap(),
        (url.clone(), "hook-secret-0123_1".to_owned())
    );
    let listening = wait_for(Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    assert!(listening);
    tg.dm(950, "pushed to me");
    assert_eq!(wait_sent(&tg, 950, 1).await[0].text, "Echo: pushed to me");
    // Hostile calls: no secret, a wrong one, garbage, too large; none reaches the agent.
    // Garbage with the secret came from Telegram: parked in the dead letters and
    // confirmed (200), or Telegram would hold back the updates after it.
    let update = serde_json::json!({"update_id": 1, "message": {"message_id": 1, "date": 1,
        "text": "forged", "chat": {"id": 951, "type": "private"}, "from": {"id": 951, "first_name": "X"}}});
    // A connection per call: the listener closes one after refusing an oversized body.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for (secret, body, want) in [
        (None, update.to_string(), 401),
        (Some("hook-secret-0123_2"), update.to_string(), 401),
        (Some("hook-secret-0123_1x"), update.to_string(), 401),
        (Some("hook-secret-0123_1"), "{not json".to_owned(), 200),
    ] {
        let mut r = http
            .post(&url)
            .body(body)
            .header("content-type", "application/json");
        if let Some(sec) = secret {
            r = r.header("X-Telegram-Bot-Api-Secret-Token", sec);
        }
        assert_eq!(
            r.send().await.unwrap().status().as_u16(),
            want,
            "{secret:?}"
        );
    }
    // Too large: refused from its Content-Length before a byte of it is read. (Sent
    // whole, the refusal races the client still writing, which may then see its
    // connection closed instead of the answer.)
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let head = format!(
            "POST /tg/hook HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
             x-telegram-bot-api-secret-token: hook-secret-0123_1\r\ncontent-length: {}\r\n\r\n",
            2 << 20
        );
        c.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 64];
        let n = c.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    // Telegram delivering the same update twice (it retries): one turn.
    for _ in 0..2 {
        let r = http
            .post(&url)
            .header("X-Telegram-Bot-Api-Secret-Token", "hook-secret-0123_1")
            .json(&serde_json::json!({"update_id": 2, "message": {"message_id": 77, "date": 1,
                "text": "twice", "chat": {"id": 952, "type": "private"}, "from": {"id": 952, "first_name": "Y"}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    wait_sent(&tg, 952, 1).await;
    // A later message of the same chat runs after any copy would have.
    tg.dm(952, "after");
    assert_eq!(wait_sent(&tg, 952, 2).await[1].text, "Echo: after");
    assert!(tg.sent_to(951).is_empty(), "a forged update got through");
    // The model was asked "twice" once (the last message of each call).
    let last: Vec<String> = clawbus_tests::last_asked(&s);
    assert_eq!(last.iter().filter(|m| *m == "twice").count(), 1, "{last:?}");
    assert!(!last.iter().any(|m| m.contains("forged")));
}

#[tokio::test]
async fn a_killed_replica_s_account_moves_to_another_and_loses_nothing() {
    let tg = TelegramEmulator::start(TOKEN).await.unwrap();
    let mut s = Suite::start(SuiteOpts {
        env: vec![
            ("TELEGRAM_BOT_TOKEN".into(), TOKEN.into()),
            (
                "CLAWBUS__CHANNELS__TELEGRAM__API_ROOT".into(),
                tg.api_root(),
            ),
            (
                "CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY".into(),
                "open".into(),
            ),
            (
                "CLAWBUS__CHANNELS__TELEGRAM__POLL_TIMEOUT_SECS".into(),
                "2".into(),
            ),
        ],
        replicas: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    // Which replica holds the account.
    let holder = {
        let mut found = None;
        let ok = wait_for(Duration::from_secs(30), || async {
            for i in 0..2 {
                let page = s
                    .get_text(&format!(
                        "{}/metrics",
                        s.replica_admin_url((Service::Channels, i))
                    ))
                    .await;
                if page.contains("clawbus_channels_accounts_owned 1") {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(ok, "no replica took the account");
        for i in 0..2 {
            let page = s
                .get_text(&format!(
                    "{}/metrics",
                    s.replica_admin_url((Service::Channels, i))
                ))
                .await;
            if page.contains("clawbus_channels_accounts_owned 1") {
                found = Some(i);
            }
        }
        found.unwrap()
    };
    tg.dm(1200, "before");
    wait_sent(&tg, 1200, 1).await;
    clawbus_tests::wait_recorded(&s, 1).await;
    s.kill9_replica((Service::Channels, holder)).await.unwrap();
    // Written while nobody holds the account: the other replica takes it (its lease
    // expires within seconds) and resumes from the committed offset.
    tg.dm(1200, "during");
    tg.dm(1200, "after");
    let other = 1 - holder;
    let ok = wait_for(Duration::from_secs(30), || async {
        tg.sent_to(1200).len() >= 3
    })
    .await;
    assert!(
        ok,
        "the account did not move within 30 s: {:?}",
        tg.sent_to(1200)
    );
    let texts: Vec<String> = tg.sent_to(1200).into_iter().map(|m| m.text).collect();
    assert_eq!(texts, ["Echo: before", "Echo: during", "Echo: after"]);
    let page = s
        .get_text(&format!(
            "{}/metrics",
            s.replica_admin_url((Service::Channels, other))
        ))
        .await;
    assert!(page.contains("clawbus_channels_accounts_owned 1"), "{page}");
}

#[tokio::test]
async fn with_partial_streaming_a_draft_shows_the_answer_and_becomes_the_reply() {
    let (s, tg) = suite(&[
        ("CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY", "open"),
        ("CLAWBUS__CHANNELS__TELEGRAM__STREAM_MODE", "partial"),
    ])
    .await;
    // The model stops halfway through its answer: the draft shows what it wrote.
    s.emu().hold_midstream();
    tg.dm(1300, "repeat 400 streaming words ");
    let drafted = wait_for(Duration::from_secs(30), || async {
        tg.sent_to(1300)
            .first()
            .is_some_and(|m| m.text.starts_with("Echo: streaming") && m.text.ends_with(" …"))
    })
    .await;
    assert!(drafted, "no draft: {:?}", tg.sent_to(1300));
    s.emu().release();
    // The finished answer replaces the draft: one message, edited, in HTML.
    let replaced = wait_for(Duration::from_secs(30), || async {
        tg.sent_to(1300)
            .first()
            .is_some_and(|m| m.parse_mode.as_deref() == Some("HTML") && !m.text.ends_with(" …"))
    })
    .await;
    assert!(replaced, "{:?}", tg.sent_to(1300));
    let want = clawbus_testkit::emulator::reply_for(&[
        serde_json::json!({"role": "user", "content": "repeat 400 streaming words "}),
    ]);
    let sent = tg.sent_to(1300);
    assert_eq!(sent.len(), 1, "the reply did not come as a second message");
    assert_eq!(sent[0].text, want.trim_end());
    assert!(tg.edits() >= 1);
}

#[tokio::test]
async fn a_draft_left_by_a_killed_replica_becomes_the_reply_its_successor_delivers() {
    // Under per-service NATS users: the channels user may follow the deltas and record
    // the draft.
    let (mut s, tg) = suite_with(
        &[
            ("CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__TELEGRAM__STREAM_MODE", "partial"),
        ],
        true,
    )
    .await;
    s.emu().hold_midstream();
    tg.dm(1310, "repeat 400 streaming words ");
    let drafted = wait_for(Duration::from_secs(30), || async {
        tg.sent_to(1310)
            .first()
            .is_some_and(|m| m.text.ends_with(" …"))
    })
    .await;
    assert!(drafted, "no draft: {:?}", tg.sent_to(1310));
    // The draft's id is recorded; then the replica that showed it dies.
    clawbus_tests::wait_recorded(&s, 1).await;
    s.kill9_replica((Service::Channels, 0)).await.unwrap();
    s.restart(Service::Channels).await.unwrap();
    s.emu().release();
    let want = clawbus_testkit::emulator::reply_for(&[
        serde_json::json!({"role": "user", "content": "repeat 400 streaming words "}),
    ]);
    let replaced = wait_for(Duration::from_secs(30), || async {
        tg.sent_to(1310)
            .first()
            .is_some_and(|m| m.text == want.trim_end())
    })
    .await;
    assert!(replaced, "{:?}", tg.sent_to(1310));
    assert_eq!(
        tg.sent_to(1310).len(),
        1,
        "the draft was left above the reply"
    );
}

#[tokio::test]
async fn a_typing_indicator_shows_while_the_turn_runs() {
    let (s, tg) = suite(&open_dms()).await;
    s.emu().hold();
    tg.dm(1400, "think hard");
    // At once, not at the next four-second refresh.
    let typing = wait_for(Duration::from_secs(3), || async { tg.chat_actions() >= 1 }).await;
    assert!(typing, "no typing indicator while the turn ran");
    s.emu().release();
    assert_eq!(wait_sent(&tg, 1400, 1).await[0].text, "Echo: think hard");
}
