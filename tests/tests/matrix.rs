//! The channels service's Matrix adapter against a real Synapse homeserver, with every
//! service of the suite as a real process: pairing in a direct chat, mention gating in
//! a group room, a restart that resumes from the sync token, and replies sent again
//! after a crash that the homeserver keeps once (transaction ids).

use std::time::Duration;

use clawbus_testkit::matrix::{MatrixServer, MatrixUser};
use clawbus_testkit::{wait_for, Service, Suite};
use serde_json::{json, Value};

async fn suite(hs: &MatrixServer, bot: &MatrixUser, extra: &[(&str, &str)]) -> Suite {
    let url = hs.url();
    let env = [
        ("CLAWBUS__CHANNELS__MATRIX__HOMESERVER", url.as_str()),
        (
            "CLAWBUS__CHANNELS__MATRIX__ACCESS_TOKEN",
            bot.token.as_str(),
        ),
        ("CLAWBUS__CHANNELS__MATRIX__POLL_TIMEOUT_SECS", "2"),
    ];
    clawbus_tests::channel_suite(&env, extra).await
}

/// Waits until the bot joined `room` (it accepts invitations).
async fn bot_joins(user: &MatrixUser, room: &str, bot: &MatrixUser) {
    let ok = wait_for(Duration::from_secs(30), || async {
        user.members(room)
            .await
            .is_ok_and(|m| m.contains(&bot.user_id))
    })
    .await;
    assert!(ok, "the bot never joined {room}");
}

/// A group room of ada, bob and the bot (joined), with group messages open: the
/// server, the bot, ada, the suite and the room.
async fn group_room() -> (MatrixServer, MatrixUser, MatrixUser, Suite, String) {
    let hs = MatrixServer::start().await.unwrap();
    let bot = hs.register("clawbot").await.unwrap();
    let ada = hs.register("ada").await.unwrap();
    let bob = hs.register("bob").await.unwrap();
    let s = suite(
        &hs,
        &bot,
        &[("CLAWBUS__CHANNELS__MATRIX__GROUP_POLICY", "open")],
    )
    .await;
    let room = ada
        .create_room(&[&bot.user_id, &bob.user_id], false)
        .await
        .unwrap();
    bob.join(&room).await.unwrap();
    bot_joins(&ada, &room, &bot).await;
    (hs, bot, ada, s, room)
}

fn body(e: &Value) -> &str {
    e["content"]["body"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_stranger_pairs_in_a_direct_chat_then_gets_the_agents_replies() {
    let hs = MatrixServer::start().await.unwrap();
    let bot = hs.register("clawbot").await.unwrap();
    let ada = hs.register("ada").await.unwrap();
    let s = suite(&hs, &bot, &[]).await;
    let room = ada.create_room(&[&bot.user_id], true).await.unwrap();
    bot_joins(&ada, &room, &bot).await;
    ada.say(&room, "hello?").await.unwrap();
    let got = ada
        .wait_messages(&room, &bot.user_id, 1, Duration::from_secs(30))
        .await;
    assert!(body(&got[0]).contains("pairing code"), "{got:?}");
    assert!(s.emu().requests().is_empty());
    clawbus_tests::approve_pairing(&s, "matrix", body(&got[0])).await;
    ada.wait_messages(&room, &bot.user_id, 2, Duration::from_secs(30))
        .await;
    let asked = ada.say(&room, "what is **bold**?").await.unwrap();
    let got = ada
        .wait_messages(&room, &bot.user_id, 3, Duration::from_secs(30))
        .await;
    let reply = &got[2];
    assert_eq!(body(reply), "Echo: what is bold?");
    assert_eq!(reply["content"]["format"], "org.matrix.custom.html");
    assert!(reply["content"]["formatted_body"]
        .as_str()
        .unwrap()
        .contains("<b>bold</b>"));
    assert_eq!(
        reply["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
        asked.as_str()
    );
}

#[tokio::test]
async fn in_a_group_room_only_mentions_are_answered() {
    let (_hs, bot, ada, s, room) = group_room().await;
    ada.say(&room, "who took the car?").await.unwrap();
    ada.send(
        &room,
        json!({"msgtype": "m.text", "body": "clawbot: where is the car?",
            "m.mentions": {"user_ids": [bot.user_id]}}),
    )
    .await
    .unwrap();
    let got = ada
        .wait_messages(&room, &bot.user_id, 1, Duration::from_secs(30))
        .await;
    assert!(body(&got[0]).contains("where is the car?"), "{got:?}");
    assert_eq!(s.emu().requests().len(), 1);
    assert!(s.emu().requests()[0]
        .to_string()
        .contains("who took the car?"));
}

#[tokio::test]
async fn a_restart_resumes_from_the_sync_token_and_resent_replies_show_once() {
    let hs = MatrixServer::start().await.unwrap();
    let bot = hs.register("clawbot").await.unwrap();
    let ada = hs.register("ada").await.unwrap();
    let mut s = suite(
        &hs,
        &bot,
        &[("CLAWBUS__CHANNELS__MATRIX__DM_POLICY", "open")],
    )
    .await;
    let room = ada.create_room(&[&bot.user_id], true).await.unwrap();
    bot_joins(&ada, &room, &bot).await;
    ada.say(&room, "first").await.unwrap();
    ada.wait_messages(&room, &bot.user_id, 1, Duration::from_secs(30))
        .await;
    // The adapter dies; a message arrives meanwhile (the homeserver keeps it).
    s.kill9_replica((Service::Channels, 0)).await.unwrap();
    ada.say(&room, "while you were away").await.unwrap();
    // As if the process had died after sending each piece but before recording it:
    // the records go, and the reply consumer starts over from the first reply.
    clawbus_tests::forget_deliveries(&s, "channels-matrix-default").await;
    s.restart(Service::Channels).await.unwrap();
    let got = ada
        .wait_messages(&room, &bot.user_id, 2, Duration::from_secs(60))
        .await;
    let bodies: Vec<&str> = got.iter().map(body).collect();
    assert_eq!(bodies, ["Echo: first", "Echo: while you were away"]);
    // Every reply was sent again with its transaction id: the homeserver kept one of
    // each (looked at again once the resent pieces had time to land).
    ada.say(&room, "last").await.unwrap();
    let got = ada
        .wait_messages(&room, &bot.user_id, 3, Duration::from_secs(30))
        .await;
    let bodies: Vec<&str> = got.iter().map(body).collect();
    assert_eq!(
        bodies,
        ["Echo: first", "Echo: while you were away", "Echo: last"]
    );
    // "first" was asked of the model once: the restart did not replay old messages.
    let asked: Vec<String> = clawbus_tests::last_asked(&s);
    assert_eq!(asked, ["first", "while you were away", "last"]);
}

#[tokio::test]
async fn with_partial_streaming_a_draft_is_replaced_by_the_reply() {
    let hs = MatrixServer::start().await.unwrap();
    let bot = hs.register("clawbot").await.unwrap();
    let ada = hs.register("ada").await.unwrap();
    let s = suite(
        &hs,
        &bot,
        &[
            ("CLAWBUS__CHANNELS__MATRIX__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__MATRIX__STREAM_MODE", "partial"),
        ],
    )
    .await;
    let room = ada.create_room(&[&bot.user_id], true).await.unwrap();
    bot_joins(&ada, &room, &bot).await;
    s.emu().hold_midstream();
    let asked = ada.say(&room, "repeat 400 streaming words ").await.unwrap();
    let bots = || async {
        ada.messages(&room)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["sender"] == bot.user_id.as_str())
            .collect::<Vec<Value>>()
    };
    // The draft shows what the model wrote so far, in reply to the question.
    let drafted = wait_for(Duration::from_secs(30), || async {
        bots()
            .await
            .first()
            .is_some_and(|e| body(e).starts_with("Echo: streaming") && body(e).ends_with(" …"))
    })
    .await;
    assert!(drafted, "no draft: {:?}", bots().await);
    s.emu().release();
    // The answer is an edit (m.replace) of the draft, not a message of its own.
    let want = clawbus_testkit::emulator::reply_for(&[
        json!({"role": "user", "content": "repeat 400 streaming words "}),
    ]);
    let is_edit = |e: &Value| e["content"]["m.relates_to"]["rel_type"] == "m.replace";
    let replaced = wait_for(Duration::from_secs(30), || async {
        bots()
            .await
            .iter()
            .any(|e| is_edit(e) && e["content"]["m.new_content"]["body"] == want.trim_end())
    })
    .await;
    let mine = bots().await;
    assert!(replaced, "{mine:?}");
    let (edits, messages): (Vec<&Value>, Vec<&Value>) = mine.iter().partition(|e| is_edit(e));
    assert_eq!(
        messages.len(),
        1,
        "the reply came as a message of its own: {mine:?}"
    );
    let draft = messages[0];
    assert_eq!(
        draft["content"]["m.relates_to"]["m.in_reply_to"]["event_id"],
        asked.as_str()
    );
    assert!(edits
        .iter()
        .all(|e| e["content"]["m.relates_to"]["event_id"] == draft["event_id"]));
}

#[tokio::test]
async fn a_long_reply_with_code_comes_in_pieces_with_its_fences_intact() {
    let hs = MatrixServer::start().await.unwrap();
    let bot = hs.register("clawbot").await.unwrap();
    let ada = hs.register("ada").await.unwrap();
    let _s = suite(
        &hs,
        &bot,
        &[
            ("CLAWBUS__CHANNELS__MATRIX__DM_POLICY", "open"),
            ("CLAWBUS__CHANNELS__MATRIX__TEXT_CHUNK_LIMIT", "1000"),
        ],
    )
    .await;
    let room = ada.create_room(&[&bot.user_id], true).await.unwrap();
    bot_joins(&ada, &room, &bot).await;
    ada.say(&room, "code 200").await.unwrap();
    let ok = wait_for(Duration::from_secs(30), || async {
        ada.messages(&room)
            .await
            .unwrap_or_default()
            .iter()
            .any(|e| body(e).contains("The end."))
    })
    .await;
    assert!(ok, "the reply's end never came");
    let mine: Vec<Value> = ada
        .messages(&room)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e["sender"] == bot.user_id.as_str())
        .collect();
    assert!(mine.len() >= 3, "{} pieces", mine.len());
    for e in &mine {
        let html = e["content"]["formatted_body"].as_str().unwrap_or_default();
        assert_eq!(
            html.matches("<pre>").count(),
            html.matches("</pre>").count(),
            "a code block cut open: {html}"
        );
    }
    let bodies: Vec<&str> = mine.iter().map(body).collect();
    clawbus_tests::assert_code_lines_once(&bodies, 200);
}

#[tokio::test]
async fn a_mention_in_a_thread_is_answered_in_that_thread_in_its_own_session() {
    let (_hs, bot, ada, s, room) = group_room().await;
    let root = ada.say(&room, "trip planning").await.unwrap();
    let asked = ada
        .send(
            &room,
            json!({"msgtype": "m.text", "body": "clawbot: which train?",
                "m.mentions": {"user_ids": [bot.user_id]},
                "m.relates_to": {"rel_type": "m.thread", "event_id": root,
                    "is_falling_back": true, "m.in_reply_to": {"event_id": root}}}),
        )
        .await
        .unwrap();
    let got = ada
        .wait_messages(&room, &bot.user_id, 1, Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), 1, "{got:?}");
    let rel = &got[0]["content"]["m.relates_to"];
    assert_eq!(body(&got[0]), "Echo: which train?");
    assert_eq!(rel["rel_type"], "m.thread", "{rel}");
    assert_eq!(rel["event_id"], root.as_str(), "in the thread asked in");
    assert_eq!(rel["m.in_reply_to"]["event_id"], asked.as_str());
    // The thread is a session of its own.
    let key = clawbus_tests::outbound_messages(&s.nats.url, "claw.v1.out.matrix.>")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.session_key)
        .next()
        .unwrap_or_default();
    assert!(
        key.starts_with("agent:main:matrix:group:") && key.contains(":thread:"),
        "{key}"
    );
}
