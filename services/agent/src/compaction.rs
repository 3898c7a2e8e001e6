//! Compaction: when a session's history nears the model's context window, its older
//! turns are summarised by the model and the recent ones kept verbatim. The summary is
//! a transcript entry (`<run_id>:summary`, role `system`) saying from which stream
//! sequence on entries are kept; loading a session applies the latest one. `/compact
//! [what to keep]` compacts on demand.

use clawbus_config::AgentConfig;
use clawbus_wire::{ChatMessage, HistoryEntry, Role, Usage};

use crate::context::estimate_tokens;
use crate::failover::Failover;
use crate::providers::{Prompt, ProviderError};

const INSTRUCTIONS: &str = "You compact a conversation between a user and an AI \
assistant so that the assistant can go on without the full text. Write a concise summary \
for the assistant's own use: the user's goals and preferences, facts and names \
established, decisions taken, files and commands involved, results of tool calls that \
still matter, and open tasks. Keep an earlier summary's content that still matters. \
Write only the summary.";

/// Bytes of one entry shown to the summariser.
const ENTRY_MAX_BYTES: usize = 4000;

/// The history as the model sees it: the latest summary's text and the entries it
/// keeps verbatim.
#[derive(Debug, Default)]
pub struct Effective {
    pub summary: Option<String>,
    pub entries: Vec<HistoryEntry>,
}

/// Applies the latest summary of a history: entries older than what it keeps go.
/// (Without a summary, the history as it is: [`prepare`](crate::turn::AgentService)
/// does not copy it then.)
pub fn effective(history: Vec<HistoryEntry>) -> Effective {
    let latest = history
        .iter()
        .rev()
        .find_map(|e| e.summary.map(|s| (s, e.content.clone())));
    match latest {
        None => Effective {
            summary: None,
            entries: history,
        },
        // A reset: what comes after it (in transcript order) and nothing before.
        Some((s, _)) if s.is_reset() => {
            let at = history
                .iter()
                .rposition(|e| e.summary.is_some())
                .map_or(0, |i| i + 1);
            Effective {
                summary: None,
                entries: history
                    .into_iter()
                    .skip(at)
                    .filter(|e| e.summary.is_none())
                    .collect(),
            }
        }
        Some((s, text)) => Effective {
            summary: Some(text),
            entries: history
                .into_iter()
                .filter(|e| e.summary.is_none() && e.seq >= s.first_kept_seq)
                .collect(),
        },
    }
}

/// The summary as the model reads it.
pub fn summary_message(text: &str) -> ChatMessage {
    ChatMessage::new(
        Role::System,
        format!("Summary of the earlier conversation (older messages were compacted):\n\n{text}"),
    )
}

/// `/compact [instructions]`: `Some(instructions)` when the message asks to compact.
pub fn command(text: &str) -> Option<&str> {
    let rest = text.trim().strip_prefix("/compact")?;
    (rest.is_empty() || rest.starts_with(char::is_whitespace)).then(|| rest.trim())
}

/// Whether a prompt of `tokens` should be compacted under `budget`.
pub fn due(cfg: &AgentConfig, tokens: u64, budget: u64) -> bool {
    cfg.compaction.enabled && tokens as f64 > budget as f64 * cfg.compaction.threshold
}

/// Where to cut: the stream sequence from which entries stay verbatim (the newest
/// runs worth at most `keep_tokens`), or `None` when nothing older is left to
/// summarise.
pub fn cut(entries: &[HistoryEntry], keep_tokens: u64) -> Option<u64> {
    let mut kept = 0u64;
    let mut first_kept = entries.last().map_or(0, |e| e.seq + 1);
    // Whole runs (entries of one run event share a sequence), newest first.
    let mut i = entries.len();
    while i > 0 {
        let seq = entries[i - 1].seq;
        let start = entries[..i]
            .iter()
            .rposition(|e| e.seq != seq)
            .map_or(0, |p| p + 1);
        let tokens: u64 = entries[start..i]
            .iter()
            .map(|e| estimate_tokens(&e.message()))
            .sum();
        if kept + tokens > keep_tokens {
            break;
        }
        kept += tokens;
        first_kept = seq;
        i = start;
    }
    (i > 0).then_some(first_kept)
}

/// The conversation as text for the summariser, within `max_bytes` (the oldest lines
/// left out first).
fn render(prior: Option<&str>, older: &[HistoryEntry], max_bytes: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    for e in older {
        let mut text = e.content.clone();
        if text.len() > ENTRY_MAX_BYTES {
            let mut end = ENTRY_MAX_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push_str(" [...]");
        }
        let who = match e.role {
            Role::Tool => format!("tool {}", e.name.as_deref().unwrap_or("result")),
            r => r.as_str().to_owned(),
        };
        if !text.is_empty() {
            lines.push(format!("[{who}] {text}"));
        }
        for c in &e.tool_calls {
            lines.push(format!("[assistant called {}] {}", c.name, c.arguments));
        }
    }
    let head = prior
        .map(|p| format!("Earlier summary:\n{p}\n\n"))
        .unwrap_or_default();
    let mut total: usize = head.len() + lines.iter().map(|l| l.len() + 1).sum::<usize>();
    let mut skip = 0;
    while total > max_bytes && skip < lines.len() {
        total -= lines[skip].len() + 1;
        skip += 1;
    }
    let note = if skip > 0 {
        "[earlier messages left out]\n"
    } else {
        ""
    };
    format!("{head}Conversation:\n{note}{}", lines[skip..].join("\n"))
}

/// Asks the model for a summary of `older` (and of the summary before it).
pub async fn summarise(
    models: &Failover,
    prior: Option<&str>,
    older: &[HistoryEntry],
    budget: Option<u64>,
    instructions: &str,
) -> Result<(String, Option<Usage>, String), ProviderError> {
    // The rendering takes at most three quarters of the window.
    let max_bytes = budget.map_or(400_000, |b| (b * 3) as usize).max(4096);
    let mut system = INSTRUCTIONS.to_owned();
    if !instructions.is_empty() {
        system.push_str("\nThe user asks you to keep in particular: ");
        system.push_str(instructions);
    }
    let messages = [
        ChatMessage::new(Role::System, system),
        ChatMessage::new(Role::User, render(prior, older, max_bytes)),
    ];
    let c = models.chat(&Prompt::new(&messages), None).await?;
    let mut text = c.text.trim().to_owned();
    // A summary longer than a quarter of the window would defeat its purpose.
    let cap = budget.map_or(64_000, |b| b as usize).max(1024);
    if text.len() > cap {
        let mut end = cap;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    if text.is_empty() {
        return Err(ProviderError::Protocol(
            "the model returned an empty summary".into(),
        ));
    }
    Ok((text, c.usage, c.model))
}

/// The prompt a turn starts from, or the answer of a `/compact` turn.
pub(crate) enum Prepared {
    Base(Vec<ChatMessage>),
    Answer(crate::providers::Completion),
}

impl crate::turn::AgentService {
    /// Builds the turn's prompt from the session's history, compacting it first when
    /// it nears the window or the message asks for it. A summary made is recorded in
    /// `progress` (and checkpointed), so a resumed turn does not make it again.
    pub(crate) async fn prepare(
        &self,
        turn: &clawbus_wire::TurnRequest,
        history: &[HistoryEntry],
        workspace: &str,
        progress: &mut crate::checkpoint::Progress,
        ckpt: &mut crate::checkpoint::Checkpoint<'_>,
    ) -> Result<Prepared, crate::steps::StepError> {
        use crate::steps::StepError;
        if let Some((level, _)) = crate::providers::thinking_directive(&turn.inbound.text) {
            // A directive without a message (with one, it is gone by now).
            return Ok(Prepared::Answer(self.note(
                &format!(
                    "`/think {}` applies to the message after it on the same line, e.g. \
                     `/think {0} why is the sky blue?`. Every turn's level is [agent] \
                     thinking (now `{}`).",
                    level.as_str(),
                    self.cfg.thinking
                ),
                progress,
            )));
        }
        // Copied only when a summary takes entries out (rare): the common turn builds
        // its prompt from the history as loaded.
        let summarised;
        let eff: (Option<&str>, &[HistoryEntry]) = if history.iter().any(|e| e.summary.is_some()) {
            summarised = effective(history.to_vec());
            (summarised.summary.as_deref(), &summarised.entries)
        } else {
            (None, history)
        };
        let asked = command(&turn.inbound.text);
        let budget = crate::context::prompt_budget(&self.cfg);
        let build = |summary: Option<&str>, entries: &[HistoryEntry]| {
            crate::context::build_messages(&self.cfg, Some(workspace), turn, entries, summary)
        };
        let base = build(eff.0, eff.1);
        let tokens: u64 = base.iter().map(estimate_tokens).sum();
        if let Some(b) = budget.filter(|b| tokens > *b) {
            // The turn itself must fit, history or not: else no summary helps.
            let mut bare = base.clone();
            let keep_from = crate::steps::current_start(&bare);
            crate::context::fit_to_window(&mut bare, b, keep_from)
                .map_err(|e| StepError::Provider(ProviderError::ContextOverflow(e)))?;
        }
        let wanted = asked.is_some() || budget.is_some_and(|b| due(&self.cfg, tokens, b));
        if !wanted {
            return Ok(Prepared::Base(base));
        }
        if progress.summary.is_none() {
            let keep = match (asked, budget) {
                (None, Some(b)) => (b as f64 * self.cfg.compaction.keep) as u64,
                _ => 0,
            };
            if let Some(first_kept) = cut(eff.1, keep) {
                let older: Vec<HistoryEntry> = eff
                    .1
                    .iter()
                    .filter(|e| e.seq < first_kept)
                    .cloned()
                    .collect();
                let (text, usage, model) = summarise(
                    &self.models.get(&turn.agent_id, turn.model.as_deref()),
                    eff.0,
                    &older,
                    budget,
                    asked.unwrap_or(""),
                )
                .await
                .map_err(StepError::Provider)?;
                tracing::info!(run_id = %turn.run_id, summarised = older.len(), tokens_before = tokens, "Session compacted");
                progress.model_calls += 1;
                if let Some(u) = usage {
                    crate::steps::account(progress, &self.cfg, &model, &u);
                }
                progress.model = Some(model);
                progress.summary = Some((text, first_kept));
                ckpt.save(progress).await?;
            }
        }
        let Some((text, first_kept)) = progress.summary.clone() else {
            if asked.is_some() {
                return Ok(Prepared::Answer(
                    self.note("Nothing to compact yet.", progress),
                ));
            }
            // Nothing older to summarise: the window fitting leaves out what it must.
            return Ok(Prepared::Base(base));
        };
        let kept: Vec<HistoryEntry> = eff
            .1
            .iter()
            .filter(|e| e.seq >= first_kept)
            .cloned()
            .collect();
        let base = build(Some(&text), &kept);
        if asked.is_some() {
            let after: u64 = base.iter().map(estimate_tokens).sum();
            let n = eff.1.len() - kept.len();
            return Ok(Prepared::Answer(self.note(
                &format!(
                    "Compacted the session: {n} earlier entries summarised (about {tokens} \
                     tokens of context before, {after} now)."
                ),
                progress,
            )));
        }
        Ok(Prepared::Base(base))
    }

    /// An answer the agent gives itself (no model call).
    pub(crate) fn note(
        &self,
        text: &str,
        progress: &crate::checkpoint::Progress,
    ) -> crate::providers::Completion {
        crate::providers::Completion {
            text: text.to_owned(),
            model: progress
                .model
                .clone()
                .unwrap_or_else(|| self.models.primary()),
            finish_reason: Some("stop".into()),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawbus_wire::Summary;

    fn e(id: &str, role: Role, content: &str, seq: u64) -> HistoryEntry {
        HistoryEntry {
            entry_id: id.into(),
            role,
            content: content.into(),
            seq,
            ..Default::default()
        }
    }

    #[test]
    fn the_latest_summary_stands_for_what_it_replaced() {
        let mut s = e("r3:summary", Role::System, "S", 30);
        s.summary = Some(Summary { first_kept_seq: 20 });
        let h = vec![
            e("r1:user", Role::User, "old", 10),
            e("r2:user", Role::User, "kept", 20),
            s,
            e("r3:user", Role::User, "new", 30),
        ];
        let eff = effective(h);
        assert_eq!(eff.summary.as_deref(), Some("S"));
        let ids: Vec<&str> = eff.entries.iter().map(|e| e.entry_id.as_str()).collect();
        assert_eq!(ids, ["r2:user", "r3:user"]);
    }

    #[test]
    fn the_cut_keeps_whole_recent_runs() {
        let h = vec![
            e("a", Role::User, &"x".repeat(400), 1),
            e("b", Role::Assistant, &"x".repeat(400), 1),
            e("c", Role::User, "short", 2),
            e("d", Role::Assistant, "short", 2),
        ];
        assert_eq!(cut(&h, 50), Some(2), "the last run fits, the first goes");
        assert_eq!(cut(&h, 0), Some(3), "nothing kept: everything summarised");
        assert_eq!(cut(&h, 100_000), None, "nothing to summarise");
        assert_eq!(cut(&[], 0), None);
    }

    #[test]
    fn compact_commands_are_recognised() {
        assert_eq!(command("/compact"), Some(""));
        assert_eq!(command("  /compact keep the plan "), Some("keep the plan"));
        assert_eq!(command("/compaction"), None);
        assert_eq!(command("please /compact"), None);
    }

    #[test]
    fn the_rendering_fits_its_budget_leaving_out_the_oldest() {
        let h: Vec<HistoryEntry> = (0..100)
            .map(|i| {
                e(
                    "x",
                    Role::User,
                    &format!("message {i} {}", "y".repeat(100)),
                    i,
                )
            })
            .collect();
        let r = render(Some("before"), &h, 2000);
        assert!(r.len() <= 2100, "{}", r.len());
        assert!(r.contains("message 99") && !r.contains("message 0 "));
        assert!(r.contains("[earlier messages left out]") && r.starts_with("Earlier summary:"));
    }
}
