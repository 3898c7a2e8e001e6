//! The tools a model is offered and how its calls run: the sandbox's registry
//! (`claw.v1.tools.list`, cached briefly), filtered by the agent's tool policy; calls
//! checked (known tool, arguments a JSON object) and sent over request/reply
//! (`claw.v1.tool.<tool>`); results cut to size.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clawbus_bus::{subjects, Bus, BusError, TraceContext};
use clawbus_config::ToolsConfig;
use clawbus_wire::{
    Envelope, ErrorInfo, FunctionCall, ToolCall, ToolListRequest, ToolListResponse, ToolResult,
    ToolSpec,
};

/// How long a registry answer (or its absence) is reused.
const REGISTRY_TTL: Duration = Duration::from_secs(5);
/// How long the agent waits for the registry.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(2);

/// Who started a run, as the sandbox's sender policies name them: `<channel>:<id>`.
pub fn sender_of(turn: &clawbus_wire::TurnRequest) -> String {
    format!("{}:{}", turn.inbound.channel, turn.inbound.sender.id)
}

/// The sandbox's tool registry as each agent (and sender) may see it, cached.
#[derive(Default)]
pub struct Registry {
    cache: Mutex<HashMap<String, (Instant, Vec<ToolSpec>)>>,
}

impl Registry {
    /// The tools `agent_id` may be offered: the sandbox's, filtered by `policy`. No
    /// sandbox answering means no tools (logged), not a failed turn.
    pub async fn offered(
        &self,
        bus: &Bus,
        policy: &ToolsConfig,
        agent_id: &str,
        sender: &str,
    ) -> Vec<ToolSpec> {
        if !policy.enabled {
            return Vec::new();
        }
        let cache_key = format!("{agent_id}|{sender}");
        if let Some((at, tools)) = lock(&self.cache).get(&cache_key) {
            if at.elapsed() < REGISTRY_TTL {
                return tools.clone();
            }
        }
        let req = Envelope::new(
            format!("tools:{agent_id}:{}", clawbus_wire::now_ms()),
            clawbus_wire::now_ms(),
            ToolListRequest {
                agent_id: agent_id.to_owned(),
                sender: Some(sender.to_owned()),
            },
        );
        let tools = match bus
            .request::<ToolListRequest, ToolListResponse>(
                subjects::TOOLS_LIST.to_owned(),
                &req,
                &TraceContext::root(),
                REGISTRY_TIMEOUT,
            )
            .await
        {
            Ok(resp) => match resp.body.error {
                Some(e) => {
                    tracing::warn!(code = %e.code, error = %e.message, "The tool registry refused; no tools this turn");
                    Vec::new()
                }
                None => resp.body.tools,
            },
            Err(e) => {
                tracing::debug!(error = %e, "No tool registry answered; no tools offered");
                Vec::new()
            }
        };
        let tools: Vec<ToolSpec> = tools
            .into_iter()
            .filter(|t| subjects::tool(&t.name).is_some() && policy.permits(&t.name))
            .collect();
        lock(&self.cache).insert(cache_key, (Instant::now(), tools.clone()));
        tools
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a call was not run, as the model is told.
pub fn refusal(call: &FunctionCall, offered: &[ToolSpec]) -> Option<String> {
    if !offered.iter().any(|t| t.name == call.name) {
        let names: Vec<&str> = offered.iter().map(|t| t.name.as_str()).collect();
        return Some(format!(
            "Error: there is no tool `{}`. Available tools: {}.",
            call.name.chars().take(64).collect::<String>(),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ));
    }
    match serde_json::from_str::<serde_json::Value>(&call.arguments) {
        Ok(v) if v.is_object() => None,
        Ok(_) => Some(format!(
            "Error: the arguments of `{}` must be a JSON object.",
            call.name
        )),
        Err(e) => Some(format!(
            "Error: the arguments of `{}` are not valid JSON ({e}); call it again with \
             a JSON object.",
            call.name
        )),
    }
}

/// Runs one call on the sandbox and gives the text the model sees. `Err` when the
/// call may have run but its outcome is unknown (no answer in time).
pub async fn invoke(
    bus: &Bus,
    call: ToolCall,
    timeout: Duration,
    trace: &TraceContext,
) -> Result<String, Unknown> {
    let Some(subject) = subjects::tool(&call.tool) else {
        return Ok(format!("Error: `{}` is not a valid tool name.", call.tool));
    };
    let name = call.tool.clone();
    let env = Envelope::new(call.call_id.clone(), clawbus_wire::now_ms(), call);
    match bus
        .request::<ToolCall, ToolResult>(subject, &env, trace, timeout)
        .await
    {
        Ok(r) => Ok(result_text(&r.body)),
        Err(BusError::Request { reason, .. }) if reason.contains("no responders") => {
            // Nobody took the request: it certainly did not run.
            Ok(format!(
                "Error: the tool `{name}` is unavailable (no sandbox is running)."
            ))
        }
        Err(e) => Err(Unknown(e.to_string())),
    }
}

/// A call whose outcome is unknown: it may or may not have run.
#[derive(Debug)]
pub struct Unknown(pub String);

/// What the model is told of a call that may have run but whose result was lost
/// (a timeout, or a crash of the agent while it ran). It is never run again.
pub fn interrupted(name: &str, why: &str) -> String {
    format!(
        "Error: the call of `{name}` was interrupted ({why}); it may or may not have \
         taken effect, and it was not repeated. Check its effect before trying again."
    )
}

/// A tool result as the model sees it.
fn result_text(r: &ToolResult) -> String {
    match (&r.error, r.ok) {
        (Some(ErrorInfo { code, message }), _) => {
            if r.content.is_empty() {
                format!("Error ({code}): {message}")
            } else {
                format!("Error ({code}): {message}\n{}", r.content)
            }
        }
        (None, false) if !r.content.starts_with("Error") => format!("Error: {}", r.content),
        _ => r.content.clone(),
    }
}

/// `text` cut to at most `max` bytes at a character boundary, with a note saying how
/// much was left out.
pub fn cap(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let total = text.len();
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!("\n[output cut: {} of {total} bytes shown]", end));
    text
}

/// A call's identity for loop detection: the tool and its arguments, normalised
/// (object keys sorted, whitespace ignored).
pub fn signature(call: &FunctionCall) -> String {
    let args = serde_json::from_str::<serde_json::Value>(&call.arguments)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| call.arguments.trim().to_owned());
    format!("{}\u{0}{args}", call.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: &str) -> FunctionCall {
        FunctionCall {
            id: "c".into(),
            name: name.into(),
            arguments: args.into(),
            signature: None,
        }
    }

    fn spec(name: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn calls_are_refused_for_unknown_tools_and_bad_arguments() {
        let offered = [spec("read"), spec("write")];
        assert_eq!(refusal(&call("read", r#"{"path":"a"}"#), &offered), None);
        let e = refusal(&call("rm -rf /", "{}"), &offered).unwrap();
        assert!(e.contains("no tool") && e.contains("read, write"), "{e}");
        assert!(refusal(&call("read", "{not json"), &offered)
            .unwrap()
            .contains("not valid JSON"));
        assert!(refusal(&call("read", "[1]"), &offered)
            .unwrap()
            .contains("JSON object"));
        assert!(refusal(&call("read", "{}"), &[]).unwrap().contains("none"));
    }

    #[test]
    fn results_are_capped_at_char_boundaries() {
        assert_eq!(cap("short".into(), 10), "short");
        let c = cap("ééééé".into(), 5);
        assert!(c.starts_with("éé\n[output cut: 4 of 10 bytes"), "{c}");
    }

    #[test]
    fn signatures_ignore_key_order_and_spacing() {
        assert_eq!(
            signature(&call("read", r#"{"a":1,"b":2}"#)),
            signature(&call("read", r#"{ "b": 2, "a": 1 }"#))
        );
        assert_ne!(
            signature(&call("read", r#"{"a":1}"#)),
            signature(&call("write", r#"{"a":1}"#))
        );
    }

    #[test]
    fn policy_allows_and_denies_by_name_wildcard_and_group() {
        let mut p = ToolsConfig::default();
        assert!(p.permits("exec"));
        p.deny = vec!["group:runtime".into()];
        assert!(!p.permits("exec") && !p.permits("process") && p.permits("read"));
        p.allow = vec!["group:fs".into(), "web_*".into()];
        assert!(p.permits("read") && p.permits("web_fetch") && !p.permits("message"));
        p.enabled = false;
        assert!(!p.permits("read"));
    }

    #[test]
    fn error_results_say_so() {
        let r = ToolResult::failed("c", "outside_workspace", "path escapes the workspace");
        assert_eq!(
            result_text(&r),
            "Error (outside_workspace): path escapes the workspace"
        );
    }
}
