//! What the model sees: system prompts, history, the new message; and reply chunking.

use std::collections::HashMap;

use clawbus_config::AgentConfig;
use clawbus_wire::{ChatMessage, HistoryEntry, Role, TurnRequest};

/// What a model is told of a call whose result the transcript lacks.
const NO_RESULT: &str = "Error: no result was recorded for this call (it was interrupted).";

/// The messages sent to the model: system prompts (the configured one, the agent's
/// workspace context, the caller's), history (or the caller's context for a session
/// without history), then the new user message.
pub fn build_messages(
    cfg: &AgentConfig,
    workspace: Option<&str>,
    turn: &TurnRequest,
    history: &[HistoryEntry],
    summary: Option<&str>,
) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(history.len() + 4);
    for s in [
        cfg.system_prompt.as_deref(),
        workspace,
        turn.inbound.system.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        if !s.trim().is_empty() {
            out.push(ChatMessage::new(Role::System, s));
        }
    }
    if let Some(s) = summary {
        out.push(crate::compaction::summary_message(s));
    }
    let limit = cfg.history_limit as usize;
    let conversation =
        |m: &ChatMessage| matches!(m.role, Role::User | Role::Assistant | Role::Tool);
    let earlier: Vec<ChatMessage> = if history.is_empty() {
        let ctx = &turn.inbound.context;
        ctx[ctx.len().saturating_sub(limit)..]
            .iter()
            .filter(|m| conversation(m))
            .cloned()
            .collect()
    } else {
        // A caller answering its functions' calls: its results follow the stored
        // calls.
        history
            .iter()
            .map(HistoryEntry::message)
            .filter(conversation)
            .chain(turn.inbound.caller_results().iter().cloned())
            .collect()
    };
    out.extend(repair(earlier));
    // A caller answering its own functions' calls (tool messages last) has no new text.
    let answers_calls = out.last().is_some_and(|m| m.role == Role::Tool);
    if !(turn.inbound.text.trim().is_empty() && answers_calls) {
        out.push(ChatMessage::new(Role::User, turn.inbound.text.clone()));
    }
    out
}

/// The conversation with every tool call followed by exactly one result, as every
/// API requires: a result missing (a crash, history cut between a call and its
/// result) is filled in with a note, a result without its call (history cut before
/// the call), or a second result of one call, is left out.
pub fn repair(messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len());
    let mut it = messages.into_iter().peekable();
    while let Some(m) = it.next() {
        match m.role {
            Role::Tool => continue, // no call before it
            Role::Assistant if !m.tool_calls.is_empty() => {
                let mut results: HashMap<String, ChatMessage> = HashMap::new();
                while let Some(r) = it.next_if(|n| n.role == Role::Tool) {
                    let id = r.tool_call_id.clone().unwrap_or_default();
                    if m.tool_calls.iter().any(|c| c.id == id) {
                        results.entry(id).or_insert(r);
                    }
                }
                let calls = m.tool_calls.clone();
                out.push(m);
                for c in &calls {
                    out.push(
                        results
                            .remove(&c.id)
                            .unwrap_or_else(|| ChatMessage::tool_result(c, NO_RESULT)),
                    );
                }
            }
            _ => out.push(m),
        }
    }
    out
}

/// Estimated tokens of a message: about four bytes a token, plus its framing.
pub fn estimate_tokens(m: &ChatMessage) -> u64 {
    let calls: usize = m
        .tool_calls
        .iter()
        .map(|c| c.name.len() + c.arguments.len() + 16)
        .sum();
    (m.content.len() + calls) as u64 / 4 + 4
}

/// The room left for the prompt in a model's window once its answer has its share:
/// `None` when nothing is declared.
pub fn prompt_budget(cfg: &AgentConfig) -> Option<u64> {
    let models = std::iter::once(&cfg.model).chain(&cfg.fallback_models);
    // The smallest window of the chain, so any fallback model can take the prompt.
    models
        .filter_map(|m| {
            let spec = cfg.model_spec(m)?;
            let window = u64::from(spec.context_window?);
            let answer = cfg.max_tokens.or(spec.max_output_tokens).unwrap_or(0);
            Some(window.saturating_sub(u64::from(answer)))
        })
        .min()
}

/// Leaves out the oldest history until the messages fit `budget` tokens; the system
/// prompts and the messages from `keep_from` on (the new message and this turn's
/// steps) always stay, and a tool call leaves with its results. Returns how many
/// were left out, or an error when even those do not fit.
pub fn fit_to_window(
    messages: &mut Vec<ChatMessage>,
    budget: u64,
    keep_from: usize,
) -> Result<usize, String> {
    let total = |ms: &[ChatMessage]| ms.iter().map(estimate_tokens).sum::<u64>();
    let mut dropped = 0;
    let mut keep_from = keep_from.min(messages.len());
    while total(messages) > budget {
        // The oldest message that is neither a system prompt nor kept.
        let Some(i) = messages[..keep_from]
            .iter()
            .position(|m| m.role != Role::System)
        else {
            return Err(format!(
                "the message and the agent's instructions need about {} tokens, more than \
                 the {budget} the model's context window leaves for them \
                 ([agent.models] context_window)",
                total(messages)
            ));
        };
        messages.remove(i);
        keep_from -= 1;
        dropped += 1;
        while i < keep_from && messages[i].role == Role::Tool {
            messages.remove(i);
            keep_from -= 1;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Splits text into chunks of at most `max` bytes at character boundaries (one empty
/// chunk for empty text).
pub(crate) fn chunk_text(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut end = max;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out.push(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawbus_wire::InboundMessage;

    fn turn(text: &str) -> TurnRequest {
        TurnRequest {
            run_id: "r".into(),
            session_key: "agent:main:main".into(),
            agent_id: "main".into(),
            inbound_id: "i".into(),
            inbound: InboundMessage {
                text: text.into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn entry(role: Role, c: &str, seq: u64) -> HistoryEntry {
        HistoryEntry {
            entry_id: format!("e{seq}"),
            run_id: "r0".into(),
            role,
            content: c.into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn history_is_left_out_oldest_first_to_fit_the_window() {
        let m = |role, n: usize| ChatMessage::new(role, "a".repeat(n));
        // 4 + 4 (system 16 bytes), 100 + 4 each history message, 4 + 4 the new one.
        let mut ms = vec![
            m(Role::System, 16),
            m(Role::User, 400),
            m(Role::Assistant, 400),
            m(Role::User, 16),
        ];
        assert_eq!(fit_to_window(&mut ms, 1000, 3), Ok(0));
        assert_eq!(fit_to_window(&mut ms, 130, 3), Ok(1));
        assert_eq!(ms[1].role, Role::Assistant, "the oldest went first");
        assert_eq!(fit_to_window(&mut ms, 16, 2), Ok(1));
        assert_eq!(ms.len(), 2);
        let e = fit_to_window(&mut ms, 10, 1).unwrap_err();
        assert!(e.contains("context window"), "{e}");
        assert_eq!(ms.len(), 2, "the instructions and the message stay");
    }

    #[test]
    fn history_then_user_message() {
        let cfg = AgentConfig {
            system_prompt: Some("be brief".into()),
            ..Default::default()
        };
        let h = [
            entry(Role::User, "hi", 1),
            entry(Role::Assistant, "hello", 2),
            entry(Role::Unknown, "?", 3),
        ];
        let m = build_messages(&cfg, None, &turn("again"), &h, None);
        let roles: Vec<_> = m.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            vec![Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert_eq!(m.last().unwrap().content, "again");
    }

    #[test]
    fn caller_context_only_without_history() {
        let cfg = AgentConfig::default();
        let mut t = turn("q");
        t.inbound.context = vec![ChatMessage::new(Role::User, "earlier")];
        assert_eq!(build_messages(&cfg, None, &t, &[], None).len(), 2);
        assert_eq!(
            build_messages(&cfg, None, &t, &[entry(Role::User, "stored", 1)], None)[0].content,
            "stored"
        );
    }

    fn call(id: &str) -> clawbus_wire::FunctionCall {
        clawbus_wire::FunctionCall {
            id: id.into(),
            name: "read".into(),
            arguments: "{}".into(),
            signature: None,
        }
    }

    fn calling(ids: &[&str]) -> ChatMessage {
        ChatMessage {
            role: Role::Assistant,
            tool_calls: ids.iter().map(|i| call(i)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn every_call_gets_exactly_one_result_on_load() {
        let result = |id: &str| ChatMessage::tool_result(&call(id), format!("r{id}"));
        let fixed = repair(vec![
            result("0"), // its call was cut off
            ChatMessage::new(Role::User, "go"),
            calling(&["a", "b"]),
            result("b"),
            result("b"),
            result("zz"), // no such call
            ChatMessage::new(Role::User, "next"),
            calling(&["c"]), // crashed before its result
        ]);
        let shape: Vec<(Role, String)> = fixed
            .iter()
            .map(|m| (m.role, m.tool_call_id.clone().unwrap_or_default()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (Role::User, "".into()),
                (Role::Assistant, "".into()),
                (Role::Tool, "a".into()),
                (Role::Tool, "b".into()),
                (Role::User, "".into()),
                (Role::Assistant, "".into()),
                (Role::Tool, "c".into()),
            ]
        );
        assert_eq!(fixed[2].content, NO_RESULT);
        assert_eq!(fixed[3].content, "rb");
    }

    #[test]
    fn a_call_leaves_the_window_with_its_results() {
        let mut ms = vec![
            ChatMessage::new(Role::System, "s"),
            calling(&["a"]),
            ChatMessage::tool_result(&call("a"), "x".repeat(400)),
            ChatMessage::new(Role::User, "q"),
        ];
        assert_eq!(fit_to_window(&mut ms, 50, 3), Ok(2));
        assert_eq!(ms.len(), 2);
        assert_eq!(ms[1].content, "q");
    }

    #[test]
    fn a_caller_answering_its_functions_sends_no_empty_message() {
        let cfg = AgentConfig::default();
        let mut t = turn("");
        t.inbound.context = vec![
            ChatMessage::new(Role::User, "weather?"),
            calling(&["w"]),
            ChatMessage::tool_result(&call("w"), "sunny"),
        ];
        let m = build_messages(&cfg, None, &t, &[], None);
        assert_eq!(m.last().unwrap().role, Role::Tool);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn chunks_respect_char_boundaries() {
        assert_eq!(chunk_text("", 4), vec![""]);
        assert_eq!(chunk_text("abcdef", 4), vec!["abcd", "ef"]);
        let s = "ééé"; // 2 bytes each
        assert_eq!(chunk_text(s, 3), vec!["é", "é", "é"]);
    }
}
