//! Chat commands (`/new`, `/status`, `/model`, ...): answered by the router without a
//! model call where possible, or turned into a turn for the agent.

use clawbus_config::{Config, THINKING_LEVELS};

use crate::state::SessionState;

/// Longest command name.
const MAX_NAME: usize = 32;
/// Longest `/model` argument.
const MAX_MODEL_REF: usize = 200;

/// A command at the start of a message: its name (lower case, without a `@bot`
/// suffix) and the text after it. `/etc/hosts` and `/ 5` are not commands.
pub fn parse(text: &str) -> Option<(String, &str)> {
    let t = text.trim_start();
    let rest = t.strip_prefix('/')?;
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    let token = &rest[..end];
    let name = token.split_once('@').map_or(token, |(n, _)| n);
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && token.split_once('@').is_none_or(|(_, bot)| {
            !bot.is_empty() && bot.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    valid.then(|| (name.to_ascii_lowercase(), rest[end..].trim()))
}

/// What a command comes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Answered here; `error` marks a refusal.
    Reply { text: String, error: bool },
    /// A turn for the agent with this text (starting the session afresh when
    /// `reset`).
    Turn { text: String, reset: bool },
    /// `/model` or `/think` changed the session: saved, then answered.
    Set { state: SessionState, text: String },
    /// `/approve`: the router decides the approval, then answers.
    Approve { id: String, decision: String },
    /// `/stop`: the session's run in progress is cancelled.
    Stop,
    /// `/usage`: the store sums the session's tokens.
    Usage,
}

fn reply(text: impl Into<String>) -> Outcome {
    Outcome::Reply {
        text: text.into(),
        error: false,
    }
}

fn refuse(text: impl Into<String>) -> Outcome {
    Outcome::Reply {
        text: text.into(),
        error: true,
    }
}

pub const HELP: &str = "Commands:\n\
/new [message], /reset [message]: start a new session (the agent forgets this one's history)\n\
/status: agent, model, thinking level, queue mode and session\n\
/queue [steer|followup|collect|interrupt|default] [debounce:2s] [cap:20] [drop:old|new|summarize]: show or set what happens to messages sent while a run goes on\n\
/stop: stop the run in progress\n\
/usage: this session's runs, tokens and cost\n\
/model [provider/model | default]: show or set this session's model\n\
/think [off|minimal|low|medium|high | default]: show or set this session's thinking level\n\
/compact [what to keep]: summarise the session's older messages now\n\
/approve <id> [allow-once|allow-always|deny]: answer a command waiting for approval (owner)\n\
/help: this list";

/// The models a session may choose: the agent's, its fallbacks and those declared in
/// `[agent.models]`.
pub fn models(cfg: &Config) -> Vec<String> {
    let mut m: Vec<String> = std::iter::once(cfg.agent.model.clone())
        .chain(cfg.agent.fallback_models.iter().cloned())
        .chain(cfg.agent.models.keys().cloned())
        .collect();
    m.dedup();
    m
}

/// Where a command was given.
pub struct Context<'a> {
    pub cfg: &'a Config,
    /// The session's state.
    pub state: &'a SessionState,
    pub agent: &'a str,
    pub session_key: &'a str,
    /// The channel the message came from.
    pub channel: &'a str,
    /// The sender may use owner-only commands.
    pub owner: bool,
    /// The whole message.
    pub text: &'a str,
}

/// Runs command `name` with `args`.
pub fn run(c: &Context<'_>, name: &str, args: &str) -> Outcome {
    let (cfg, state, agent, session_key, owner, text, channel) = (
        c.cfg,
        c.state,
        c.agent,
        c.session_key,
        c.owner,
        c.text,
        c.channel,
    );
    match name {
        "help" | "commands" => reply(HELP),
        "new" | "reset" => Outcome::Turn {
            text: args.to_owned(),
            reset: true,
        },
        "compact" => Outcome::Turn {
            text: text.trim().to_owned(),
            reset: false,
        },
        "status" => reply(format!(
            "Agent: {agent}\nSession: {session_key}\nModel: {}\nThinking: {}\nQueue: {}\nLast message: {}",
            state
                .model
                .clone()
                .unwrap_or_else(|| format!("{} (the agent's)", cfg.agent.model)),
            state
                .thinking
                .clone()
                .unwrap_or_else(|| format!("{} (the agent's)", cfg.agent.thinking)),
            queue_line(cfg, state, channel),
            match state.last_active_ms {
                0 => "none yet".to_owned(),
                t => format!("{} min ago", (clawbus_wire::now_ms() - t).max(0) / 60_000),
            },
        )),
        "model" => {
            let known = models(cfg);
            if args.is_empty() {
                return reply(format!(
                    "Model: {}\nAvailable: {}",
                    state.model.as_deref().unwrap_or(&cfg.agent.model),
                    known.join(", ")
                ));
            }
            if args.len() > MAX_MODEL_REF || args.contains(char::is_whitespace) {
                return refuse("Usage: /model <provider/model> (one word), or /model default");
            }
            let mut s = state.clone();
            if args == "default" {
                s.model = None;
                return Outcome::Set {
                    state: s,
                    text: format!("Model: back to the agent's ({})", cfg.agent.model),
                };
            }
            if !known.iter().any(|k| k == args) {
                return refuse(format!(
                    "Unknown model `{args}`. Available: {}",
                    known.join(", ")
                ));
            }
            s.model = Some(args.to_owned());
            Outcome::Set {
                state: s,
                text: format!("Model for this session: {args}"),
            }
        }
        "think" | "thinking" => {
            let mut words = args.split_whitespace();
            let level = words.next().unwrap_or_default().to_ascii_lowercase();
            if level.is_empty() {
                return reply(format!(
                    "Thinking: {}\nLevels: {}",
                    state.thinking.as_deref().unwrap_or(&cfg.agent.thinking),
                    THINKING_LEVELS.join(", ")
                ));
            }
            if words.next().is_some() && THINKING_LEVELS.contains(&level.as_str()) {
                // `/think high <message>`: this message only, the agent's directive.
                return Outcome::Turn {
                    text: text.trim().to_owned(),
                    reset: false,
                };
            }
            let mut s = state.clone();
            if level == "default" {
                s.thinking = None;
            } else if THINKING_LEVELS.contains(&level.as_str()) {
                s.thinking = Some(level.clone());
            } else {
                return refuse(format!(
                    "Unknown thinking level `{}`. Levels: {}",
                    level.chars().take(32).collect::<String>(),
                    THINKING_LEVELS.join(", ")
                ));
            }
            Outcome::Set {
                state: s,
                text: format!("Thinking for this session: {level}"),
            }
        }
        "approve" => {
            if !owner {
                return refuse("/approve is for the owner only");
            }
            let mut words = args.split_whitespace();
            let (Some(id), decision, None) = (
                words.next(),
                words.next().unwrap_or("allow-once"),
                words.next(),
            ) else {
                return refuse("Usage: /approve <id> [allow-once|allow-always|deny]");
            };
            if !["allow-once", "allow-always", "deny"].contains(&decision) {
                return refuse("Usage: /approve <id> [allow-once|allow-always|deny]");
            }
            Outcome::Approve {
                id: id.to_owned(),
                decision: decision.to_owned(),
            }
        }
        "queue" => queue(cfg, state, channel, args),
        "stop" => Outcome::Stop,
        "usage" => Outcome::Usage,
        other => refuse(format!(
            "Unknown command /{other}. /help lists the commands."
        )),
    }
}

/// The session's queue, as `/status` and `/queue` show it.
fn queue_line(cfg: &Config, state: &SessionState, channel: &str) -> String {
    let q = &cfg.messages.queue;
    let o = state.queue_options(q);
    format!(
        "{} (debounce {} ms, cap {}, drop {})",
        state.queue.as_deref().unwrap_or(q.mode_for(channel)),
        o.debounce_ms,
        o.cap,
        o.drop
    )
}

/// `/queue [mode] [debounce:<d>] [cap:<n>] [drop:<policy>]`: shows the session's
/// queue, or sets its mode and options (`default` returns them to the configured).
fn queue(cfg: &Config, state: &SessionState, channel: &str, args: &str) -> Outcome {
    let usage = || {
        format!(
            "Usage: /queue [{}|default] [debounce:2s] [cap:20] [drop:{}]",
            clawbus_config::QUEUE_MODES.join("|"),
            clawbus_config::QUEUE_DROPS.join("|")
        )
    };
    if args.trim().is_empty() {
        return reply(format!(
            "Queue: {}\n{}",
            queue_line(cfg, state, channel),
            usage()
        ));
    }
    let mut s = state.clone();
    for word in args.split_whitespace() {
        let word = word.to_ascii_lowercase();
        let shown: String = word.chars().take(32).collect();
        match word.split_once(':') {
            None if word == "default" => {
                s.queue = None;
                s.queue_debounce_ms = None;
                s.queue_cap = None;
                s.queue_drop = None;
            }
            None if clawbus_config::QUEUE_MODES.contains(&word.as_str()) => {
                s.queue = Some(word.clone());
            }
            None => return refuse(format!("Unknown queue mode `{shown}`. {}", usage())),
            Some(("debounce", v)) => match clawbus_config::parse_debounce(v) {
                Ok(ms) => s.queue_debounce_ms = Some(ms),
                Err(e) => return refuse(e),
            },
            Some(("cap", v)) => match v.parse::<u32>() {
                Ok(n) if (1..=clawbus_config::MAX_QUEUE_CAP).contains(&n) => s.queue_cap = Some(n),
                _ => {
                    return refuse(format!(
                        "`{shown}`: the cap is a number from 1 to {}",
                        clawbus_config::MAX_QUEUE_CAP
                    ))
                }
            },
            Some(("drop", v)) if clawbus_config::QUEUE_DROPS.contains(&v) => {
                s.queue_drop = Some(v.to_owned());
            }
            Some(_) => return refuse(format!("Unknown queue option `{shown}`. {}", usage())),
        }
    }
    Outcome::Set {
        text: format!("Queue for this session: {}", queue_line(cfg, &s, channel)),
        state: s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_told_from_paths_and_punctuation() {
        assert_eq!(parse("/new"), Some(("new".into(), "")));
        assert_eq!(parse("  /Status@my_bot  "), Some(("status".into(), "")));
        assert_eq!(
            parse("/think high tell me"),
            Some(("think".into(), "high tell me"))
        );
        for not in [
            "/etc/hosts is a file",
            "/ 5",
            "//x",
            "hello /new",
            "/1abc",
            "/x@",
            "/a-b",
        ] {
            assert_eq!(parse(not), None, "{not}");
        }
        assert_eq!(parse(&format!("/{}", "a".repeat(33))), None);
    }

    #[test]
    fn hostile_and_unknown_arguments_get_clear_answers() {
        let cfg = Config::default();
        let st = SessionState::default();
        let run = |n: &str, a: &str| {
            let c = Context {
                cfg: &cfg,
                state: &st,
                agent: "main",
                session_key: "agent:main:main",
                channel: "test",
                owner: false,
                text: a,
            };
            run(&c, n, a)
        };
        for (n, a) in [
            ("model", "openai/x y"),
            ("model", &"m".repeat(300)),
            ("model", "nope/unknown"),
            ("think", "ultra"),
            ("approve", "abc"),
            ("frobnicate", ""),
            ("queue", "sideways"),
            ("queue", "collect cap:0"),
            ("queue", "cap:1001"),
            ("queue", "cap:-5"),
            ("queue", "debounce:forever"),
            ("queue", "debounce:2h"),
            ("queue", "drop:random"),
            ("queue", "colour:blue"),
            ("queue", &format!("debounce:{}", "9".repeat(10_000))),
        ] {
            assert!(
                matches!(run(n, a), Outcome::Reply { error: true, .. }),
                "/{n} {a}"
            );
        }
        assert!(matches!(
            run("model", &cfg.agent.model.clone()),
            Outcome::Set { .. }
        ));
        assert!(matches!(run("think", "high"), Outcome::Set { .. }));
        match run("queue", "Collect debounce:2s cap:5 drop:old") {
            Outcome::Set { state, text } => {
                assert_eq!(state.queue.as_deref(), Some("collect"));
                assert_eq!(
                    (
                        state.queue_debounce_ms,
                        state.queue_cap,
                        state.queue_drop.as_deref()
                    ),
                    (Some(2000), Some(5), Some("old"))
                );
                assert!(text.contains("debounce 2000 ms, cap 5, drop old"), "{text}");
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(
            run("new", "hello"),
            Outcome::Turn {
                text: "hello".into(),
                reset: true
            }
        );
    }
}
