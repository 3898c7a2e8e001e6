//! The emulated model's tool use, scripted by the user's message so that a turn is a
//! pure function of its conversation (a retried or resumed turn gets the same
//! answers):
//!
//! - `tools: [[{"name": "write", "arguments": {...}}], [{"name": "read", ...}]]` — a
//!   list of rounds, each a list of calls made at once. The model makes the round after
//!   the ones already answered (counted after the last user message), and once every
//!   round has its results it answers `Done: <results of the last round, joined by
//!   " | ">`.
//! - `tools: {"name": "exec", "arguments": {...}}` — one call, made again after every
//!   result, forever (a model stuck in a loop).
//!
//! Without a script, a request that offers functions gets a call of the first one
//! whose name's words (less `get`/`set`/`do`) are words of the user's message, its
//! first required string argument set to the message's last capitalised word (`What
//! is the weather in Paris?` → `get_weather {"location": "Paris"}`), once; then the
//! answer `Done: <results>`. That is how the client examples run against it.
//!
//! Arguments given as a string are the raw argument text (a model writing broken
//! JSON; APIs whose arguments are objects send `{}` for it).
//!
//! The conversation is in the emulator's common form: `{role, content}` with
//! `tool_calls: [{id, name, arguments}]` on assistant messages and `tool_call_id` on
//! `tool` messages.

use serde_json::Value;

/// What the model does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Answer with text (the emulator's usual reply).
    Answer,
    /// Answer with the results of the last round.
    Done(String),
    /// Call these functions: (name, arguments as JSON text).
    Call(Vec<(String, String)>),
}

/// The functions a request offers, as (name, JSON Schema of the arguments), in any
/// of the three APIs' forms.
pub fn offered(req: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for t in req["tools"].as_array().into_iter().flatten() {
        if let Some(f) = t.get("function") {
            out.push((f["name"].clone(), f["parameters"].clone()));
        } else if let Some(decls) = t["functionDeclarations"].as_array() {
            for d in decls {
                let schema = d.get("parametersJsonSchema").unwrap_or(&d["parameters"]);
                out.push((d["name"].clone(), schema.clone()));
            }
        } else if t.get("name").is_some() {
            out.push((t["name"].clone(), t["input_schema"].clone()));
        }
    }
    out.into_iter()
        .filter_map(|(n, s)| Some((n.as_str()?.to_owned(), s)))
        .collect()
}

/// The next step for a conversation, with the functions the request offers.
pub fn next(messages: &[Value], offered: &[(String, Value)]) -> Step {
    let Some(last_user) = messages.iter().rposition(|m| m["role"] == "user") else {
        return Step::Answer;
    };
    let text = messages[last_user]["content"].as_str().unwrap_or_default();
    let script = match text
        .strip_prefix("tools:")
        .and_then(|j| serde_json::from_str::<Value>(j.trim()).ok())
    {
        Some(s) => s,
        None => match natural_call(text, offered) {
            Some(call) => Value::Array(vec![Value::Array(vec![call])]),
            None => return Step::Answer,
        },
    };
    let after = &messages[last_user + 1..];
    let rounds_done = after
        .iter()
        .filter(|m| {
            m["role"] == "assistant" && m["tool_calls"].as_array().is_some_and(|c| !c.is_empty())
        })
        .count();
    let calls = |round: &Value| -> Vec<(String, String)> {
        round
            .as_array()
            .map(|r| r.iter().map(call).collect())
            .unwrap_or_else(|| vec![call(round)])
    };
    match &script {
        Value::Object(_) => Step::Call(calls(&script)),
        Value::Array(rounds) if rounds_done < rounds.len() => {
            Step::Call(calls(&rounds[rounds_done]))
        }
        _ => {
            let last_calls = after
                .iter()
                .rposition(|m| m["role"] == "assistant")
                .map_or(0, |i| i + 1);
            let results: Vec<&str> = after[last_calls..]
                .iter()
                .filter(|m| m["role"] == "tool")
                .filter_map(|m| m["content"].as_str())
                .collect();
            Step::Done(format!("Done: {}", results.join(" | ")))
        }
    }
}

/// A call of an offered function the user's text names, if any.
fn natural_call(text: &str, offered: &[(String, Value)]) -> Option<Value> {
    let lower = text.to_lowercase();
    let said: Vec<&str> = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let (name, schema) = offered.iter().find(|(name, _)| {
        let words: Vec<String> = name
            .split(['_', '-'])
            .filter(|w| !w.is_empty() && !matches!(*w, "get" | "set" | "do"))
            .map(str::to_lowercase)
            .collect();
        !words.is_empty() && words.iter().all(|w| said.contains(&w.as_str()))
    })?;
    let mut args = serde_json::Map::new();
    let first_string = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|p| schema["properties"][*p]["type"] == "string");
    if let Some(p) = first_string {
        let word = text
            .split(|c: char| !c.is_alphanumeric())
            .skip(1)
            .filter(|w| w.chars().next().is_some_and(char::is_uppercase))
            .last()
            .unwrap_or(text);
        args.insert(p.to_owned(), word.into());
    }
    Some(serde_json::json!({"name": name, "arguments": args}))
}

/// A scripted call: its arguments an object, or a string taken as the raw argument
/// text (a model writing broken JSON).
fn call(v: &Value) -> (String, String) {
    let args = match v.get("arguments") {
        None => "{}".to_owned(),
        Some(Value::String(raw)) => raw.clone(),
        Some(a) => a.to_string(),
    };
    (v["name"].as_str().unwrap_or_default().to_owned(), args)
}

/// Checks what the APIs that pair calls and results by id check: every call is
/// answered by a `tool` message before the conversation goes on, and every `tool`
/// message answers a call of the assistant message before it.
pub fn check_pairs(messages: &[Value]) -> Result<(), String> {
    let mut open: Vec<String> = Vec::new();
    let mut answerable: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match m["role"].as_str() {
            Some("tool") => {
                let id = m["tool_call_id"].as_str().unwrap_or_default();
                if !answerable.iter().any(|a| a == id) {
                    return Err(format!(
                        "messages.{i}: a tool result for `{id}`, which no preceding tool call has"
                    ));
                }
                open.retain(|o| o != id);
            }
            _ if !open.is_empty() => {
                return Err(format!(
                    "messages.{i}: tool calls without results immediately after them: {}",
                    open.join(", ")
                ));
            }
            Some("assistant") => {
                let ids: Vec<String> = m["tool_calls"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                open = ids.clone();
                answerable = ids;
            }
            _ => answerable.clear(),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rounds_then_done() {
        let user = json!({"role": "user", "content": r#"tools: [[{"name":"a","arguments":{"x":1}}],[{"name":"b"}]]"#});
        assert_eq!(
            next(std::slice::from_ref(&user), &[]),
            Step::Call(vec![("a".into(), r#"{"x":1}"#.into())])
        );
        let c1 =
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "1", "name": "a"}]});
        let r1 = json!({"role": "tool", "tool_call_id": "1", "content": "A"});
        assert_eq!(
            next(&[user.clone(), c1.clone(), r1.clone()], &[]),
            Step::Call(vec![("b".into(), "{}".into())])
        );
        let c2 =
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "2", "name": "b"}]});
        let r2 = json!({"role": "tool", "tool_call_id": "2", "content": "B"});
        assert_eq!(
            next(&[user, c1, r1, c2, r2], &[]),
            Step::Done("Done: B".into())
        );
        assert_eq!(
            next(&[json!({"role": "user", "content": "hi"})], &[]),
            Step::Answer
        );
    }

    #[test]
    fn pairs_are_checked() {
        let call = json!({"role": "assistant", "tool_calls": [{"id": "1"}]});
        let result = json!({"role": "tool", "tool_call_id": "1"});
        let user = json!({"role": "user", "content": "x"});
        assert!(check_pairs(&[user.clone(), call.clone(), result.clone(), user.clone()]).is_ok());
        assert!(check_pairs(&[user.clone(), call.clone(), user.clone()]).is_err());
        assert!(check_pairs(&[user.clone(), result]).is_err());
    }

    #[test]
    fn a_named_function_is_called_naturally() {
        let req = json!({"tools": [{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]});
        let offered = offered(&req);
        let user = json!({"role": "user", "content": "What is the weather like in Paris today?"});
        assert_eq!(
            next(std::slice::from_ref(&user), &offered),
            Step::Call(vec![(
                "get_weather".into(),
                r#"{"location":"Paris"}"#.into()
            )])
        );
        let asked = json!({"role": "user", "content": "How are you?"});
        assert_eq!(next(&[asked], &offered), Step::Answer);
    }
}
