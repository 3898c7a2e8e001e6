//! The official OpenAI Python client (installed by `make setup` into `.tools/py`) talks
//! to the gateway: plain and streamed completions, usage, models, error statuses.

use std::path::PathBuf;

use clawbus_testkit::{Suite, SuiteOpts};
use serde_json::Value;

#[tokio::test]
async fn the_official_openai_python_client_works_unchanged() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let pytools = root.join(".tools/py");
    assert!(
        pytools.join("openai").exists(),
        "{} is missing: run `make setup`",
        pytools.display()
    );
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(root.join("tests/py/openai_client.py"))
        .env("PYTHONPATH", &pytools)
        .env("CLAWBUS_BASE_URL", format!("{}/v1", s.gateway_url))
        .env("CLAWBUS_TOKEN", &s.token)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client failed: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["plain"], "Echo: first");
    assert_eq!(v["finish"], "stop");
    assert!(v["usage_total"].as_u64().unwrap() > 0);
    assert_eq!(v["streamed"], "Echo: second streamed");
    assert!(v["streamed_usage_total"].as_u64().unwrap() > 0);
    assert_eq!(v["models"], serde_json::json!(["clawbus", "clawbus:main"]));
    assert_eq!(v["unknown_model"], 404);
    assert_eq!(v["bad_key"], 401);
    // `user` kept one session: the streamed turn carried the first turn as history.
    let last = clawbus_tests::last_conversation(&s).len();
    assert_eq!(last, 3);
}

/// Runs an example of `examples/` against a fresh suite; its JSON output.
async fn run_example(name: &str) -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(root.join("examples").join(name))
        .env("PYTHONPATH", root.join(".tools/py"))
        .env("CLAWBUS_BASE_URL", format!("{}/v1", s.gateway_url))
        .env("CLAWBUS_TOKEN", &s.token)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_function_calling_example_runs_unchanged() {
    let v = run_example("openai_tools.py").await;
    assert_eq!(v["finish"], "tool_calls", "{v}");
    assert_eq!(v["calls"][0]["name"], "get_weather");
    assert_eq!(v["calls"][0]["arguments"], r#"{"location":"Paris"}"#);
    assert_eq!(v["answer"], "Done: sunny, 21 C in Paris");
    assert_eq!(v["final_finish"], "stop");
    assert_eq!(v["streamed_finish"], "tool_calls");
    assert_eq!(
        v["streamed_calls"][0]["arguments"],
        r#"{"location":"Lisbon"}"#
    );
    assert_eq!(v["streamed_answer"], "Done: sunny, 21 C in Lisbon");
}

#[tokio::test]
async fn the_responses_example_runs_unchanged() {
    let v = run_example("openai_responses.py").await;
    assert_eq!(
        v["text"], "Echo: Tell me a story about a lighthouse.",
        "{v}"
    );
    assert_eq!(v["status"], "completed");
    assert!(v["usage_total"].as_u64().unwrap() > 0);
    assert_eq!(v["continued"], "Echo: And what happened next?");
    assert_eq!(v["same_session"], true);
    assert_eq!(v["streamed"], "Echo: Stream a short poem.");
    assert_eq!(v["streamed_final"], "Echo: Stream a short poem.");
    for kind in [
        "response.created",
        "response.output_text.delta",
        "response.output_text.done",
        "response.completed",
    ] {
        assert!(
            v["event_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k == kind),
            "{kind}: {v}"
        );
    }
    assert_eq!(v["calls"][0]["name"], "get_weather");
    assert_eq!(v["calls"][0]["arguments"], r#"{"location":"Rome"}"#);
    assert_eq!(v["tool_answer"], "Done: cloudy in Rome");
}

#[tokio::test]
async fn responses_continue_sessions_and_refuse_bad_requests_clearly() {
    let s = Suite::start(SuiteOpts::default()).await.unwrap();
    let post = |body: Value| {
        s.http
            .post(format!("{}/v1/responses", s.gateway_url))
            .bearer_auth(&s.token)
            .json(&body)
            .send()
    };
    let r = post(serde_json::json!({"model": "clawbus", "input": "one"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first: Value = r.json().await.unwrap();
    assert_eq!(first["output"][0]["content"][0]["text"], "Echo: one");
    let r = post(serde_json::json!({"model": "clawbus", "input": "two", "previous_response_id": first["id"]}))
        .await
        .unwrap();
    let second: Value = r.json().await.unwrap();
    assert_eq!(second["previous_response_id"], first["id"]);
    // The model saw the first exchange: the session's history, not resent.
    let conv = clawbus_tests::last_conversation(&s);
    let texts: Vec<&str> = conv.iter().filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(texts, ["one", "Echo: one", "two"]);
    for (body, status, code) in [
        (
            serde_json::json!({"model": "clawbus", "input": "x", "previous_response_id": "resp_00_x"}),
            404,
            "previous_response_not_found",
        ),
        (
            serde_json::json!({"model": "clawbus:nobody", "input": "x"}),
            404,
            "model_not_found",
        ),
        (
            serde_json::json!({"model": "clawbus", "input": []}),
            400,
            "",
        ),
        (
            serde_json::json!({"model": "clawbus", "input": [{"type": "computer_call"}]}),
            400,
            "",
        ),
        (
            serde_json::json!({"model": "clawbus", "input": "x", "tools": [{"type": "file_search"}]}),
            400,
            "",
        ),
        (serde_json::json!({"model": "clawbus"}), 400, ""),
    ] {
        let r = post(body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        if !code.is_empty() {
            assert_eq!(v["error"]["code"], code, "{body}");
        }
    }
}
