//! The agent's workspace: created with starter files, and its files and skills reach
//! the model's system prompt, edits included.

use std::time::Duration;

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
async fn history_beyond_the_context_window_is_left_out_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("clawbus.toml");
    std::fs::write(&config, "[agent.models.emulator-1]\ncontext_window = 600\n").unwrap();
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
