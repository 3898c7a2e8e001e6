//! Model providers, each speaking its API's exact wire format with streaming:
//! OpenAI Chat Completions (and every compatible server by base URL), Anthropic
//! Messages and Google Gemini. A model is named `provider/model`
//! (`anthropic/claude-sonnet-4-5`); a bare name, or a prefix that is no provider's
//! (`meta-llama/Llama-3-8B` on vLLM), goes to the OpenAI-compatible endpoint.

pub mod anthropic;
pub mod gemini;
pub mod openai;
mod sse;

use std::time::Duration;

use clawbus_config::AgentConfig;
use clawbus_wire::{ChatMessage, ErrorInfo, FunctionCall, ToolSpec, Usage};
use futures::StreamExt;
use tokio::sync::mpsc;

use anthropic::AnthropicProvider;
use gemini::GeminiProvider;
use openai::OpenAiProvider;
use sse::SseDecoder;

/// Largest reply accepted from a provider (bytes of text).
pub const MAX_REPLY_BYTES: usize = 512 * 1024;

/// The APIs clawbus speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Api {
    pub fn name(self) -> &'static str {
        match self {
            Api::OpenAi => "openai",
            Api::Anthropic => "anthropic",
            Api::Gemini => "gemini",
        }
    }

    /// The variables that configure this API.
    fn variables(self) -> &'static str {
        match self {
            Api::OpenAi => "OPENAI_BASE_URL (e.g. https://api.openai.com/v1) and OPENAI_API_KEY",
            Api::Anthropic => "ANTHROPIC_API_KEY (and ANTHROPIC_BASE_URL for a proxy)",
            Api::Gemini => "GEMINI_API_KEY (and GEMINI_BASE_URL for a proxy)",
        }
    }
}

/// `provider/model` split into the API and the provider's model name.
pub fn parse_model(model: &str) -> (Api, &str) {
    match model.split_once('/') {
        Some(("openai", m)) => (Api::OpenAi, m),
        Some(("anthropic", m)) => (Api::Anthropic, m),
        Some(("gemini" | "google", m)) => (Api::Gemini, m),
        _ => (Api::OpenAi, model),
    }
}

/// A configured provider for the agent's model.
#[derive(Clone)]
pub enum Provider {
    OpenAi(OpenAiProvider),
    Anthropic(AnthropicProvider),
    Gemini(GeminiProvider),
}

impl Provider {
    /// The provider of `model_ref` (`provider/model`) with this key, or why there is
    /// none: its API has no endpoint.
    pub fn for_model(
        cfg: &AgentConfig,
        model_ref: &str,
        key: Option<&str>,
    ) -> Result<Provider, ProviderError> {
        let (api, model) = parse_model(model_ref);
        let timeout = Duration::from_secs(cfg.provider.timeout_secs);
        let not_configured = || ProviderError::NotConfigured {
            model: model_ref.to_owned(),
            variables: api.variables(),
        };
        // An API with an official endpoint needs only its key; a base URL alone
        // serves a proxy or a local server without keys.
        let url = match api {
            Api::OpenAi => cfg.provider.base_url(),
            Api::Anthropic => cfg
                .anthropic
                .base_url()
                .or(key.map(|_| anthropic::DEFAULT_BASE_URL)),
            Api::Gemini => cfg
                .gemini
                .base_url()
                .or(key.map(|_| gemini::DEFAULT_BASE_URL)),
        };
        let mut ep = Endpoint::new(url.ok_or_else(not_configured)?, key, model, timeout)?;
        ep.max_tokens = cfg
            .max_tokens
            .or_else(|| cfg.model_spec(model_ref).and_then(|m| m.max_output_tokens));
        ep.idle_timeout = Duration::from_secs(cfg.provider.idle_timeout_secs);
        Ok(match api {
            Api::OpenAi => Provider::OpenAi(OpenAiProvider(ep)),
            Api::Anthropic => Provider::Anthropic(AnthropicProvider(ep)),
            Api::Gemini => Provider::Gemini(GeminiProvider(ep)),
        })
    }

    pub fn api(&self) -> Api {
        match self {
            Provider::OpenAi(_) => Api::OpenAi,
            Provider::Anthropic(_) => Api::Anthropic,
            Provider::Gemini(_) => Api::Gemini,
        }
    }

    /// The model as `provider/model`.
    pub fn model_ref(&self) -> String {
        let model = match self {
            Provider::OpenAi(p) => &p.0.model,
            Provider::Anthropic(p) => &p.0.model,
            Provider::Gemini(p) => &p.0.model,
        };
        format!("{}/{model}", self.api().name())
    }

    /// Streams one answer; each text delta goes to `deltas` when given.
    pub async fn chat(
        &self,
        prompt: &Prompt<'_>,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        let mut c = match self {
            Provider::OpenAi(p) => p.chat(prompt, deltas).await,
            Provider::Anthropic(p) => p.chat(prompt, deltas).await,
            Provider::Gemini(p) => p.chat(prompt, deltas).await,
        }?;
        // Which model answered, as `provider/model` (the provider's own name for it).
        c.model = format!("{}/{}", self.api().name(), c.model);
        if !c.tool_calls.is_empty() {
            // Gemini says STOP, Anthropic tool_use: one name for every API.
            c.finish_reason = Some("tool_calls".into());
        }
        Ok(c)
    }
}

/// Where and how a provider is called: its HTTP client, base URL, key and model.
#[derive(Clone)]
pub struct Endpoint {
    pub(crate) http: reqwest::Client,
    /// Without a trailing slash.
    pub(crate) base_url: String,
    pub(crate) api_key: Option<String>,
    /// The provider's name of the model.
    pub model: String,
    /// The most tokens an answer may have, when set.
    pub max_tokens: Option<u32>,
    /// A stream silent this long is aborted.
    pub idle_timeout: Duration,
}

impl Endpoint {
    pub fn new(
        base_url: &str,
        api_key: Option<&str>,
        model: &str,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(timeout)
            .pool_max_idle_per_host(256)
            .user_agent(concat!("clawbus/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Network(e.to_string()))?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.map(str::to_owned),
            model: model.to_owned(),
            max_tokens: None,
            idle_timeout: Duration::from_secs(60),
        })
    }

    /// POSTs `body` to `path` (after the base URL) with `headers` and the key in
    /// `key_header` (`authorization` is sent as a bearer token); a failure status
    /// becomes an error with the message `error_message` finds in the body.
    pub(crate) async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
        key_header: &str,
        headers: &[(&str, &str)],
        error_message: fn(&str) -> String,
    ) -> Result<reqwest::Response, ProviderError> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(k) = &self.api_key {
            req = if key_header == "authorization" {
                req.bearer_auth(k)
            } else {
                req.header(key_header, k)
            };
        }
        send(req, error_message).await
    }

    /// The server-sent events of a response, watched for silence.
    pub(crate) fn events(&self, resp: reqwest::Response) -> Events {
        Events {
            dec: SseDecoder::default(),
            body: resp.bytes_stream().boxed(),
            ready: Default::default(),
            ended: false,
            idle: self.idle_timeout,
        }
    }
}

/// Sends a request; a non-success status becomes [`ProviderError::Status`] with the
/// message `error_message` finds in the body.
async fn send(
    req: reqwest::RequestBuilder,
    error_message: fn(&str) -> String,
) -> Result<reqwest::Response, ProviderError> {
    let resp = req
        .send()
        .await
        .map_err(|e| ProviderError::Network(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = resp.text().await.unwrap_or_default();
    Err(ProviderError::Status {
        status: status.as_u16(),
        message: error_message(&text),
        retry_after,
    })
}

/// The server-sent events of a response, one data payload at a time.
pub(crate) struct Events {
    dec: SseDecoder,
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    ready: std::collections::VecDeque<String>,
    ended: bool,
    idle: Duration,
}

impl Events {
    /// The next event's data; `None` once the stream has ended.
    pub async fn next(&mut self) -> Result<Option<String>, ProviderError> {
        loop {
            if let Some(d) = self.ready.pop_front() {
                return Ok(Some(d));
            }
            if self.ended {
                return Ok(None);
            }
            let next = tokio::time::timeout(self.idle, self.body.next())
                .await
                .map_err(|_| {
                    ProviderError::Network(format!(
                        "the provider sent nothing for {} s (agent.provider.idle_timeout_secs)",
                        self.idle.as_secs()
                    ))
                })?;
            match next {
                Some(chunk) => {
                    let chunk = chunk.map_err(|e| ProviderError::Network(e.to_string()))?;
                    let events = self.dec.feed(&chunk).map_err(ProviderError::Protocol)?;
                    self.ready.extend(events);
                }
                None => {
                    self.ended = true;
                    self.ready.extend(self.dec.finish());
                }
            }
        }
    }
}

/// The answer as it streams in: bounded, and forwarded as deltas.
#[derive(Default)]
pub(crate) struct Answer {
    pub text: String,
}

impl Answer {
    pub async fn push(
        &mut self,
        piece: &str,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<(), ProviderError> {
        if piece.is_empty() {
            return Ok(());
        }
        if self.text.len() + piece.len() > MAX_REPLY_BYTES {
            return Err(ProviderError::Protocol(format!(
                "reply longer than {MAX_REPLY_BYTES} bytes"
            )));
        }
        self.text.push_str(piece);
        if let Some(tx) = deltas {
            let _ = tx.send(piece.to_owned()).await;
        }
        Ok(())
    }
}

/// An error body that is not the API's JSON, shortened for a message.
pub(crate) fn short_body(body: &str) -> String {
    let s: String = body.chars().take(300).collect();
    if s.is_empty() {
        "(empty body)".into()
    } else {
        s
    }
}

/// How much a model thinks before answering.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Thinking {
    #[default]
    Off,
    Minimal,
    Low,
    Medium,
    High,
}

impl Thinking {
    pub fn parse(s: &str) -> Option<Thinking> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" => Thinking::Off,
            "minimal" | "min" => Thinking::Minimal,
            "low" => Thinking::Low,
            "medium" | "med" => Thinking::Medium,
            "high" | "max" => Thinking::High,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Thinking::Off => "off",
            Thinking::Minimal => "minimal",
            Thinking::Low => "low",
            Thinking::Medium => "medium",
            Thinking::High => "high",
        }
    }

    /// Tokens of thinking for APIs that take a budget (Anthropic, Gemini).
    pub fn budget(self) -> Option<u32> {
        match self {
            Thinking::Off => None,
            Thinking::Minimal => Some(1024),
            Thinking::Low => Some(2048),
            Thinking::Medium => Some(8192),
            Thinking::High => Some(16384),
        }
    }
}

/// `/think <level> <message>` (also `/think:<level>`, `/t <level>`) at the start of a
/// message: the level for this message and the message without the directive.
pub fn thinking_directive(text: &str) -> Option<(Thinking, &str)> {
    let t = text.trim_start();
    let rest = ["/thinking", "/think", "/t"]
        .iter()
        .find_map(|d| t.strip_prefix(d))
        .filter(|r| r.starts_with([':', ' ']))?;
    let rest = rest.trim_start_matches([':', ' ']);
    let (level, message) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    Some((Thinking::parse(level)?, message.trim_start()))
}

/// What a model is asked: the conversation, the functions it may call, how much it
/// thinks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prompt<'a> {
    pub messages: &'a [ChatMessage],
    pub tools: &'a [ToolSpec],
    /// The caller's `tool_choice` in OpenAI's form (`auto`, `none`, `required`, or a
    /// JSON object naming a function), as JSON text or a bare word.
    pub tool_choice: Option<&'a str>,
    pub thinking: Thinking,
    /// What is left of the turn's time (`None`: the agent's whole turn timeout) and the
    /// turn's limit in seconds, for the error when it runs out.
    pub time_left: Option<(std::time::Duration, u64)>,
}

impl<'a> Prompt<'a> {
    pub fn new(messages: &'a [ChatMessage]) -> Self {
        Self {
            messages,
            ..Default::default()
        }
    }

    /// The tool choice as a mode (`auto`, `none`, `required`) and, when it names one
    /// function, that function.
    pub fn choice(&self) -> (&'static str, Option<String>) {
        let Some(c) = self.tool_choice.map(str::trim) else {
            return ("auto", None);
        };
        let word = c.trim_matches('"');
        match word {
            "none" => return ("none", None),
            "required" | "any" => return ("required", None),
            "auto" | "" => return ("auto", None),
            _ => {}
        }
        let v: serde_json::Value = serde_json::from_str(c).unwrap_or_default();
        let name = v
            .pointer("/function/name")
            .or_else(|| v.get("name"))
            .and_then(|n| n.as_str())
            .map(str::to_owned);
        match name {
            Some(n) => ("required", Some(n)),
            None => ("auto", None),
        }
    }
}

/// A tool's parameter schema as JSON (an empty object schema when it has none or it
/// does not parse).
pub(crate) fn schema_of(t: &ToolSpec) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&t.parameters)
        .ok()
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}))
}

/// A call's arguments as a JSON object, as Anthropic's `input` and Gemini's `args`
/// need them (arguments that are not an object become `{}`).
pub(crate) fn arguments_object(c: &FunctionCall) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(&c.arguments)
        .ok()
        .filter(serde_json::Value::is_object)
        .unwrap_or_else(|| serde_json::json!({}))
}

/// Function calls as they stream in, by their index in the answer: an id and name
/// first, then the arguments in fragments.
#[derive(Default)]
pub(crate) struct CallsInProgress {
    calls: std::collections::BTreeMap<u64, FunctionCall>,
    bytes: usize,
}

impl CallsInProgress {
    /// Starts (or names) the call at `index`.
    pub fn start(&mut self, index: u64, id: Option<&str>, name: Option<&str>) {
        let c = self.calls.entry(index).or_default();
        if let Some(id) = id.filter(|i| !i.is_empty()) {
            c.id = id.to_owned();
        }
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            c.name.push_str(n);
        }
    }

    /// Appends a fragment of the arguments of the call at `index`.
    pub fn arguments(&mut self, index: u64, fragment: &str) -> Result<(), ProviderError> {
        self.bytes += fragment.len();
        if self.bytes > MAX_REPLY_BYTES {
            return Err(ProviderError::Protocol(format!(
                "function call arguments longer than {MAX_REPLY_BYTES} bytes"
            )));
        }
        self.calls
            .entry(index)
            .or_default()
            .arguments
            .push_str(fragment);
        Ok(())
    }

    /// The finished calls, in order; a call without arguments gets `{}`.
    pub fn finish(self) -> Vec<FunctionCall> {
        self.calls
            .into_values()
            .filter(|c| !c.name.is_empty())
            .map(|mut c| {
                if c.arguments.trim().is_empty() {
                    c.arguments = "{}".into();
                }
                c
            })
            .collect()
    }
}

/// The text of the system messages, joined.
pub(crate) fn system_text(messages: &[ChatMessage]) -> String {
    messages
        .iter()
        .filter(|m| m.role == clawbus_wire::Role::System)
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// A piece of a turn in APIs whose messages are lists of blocks.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Block<'a> {
    /// The provider's own reasoning blocks (JSON array), sent back as they came.
    Reasoning(&'a str),
    Text(String),
    Call(&'a FunctionCall),
    /// A tool's result: call id, function name, content.
    Result(&'a str, &'a str, &'a str),
}

/// The conversation without system messages, as (is the user, blocks): tool results
/// speak as the user, empty messages are dropped, consecutive messages of one role
/// merged (texts joined by a blank line, a tool result before any text), leading
/// assistant messages dropped (Anthropic and Gemini require the user to speak first
/// and roles to alternate).
pub(crate) fn alternating(messages: &[ChatMessage]) -> Vec<(bool, Vec<Block<'_>>)> {
    use clawbus_wire::Role;
    let mut out: Vec<(bool, Vec<Block<'_>>)> = Vec::new();
    for m in messages {
        let (user, blocks) = match m.role {
            Role::User if !m.content.is_empty() => (true, vec![Block::Text(m.content.clone())]),
            Role::Tool => (
                true,
                vec![Block::Result(
                    m.tool_call_id.as_deref().unwrap_or_default(),
                    m.name.as_deref().unwrap_or_default(),
                    &m.content,
                )],
            ),
            Role::Assistant => {
                let mut b = Vec::new();
                if let Some(r) = m.reasoning.as_deref() {
                    b.push(Block::Reasoning(r));
                }
                if !m.content.is_empty() {
                    b.push(Block::Text(m.content.clone()));
                }
                b.extend(m.tool_calls.iter().map(Block::Call));
                (false, b)
            }
            _ => continue,
        };
        if blocks.iter().all(|b| matches!(b, Block::Reasoning(_))) || (out.is_empty() && !user) {
            continue;
        }
        match out.last_mut() {
            Some((u, have)) if *u == user => {
                for b in blocks {
                    match (have.last_mut(), b) {
                        (Some(Block::Text(t)), Block::Text(more)) => {
                            t.push_str("\n\n");
                            t.push_str(&more);
                        }
                        (_, b) => have.push(b),
                    }
                }
            }
            _ => out.push((user, blocks)),
        }
    }
    for (user, blocks) in &mut out {
        if *user {
            // Tool results lead their message (Anthropic requires it).
            blocks.sort_by_key(|b| !matches!(b, Block::Result(..)));
        }
    }
    out
}

/// The result of one model call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Completion {
    pub text: String,
    /// Functions the model called (then `finish_reason` is `tool_calls`).
    pub tool_calls: Vec<FunctionCall>,
    /// Reasoning blocks to send back with the calls (see `ChatMessage::reasoning`).
    pub reasoning: Option<String>,
    /// The usage of this call alone, when `usage` is a turn's sum.
    pub call_usage: Option<Usage>,
    pub usage: Option<Usage>,
    pub model: String,
    /// The provider's reason for ending the answer, as it sent it.
    pub finish_reason: Option<String>,
}

/// Why a model call failed, and whether trying again may help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error(
        "no model provider is configured for `{model}`. Set {variables} (or the [agent] \
         section in clawbus.toml), then restart the agent"
    )]
    NotConfigured {
        model: String,
        variables: &'static str,
    },
    #[error("provider answered HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        /// The provider's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    #[error("the turn ran out of time calling models ({0} s, agent.turn_timeout_secs)")]
    TurnTimeout(u64),
    #[error("{0}")]
    ContextOverflow(String),
    #[error("provider unreachable: {0}")]
    Network(String),
    #[error("provider sent an invalid response: {0}")]
    Protocol(String),
}

impl ProviderError {
    /// Rate limits, server errors and network failures are worth retrying.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Status { status, .. } => matches!(status, 408 | 409 | 429 | 500..=599),
            ProviderError::Network(_) => true,
            ProviderError::NotConfigured { .. }
            | ProviderError::Protocol(_)
            | ProviderError::TurnTimeout(_)
            | ProviderError::ContextOverflow(_) => false,
        }
    }

    pub fn info(&self) -> ErrorInfo {
        let code = match self {
            ProviderError::NotConfigured { .. } => "provider_not_configured",
            ProviderError::Status {
                status: 401 | 403, ..
            } => "provider_auth_failed",
            ProviderError::Status { status: 429, .. } => "provider_rate_limited",
            ProviderError::Status { status: 529, .. } => "provider_overloaded",
            ProviderError::Status { .. } => "provider_error",
            ProviderError::Network(_) => "provider_unreachable",
            ProviderError::Protocol(_) => "provider_protocol_error",
            ProviderError::TurnTimeout(_) => "turn_timeout",
            ProviderError::ContextOverflow(_) => "context_window_exceeded",
        };
        ErrorInfo {
            code: code.into(),
            message: self.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_directives_lead_a_message() {
        assert_eq!(
            thinking_directive("/think high why?"),
            Some((Thinking::High, "why?"))
        );
        assert_eq!(
            thinking_directive("/think:low  go"),
            Some((Thinking::Low, "go"))
        );
        assert_eq!(thinking_directive("/t off x"), Some((Thinking::Off, "x")));
        assert_eq!(
            thinking_directive("/think medium"),
            Some((Thinking::Medium, ""))
        );
        assert_eq!(thinking_directive("/think loudly"), None);
        assert_eq!(thinking_directive("/thinker high x"), None);
        assert_eq!(thinking_directive("please /think high"), None);
        assert!(Thinking::High > Thinking::Low);
        assert_eq!(Thinking::Off.budget(), None);
    }
}
