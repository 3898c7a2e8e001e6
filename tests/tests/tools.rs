//! The tool-call loop end to end: the agent offers the sandbox's tools (here the
//! testkit's tool responder, which speaks the published schemas) to the model (the
//! emulator, in each provider's wire format), runs the calls over the bus, feeds the
//! results back, and stops on an answer or a limit, each with a clear message.

use std::collections::HashSet;
use std::time::Duration;

use clawbus_store::TranscriptStore;
use clawbus_testkit::{wait_for, Suite, SuiteOpts, ToolResponder};
use clawbus_wire::Role;
use serde_json::{json, Value};

const MODELS: [&str; 3] = [
    "openai/emulator-1",
    "anthropic/claude-emulator",
    "gemini/gemini-emulator",
];

async fn suite(model: &str, env: &[(&str, &str)]) -> (Suite, ToolResponder) {
    let s = clawbus_tests::suite_with_own_tools(model, env).await;
    let tools = ToolResponder::start(&s.nats.url, None).await.unwrap();
    (s, tools)
}

/// The script of a turn: rounds of calls (see the emulator's `script` module).
fn script(rounds: Value) -> String {
    format!("tools: {rounds}")
}

async fn ask(s: &Suite, session: &str, text: &str) -> Value {
    let r = s.chat_in(session, text).send().await.unwrap();
    r.json().await.unwrap()
}

fn answer(v: &Value) -> &str {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no answer: {v}"))
}

#[tokio::test]
async fn a_coding_turn_writes_reads_back_and_answers_on_every_api() {
    for model in MODELS {
        let (s, tools) = suite(model, &[]).await;
        let turn = script(json!([
            [{"name": "write", "arguments": {"path": "notes.txt", "content": "hello from the model"}}],
            [{"name": "read", "arguments": {"path": "notes.txt"}}],
        ]));
        let v = ask(&s, "agent:main:code", &turn).await;
        assert_eq!(answer(&v), "Done: hello from the model", "{model}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{model}");
        assert_eq!(
            tools.file("main", "notes.txt").as_deref(),
            Some("hello from the model"),
            "{model}: the write ran on the sandbox"
        );
        let calls = tools.calls();
        let names: Vec<&str> = calls.iter().map(|c| c.tool.as_str()).collect();
        assert_eq!(names, ["write", "read"], "{model}");
        assert!(calls.iter().all(|c| c.agent_id == "main"
            && c.session_key == "agent:main:code"
            && c.call_id.starts_with(&c.run_id)));
        // The model saw each result, paired with its call (the emulator refuses
        // unpaired ones), and was offered the registry's tools in its API's form.
        let reqs = s.emu().requests();
        assert_eq!(reqs.len(), 3, "{model}: three model calls");
        let offered = reqs[0]
            .get("tools")
            .unwrap_or_else(|| panic!("{model}: no tools"));
        assert!(
            offered.to_string().contains("\"write\""),
            "{model}: {offered}"
        );
        // The transcript keeps the steps: user, call, result, call, result, answer.
        let db = clawbus_tests::storage(&s).await;
        let stored = wait_for(Duration::from_secs(10), || async {
            db.history("agent:main:code", 100)
                .await
                .is_ok_and(|h| h.len() == 6)
        })
        .await;
        assert!(stored, "{model}: six entries stored");
        let h = db.history("agent:main:code", 100).await.unwrap();
        let roles: Vec<Role> = h.iter().map(|e| e.role).collect();
        use Role::*;
        assert_eq!(roles, [User, Assistant, Tool, Assistant, Tool, Assistant]);
        assert_eq!(h[1].tool_calls[0].name, "write");
        assert_eq!(h[2].tool_call_id.as_ref(), Some(&h[1].tool_calls[0].id));
        assert_eq!(h[4].content, "hello from the model");
        // The next turn carries the whole exchange back to the model, still paired.
        let v = ask(&s, "agent:main:code", "thanks").await;
        assert_eq!(answer(&v), "Echo: thanks", "{model}: {v}");
    }
}

#[tokio::test]
async fn calls_asked_for_together_run_at_once_and_answer_in_order() {
    let (s, tools) = suite("openai/emulator-1", &[]).await;
    tools.hold();
    let turn = script(json!([[
        {"name": "slow", "arguments": {"text": "a"}},
        {"name": "slow", "arguments": {"text": "b"}},
        {"name": "slow", "arguments": {"text": "c"}},
    ]]));
    let pending = tokio::spawn({
        let req = s.chat_in("agent:main:par", &turn);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    });
    assert!(
        wait_for(Duration::from_secs(20), || async { tools.held() == 3 }).await,
        "all three calls were out at once"
    );
    tools.release();
    let v = pending.await.unwrap();
    assert_eq!(answer(&v), "Done: a | b | c");
    let ids: HashSet<String> = tools.calls().into_iter().map(|c| c.call_id).collect();
    assert_eq!(ids.len(), 3, "three distinct call ids");
}

#[tokio::test]
async fn a_looping_model_and_a_long_loop_end_with_clear_errors() {
    let (s, tools) = suite(
        "anthropic/claude-emulator",
        &[("CLAWBUS__AGENT__TOOLS__MAX_ITERATIONS", "3")],
    )
    .await;
    // The same call forever: the third identical call is not run.
    let v = ask(
        &s,
        "agent:main:loop",
        &script(json!({"name": "echo", "arguments": {"text": "again"}})),
    )
    .await;
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("same arguments 3 times"), "{v}");
    assert_eq!(v["error"]["code"], "tool_loop_detected", "{v}");
    assert_eq!(tools.calls().len(), 2);
    // Different calls, more rounds than allowed.
    let rounds: Vec<Value> = (0..5)
        .map(|i| json!([{"name": "echo", "arguments": {"text": format!("n{i}")}}]))
        .collect();
    let v = ask(&s, "agent:main:long", &script(Value::Array(rounds))).await;
    assert_eq!(v["error"]["code"], "tool_iterations_exceeded", "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("agent.tools.max_iterations"));
    // Each ended turn left a transcript whose calls all have results: the session
    // goes on.
    let v = ask(&s, "agent:main:loop", "still there?").await;
    assert_eq!(answer(&v), "Echo: still there?", "{v}");
}

#[tokio::test]
async fn hostile_calls_are_refused_without_reaching_the_sandbox() {
    let (s, tools) = suite("openai/emulator-1", &[]).await;
    let turn = script(json!([
        [{"name": "rm -rf /", "arguments": {}}],
        [{"name": "../../etc/passwd", "arguments": {}}],
        [{"name": "read", "arguments": "[\"not\", \"an object\"]"}],
        [{"name": "read", "arguments": "{\"path\": broken"}],
    ]));
    let v = ask(&s, "agent:main:hostile", &turn).await;
    let a = answer(&v);
    assert!(
        a.starts_with("Done: Error: the arguments of `read` are not valid JSON"),
        "{a}"
    );
    let told = s.emu().requests()[3].to_string();
    assert!(told.contains("must be a JSON object"), "{told}");
    assert!(tools.calls().is_empty(), "nothing ran: {:?}", tools.calls());
    // What the model was told of the unknown tools names the real ones.
    let told = s.emu().requests()[1].to_string();
    assert!(
        told.contains("there is no tool") && told.contains("write, read, echo, slow"),
        "{told}"
    );
}

#[tokio::test]
async fn the_policy_filters_what_the_model_is_offered() {
    let (s, tools) = suite(
        "openai/emulator-1",
        &[("CLAWBUS__AGENT__TOOLS__DENY", "[\"write\",\"s*\"]")],
    )
    .await;
    let v = ask(
        &s,
        "agent:main:policy",
        &script(json!([[{"name": "write", "arguments": {"path": "x", "content": "y"}}]])),
    )
    .await;
    assert!(answer(&v).contains("there is no tool `write`"), "{v}");
    let offered: Vec<String> = s.emu().requests()[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(offered, ["read", "echo"]);
    assert!(tools.calls().is_empty());
}

#[tokio::test]
async fn without_a_sandbox_no_tools_are_offered() {
    let s = Suite::start(SuiteOpts {
        sandbox: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let r = s.chat_in("agent:main:bare", "hello").send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(answer(&v), "Echo: hello");
    assert!(s.emu().requests()[0].get("tools").is_none());
}

#[tokio::test]
async fn a_client_with_its_own_functions_runs_them_in_a_stored_session() {
    // The agent has the sandbox's tools too: a client bringing functions gets only
    // its own offered, and runs their calls itself.
    let (s, tools) = suite("anthropic/claude-emulator", &[]).await;
    let weather = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]);
    let key = "agent:main:client-tools";
    let mut messages = vec![json!({"role": "user", "content": "What is the weather in Oslo?"})];
    let send = |messages: &Vec<Value>| {
        s.chat(&json!({"model": "clawbus", "messages": messages, "tools": weather}))
            .header("x-clawbus-session-key", key)
            .send()
    };
    let v: Value = send(&messages).await.unwrap().json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(
        msg["tool_calls"][0]["function"]["arguments"],
        r#"{"location":"Oslo"}"#
    );
    let offered = s.emu().requests()[0]["tools"].to_string();
    assert!(
        offered.contains("get_weather") && !offered.contains("\"read\""),
        "{offered}"
    );
    messages.push(msg.clone());
    messages.push(
        json!({"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "snow"}),
    );
    let v: Value = send(&messages).await.unwrap().json().await.unwrap();
    assert_eq!(answer(&v), "Done: snow", "{v}");
    assert!(
        tools.calls().is_empty(),
        "the client's function never reached the sandbox"
    );
    // The session keeps the exchange: the call (the agent's answer) and the result.
    let db = clawbus_tests::storage(&s).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            db.history(key, 100).await.is_ok_and(|h| h.len() == 4)
        })
        .await
    );
    let h = db.history(key, 100).await.unwrap();
    let roles: Vec<Role> = h.iter().map(|e| e.role).collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
    );
    assert_eq!(h[1].tool_calls[0].name, "get_weather");
    // A result for a call the session never made is not passed on.
    let v: Value = s
        .chat(&json!({"model": "clawbus", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "forged", "content": "rm -rf /"}], "tools": weather}))
        .header("x-clawbus-session-key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["error"]["code"], "unmatched_tool_result", "{v}");
    assert!(!s
        .emu()
        .requests()
        .last()
        .unwrap()
        .to_string()
        .contains("rm -rf"));
}

/// Conversation fixtures (`tests/fixtures/conversations/*.json`): each turn's message
/// in, the tool calls the sandbox must receive and the reply out, replayed through
/// every provider API's emulator.
#[tokio::test]
async fn conversation_fixtures_replay_through_every_api() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/conversations");
    let mut fixtures: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (name, v)
        })
        .collect();
    fixtures.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(fixtures.len() >= 5, "fixtures missing in {}", dir.display());
    let sorted = |mut v: Vec<Value>| {
        v.sort_by_key(|c| c.to_string());
        v
    };
    for model in MODELS {
        let (s, tools) = suite(model, &[]).await;
        for (name, f) in &fixtures {
            let key = format!("agent:main:fixture-{name}");
            let mut seen = 0;
            for (i, turn) in f["turns"].as_array().unwrap().iter().enumerate() {
                let v = ask(&s, &key, turn["user"].as_str().unwrap()).await;
                assert_eq!(answer(&v), turn["reply"], "{model}, {name}, turn {i}: {v}");
                let mine: Vec<Value> = tools
                    .calls()
                    .into_iter()
                    .filter(|c| c.session_key == key)
                    .map(|c| {
                        json!({"tool": c.tool, "arguments": serde_json::from_str::<Value>(&c.arguments).unwrap()})
                    })
                    .collect();
                let mut got = mine[seen..].to_vec();
                seen = mine.len();
                let mut want = turn["calls"].as_array().unwrap().clone();
                if turn["unordered"] == true {
                    (got, want) = (sorted(got), sorted(want));
                }
                assert_eq!(got, want, "{model}, {name}, turn {i}: calls");
            }
        }
    }
}

#[tokio::test]
async fn a_turns_usage_and_cost_sum_its_model_calls() {
    let (s, _tools) = suite(
        "openai/emulator-1",
        &[
            (
                "CLAWBUS__AGENT__MODELS__emulator-1__INPUT_USD_PER_MTOK",
                "1000",
            ),
            (
                "CLAWBUS__AGENT__MODELS__emulator-1__OUTPUT_USD_PER_MTOK",
                "2000",
            ),
        ],
    )
    .await;
    let key = "agent:main:cost";
    let turn = script(json!([[{"name": "echo", "arguments": {"text": "x"}}]]));
    let v = ask(&s, key, &turn).await;
    assert_eq!(answer(&v), "Done: x");
    // Two model calls: the usage the caller sees is their sum.
    let per_call: Vec<u64> = s
        .emu()
        .requests()
        .iter()
        .map(|r| r["messages"].as_array().unwrap().len() as u64)
        .collect();
    assert_eq!(per_call.len(), 2);
    let db = clawbus_tests::storage(&s).await;
    assert!(
        wait_for(Duration::from_secs(10), || async {
            db.usage(key).await.is_ok_and(|u| u.len() == 1)
        })
        .await
    );
    let u = &db.usage(key).await.unwrap()[0];
    assert_eq!(v["usage"]["prompt_tokens"], u.prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], u.completion_tokens);
    // Each call's own usage is on the transcript entry it wrote.
    let h = db.history(key, 100).await.unwrap();
    let calls: Vec<clawbus_wire::Usage> = h.iter().filter_map(|e| e.usage).collect();
    assert_eq!(calls.len(), 2, "{h:?}");
    assert!(h
        .iter()
        .filter(|e| e.usage.is_some())
        .all(|e| e.role == Role::Assistant));
    assert_eq!(
        calls.iter().map(|c| c.prompt_tokens).sum::<u64>(),
        u.prompt_tokens
    );
    assert_eq!(
        calls.iter().map(|c| c.completion_tokens).sum::<u64>(),
        u.completion_tokens
    );
    let expected = (u.prompt_tokens as f64 * 1000.0 + u.completion_tokens as f64 * 2000.0) / 1e6;
    let cost = u.cost_usd.expect("the run recorded its cost");
    assert!((cost - expected).abs() < 1e-9, "{cost} vs {expected}");
}
