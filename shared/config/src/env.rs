//! The environment's layers: the standard variables users already have, then
//! `CLAWBUS__`-prefixed ones.

use figment::providers::{Env, Serialized};
use figment::Figment;

/// Each standard variable and the key it sets, in one table.
pub const STANDARD_VARIABLES: &[(&str, &str)] = &[
    ("OPENAI_BASE_URL", "agent.provider.base_url"),
    ("OPENAI_API_KEY", "agent.provider.api_key"),
    ("CLAWBUS_MODEL", "agent.model"),
    ("ANTHROPIC_BASE_URL", "agent.anthropic.base_url"),
    ("ANTHROPIC_API_KEY", "agent.anthropic.api_key"),
    ("GEMINI_BASE_URL", "agent.gemini.base_url"),
    ("GEMINI_API_KEY", "agent.gemini.api_key"),
    ("TELEGRAM_BOT_TOKEN", "channels.telegram.bot_token"),
    ("NATS_URL", "nats.url"),
    ("DATABASE_URL", "store.database_url"),
    ("CLAWBUS_GATEWAY_TOKEN", "gateway.token"),
    ("CLAWBUS_HOME", "state_dir"),
];

/// `fig` with the environment's layers merged over it.
pub(crate) fn merge(mut fig: Figment) -> Figment {
    for (var, key) in STANDARD_VARIABLES {
        fig = fig.merge(Env::raw().only(&[var]).map(move |_| (*key).into()));
    }
    fig.merge(fallback_models())
        .merge(Env::prefixed("CLAWBUS__").split("__"))
}

/// `CLAWBUS_FALLBACK_MODELS=a/x,b/y` as `agent.fallback_models` (when set).
fn fallback_models() -> Figment {
    match std::env::var("CLAWBUS_FALLBACK_MODELS") {
        Ok(v) => {
            let models: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect();
            Figment::from(Serialized::default("agent.fallback_models", models))
        }
        Err(_) => Figment::new(),
    }
}
