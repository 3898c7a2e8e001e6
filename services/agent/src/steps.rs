//! The steps of a turn: model calls, and the tool calls they ask for, run on the
//! sandbox over request/reply (several at once when the model asks for several),
//! their results fed back, until the model answers — or the turn hits its limits
//! (model calls, a repeating call, the size of its tool output, its time), each ending
//! with a clear error. Every step is checkpointed (see [`crate::checkpoint`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clawbus_bus::consumer::Delivery;
use clawbus_bus::ownership::Fence;
use clawbus_bus::{subjects, topology, Bus};
use clawbus_wire::{ChatMessage, DeltaEvent, Envelope, ErrorInfo, Role, ToolCall, TurnRequest};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

use crate::checkpoint::{Checkpoint, CheckpointError, Progress};
use crate::context::{fit_to_window, prompt_budget};
use crate::providers::{Completion, Prompt, ProviderError, MAX_REPLY_BYTES};
use crate::tools;
use crate::turn::AgentService;

/// Room for everything but the message, the steps and the answer in a run event.
const RUN_EVENT_OVERHEAD: usize = 64 * 1024;

/// How a turn's steps ended, when not with an answer.
#[derive(Debug)]
pub enum StepError {
    Provider(ProviderError),
    /// The turn ends with this error for the sender (a limit; not retried).
    End(ErrorInfo),
    Checkpoint(CheckpointError),
    /// The session's partition went to another replica.
    Fenced,
}

impl From<CheckpointError> for StepError {
    fn from(e: CheckpointError) -> Self {
        StepError::Checkpoint(e)
    }
}

/// The bytes of tool calls and results a turn may gather: its run event carries them
/// with the message and the answer, in one stream message.
pub fn steps_budget(turn: &TurnRequest) -> usize {
    (topology::MAX_MESSAGE_BYTES as usize)
        .saturating_sub(turn.inbound.text.len() + MAX_REPLY_BYTES + RUN_EVENT_OVERHEAD)
}

/// The reply a channel gets: the texts the model wrote along the way and its answer,
/// joined by blank lines.
pub fn reply_text(steps: &[ChatMessage], answer: &str) -> String {
    steps
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .map(|m| m.content.as_str())
        .chain(std::iter::once(answer))
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n")
}

impl AgentService {
    /// Runs the turn from where `progress` stands to the model's answer.
    pub(crate) async fn run_steps(
        &self,
        d: &Delivery,
        turn: &TurnRequest,
        base: &[ChatMessage],
        progress: &mut Progress,
        ckpt: &mut Checkpoint<'_>,
        deltas: &mut Deltas,
    ) -> Result<Completion, StepError> {
        let cfg = &self.cfg.tools;
        if turn.inbound.text.trim().is_empty() && base.last().map(|m| m.role) != Some(Role::Tool) {
            // Results of calls this session never made (or already answered).
            return Err(StepError::End(ErrorInfo {
                code: "unmatched_tool_result".into(),
                message: "the tool results answer no open tool call of this session".into(),
            }));
        }
        // A caller that brings its own functions runs their calls itself.
        let client_tools = !turn.inbound.tools.is_empty();
        let offered = if client_tools {
            turn.inbound.tools.clone()
        } else {
            self.tools
                .offered(&self.bus, cfg, &turn.agent_id, &tools::sender_of(turn))
                .await
        };
        if !progress.sent.is_empty() {
            // Calls that were out when the previous attempt died: they may have run.
            interrupted(progress);
            ckpt.save(progress).await?;
        }
        let started = Instant::now();
        // The whole attempt is bounded: by the agent's turn timeout, or a hook's
        // shorter `timeoutSeconds`.
        let limit_secs = turn
            .inbound
            .hook
            .as_ref()
            .and_then(|h| h.timeout_seconds)
            .map_or(self.cfg.turn_timeout_secs, |t| {
                u64::from(t).min(self.cfg.turn_timeout_secs)
            });
        let limit = Duration::from_secs(limit_secs);
        let keep_from = current_start(base);
        let steering = turn.queue.as_deref() == Some("steer") && !client_tools;
        loop {
            // `steer`: after tool results, the session's waiting messages join the run
            // before the next model call (recorded before they are marked taken).
            if steering && progress.steps.last().is_some_and(|m| m.role == Role::Tool) {
                let later = self.waiting_turns(d, crate::queue::MAX_STEERED).await;
                if !later.is_empty() {
                    let ids: Vec<String> = later.iter().map(|t| t.run_id.clone()).collect();
                    for t in &later {
                        progress
                            .steps
                            .push(ChatMessage::new(Role::User, t.inbound.text.clone()));
                    }
                    progress.absorbed.extend(ids.iter().cloned());
                    ckpt.save(progress).await?;
                    self.absorb(&ids).await;
                    tracing::info!(run_id = %turn.run_id, taken = ids.len(), "Steered the run with the messages that arrived");
                }
            }
            if progress.model_calls >= cfg.max_iterations {
                return Err(StepError::End(ErrorInfo {
                    code: "tool_iterations_exceeded".into(),
                    message: format!(
                        "the model was still calling tools after {} model calls \
                         (agent.tools.max_iterations); the turn was stopped",
                        progress.model_calls
                    ),
                }));
            }
            if started.elapsed() >= limit {
                return Err(StepError::Provider(ProviderError::TurnTimeout(limit_secs)));
            }
            // The prompt as built, while no step was taken; else with the steps,
            // fitted to the window.
            let fitted;
            let messages: &[ChatMessage] = if progress.steps.is_empty()
                && !over_budget(&self.cfg, base)
            {
                base
            } else {
                let mut m = base.to_vec();
                m.extend(progress.steps.iter().cloned());
                if let Some(budget) = prompt_budget(&self.cfg) {
                    match fit_to_window(&mut m, budget, keep_from) {
                        Err(e) => {
                            return Err(StepError::Provider(ProviderError::ContextOverflow(e)))
                        }
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(run_id = %turn.run_id, dropped = n, "Oldest history left out to fit the context window")
                        }
                    }
                }
                fitted = m;
                &fitted
            };
            let prompt = Prompt {
                messages,
                tools: &offered,
                tool_choice: turn.inbound.tool_choice.as_deref(),
                thinking: progress.thinking,
                time_left: Some((limit.saturating_sub(started.elapsed()), limit_secs)),
            };
            let mut c = self
                .call_model(turn, &prompt, deltas)
                .await
                .map_err(StepError::Provider)?;
            progress.model_calls += 1;
            if let Some(u) = c.usage {
                account(progress, &self.cfg, &c.model, &u);
            }
            progress.model = Some(c.model.clone());
            name_calls(&turn.run_id, progress, &mut c);
            if c.tool_calls.is_empty() || client_tools {
                return Ok(c);
            }
            self.run_calls(d, turn, &offered, c, progress, ckpt).await?;
        }
    }

    /// Runs the calls of one model answer and records their results.
    async fn run_calls(
        &self,
        d: &Delivery,
        turn: &TurnRequest,
        offered: &[clawbus_wire::ToolSpec],
        c: Completion,
        progress: &mut Progress,
        ckpt: &mut Checkpoint<'_>,
    ) -> Result<(), StepError> {
        let cfg = &self.cfg.tools;
        let calls = c.tool_calls;
        let first = progress.steps.len();
        if let Some(u) = c.usage {
            progress.step_usage.push((first, u));
        }
        progress.steps.push(ChatMessage {
            role: Role::Assistant,
            content: c.text,
            tool_calls: calls.clone(),
            reasoning: c.reasoning,
            ..Default::default()
        });
        let budget = steps_budget(turn);
        if let Some((call, n)) = repeating(progress, cfg.loop_threshold) {
            for call in &calls {
                progress.steps.push(ChatMessage::tool_result(
                    call,
                    "Not run: the turn was stopped because this call kept repeating.",
                ));
            }
            ckpt.save(progress).await?;
            return Err(StepError::End(ErrorInfo {
                code: "tool_loop_detected".into(),
                message: format!(
                    "the model called `{call}` with the same arguments {n} times in one \
                     turn (agent.tools.loop_threshold); the turn was stopped to break the loop"
                ),
            }));
        }
        if progress.step_bytes() > budget {
            return Err(StepError::End(output_budget_spent(budget)));
        }
        let mut to_run = Vec::new();
        for (i, call) in calls.iter().enumerate() {
            match tools::refusal(call, offered) {
                Some(why) => progress.steps.push(ChatMessage::tool_result(call, why)),
                None => {
                    progress.calls += 1;
                    progress.sent.push(call.id.clone());
                    to_run.push((
                        i,
                        ToolCall {
                            call_id: format!("{}:tool:{}", turn.run_id, progress.calls),
                            run_id: turn.run_id.clone(),
                            session_key: turn.session_key.clone(),
                            tool: call.name.clone(),
                            arguments: call.arguments.clone(),
                            agent_id: turn.agent_id.clone(),
                            sender: Some(tools::sender_of(turn)),
                        },
                    ));
                }
            }
        }
        if d.fence.as_ref().is_some_and(Fence::is_lost) {
            return Err(StepError::Fenced);
        }
        // The model's answer and the calls about to go out: from here on a crash
        // never sends them again.
        ckpt.save(progress).await?;
        let timeout = Duration::from_secs(cfg.timeout_secs);
        let mut running: FuturesUnordered<_> = to_run
            .into_iter()
            .map(|(i, call)| {
                let (bus, trace) = (&self.bus, &d.trace);
                async move {
                    let name = call.tool.clone();
                    let text = tools::invoke(bus, call, timeout, trace)
                        .await
                        .unwrap_or_else(|e| tools::interrupted(&name, &e.0));
                    (i, text)
                }
            })
            .collect();
        while let Some((i, text)) = running.next().await {
            let call = &calls[i];
            let room = budget.saturating_sub(progress.step_bytes() + 256);
            let text = if room < 256 {
                "Error: this turn's tool output budget is spent; the result was left out. \
                 Answer with what you have."
                    .to_owned()
            } else {
                tools::cap(text, cfg.result_max_bytes.min(room))
            };
            progress.sent.retain(|id| id != &call.id);
            progress.steps.push(ChatMessage::tool_result(call, text));
            ckpt.save(progress).await?;
            self.metrics.tool_calls.inc();
        }
        // Results in the order of the calls (they were recorded as they came).
        let position = |m: &ChatMessage| {
            calls
                .iter()
                .position(|c| Some(&c.id) == m.tool_call_id.as_ref())
        };
        progress.steps[first + 1..].sort_by_key(position);
        Ok(())
    }

    /// One model call, its text streamed to the sender when it asked for deltas.
    async fn call_model(
        &self,
        turn: &TurnRequest,
        prompt: &Prompt<'_>,
        deltas: &mut Deltas,
    ) -> Result<Completion, ProviderError> {
        let models = self.models.get(&turn.agent_id, turn.model.as_deref());
        let started = Instant::now();
        let result = if deltas.live() {
            let (tx, mut rx) = mpsc::channel::<String>(256);
            deltas.begin_call();
            let call = async {
                let r = models.chat(prompt, Some(&tx)).await;
                drop(tx);
                r
            };
            let forward = async {
                while let Some(text) = rx.recv().await {
                    deltas.send(text).await;
                }
            };
            tokio::join!(call, forward).0
        } else {
            models.chat(prompt, None).await
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .provider_seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

/// Whether messages pass the room the model's window leaves for the prompt.
fn over_budget(cfg: &clawbus_config::AgentConfig, messages: &[ChatMessage]) -> bool {
    prompt_budget(cfg).is_some_and(|b| {
        messages
            .iter()
            .map(crate::context::estimate_tokens)
            .sum::<u64>()
            > b
    })
}

/// Where the current turn's own messages start in `base`: the new message, or the
/// caller's answers to its functions' calls together with those calls.
pub(crate) fn current_start(base: &[ChatMessage]) -> usize {
    let mut i = base.len().saturating_sub(1);
    if base.get(i).is_some_and(|m| m.role == Role::Tool) {
        while i > 0 && base[i].role == Role::Tool {
            i -= 1;
        }
    }
    i
}

/// Records the calls that were out when an attempt died as interrupted: they may have
/// run, so they are never sent again.
fn interrupted(progress: &mut Progress) {
    let sent = std::mem::take(&mut progress.sent);
    let calls: Vec<_> = progress
        .steps
        .iter()
        .flat_map(|m| m.tool_calls.iter())
        .filter(|c| sent.contains(&c.id))
        .cloned()
        .collect();
    for c in calls {
        tracing::warn!(tool = %c.name, call = %c.id, "A tool call was out when the turn's previous attempt died; not repeated");
        progress.steps.push(ChatMessage::tool_result(
            &c,
            tools::interrupted(&c.name, "the agent restarted while it ran"),
        ));
    }
}

/// A call made `threshold` times or more in this turn, with its count.
fn repeating(progress: &Progress, threshold: u32) -> Option<(String, u32)> {
    let mut counts: HashMap<String, (String, u32)> = HashMap::new();
    for c in progress.steps.iter().flat_map(|m| m.tool_calls.iter()) {
        let e = counts
            .entry(tools::signature(c))
            .or_insert_with(|| (c.name.clone(), 0));
        e.1 += 1;
    }
    counts.into_values().find(|(_, n)| *n >= threshold)
}

fn output_budget_spent(budget: usize) -> ErrorInfo {
    ErrorInfo {
        code: "tool_output_budget_exceeded".into(),
        message: format!(
            "the turn's tool calls and results passed {budget} bytes, the most one turn \
             may record; the turn was stopped"
        ),
    }
}

/// Gives every call an id unique in the turn (APIs without ids, or repeating ones).
fn name_calls(run_id: &str, progress: &Progress, c: &mut Completion) {
    let mut seen: Vec<String> = progress
        .steps
        .iter()
        .flat_map(|m| m.tool_calls.iter().map(|c| c.id.clone()))
        .collect();
    let run = subjects::session_hash(run_id);
    for (i, call) in c.tool_calls.iter_mut().enumerate() {
        if call.id.is_empty() || seen.contains(&call.id) {
            call.id = format!("call_{run:08x}_{}_{i}", progress.model_calls);
        }
        seen.push(call.id.clone());
    }
}

/// Adds one model call's usage, and its cost when `model` has prices, to the turn's.
pub(crate) fn account(
    progress: &mut Progress,
    cfg: &clawbus_config::AgentConfig,
    model: &str,
    u: &clawbus_wire::Usage,
) {
    if let Some(spec) = price_of(cfg, model) {
        let cost = spec.cost_usd(u.prompt_tokens, u.completion_tokens);
        progress.cost_usd = Some(progress.cost_usd.unwrap_or(0.0) + cost);
    }
    add_usage(progress, u);
}

/// The declaration with prices of the model that answered: its own, or that of the
/// longest declared name it starts with (`openai/gpt-4o-mini` for the dated
/// `openai/gpt-4o-mini-2024-07-18` a provider reports).
fn price_of<'a>(
    cfg: &'a clawbus_config::AgentConfig,
    model: &str,
) -> Option<&'a clawbus_config::ModelSpec> {
    let priced =
        |s: &&clawbus_config::ModelSpec| s.input_usd_per_mtok > 0.0 || s.output_usd_per_mtok > 0.0;
    cfg.model_spec(model).filter(priced).or_else(|| {
        let bare = model.strip_prefix("openai/").unwrap_or(model);
        cfg.models
            .iter()
            .filter(|(k, s)| {
                priced(s) && (model.starts_with(k.as_str()) || bare.starts_with(k.as_str()))
            })
            .max_by_key(|(k, _)| k.len())
            .map(|(_, s)| s)
    })
}

/// Adds one model call's usage to the turn's.
fn add_usage(progress: &mut Progress, u: &clawbus_wire::Usage) {
    let t = &mut progress.usage;
    t.prompt_tokens += u.prompt_tokens;
    t.completion_tokens += u.completion_tokens;
    t.total_tokens += u.total_tokens;
    t.cached_tokens += u.cached_tokens;
    t.reasoning_tokens += u.reasoning_tokens;
}

/// The live deltas of one attempt of a turn: offsets run on across model calls, the
/// texts of separate calls joined by a blank line (as in the final reply).
pub struct Deltas {
    bus: Bus,
    subject: Option<String>,
    run_id: String,
    inbound_id: String,
    chat_id: String,
    thread_id: Option<String>,
    attempt: u32,
    offset: u64,
    n: u64,
    new_call: bool,
}

impl Deltas {
    pub fn new(bus: &Bus, turn: &TurnRequest, attempt: u32) -> Self {
        Self {
            bus: bus.clone(),
            subject: turn
                .inbound
                .stream
                .then(|| subjects::delta(&turn.session_key)),
            run_id: turn.run_id.clone(),
            inbound_id: turn.inbound_id.clone(),
            chat_id: turn.inbound.chat.id.clone(),
            thread_id: turn.inbound.thread_id.clone(),
            attempt,
            offset: 0,
            n: 0,
            new_call: false,
        }
    }

    pub fn live(&self) -> bool {
        self.subject.is_some()
    }

    /// The next text belongs to a new model call.
    pub fn begin_call(&mut self) {
        self.new_call = true;
    }

    /// Sends the texts of steps already taken (a resumed turn's new attempt starts
    /// its deltas over).
    pub async fn replay(&mut self, steps: &[ChatMessage]) {
        for m in steps.iter().filter(|m| m.role == Role::Assistant) {
            self.begin_call();
            self.send(m.content.clone()).await;
        }
    }

    pub async fn send(&mut self, mut text: String) {
        let Some(subject) = self.subject.clone() else {
            return;
        };
        if text.is_empty() {
            return;
        }
        if std::mem::take(&mut self.new_call) && self.offset > 0 {
            text.insert_str(0, "\n\n");
        }
        let len = text.len() as u64;
        let ev = DeltaEvent {
            run_id: self.run_id.clone(),
            inbound_id: self.inbound_id.clone(),
            attempt: self.attempt,
            offset: self.offset,
            text,
            chat_id: self.chat_id.clone(),
            thread_id: self.thread_id.clone(),
        };
        let env = Envelope::new(
            format!("{}:delta:{}:{}", self.run_id, self.attempt, self.n),
            clawbus_wire::now_ms(),
            ev,
        );
        if let Err(e) = self.bus.publish_live(subject, &env).await {
            tracing::debug!(error = %e, "Delta publish failed");
        }
        self.offset += len;
        self.n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clawbus_wire::FunctionCall;

    fn call(name: &str, args: &str) -> FunctionCall {
        FunctionCall {
            id: String::new(),
            name: name.into(),
            arguments: args.into(),
            signature: None,
        }
    }

    #[test]
    fn calls_get_unique_ids() {
        let mut p = Progress::default();
        p.steps.push(ChatMessage {
            role: Role::Assistant,
            tool_calls: vec![FunctionCall {
                id: "dup".into(),
                ..call("read", "{}")
            }],
            ..Default::default()
        });
        let mut c = Completion {
            tool_calls: vec![
                call("a", "{}"),
                FunctionCall {
                    id: "dup".into(),
                    ..call("b", "{}")
                },
                FunctionCall {
                    id: "fine".into(),
                    ..call("c", "{}")
                },
            ],
            ..Default::default()
        };
        name_calls("run:x", &p, &mut c);
        let ids: Vec<&str> = c.tool_calls.iter().map(|c| c.id.as_str()).collect();
        assert!(ids[0].starts_with("call_") && ids[1].starts_with("call_"));
        assert_ne!(ids[0], ids[1]);
        assert_eq!(ids[2], "fine");
    }

    #[test]
    fn a_repeating_call_is_found_at_the_threshold() {
        let mut p = Progress::default();
        let step = |args: &str| ChatMessage {
            role: Role::Assistant,
            tool_calls: vec![call("exec", args)],
            ..Default::default()
        };
        p.steps.push(step(r#"{"command":"ls"}"#));
        p.steps.push(step(r#"{"command":"pwd"}"#));
        p.steps.push(step(r#"{ "command": "ls" }"#));
        assert_eq!(repeating(&p, 3), None);
        assert_eq!(repeating(&p, 2), Some(("exec".into(), 2)));
    }

    #[test]
    fn interrupted_calls_get_a_result_and_are_not_sent_again() {
        let mut p = Progress::default();
        p.steps.push(ChatMessage {
            role: Role::Assistant,
            tool_calls: vec![
                FunctionCall {
                    id: "a".into(),
                    ..call("exec", "{}")
                },
                FunctionCall {
                    id: "b".into(),
                    ..call("read", "{}")
                },
            ],
            ..Default::default()
        });
        p.steps.push(ChatMessage::tool_result(
            &p.steps[0].tool_calls[1].clone(),
            "ok",
        ));
        p.sent = vec!["a".into()];
        interrupted(&mut p);
        assert!(p.sent.is_empty());
        assert_eq!(p.steps.len(), 3);
        assert_eq!(p.steps[2].tool_call_id.as_deref(), Some("a"));
        assert!(p.steps[2].content.contains("interrupted"));
    }

    #[test]
    fn the_reply_joins_the_texts_of_the_turn() {
        let steps = [
            ChatMessage::new(Role::Assistant, "Let me look."),
            ChatMessage::new(Role::Tool, "file"),
            ChatMessage::new(Role::Assistant, ""),
        ];
        assert_eq!(reply_text(&steps, "Done."), "Let me look.\n\nDone.");
        assert_eq!(reply_text(&[], "Hi"), "Hi");
    }

    #[test]
    fn the_current_turn_starts_at_the_message_or_the_callers_answers() {
        let m = |r| ChatMessage::new(r, "x");
        assert_eq!(current_start(&[m(Role::System), m(Role::User)]), 1);
        assert_eq!(
            current_start(&[
                m(Role::User),
                m(Role::Assistant),
                m(Role::Tool),
                m(Role::Tool)
            ]),
            1
        );
    }
}
