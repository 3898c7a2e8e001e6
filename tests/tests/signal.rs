//! The channels service's Signal adapter against an emulator of signal-cli's HTTP
//! daemon (JSON-RPC and Server-Sent Events), with every service of the suite as a real
//! process: pairing, group mentions, quotes, and a restart that resumes the event
//! stream from the last published event.

use std::time::Duration;

use clawbus_testkit::signal::{SignalEmulator, SignalSent};
use clawbus_testkit::{wait_for, Service, Suite};

const BOT: &str = "+15550000000";
const ADA: &str = "+15551111111";

async fn suite(sig: &SignalEmulator, extra: &[(&str, &str)]) -> Suite {
    let url = sig.url();
    let env = [
        ("CLAWBUS__CHANNELS__SIGNAL__HTTP_URL", url.as_str()),
        ("CLAWBUS__CHANNELS__SIGNAL__ACCOUNT", BOT),
    ];
    clawbus_tests::channel_suite(&env, extra).await
}

async fn wait_sent(sig: &SignalEmulator, chat: &str, n: usize) -> Vec<SignalSent> {
    clawbus_tests::wait_count(&format!("messages to {chat}"), n, || sig.sent_to(chat)).await
}

#[tokio::test]
async fn a_stranger_pairs_then_talks_to_the_agent() {
    let sig = SignalEmulator::start(BOT).await.unwrap();
    let s = suite(&sig, &[]).await;
    // The adapter is connected once the first message comes through.
    sig.dm(ADA, "hello");
    let first = wait_sent(&sig, ADA, 1).await;
    assert!(first[0].1.contains("pairing code"), "{first:?}");
    clawbus_tests::approve_pairing(&s, "signal", &first[0].1).await;
    wait_sent(&sig, ADA, 2).await;
    let ts = sig.dm(ADA, "what is **up**?");
    let sent = wait_sent(&sig, ADA, 3).await;
    assert_eq!(sent[2].1, "Echo: what is up?", "plain text, markup gone");
    assert_eq!(sent[2].2, Some(ts), "the reply quotes the message");
}

#[tokio::test]
async fn a_group_message_is_answered_only_when_it_mentions_the_bot() {
    let sig = SignalEmulator::start(BOT).await.unwrap();
    let s = suite(&sig, &[("CLAWBUS__CHANNELS__SIGNAL__GROUP_POLICY", "open")]).await;
    sig.group("ZmFtaWx5", ADA, "groceries done", false);
    sig.group("ZmFtaWx5", ADA, "what is left?", true);
    let sent = wait_sent(&sig, "group:ZmFtaWx5", 1).await;
    assert!(sent[0].1.contains("what is left?"), "{sent:?}");
    assert_eq!(s.emu().requests().len(), 1);
    assert!(s.emu().requests()[0].to_string().contains("groceries done"));
}

#[tokio::test]
async fn a_restarted_adapter_resumes_after_the_last_event_it_published() {
    let sig = SignalEmulator::start(BOT).await.unwrap();
    let mut s = suite(&sig, &[("CLAWBUS__CHANNELS__SIGNAL__DM_POLICY", "open")]).await;
    sig.dm(ADA, "one");
    wait_sent(&sig, ADA, 1).await;
    clawbus_tests::wait_recorded(&s, 1).await;
    s.kill9_replica((Service::Channels, 0)).await.unwrap();
    // signal-cli keeps what arrives meanwhile; the adapter asks for what follows the
    // last event it published.
    sig.dm(ADA, "two");
    sig.dm(ADA, "three");
    s.restart(Service::Channels).await.unwrap();
    let sent = wait_sent(&sig, ADA, 3).await;
    let texts: Vec<&str> = sent.iter().map(|m| m.1.as_str()).collect();
    assert_eq!(texts, ["Echo: one", "Echo: two", "Echo: three"]);
    // "one" was not published again: the model saw it once.
    let last: Vec<String> = clawbus_tests::last_asked(&s);
    assert_eq!(last, ["one", "two", "three"]);
}

#[tokio::test]
async fn channels_killed_while_sending_a_long_reply_sends_every_piece_once() {
    let sig = SignalEmulator::start(BOT).await.unwrap();
    let mut s = suite(
        &sig,
        &[
            ("CLAWBUS__CHANNELS__SIGNAL__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__SIGNAL__TEXT_CHUNK_LIMIT", "100"),
        ],
    )
    .await;
    sig.hold_sends_after(3);
    let words = clawbus_tests::numbered_words(120);
    sig.dm(ADA, &words);
    assert!(wait_for(Duration::from_secs(30), || async { sig.held() >= 1 }).await);
    s.kill9_replica((Service::Channels, 0)).await.unwrap();
    sig.release_failing();
    s.restart(Service::Channels).await.unwrap();
    let done = wait_for(Duration::from_secs(60), || async {
        sig.sent_to(ADA).iter().any(|m| m.1.contains("w119"))
    })
    .await;
    assert!(done, "{:?}", sig.sent_to(ADA));
    let texts: Vec<String> = sig.sent_to(ADA).into_iter().map(|m| m.1).collect();
    clawbus_tests::assert_each_word_once(&texts, 120);
}

#[tokio::test]
async fn a_long_reply_with_code_comes_in_pieces_with_every_code_line_whole() {
    let sig = SignalEmulator::start(BOT).await.unwrap();
    let _s = suite(&sig, &[("CLAWBUS__CHANNELS__SIGNAL__DM_POLICY", "open")]).await;
    // 300 lines of code, some 4,500 characters: three pieces at Signal's 2,000.
    sig.dm(ADA, "code 300");
    let ok = wait_for(Duration::from_secs(30), || async {
        sig.sent_to(ADA).iter().any(|m| m.1.contains("The end."))
    })
    .await;
    assert!(ok, "{:?}", sig.sent());
    let texts: Vec<String> = sig.sent_to(ADA).into_iter().map(|m| m.1).collect();
    assert!(texts.len() >= 3, "{} pieces", texts.len());
    assert!(texts.iter().all(|t| t.chars().count() <= 2000));
    assert!(texts.iter().all(|t| !t.contains("```")), "plain text");
    clawbus_tests::assert_code_lines_once(&texts, 300);
}

#[tokio::test]
async fn with_partial_streaming_a_draft_is_edited_into_the_reply() {
    let sig = SignalEmulator::start(BOT).await.unwrap();
    let s = suite(
        &sig,
        &[
            ("CLAWBUS__CHANNELS__SIGNAL__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__SIGNAL__STREAM_MODE", "partial"),
        ],
    )
    .await;
    // The model stops halfway: the draft shows what it wrote, quoting the question.
    s.emu().hold_midstream();
    let asked = sig.dm(ADA, "repeat 400 streaming words");
    let drafted = wait_for(Duration::from_secs(30), || async {
        sig.sent_to(ADA)
            .first()
            .is_some_and(|m| m.1.starts_with("Echo: streaming") && m.1.ends_with(" …"))
    })
    .await;
    assert!(drafted, "no draft: {:?}", sig.sent());
    assert_eq!(sig.sent_to(ADA)[0].2, Some(asked));
    s.emu().release();
    // The answer is an edit of the draft (editTimestamp), not a second message.
    let want = clawbus_testkit::emulator::reply_for(&[
        serde_json::json!({"role": "user", "content": "repeat 400 streaming words"}),
    ]);
    let replaced = wait_for(Duration::from_secs(30), || async {
        sig.sent_to(ADA)
            .first()
            .is_some_and(|m| m.1 == want.trim_end())
    })
    .await;
    assert!(replaced, "{:?}", sig.sent());
    assert_eq!(
        sig.sent_to(ADA).len(),
        1,
        "the reply came as a second message"
    );
    let (applied, ignored) = sig.edits();
    assert!((1..=10).contains(&applied), "{applied} edits");
    assert_eq!(ignored, 0, "an edit Signal apps would not show");
}
