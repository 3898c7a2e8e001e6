//! Auth profiles and model fallback.
//!
//! A turn tries the agent's model, then its fallback models (`CLAWBUS_FALLBACK_MODELS`),
//! each with the keys configured for its provider (auth profiles) in order:
//! - a rate limit or an auth error cools that key down (30 s, then 1 min, then 5 min,
//!   or the provider's `Retry-After`, capped) and the next key is tried;
//! - a billing error disables the key until the configuration changes (a new key is a
//!   new profile);
//! - a server or network error (after `max_retries` tries) moves to the next model;
//! - a request the provider refuses (400) ends the turn: another model would too.
//!
//! Cooldowns live in the KV bucket `claw_profiles`, shared by every agent replica, and
//! are cached for a second. A streamed turn falls back only while nothing of its answer
//! has been sent; the whole turn is bounded by `agent.turn_timeout_secs`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use clawbus_config::AgentConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::providers::{parse_model, Api, Completion, Prompt, Provider, ProviderError};

/// Cooldowns after consecutive rate limits or auth errors of one key.
const COOLDOWNS: [Duration; 3] = [
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(300),
];
/// How long a key's cooldown state is trusted before it is read again.
const CACHE_FOR: Duration = Duration::from_secs(1);

/// Unix milliseconds now.
fn now() -> u64 {
    clawbus_wire::now_ms().max(0) as u64
}

/// One key of one model's provider.
pub struct Profile {
    /// `provider/model#n` for logs and errors (never the key).
    pub label: String,
    /// KV key of its state: `<provider>.<hash of the key>`.
    state_key: String,
    pub provider: Provider,
}

/// A model of the chain and its profiles (none when its provider is not configured).
pub struct Candidate {
    pub model: String,
    pub profiles: Vec<Profile>,
    unconfigured: Option<ProviderError>,
}

/// What to do after a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// This key is the problem: cool it down, try the next key.
    CoolKey,
    /// This key cannot pay: disable it, try the next key.
    DisableKey,
    /// The model or provider is in trouble: try the next model.
    NextModel,
    /// The request itself is refused: stop.
    Stop,
}

/// Where a failure sends the turn.
pub fn classify(e: &ProviderError) -> Next {
    match e {
        ProviderError::Status {
            status, message, ..
        } => {
            let m = message.to_ascii_lowercase();
            if *status == 402
                || m.contains("insufficient_quota")
                || m.contains("billing")
                || m.contains("credit balance")
            {
                Next::DisableKey
            } else {
                match status {
                    401 | 403 | 429 => Next::CoolKey,
                    404 | 408 | 409 | 500..=599 => Next::NextModel,
                    _ => Next::Stop,
                }
            }
        }
        ProviderError::Network(_) | ProviderError::NotConfigured { .. } => Next::NextModel,
        ProviderError::Protocol(_)
        | ProviderError::TurnTimeout(_)
        | ProviderError::ContextOverflow(_) => Next::Stop,
    }
}

/// The state of a key, as kept in KV.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyState {
    /// Unix milliseconds until which the key rests.
    pub until_ms: u64,
    /// Consecutive failures (picks the next cooldown).
    pub failures: u32,
    pub disabled: bool,
    pub reason: String,
}

impl KeyState {
    fn resting(&self, now_ms: u64) -> bool {
        self.disabled || self.until_ms > now_ms
    }
}

/// Key states shared through KV (none in unit tests), cached for a second.
pub struct Cooldowns {
    kv: Option<kv::Store>,
    cache: Mutex<HashMap<String, (Instant, Option<KeyState>)>>,
    max_retry_after: Duration,
}

impl Cooldowns {
    pub fn new(kv: Option<kv::Store>, max_retry_after: Duration) -> Self {
        Self {
            kv,
            cache: Mutex::new(HashMap::new()),
            max_retry_after,
        }
    }

    fn cached(&self, key: &str) -> Option<Option<KeyState>> {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.get(key)
            .filter(|(at, _)| at.elapsed() < CACHE_FOR)
            .map(|(_, s)| s.clone())
    }

    fn remember(&self, key: &str, state: Option<KeyState>) {
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.insert(key.to_owned(), (Instant::now(), state));
    }

    /// The key's state (a KV read at most once a second per key).
    pub async fn get(&self, key: &str) -> Option<KeyState> {
        if let Some(s) = self.cached(key) {
            return s;
        }
        let state = match &self.kv {
            Some(kv) => match kv.get(key).await {
                Ok(Some(bytes)) => serde_json::from_slice(&bytes).ok(),
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read a provider key's cooldown");
                    None
                }
            },
            None => self.cached_any(key),
        };
        self.remember(key, state.clone());
        state
    }

    /// Without KV, the last state written stays (tests).
    fn cached_any(&self, key: &str) -> Option<KeyState> {
        let c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.get(key).and_then(|(_, s)| s.clone())
    }

    async fn put(&self, key: &str, state: KeyState) {
        if let Some(kv) = &self.kv {
            let bytes = serde_json::to_vec(&state).unwrap_or_default();
            if let Err(e) = kv.put(key, bytes.into()).await {
                tracing::warn!(error = %e, "Cannot share a provider key's cooldown");
            }
        }
        self.remember(key, Some(state));
    }

    /// Rests a key after a rate limit or an auth error.
    pub async fn cool(&self, key: &str, retry_after: Option<Duration>, reason: &str) -> KeyState {
        let failures = self.get(key).await.map_or(0, |s| s.failures) + 1;
        let base = COOLDOWNS[(failures as usize - 1).min(COOLDOWNS.len() - 1)];
        let rest = retry_after.map_or(base, |ra| ra.min(self.max_retry_after));
        let state = KeyState {
            until_ms: now() + rest.as_millis() as u64,
            failures,
            disabled: false,
            reason: reason.to_owned(),
        };
        self.put(key, state.clone()).await;
        state
    }

    /// Disables a key (billing) until the configuration changes.
    pub async fn disable(&self, key: &str, reason: &str) {
        let state = KeyState {
            disabled: true,
            reason: reason.to_owned(),
            ..Default::default()
        };
        self.put(key, state).await;
    }

    /// A key that answered is well again.
    pub async fn clear(&self, key: &str) {
        if self.get(key).await.is_some_and(|s| s.failures > 0) {
            if let Some(kv) = &self.kv {
                let _ = kv.delete(key).await;
            }
            self.remember(key, None);
        }
    }
}

/// The agent's models with their profiles, and the cooldowns of their keys.
pub struct Failover {
    pub candidates: Vec<Candidate>,
    pub cooldowns: Cooldowns,
    max_retries: u32,
    turn_timeout: Duration,
}

/// The keys configured for an API, in order (empty: one profile without a key, when
/// the endpoint has a base URL).
fn keys_of(cfg: &AgentConfig, api: Api) -> Vec<String> {
    let (first, more) = match api {
        Api::OpenAi => (cfg.provider.api_key(), &cfg.provider.api_keys),
        Api::Anthropic => (cfg.anthropic.api_key(), &cfg.anthropic.api_keys),
        Api::Gemini => (cfg.gemini.api_key(), &cfg.gemini.api_keys),
    };
    let mut keys: Vec<String> = first.map(str::to_owned).into_iter().collect();
    for k in more {
        use secrecy::ExposeSecret;
        let k = k.expose_secret().trim();
        if !k.is_empty() && !keys.iter().any(|x| x == k) {
            keys.push(k.to_owned());
        }
    }
    keys
}

/// A key's state key: the provider and a hash of the key (the key never leaves).
fn state_key(api: Api, key: Option<&str>) -> String {
    let h = clawbus_bus::subjects::session_hash(key.unwrap_or(""));
    format!("{}.{h:016x}", api.name())
}

impl Failover {
    pub fn from_config(cfg: &AgentConfig, kv: Option<kv::Store>) -> Failover {
        let models = std::iter::once(cfg.model.clone()).chain(cfg.fallback_models.iter().cloned());
        let mut candidates = Vec::new();
        for model in models {
            let (api, _) = parse_model(&model);
            let keys = keys_of(cfg, api);
            let keys: Vec<Option<&str>> = if keys.is_empty() {
                vec![None]
            } else {
                keys.iter().map(|k| Some(k.as_str())).collect()
            };
            let mut profiles = Vec::new();
            let mut unconfigured = None;
            for (i, key) in keys.into_iter().enumerate() {
                match Provider::for_model(cfg, &model, key) {
                    Ok(provider) => profiles.push(Profile {
                        label: format!("{}#{}", provider.model_ref(), i + 1),
                        state_key: state_key(api, key),
                        provider,
                    }),
                    Err(e) => unconfigured = Some(e),
                }
            }
            candidates.push(Candidate {
                model,
                profiles,
                unconfigured,
            });
        }
        Failover {
            candidates,
            cooldowns: Cooldowns::new(kv, Duration::from_secs(cfg.provider.max_retry_after_secs)),
            max_retries: cfg.provider.max_retries,
            turn_timeout: Duration::from_secs(cfg.turn_timeout_secs),
        }
    }

    /// The agent's own model as `provider/model`.
    pub fn primary(&self) -> String {
        self.candidates
            .first()
            .and_then(|c| c.profiles.first())
            .map(|p| p.provider.model_ref())
            .or_else(|| self.candidates.first().map(|c| c.model.clone()))
            .unwrap_or_default()
    }

    /// Why no model can answer at all, when none is configured.
    pub fn unconfigured(&self) -> Option<ProviderError> {
        if self.candidates.iter().any(|c| !c.profiles.is_empty()) {
            return None;
        }
        self.candidates.first().and_then(|c| c.unconfigured.clone())
    }

    /// Answers with the first model and key that can; `deltas` receives the answer as
    /// it streams (a streamed turn stops falling back once part of it was sent).
    pub async fn chat(
        &self,
        prompt: &Prompt<'_>,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        let (timeout, limit) = match prompt.time_left {
            Some((left, limit)) => (left.min(self.turn_timeout), limit),
            None => (self.turn_timeout, self.turn_timeout.as_secs()),
        };
        match tokio::time::timeout(timeout, self.chain(prompt, deltas)).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::TurnTimeout(limit)),
        }
    }

    async fn chain(
        &self,
        prompt: &Prompt<'_>,
        deltas: Option<&mpsc::Sender<String>>,
    ) -> Result<Completion, ProviderError> {
        if let Some(e) = self.unconfigured() {
            return Err(e);
        }
        let mut last: Option<ProviderError> = None;
        for candidate in &self.candidates {
            'keys: for p in &candidate.profiles {
                let now = now();
                if let Some(s) = self
                    .cooldowns
                    .get(&p.state_key)
                    .await
                    .filter(|s| s.resting(now))
                {
                    tracing::debug!(profile = %p.label, reason = %s.reason, "Key resting; skipped");
                    last.get_or_insert(ProviderError::Status {
                        status: 429,
                        message: format!(
                            "every key of {} is resting after: {}",
                            candidate.model, s.reason
                        ),
                        retry_after: None,
                    });
                    continue;
                }
                let mut tries = 0;
                loop {
                    let (result, streamed) = attempt(&p.provider, prompt, deltas).await;
                    let e = match result {
                        Ok(c) => {
                            self.cooldowns.clear(&p.state_key).await;
                            return Ok(c);
                        }
                        Err(e) => e,
                    };
                    let next = classify(&e);
                    tracing::warn!(profile = %p.label, error = %e, next = ?next, "Model call failed");
                    if streamed {
                        // Part of this answer reached the caller: no other model may
                        // continue it.
                        return Err(e);
                    }
                    match next {
                        Next::CoolKey => {
                            let retry_after = match &e {
                                ProviderError::Status { retry_after, .. } => *retry_after,
                                _ => None,
                            };
                            self.cooldowns
                                .cool(&p.state_key, retry_after, &e.to_string())
                                .await;
                        }
                        Next::DisableKey => {
                            tracing::error!(profile = %p.label, "Key disabled (billing) until the configuration changes");
                            self.cooldowns.disable(&p.state_key, &e.to_string()).await;
                        }
                        Next::NextModel if tries < self.max_retries && deltas.is_none() => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(tries))).await;
                            continue;
                        }
                        Next::NextModel => {
                            last = Some(e);
                            break 'keys;
                        }
                        Next::Stop => return Err(e),
                    }
                    last = Some(e);
                    continue 'keys;
                }
            }
        }
        Err(last.unwrap_or(ProviderError::Status {
            status: 503,
            message: "no model could answer".into(),
            retry_after: None,
        }))
    }
}

/// One call; true when part of its answer was passed on to `deltas`.
async fn attempt(
    provider: &Provider,
    prompt: &Prompt<'_>,
    deltas: Option<&mpsc::Sender<String>>,
) -> (Result<Completion, ProviderError>, bool) {
    let Some(out) = deltas else {
        return (provider.chat(prompt, None).await, false);
    };
    let (tx, mut rx) = mpsc::channel::<String>(256);
    let call = async move {
        let r = provider.chat(prompt, Some(&tx)).await;
        drop(tx);
        r
    };
    let forward = async {
        let mut sent = false;
        while let Some(d) = rx.recv().await {
            sent = true;
            let _ = out.send(d).await;
        }
        sent
    };
    tokio::join!(call, forward)
}

/// The agent's models with failover, and those a session or an agent chose instead
/// (`/model`, `[agent.agents.<id>] model`): each a chain of its own (the chosen model,
/// then the fallbacks), built on first use and kept.
pub struct Models {
    default: std::sync::Arc<Failover>,
    cfg: AgentConfig,
    kv: Option<kv::Store>,
    chosen: Mutex<HashMap<String, std::sync::Arc<Failover>>>,
}

impl Models {
    pub fn new(cfg: &AgentConfig, kv: Option<kv::Store>) -> Self {
        Self {
            default: std::sync::Arc::new(Failover::from_config(cfg, kv.clone())),
            cfg: cfg.clone(),
            kv,
            chosen: Mutex::new(HashMap::new()),
        }
    }

    /// The chain for a turn: the session's model, else the agent's own, else the
    /// default.
    pub fn get(&self, agent: &str, session_model: Option<&str>) -> std::sync::Arc<Failover> {
        let model = session_model
            .or_else(|| self.cfg.agents.get(agent).and_then(|a| a.model.as_deref()))
            .filter(|m| *m != self.cfg.model);
        let Some(model) = model else {
            return self.default.clone();
        };
        let mut chosen = self.chosen.lock().unwrap_or_else(|p| p.into_inner());
        chosen
            .entry(model.to_owned())
            .or_insert_with(|| {
                let cfg = AgentConfig {
                    model: model.to_owned(),
                    ..self.cfg.clone()
                };
                std::sync::Arc::new(Failover::from_config(&cfg, self.kv.clone()))
            })
            .clone()
    }

    /// The agent's own model as `provider/model`.
    pub fn primary(&self) -> String {
        self.default.primary()
    }

    pub fn unconfigured(&self) -> Option<ProviderError> {
        self.default.unconfigured()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(s: u16, m: &str) -> ProviderError {
        ProviderError::Status {
            status: s,
            message: m.into(),
            retry_after: None,
        }
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(classify(&status(429, "slow down")), Next::CoolKey);
        assert_eq!(classify(&status(401, "bad key")), Next::CoolKey);
        assert_eq!(classify(&status(402, "pay")), Next::DisableKey);
        assert_eq!(
            classify(&status(429, "insufficient_quota")),
            Next::DisableKey
        );
        assert_eq!(classify(&status(529, "overloaded")), Next::NextModel);
        assert_eq!(classify(&status(404, "no such model")), Next::NextModel);
        assert_eq!(
            classify(&ProviderError::Network("reset".into())),
            Next::NextModel
        );
        assert_eq!(classify(&status(400, "bad request")), Next::Stop);
        assert_eq!(classify(&ProviderError::TurnTimeout(1)), Next::Stop);
    }

    #[tokio::test]
    async fn cooldowns_escalate_and_honour_retry_after_capped() {
        let c = Cooldowns::new(None, Duration::from_secs(120));
        let now = now();
        let s1 = c.cool("k", None, "429").await;
        assert!((29_000..=31_000).contains(&(s1.until_ms - now)));
        let s2 = c.cool("k", None, "429").await;
        assert!(s2.until_ms - now >= 59_000 && s2.failures == 2);
        let s3 = c.cool("k", None, "429").await;
        assert!(s3.until_ms - now >= 299_000);
        let s4 = c.cool("k", Some(Duration::from_secs(10_000)), "429").await;
        assert!(s4.until_ms - now <= 121_000, "Retry-After is capped");
        c.disable("b", "billing").await;
        assert!(c.get("b").await.unwrap().resting(u64::MAX - 1));
        c.clear("k").await;
        assert!(c.get("k").await.is_none());
    }

    #[test]
    fn state_keys_hide_the_key_and_are_kv_safe() {
        let k = state_key(Api::Anthropic, Some("sk-ant-secret"));
        assert!(k.starts_with("anthropic.") && !k.contains("secret"));
        assert!(k[10..].bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
