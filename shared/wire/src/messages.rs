//! One type per message kind. Field docs state the invariants producers keep.

use serde::{Deserialize, Serialize};

fn is_false(b: &bool) -> bool {
    !*b
}

/// Who wrote a transcript entry or chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    #[default]
    User,
    Assistant,
    Tool,
    /// A role this reader does not know yet.
    #[serde(other)]
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Role {
        match s {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => Role::Unknown,
        }
    }
}

/// The kind of conversation a message arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatKind {
    #[default]
    Direct,
    Group,
    Channel,
    #[serde(other)]
    Unknown,
}

/// One message of a conversation, as given to a model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
    /// On an assistant message: the functions the model called, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<FunctionCall>,
    /// On a tool message: the id of the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On a tool message: the called function's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// On an assistant message: the provider's reasoning blocks, opaque (JSON), that
    /// must go back with its tool calls (Anthropic thinking with signatures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
}

impl ChatMessage {
    /// A plain message of `role` with `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            ..Default::default()
        }
    }

    /// The result of the call `call` (a `tool` message).
    pub fn tool_result(call: &FunctionCall, content: impl Into<String>) -> Self {
        Self {
            role: Role::Tool,
            content: content.into(),
            tool_call_id: Some(call.id.clone()),
            name: Some(call.name.clone()),
            ..Default::default()
        }
    }
}

/// A function call a model asked for (OpenAI `tool_calls[]`, Anthropic `tool_use`,
/// Gemini `functionCall`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The call's id as the model gave it (made up for APIs without ids); the tool
    /// message answering it carries it as `tool_call_id`.
    pub id: String,
    pub name: String,
    /// Arguments as the model produced them: a JSON document in text form.
    pub arguments: String,
    /// Opaque data the provider wants back with this call in later requests (Gemini's
    /// `thoughtSignature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A tool a model may call: name, description and the JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolSpec {
    /// `[A-Za-z0-9_-]{1,64}`: also a subject token.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// JSON Schema (an object schema) of the arguments, in JSON text form.
    #[serde(default)]
    pub parameters: String,
}

/// The conversation a message belongs to on its platform.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRef {
    /// Platform chat id (a Telegram chat id, a Slack channel id, an HTTP request id).
    pub id: String,
    #[serde(default)]
    pub kind: ChatKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The chat a thread or topic belongs to, when this chat is one (bindings match
    /// the parent too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The platform's server or workspace: a Discord guild, a Slack team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guild_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team_id: Option<String>,
}

/// Who sent a message.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Sender {
    /// Platform user id.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub is_bot: bool,
}

/// The message an inbound message replies to, when the platform tells.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ReplyRef {
    pub message_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The message replied to is the bot's own (counts as a mention in groups).
    #[serde(default, skip_serializing_if = "is_false")]
    pub from_bot: bool,
}

/// A machine-readable error carried in a message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable snake_case code, e.g. `provider_not_configured`.
    pub code: String,
    /// A sentence for people.
    pub message: String,
}

/// Token usage of one model call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    /// Prompt tokens the provider served from its prompt cache (part of
    /// `prompt_tokens`); absent when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u64,
    /// Completion tokens spent on reasoning/thinking (part of `completion_tokens`);
    /// absent when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reasoning_tokens: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A message from a person (or program) arriving through a channel or the gateway.
/// Subject: `claw.v1.in.<channel>.<account>`. The envelope id is
/// `<channel>:<account>:<message_id>` so a platform redelivery dedupes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InboundMessage {
    /// Channel name (`http`, `telegram`, `slack`, ...): a subject token.
    pub channel: String,
    /// Account (bot) on that channel: a subject token.
    pub account: String,
    /// The platform's own message id.
    pub message_id: String,
    pub chat: ChatRef,
    pub sender: Sender,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyRef>,
    pub text: String,
    /// Whether the bot was mentioned (mention gating in groups).
    #[serde(default, skip_serializing_if = "is_false")]
    pub mentions_bot: bool,
    /// Session key requested by a trusted ingress (the gateway); the router validates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_key: Option<String>,
    /// Agent requested by the ingress; the router falls back to its bindings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The sender wants live token deltas (`claw.v1.evt.delta.…`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// Extra system instructions supplied with the message (OpenAI `system` messages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Prior conversation supplied by the caller, used when the session has no history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context: Vec<ChatMessage>,
    /// Functions the caller brings (OpenAI `tools`): when present the model is offered
    /// these instead of the sandbox's, and a call of one ends the turn with
    /// `finish_reason: tool_calls` for the caller to run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolSpec>,
    /// The caller's `tool_choice` (`auto`, `none`, `required`, or a JSON object naming
    /// a function), as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<String>,
    /// Set by the gateway's webhooks (`/hooks/agent`, `/hooks/wake`): what the router
    /// does with the message besides running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
}

/// A webhook's instructions to the router.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Hook {
    /// `agent` (run a turn) or `wake` (a system event for the main session).
    pub kind: String,
    /// `wake`: `now` (a heartbeat turn at once) or `next-heartbeat` (kept for it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `agent`: deliver the answer to a chat: `channel` (`last`, or none: where the
    /// agent's main session last heard from its owner), `account`, `to`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deliver: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `agent`: the run's model and thinking level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
    /// `agent`: the most seconds the run may take (OpenClaw's `timeoutSeconds`); the
    /// agent's own turn timeout still applies when it is shorter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u32>,
}

impl InboundMessage {
    /// The caller's answers to its own functions' calls: the tool messages ending
    /// `context` of a message without text of its own.
    pub fn caller_results(&self) -> &[ChatMessage] {
        if !self.text.trim().is_empty() {
            return &[];
        }
        let n = self
            .context
            .iter()
            .rev()
            .take_while(|m| m.role == Role::Tool)
            .count();
        &self.context[self.context.len() - n..]
    }
}

/// A turn for an agent to run. Subject: `claw.v1.turn.<partition>.<session_token>`.
/// The envelope id is `turn:<inbound envelope id>`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TurnRequest {
    /// Deterministic run id derived from the inbound message id.
    pub run_id: String,
    /// OpenClaw-style session key, e.g. `agent:main:main`.
    pub session_key: String,
    pub agent_id: String,
    /// Envelope id of the inbound message this turn answers.
    pub inbound_id: String,
    pub inbound: InboundMessage,
    /// The session starts afresh with this turn (`/new`, `/reset`, a reset policy):
    /// the model sees none of the earlier history.
    #[serde(default, skip_serializing_if = "is_false")]
    pub reset: bool,
    /// The session's model (`/model`), over the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The session's thinking level (`/think`), over the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<String>,
    /// A heartbeat: an answer of `HEARTBEAT_OK` is recorded but not delivered.
    #[serde(default, skip_serializing_if = "is_false")]
    pub heartbeat: bool,
    /// The session's queue mode: `steer` (later messages of the session join this
    /// run at its next model call), `collect` (this run takes the messages waiting
    /// behind it too), `followup` or none (each its own run), `interrupt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// How the session's queue is kept (chat sessions; none: every turn runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_options: Option<QueueOptions>,
}

/// A chat session's queue: a run queued behind another starts once the session has
/// been quiet for `debounce_ms`; at most `cap` messages wait, `drop` deciding which
/// go beyond it (`old`, `new`, `summarize`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct QueueOptions {
    pub debounce_ms: u32,
    pub cap: u32,
    pub drop: String,
}

/// A command for the run a session has going (`/stop`, the `interrupt` queue mode).
/// Subject: `claw.v1.ctl.<session_token>` (core NATS: only a run in progress cares).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RunControl {
    pub session_key: String,
    /// `cancel`.
    pub action: String,
    /// Leave this run alone (the newer message that interrupts the older run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except_run_id: Option<String>,
    /// Why, for the record.
    #[serde(default)]
    pub reason: String,
}

/// A reply chunk for a channel to deliver. Subject: `claw.v1.out.<channel>.<account>`.
/// The envelope id is `<run_id>:out:<chunk>`: exactly one delivery per chunk.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct OutboundMessage {
    pub run_id: String,
    pub session_key: String,
    pub channel: String,
    pub account: String,
    pub chat_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// Platform id of the message being answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to_message_id: Option<String>,
    /// Envelope id of the inbound message being answered.
    pub inbound_id: String,
    /// Chunk index, from 0.
    #[serde(default)]
    pub chunk: u32,
    /// True on the last chunk of the reply.
    #[serde(default)]
    pub last: bool,
    pub text: String,
    /// Set when the turn failed; `text` then explains it for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// On the last chunk of a model's answer: why the model stopped, as the provider
    /// said (`stop`, `length`, `content_filter`, `tool_calls`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// On the last chunk: calls of the caller's own functions (see
    /// `InboundMessage::tools`) for the caller to run; `finish_reason` is `tool_calls`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<FunctionCall>,
}

/// One entry of a session transcript. Subject: `claw.v1.evt.transcript.<session_token>`.
/// The envelope id equals `entry_id`; the store writes it at most once. The agent
/// records a turn's entries in its [`RunEvent`] instead; this kind stays for
/// publishers that add single entries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptEvent {
    pub session_key: String,
    /// Deterministic id, `<run_id>:user` or `<run_id>:assistant`.
    pub entry_id: String,
    pub run_id: String,
    pub agent_id: String,
    pub role: Role,
    pub content: String,
}

/// The state of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Started,
    Completed,
    Failed,
    #[serde(other)]
    Unknown,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Started => "started",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Unknown => "unknown",
        }
    }
}

/// A run's lifecycle and usage. Subject: `claw.v1.evt.run.<session_token>`.
/// The envelope id is `<run_id>:<status>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    pub run_id: String,
    pub session_key: String,
    pub agent_id: String,
    pub status: RunStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// What the run's model calls cost, in US dollars, at the prices configured when
    /// it ran (`[agent.models]`); absent when no model used had prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Delivery attempt of the turn request that produced this event (1 = first).
    #[serde(default)]
    pub attempt: u32,
    /// Wall time of the model call(s), milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    /// The transcript entries this run adds, in order, recorded with its final event:
    /// one message per turn instead of one per entry. The store writes them, and the
    /// run, in one transaction; they are ordered by this event's stream sequence, then
    /// by position.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<RunEntry>,
}

/// A transcript entry carried by a [`RunEvent`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RunEntry {
    /// Deterministic id, `<run_id>:user`, `<run_id>:assistant`, or for the steps of a
    /// turn with tools `<run_id>:step:<n>`; written at most once.
    pub entry_id: String,
    pub role: Role,
    pub content: String,
    /// On an assistant entry: the functions the model called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<FunctionCall>,
    /// On a tool entry: the call it is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On a tool entry: the called function's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Set on a compaction summary (role `system`, `<run_id>:summary`): the entry
    /// stands for every earlier entry before `first_kept_seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// On an assistant entry: the usage of the model call that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// What a compaction summary replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Entries from this stream sequence on are kept verbatim; older ones are what the
    /// summary says of them. [`Summary::RESET`]: a session reset, nothing before this
    /// entry is kept.
    pub first_kept_seq: u64,
}

impl Summary {
    /// `first_kept_seq` of a session reset (`/new`): the entries after this one (in
    /// transcript order) are the session's history, none before.
    pub const RESET: u64 = u64::MAX;

    pub fn is_reset(&self) -> bool {
        self.first_kept_seq == Self::RESET
    }
}

/// A live token delta, published on core NATS only (never persisted).
/// Subject: `claw.v1.evt.delta.<session_token>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaEvent {
    pub run_id: String,
    pub inbound_id: String,
    /// Delivery attempt of the turn; a retried turn restarts its deltas at offset 0.
    #[serde(default)]
    pub attempt: u32,
    /// Byte offset of `text` within the whole reply of this attempt.
    pub offset: u64,
    pub text: String,
    /// The chat being answered (the inbound message's), so that a channel adapter can
    /// show the text so far there as a draft; empty from agents before it was added.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chat_id: String,
    /// The thread being answered in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
}

/// A tool invocation. Subject: `claw.v1.tool.<tool>` (request/reply, queue group
/// `sandbox`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolCall {
    /// Deterministic id (`<run_id>:tool:<n>`); a call that may have run is never run again.
    pub call_id: String,
    pub run_id: String,
    pub session_key: String,
    pub tool: String,
    /// Arguments as the model produced them: a JSON document in text form.
    pub arguments: String,
    /// The agent whose workspace and policy the call runs under.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub agent_id: String,
    /// Who started the run, `<channel>:<sender id>`: the sender's own policy applies
    /// over the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
}

/// The result of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    pub call_id: String,
    pub ok: bool,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

impl ToolResult {
    /// A call that did not do what it asked, with the error's code and message.
    pub fn failed(
        call_id: impl Into<String>,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            call_id: call_id.into(),
            ok: false,
            content: String::new(),
            error: Some(ErrorInfo {
                code: code.into(),
                message: message.into(),
            }),
        }
    }
}

/// The state of an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    #[default]
    Pending,
    AllowedOnce,
    AllowedAlways,
    Denied,
    /// Nobody decided in time: denied.
    Expired,
    #[serde(other)]
    Unknown,
}

/// A tool call waiting for its owner's decision (`sandbox.ask`). Kept in KV
/// `claw_approvals` under `pending.<id>`; the sandbox writes it pending and waits, the
/// owner (`clawbus approvals allow|deny <id>`, the router's `/approve`) updates its
/// state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Approval {
    /// Short id people type: 12 hex digits derived from the call id.
    pub id: String,
    pub call_id: String,
    pub agent_id: String,
    pub session_key: String,
    pub tool: String,
    /// What would run (the command of an `exec`).
    pub command: String,
    pub state: ApprovalState,
    /// Unix milliseconds of the request, and the deadline after which it expires.
    pub requested_at: i64,
    pub expires_at: i64,
}

/// Asks the sandbox which tools an agent may call. Subject: `claw.v1.tools.list`
/// (request/reply, queue group `sandbox`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolListRequest {
    pub agent_id: String,
    /// Who the tools are for, `<channel>:<sender id>` (a sender's own policy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
}

/// Answer to a [`ToolListRequest`]: the tool registry as the agent may see it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolListResponse {
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// Query for a session's recent transcript. Subject: `claw.v1.store.history.<event
/// partition>` (request/reply; see `subjects::event_partition`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRequest {
    pub session_key: String,
    /// At most this many entries, newest last.
    pub limit: u32,
    /// Wait (briefly) until the store has applied the transcript event with this stream
    /// sequence: read-your-writes for an agent that just published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// Lists an agent's sessions. Subject: `claw.v1.store.sessions` (request/reply,
/// queue group `store`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionsRequest {
    /// Sessions of this agent (`agent:<id>:...`).
    pub agent_id: String,
    /// At most this many, the most recently active first.
    pub limit: u32,
    /// Only sessions active in the last this many minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_minutes: Option<u32>,
}

/// One session as listed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_key: String,
    /// Transcript entries.
    pub messages: u64,
    /// The latest entry's time (Unix ms).
    pub last_ts: i64,
}

/// Answer to a [`SessionsRequest`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SessionsResponse {
    #[serde(default)]
    pub sessions: Vec<SessionInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// Asks for a session's token usage. Subject: `claw.v1.store.usage` (request/reply,
/// queue group `store`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UsageRequest {
    pub session_key: String,
}

/// Answer to a [`UsageRequest`]: the session's runs and tokens, summed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UsageResponse {
    #[serde(default)]
    pub runs: u64,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    /// US dollars, for the runs that were priced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// One stored transcript entry.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub entry_id: String,
    pub run_id: String,
    pub role: Role,
    pub content: String,
    /// Stream sequence of the event that carried the entry: the order of entries
    /// (entries of one run event share it and keep their order in it).
    pub seq: u64,
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<FunctionCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Set on a compaction summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// On an assistant entry: the usage of the model call that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl HistoryEntry {
    /// The entry as a message for a model.
    pub fn message(&self) -> ChatMessage {
        ChatMessage {
            role: self.role,
            content: self.content.clone(),
            tool_calls: self.tool_calls.clone(),
            tool_call_id: self.tool_call_id.clone(),
            name: self.name.clone(),
            reasoning: None,
        }
    }
}

impl RunEntry {
    /// An entry `<run_id>:<suffix>` of a message.
    pub fn of(run_id: &str, suffix: &str, m: &ChatMessage) -> Self {
        Self {
            entry_id: format!("{run_id}:{suffix}"),
            role: m.role,
            content: m.content.clone(),
            tool_calls: m.tool_calls.clone(),
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
            summary: None,
            usage: None,
        }
    }
}

/// Answer to a [`HistoryRequest`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HistoryResponse {
    #[serde(default)]
    pub entries: Vec<HistoryEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}
