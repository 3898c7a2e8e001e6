//! The agent's workspace: created with starter files, and its files and skills reach
//! the model's system prompt, edits included.

use std::time::Duration;

use clawbus_store::TranscriptStore;
use clawbus_testkit::{wait_for, Suite, SuiteOpts};
use clawbus_tests::user_msg;

/// The system messages of the provider's latest request.
fn last_system_prompt(s: &Suite) -> String {
    let reqs = s.emu().requests();
    let Some(last) = reqs.last() else {
        return String::new();
    };
    last["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "system")
        .filter_map(|m| m["content"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn workspace_files_and_skills_reach_the_system_prompt() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let ws = s.state.path().join("workspace");
    for f in ["AGENTS.md", "SOUL.md", "TOOLS.md", "IDENTITY.md", "USER.md"] {
        assert!(ws.join(f).is_file(), "starter {f}");
    }
    let r = s.chat(&user_msg("hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let prompt = last_system_prompt(&s);
    assert!(prompt.contains("## AGENTS.md"), "{prompt}");
    assert!(prompt.contains(&ws.display().to_string()), "{prompt}");

    // An OpenClaw-style workspace: persona, memory, a skill, an oversized profile.
    std::fs::write(ws.join("SOUL.md"), "You are Clawd, a patient lobster.").unwrap();
    std::fs::write(ws.join("MEMORY.md"), "The user's cat is called Miso.").unwrap();
    std::fs::create_dir_all(ws.join("skills/weather")).unwrap();
    std::fs::write(
        ws.join("skills/weather/SKILL.md"),
        "---\nname: weather\ndescription: Current weather and forecasts via wttr.in\n---\n# Weather\n",
    )
    .unwrap();
    std::fs::write(ws.join("USER.md"), "u".repeat(30_000)).unwrap();
    // An edit shows within about a second: turns go on until the model sees it.
    let seen = wait_for(Duration::from_secs(15), || async {
        let r = s.chat(&user_msg("again")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        last_system_prompt(&s).contains("Clawd")
    })
    .await;
    assert!(seen, "the edited SOUL.md reached the model");
    let prompt = last_system_prompt(&s);
    assert!(prompt.contains("You are Clawd, a patient lobster."));
    assert!(prompt.contains("The user's cat is called Miso."));
    assert!(prompt.contains("- weather: Current weather and forecasts via wttr.in ("));
    assert!(prompt.contains("USER.md is 30000 characters; only the first 20000"));
    assert!(prompt.matches('u').count() >= 20_000);
    assert!(!prompt.contains(&"u".repeat(20_001)));
}

#[tokio::test]
async fn without_compaction_history_beyond_the_window_is_left_out_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("clawbus.toml");
    std::fs::write(
        &config,
        "[agent.models.emulator-1]\ncontext_window = 600\n[agent.compaction]\nenabled = false\n",
    )
    .unwrap();
    let s = Suite::start(SuiteOpts {
        env: vec![("CLAWBUS_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    })
    .await
    .unwrap();
    let key = "agent:main:window";
    for i in 0..4 {
        let text = format!("turn {i} {}", "w".repeat(400));
        let r = s.chat_in(key, &text).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let conv = clawbus_tests::last_conversation(&s);
    assert!(
        conv.len() < 7,
        "older turns were left out: {} messages",
        conv.len()
    );
    assert!(conv.last().unwrap()["content"]
        .as_str()
        .unwrap()
        .starts_with("turn 3 "));
    assert!(
        !conv
            .iter()
            .any(|m| m["content"].as_str().unwrap().starts_with("turn 0 ")),
        "the oldest turn went first"
    );
    // A message that cannot fit at all gets a clear error, not a loop.
    let calls = s.emu().requests().len();
    let r = s.chat_in(key, &"z".repeat(4000)).send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v.to_string().contains("context window"), "{v}");
    assert_eq!(s.emu().requests().len(), calls, "the model was not called");
}

async fn suite_with_window(window: u32) -> (Suite, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("clawbus.toml");
    std::fs::write(
        &config,
        format!("[agent.models.emulator-1]\ncontext_window = {window}\n"),
    )
    .unwrap();
    let s = Suite::start(SuiteOpts {
        env: vec![("CLAWBUS_CONFIG".into(), config.display().to_string())],
        ..Default::default()
    })
    .await
    .unwrap();
    (s, dir)
}

#[tokio::test]
async fn a_session_nearing_the_window_is_summarised_and_goes_on() {
    let (s, _dir) = suite_with_window(1000).await;
    let key = "agent:main:compaction";
    for i in 0..6 {
        let text = format!("turn {i} {}", "w".repeat(400));
        let r = s.chat_in(key, &text).send().await.unwrap();
        assert_eq!(r.status(), 200, "turn {i}");
    }
    let reqs = s.emu().requests();
    // The summariser was asked: its instructions and the earliest turn in its input.
    let summarising = reqs
        .iter()
        .find(|r| r.to_string().contains("You compact a conversation"))
        .expect("a summary was asked for");
    assert!(summarising.to_string().contains("turn 0 "));
    // The latest turn's prompt: the summary as a system message, the recent turns,
    // and no more the earliest.
    let last = reqs.last().unwrap();
    let messages = last["messages"].as_array().unwrap();
    assert!(messages.iter().any(|m| m["role"] == "system"
        && m["content"]
            .as_str()
            .unwrap()
            .starts_with("Summary of the earlier conversation")));
    let conv = clawbus_tests::last_conversation(&s);
    assert!(conv.last().unwrap()["content"]
        .as_str()
        .unwrap()
        .starts_with("turn 5 "));
    assert!(!conv
        .iter()
        .any(|m| m["content"].as_str().unwrap().starts_with("turn 0 ")));
    // The summary is in the transcript, once per compaction, and the whole exchange
    // is still there.
    // The store applies the last turns' events after their replies went out: wait.
    let db = clawbus_tests::storage(&s).await;
    let complete = wait_for(Duration::from_secs(10), || async {
        db.history(key, 1000)
            .await
            .is_ok_and(|h| h.iter().filter(|e| e.summary.is_none()).count() == 12)
    })
    .await;
    assert!(complete, "every message of the six turns is stored");
    let h = db.history(key, 1000).await.unwrap();
    assert!(h.iter().any(|e| e.summary.is_some()));
}

#[tokio::test]
async fn compact_on_demand_summarises_everything_said_so_far() {
    let (s, _dir) = suite_with_window(100_000).await;
    let key = "agent:main:compact-cmd";
    let r = s.chat_in(key, "/compact").send().await.unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Nothing to compact yet."
    );
    for text in ["my name is Ada", "I like otters"] {
        s.chat_in(key, text).send().await.unwrap();
    }
    let calls = s.emu().requests().len();
    let r = s
        .chat_in(key, "/compact keep the names")
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    let note = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        note.starts_with("Compacted the session: 4 earlier entries summarised"),
        "{v}"
    );
    let reqs = s.emu().requests();
    assert_eq!(reqs.len(), calls + 1, "one model call: the summary");
    assert!(reqs
        .last()
        .unwrap()
        .to_string()
        .contains("keep in particular: keep the names"));
    s.chat_in(key, "who am I?").send().await.unwrap();
    let conv = clawbus_tests::last_conversation(&s);
    let texts: Vec<&str> = conv.iter().filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(texts, ["who am I?"], "the summary stands for the rest");
    let system = s.emu().requests().last().unwrap()["messages"].to_string();
    assert!(
        system.contains("Summary of the earlier conversation") && system.contains("my name is Ada")
    );
}
