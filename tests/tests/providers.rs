//! The same agent config against each provider's API (OpenAI Chat Completions,
//! Anthropic Messages, Gemini), each through the emulator speaking its exact wire
//! format: only `CLAWBUS_MODEL` (and the provider's key and base URL) change.

use std::time::Duration;

use clawbus_store::TranscriptStore;
use clawbus_testkit::{wait_for, Suite};
use clawbus_tests::{sse_events, streamed_text, suite_with, user_msg};
use serde_json::Value;

const MODELS: [&str; 3] = [
    "openai/emulator-1",
    "anthropic/claude-emulator",
    "gemini/gemini-emulator",
];

/// The system prompt and the conversation of a recorded request, wherever its API
/// puts them, as (role, text) with roles `user` and `assistant`.
fn parts_of(req: &Value) -> (String, Vec<(String, String)>) {
    if let Some(contents) = req["contents"].as_array() {
        let system = req
            .pointer("/systemInstruction/parts/0/text")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let conv = contents
            .iter()
            .map(|c| {
                let role = if c["role"] == "model" {
                    "assistant"
                } else {
                    "user"
                };
                let text = c["parts"][0]["text"].as_str().unwrap_or_default();
                (role.to_owned(), text.to_owned())
            })
            .collect();
        return (system.to_owned(), conv);
    }
    let mut system = req
        .pointer("/system/0/text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut conv = Vec::new();
    for m in req["messages"].as_array().into_iter().flatten() {
        let text = m["content"].as_str().unwrap_or_default().to_owned();
        match m["role"].as_str().unwrap_or_default() {
            "system" => system.push_str(&text),
            role => conv.push((role.to_owned(), text)),
        }
    }
    (system, conv)
}

/// A retryable failure is tried twice, then reported.
async fn suite_for(model: &str) -> Suite {
    suite_with(model, &[("CLAWBUS__AGENT__MAX_DELIVER", "2")]).await
}

/// The gateway's answer to one message in a session.
async fn ask(s: &Suite, session: &str, text: &str) -> Value {
    let r = s.chat_in(session, text).send().await.unwrap();
    r.json().await.unwrap()
}

#[tokio::test]
async fn every_provider_api_answers_streams_and_remembers() {
    for model in MODELS {
        let s = suite_for(model).await;
        let key = format!("agent:main:{}", model.replace('/', "-"));
        let r = s.chat_in(&key, "my name is Ada").send().await.unwrap();
        assert_eq!(r.status(), 200, "{model}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"], "Echo: my name is Ada",
            "{model}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{model}");
        assert!(
            v["usage"]["total_tokens"].as_u64().unwrap() > 0,
            "{model}: {v}"
        );

        // Streamed, in the same session: the provider gets the first turn as history.
        let mut body = user_msg("and streamed?");
        body["stream"] = true.into();
        let r = s
            .chat(&body)
            .header("x-clawbus-session-key", &key)
            .send()
            .await
            .unwrap();
        let (events, done) = sse_events(&r.text().await.unwrap());
        assert!(done, "{model}");
        assert_eq!(streamed_text(&events), "Echo: and streamed?", "{model}");
        let (system, conv) = parts_of(s.emu().requests().last().unwrap());
        assert!(
            system.contains("## AGENTS.md"),
            "{model}: the workspace reaches the system prompt"
        );
        assert_eq!(
            conv,
            vec![
                ("user".to_owned(), "my name is Ada".to_owned()),
                ("assistant".to_owned(), "Echo: my name is Ada".to_owned()),
                ("user".to_owned(), "and streamed?".to_owned()),
            ],
            "{model}"
        );
        // The run records which model answered, as provider/model.
        let db = clawbus_tests::storage(&s).await;
        let answered = wait_for(Duration::from_secs(10), || async {
            db.runs(&key).await.unwrap_or_default().iter().any(|r| {
                r.model
                    .as_deref()
                    .is_some_and(|m| m.starts_with(model.split('/').next().unwrap()))
            })
        })
        .await;
        assert!(answered, "{model}: {:?}", db.runs(&key).await);
    }
}

#[tokio::test]
async fn provider_errors_reach_the_caller_clearly_on_every_api() {
    for model in MODELS {
        let s = suite_for(model).await;
        // An error event in the middle of a stream fails the turn with the provider's
        // message; nothing of the broken answer is kept as the answer.
        let r = s.chat(&user_msg("fail midstream")).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .or(v["error"]["message"].as_str())
            .unwrap_or_default()
            .to_owned();
        assert!(
            text.contains("provider") && !text.starts_with("Echo"),
            "{model}: {v}"
        );
        // A connection dropped mid-stream is a network failure: retried, and when it
        // keeps happening the turn ends saying the provider is unreachable.
        let r = s.chat(&user_msg("reset midstream")).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("provider unreachable")),
            "{model}: {v}"
        );
        assert_eq!(v["error"]["code"], "provider_unreachable", "{model}");
        // A server error (500, 503, 529 overloaded) is retried: the answer comes, from
        // the second request.
        for (i, status) in [500u16, 503, 529].into_iter().enumerate() {
            let text = format!("unlucky {i}");
            s.emu().fail_next(&[status]);
            let r = s.chat(&user_msg(&text)).send().await.unwrap();
            let v: Value = r.json().await.unwrap();
            let answer = &v["choices"][0]["message"]["content"];
            assert_eq!(
                answer.as_str(),
                Some(format!("Echo: {text}").as_str()),
                "{model} {status}"
            );
            let asked = s
                .emu()
                .requests()
                .iter()
                .filter(|r| parts_of(r).1.last().is_some_and(|(_, t)| *t == text))
                .count();
            assert_eq!(asked, 2, "{model} {status}");
        }
        // A request the provider refuses is not retried: its status and message.
        s.emu().fail_next(&[400]);
        let r = s.chat(&user_msg("refused")).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        assert!(
            v.to_string().contains("HTTP 400: Emulated failure."),
            "{model}: {v}"
        );
        // And then it works again.
        let r = s.chat(&user_msg("fine")).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        let answer = &v["choices"][0]["message"]["content"];
        assert_eq!(answer, "Echo: fine", "{model}");
        // A rate limit rests the only key: 30 s, so the turn ends saying so; for as
        // long as the provider's Retry-After when it sends one (the Anthropic API
        // does, 1 s here), so the redelivered turn is answered.
        s.emu().fail_next(&[429]);
        let r = s.chat(&user_msg("limited")).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        if model.starts_with("anthropic/") {
            let answer = &v["choices"][0]["message"]["content"];
            assert_eq!(answer, "Echo: limited", "{model}");
        } else {
            assert!(v.to_string().contains("429"), "{model}: {v}");
        }
    }
}

/// The gateway's answer to one message, with `model` and `env` for the agent.
async fn answer_with(model: &str, env: &[(&str, &str)], text: &str) -> Value {
    ask(&suite_with(model, env).await, "agent:main:once", text).await
}

#[tokio::test]
async fn a_wrong_key_and_a_missing_provider_say_what_to_set() {
    let v = answer_with(
        "anthropic/claude-emulator",
        &[("ANTHROPIC_API_KEY", "wrong")],
        "hi",
    )
    .await;
    assert!(v.to_string().contains("401"), "{v}");
    let v = answer_with(
        "gemini/gemini-emulator",
        &[("GEMINI_API_KEY", ""), ("GEMINI_BASE_URL", "")],
        "hi",
    )
    .await;
    assert!(v.to_string().contains("GEMINI_API_KEY"), "{v}");
}

/// Cooldown states in the shared KV bucket: (key, state JSON).
async fn key_states(s: &Suite) -> Vec<(String, Value)> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(s.nats.client().await.unwrap());
    let kv = js.get_key_value("claw_profiles").await.unwrap();
    let mut out = Vec::new();
    let Ok(mut keys) = kv.keys().await else {
        return out;
    };
    while let Some(Ok(k)) = keys.next().await {
        if let Ok(Some(v)) = kv.get(&k).await {
            out.push((k, serde_json::from_slice(&v).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn a_rate_limited_key_rests_and_the_next_key_answers() {
    let s = suite_with(
        "anthropic/claude-emulator",
        &[
            ("ANTHROPIC_API_KEY", "test-key-ratelimited"),
            ("CLAWBUS__AGENT__ANTHROPIC__API_KEYS", "[\"test-key\"]"),
        ],
    )
    .await;
    let v = ask(&s, "agent:main:keys", "one").await;
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: one", "{v}");
    assert_eq!(
        s.emu().requests().len(),
        2,
        "the first key was refused, the second answered"
    );
    // The first key rests (shared in KV): the next turn goes straight to the second.
    let v = ask(&s, "agent:main:keys", "two").await;
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: two", "{v}");
    assert_eq!(s.emu().requests().len(), 3);
    let states = key_states(&s).await;
    assert_eq!(states.len(), 1, "{states:?}");
    assert!(states[0].0.starts_with("anthropic."), "{states:?}");
    assert_eq!(states[0].1["failures"], 1);
    assert!(
        !states[0].0.contains("test-key"),
        "the key itself stays out of KV"
    );
}

#[tokio::test]
async fn when_every_key_fails_a_fallback_model_answers_and_says_so() {
    let s = suite_with(
        "anthropic/claude-emulator",
        &[
            ("ANTHROPIC_API_KEY", "test-key-billing"),
            ("CLAWBUS_FALLBACK_MODELS", "gemini/gemini-emulator"),
        ],
    )
    .await;
    let key = "agent:main:fallback";
    let v = ask(&s, key, "hello").await;
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: hello", "{v}");
    assert_eq!(
        v["model"], "gemini/gemini-emulator",
        "the answer says which model answered"
    );
    let db = clawbus_tests::storage(&s).await;
    let recorded = wait_for(Duration::from_secs(10), || async {
        db.runs(key)
            .await
            .unwrap_or_default()
            .iter()
            .any(|r| r.model.as_deref() == Some("gemini/gemini-emulator"))
    })
    .await;
    assert!(recorded);
    let states = key_states(&s).await;
    assert!(
        states
            .iter()
            .any(|(k, v)| k.starts_with("anthropic.") && v["disabled"] == true),
        "a billing error disables the key: {states:?}"
    );
}

#[tokio::test]
async fn a_silent_stream_and_a_slow_turn_end_with_clear_errors() {
    let v = answer_with(
        "openai/emulator-1",
        &[
            ("CLAWBUS__AGENT__PROVIDER__IDLE_TIMEOUT_SECS", "1"),
            ("CLAWBUS__AGENT__MAX_DELIVER", "1"),
        ],
        "hang",
    )
    .await;
    assert!(v.to_string().contains("sent nothing for 1 s"), "{v}");
    let v = answer_with(
        "gemini/gemini-emulator",
        &[("CLAWBUS__AGENT__TURN_TIMEOUT_SECS", "1")],
        "hang",
    )
    .await;
    assert!(v.to_string().contains("ran out of time"), "{v}");
}

/// Where each API's request says how much to think.
fn thinking_of(req: &Value) -> Value {
    if let Some(e) = req.get("reasoning_effort") {
        return e.clone();
    }
    if let Some(t) = req.get("thinking") {
        return t["budget_tokens"].clone();
    }
    req.pointer("/generationConfig/thinkingConfig/thinkingBudget")
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn thinking_levels_reach_every_api_in_its_terms() {
    let expected = [
        ("openai/emulator-1", Value::from("high"), Value::from("low")),
        (
            "anthropic/claude-emulator",
            Value::from(16384),
            Value::from(2048),
        ),
        (
            "gemini/gemini-emulator",
            Value::from(16384),
            Value::from(2048),
        ),
    ];
    for (model, high, low) in expected {
        let s = suite_with(model, &[("CLAWBUS__AGENT__THINKING", "low")]).await;
        let v = ask(&s, "agent:main:think", "/think high why is the sky blue?").await;
        assert_eq!(
            v["choices"][0]["message"]["content"], "Echo: why is the sky blue?",
            "{model}: the directive is not part of the message: {v}"
        );
        assert_eq!(
            thinking_of(s.emu().requests().last().unwrap()),
            high,
            "{model}"
        );
        if !model.starts_with("anthropic") {
            // Anthropic counts thinking in its output tokens; the others say it.
            assert_eq!(
                v["usage"]["completion_tokens_details"]["reasoning_tokens"],
                clawbus_testkit::emulator::REASONING_TOKENS,
                "{model}: {v}"
            );
        }
        let v = ask(&s, "agent:main:think", "and the sea?").await;
        assert_eq!(v["choices"][0]["message"]["content"], "Echo: and the sea?");
        assert_eq!(
            thinking_of(s.emu().requests().last().unwrap()),
            low,
            "{model}: the default"
        );
        // A lone `/think` sets the session's level, without a model call.
        let calls = s.emu().requests().len();
        let v = ask(&s, "agent:main:think", "/think high").await;
        let note = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(note.contains("Thinking for this session: high"), "{note}");
        assert_eq!(s.emu().requests().len(), calls);
        ask(&s, "agent:main:think", "and the stars?").await;
        assert_eq!(
            thinking_of(s.emu().requests().last().unwrap()),
            high,
            "{model}: the session's level"
        );
        ask(&s, "agent:main:think", "/think default").await;
        ask(&s, "agent:main:think", "and the moon?").await;
        assert_eq!(
            thinking_of(s.emu().requests().last().unwrap()),
            low,
            "{model}: back to the default"
        );
        // The stored message has no directive.
        let db = clawbus_tests::storage(&s).await;
        let h = db.history("agent:main:think", 100).await.unwrap();
        assert!(h.iter().all(|e| !e.content.contains("/think")), "{model}");
    }
}

#[tokio::test]
async fn anthropic_thinking_survives_a_tool_loop() {
    // While thinking, Anthropic requires each tool use to come back with the thinking
    // block (and signature) that led to it: the emulator refuses it otherwise.
    let s = clawbus_tests::suite_with_own_tools("anthropic/claude-emulator", &[]).await;
    let _tools = clawbus_testkit::ToolResponder::start(&s.nats.url, None)
        .await
        .unwrap();
    let turn = r#"/think medium tools: [[{"name":"echo","arguments":{"text":"a"}}],[{"name":"echo","arguments":{"text":"b"}}]]"#;
    let v = ask(&s, "agent:main:think-tools", turn).await;
    assert_eq!(v["choices"][0]["message"]["content"], "Done: b", "{v}");
    let reqs = s.emu().requests();
    let last = reqs.last().unwrap();
    assert_eq!(last["messages"][1]["content"][0]["type"], "thinking");
    assert_eq!(
        last["messages"][1]["content"][0]["signature"],
        "ZW11bGF0ZWQ="
    );
}
