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
