//! What the model sees: system prompts, history, the new message; and reply chunking.

use clawbus_config::AgentConfig;
use clawbus_wire::{ChatMessage, HistoryEntry, Role, TurnRequest};

/// The messages sent to the model: system prompts (the configured one, the agent's
/// workspace context, the caller's), history (or the caller's context for a session
/// without history), then the new user message.
pub fn build_messages(
    cfg: &AgentConfig,
    workspace: Option<&str>,
    turn: &TurnRequest,
    history: &[HistoryEntry],
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
            out.push(ChatMessage {
                role: Role::System,
                content: s.to_owned(),
            });
        }
    }
    let limit = cfg.history_limit as usize;
    if history.is_empty() {
        let ctx = &turn.inbound.context;
        out.extend(
            ctx[ctx.len().saturating_sub(limit)..]
                .iter()
                .filter(|m| matches!(m.role, Role::User | Role::Assistant))
                .cloned(),
        );
    } else {
        out.extend(
            history
                .iter()
                .filter(|h| matches!(h.role, Role::User | Role::Assistant))
                .map(|h| ChatMessage {
                    role: h.role,
                    content: h.content.clone(),
                }),
        );
    }
    out.push(ChatMessage {
        role: Role::User,
        content: turn.inbound.text.clone(),
    });
    out
}

/// Estimated tokens of a message: about four bytes a token, plus its framing.
pub fn estimate_tokens(m: &ChatMessage) -> u64 {
    m.content.len() as u64 / 4 + 4
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
/// prompts and the new message always stay. Returns how many were left out, or an
/// error when even those do not fit.
pub fn fit_to_window(messages: &mut Vec<ChatMessage>, budget: u64) -> Result<usize, String> {
    let total = |ms: &[ChatMessage]| ms.iter().map(estimate_tokens).sum::<u64>();
    let mut dropped = 0;
    while total(messages) > budget {
        // The oldest message that is neither a system prompt nor the new message.
        let last = messages.len().saturating_sub(1);
        let Some(i) = messages[..last].iter().position(|m| m.role != Role::System) else {
            return Err(format!(
                "the message and the agent's instructions need about {} tokens, more than \
                 the {budget} the model's context window leaves for them \
                 ([agent.models] context_window)",
                total(messages)
            ));
        };
        messages.remove(i);
        dropped += 1;
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
        }
    }

    fn entry(role: Role, c: &str, seq: u64) -> HistoryEntry {
        HistoryEntry {
            entry_id: format!("e{seq}"),
            run_id: "r0".into(),
            role,
            content: c.into(),
            seq,
            ts: 0,
        }
    }

    #[test]
    fn history_is_left_out_oldest_first_to_fit_the_window() {
        let m = |role, n: usize| ChatMessage {
            role,
            content: "a".repeat(n),
        };
        // 4 + 4 (system 16 bytes), 100 + 4 each history message, 4 + 4 the new one.
        let mut ms = vec![
            m(Role::System, 16),
            m(Role::User, 400),
            m(Role::Assistant, 400),
            m(Role::User, 16),
        ];
        assert_eq!(fit_to_window(&mut ms, 1000), Ok(0));
        assert_eq!(fit_to_window(&mut ms, 130), Ok(1));
        assert_eq!(ms[1].role, Role::Assistant, "the oldest went first");
        assert_eq!(fit_to_window(&mut ms, 16), Ok(1));
        assert_eq!(ms.len(), 2);
        let e = fit_to_window(&mut ms, 10).unwrap_err();
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
        let m = build_messages(&cfg, None, &turn("again"), &h);
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
        t.inbound.context = vec![ChatMessage {
            role: Role::User,
            content: "earlier".into(),
        }];
        assert_eq!(build_messages(&cfg, None, &t, &[]).len(), 2);
        assert_eq!(
            build_messages(&cfg, None, &t, &[entry(Role::User, "stored", 1)])[0].content,
            "stored"
        );
    }

    #[test]
    fn chunks_respect_char_boundaries() {
        assert_eq!(chunk_text("", 4), vec![""]);
        assert_eq!(chunk_text("abcdef", 4), vec!["abcd", "ef"]);
        let s = "ééé"; // 2 bytes each
        assert_eq!(chunk_text(s, 3), vec!["é", "é", "é"]);
    }
}
