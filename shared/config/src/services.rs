//! The one registry of the suite's services: their names, start order, whether they
//! run as replicas, where their admin endpoints are configured, and which variables of
//! the environment each is started with. The supervisor (`clawbus up`), the testkit,
//! the service start-up and the NATS rights derive from it.
//!
//! The environment: `clawbus up` starts every process with an empty environment plus
//! what this registry grants it, so a provider key reaches the agent only, a platform
//! token the channels service only, and nothing of the supervisor's environment the
//! suite does not read reaches any process.

use std::ffi::OsString;

use crate::Config;

/// A service of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Gateway,
    Router,
    Agent,
    Store,
    Sandbox,
    Channels,
}

/// Every service, in start order (the store first: others wait for its history).
pub const SERVICES: [Service; 6] = [
    Service::Store,
    Service::Sandbox,
    Service::Router,
    Service::Agent,
    Service::Gateway,
    Service::Channels,
];

impl Service {
    /// Its name: binary `clawbus-<name>`, NATS user, log and metrics label.
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Router => "router",
            Service::Agent => "agent",
            Service::Store => "store",
            Service::Sandbox => "sandbox",
            Service::Channels => "channels",
        }
    }

    /// True for services that run as several replicas (`clawbus up --replicas N`);
    /// gateways run side by side only with an account each.
    pub fn scales(self) -> bool {
        !matches!(self, Service::Gateway)
    }

    /// The configured admin address (`[admin] <name>`).
    pub fn admin(self, cfg: &Config) -> &str {
        match self {
            Service::Gateway => &cfg.admin.gateway,
            Service::Router => &cfg.admin.router,
            Service::Agent => &cfg.admin.agent,
            Service::Store => &cfg.admin.store,
            Service::Sandbox => &cfg.admin.sandbox,
            Service::Channels => &cfg.admin.channels,
        }
    }

    /// The service of this name.
    pub fn named(name: &str) -> Option<Service> {
        SERVICES.into_iter().find(|s| s.name() == name)
    }
}

/// The value a service gets for a secret it does not need but whose presence shapes
/// the configuration every service checks (a channel account's credentials, the hooks
/// token): the same accounts exist and the same checks pass everywhere, while only
/// the services that use the secret hold it.
pub const WITHHELD: &str = "withheld-by-clawbus-up-for-another-service";

/// Who gets a variable of `clawbus up`'s environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// Every process, nats-server included: the system's basics.
    System,
    /// Every service.
    Services,
    /// These services; the others do not get it.
    Only(&'static [Service]),
    /// These services; the others get [`WITHHELD`] instead.
    Secret(&'static [Service]),
    /// Nobody: what the suite does not read (another program's secrets, say).
    Nobody,
}

/// What the services make outbound HTTP calls with (providers, platforms, web_fetch,
/// Slack's Socket Mode): they get the proxy settings.
const OUTBOUND: &[Service] = &[
    Service::Agent,
    Service::Channels,
    Service::Sandbox,
    Service::Gateway,
];

/// Configuration fields that hold secrets, as the last part of a `CLAWBUS__` variable.
const SECRET_FIELDS: &[&str] = &[
    "API_KEY",
    "API_KEYS",
    "TOKEN",
    "BOT_TOKEN",
    "ACCESS_TOKEN",
    "APP_TOKEN",
    "SECRET",
    "SIGNING_SECRET",
    "WEBHOOK_SECRET",
    "PASSWORD",
    "NICKSERV_PASSWORD",
    "DATABASE_URL",
];

/// The registry of variables: who gets `name` (whose value is `value`). Every variable
/// the configuration reads (`Config::figment`, `HooksConfig::token`) is listed here.
fn grant(name: &str, value: &str) -> Grant {
    const AGENT: &[Service] = &[Service::Agent];
    match name {
        "PATH" | "HOME" | "USER" | "LOGNAME" | "LANG" | "LANGUAGE" | "TZ" | "TMPDIR" => {
            Grant::System
        }
        n if n.starts_with("LC_") => Grant::System,
        "RUST_LOG"
        | "RUST_BACKTRACE"
        | "RUST_LIB_BACKTRACE"
        | "HOSTNAME"
        | "SSL_CERT_FILE"
        | "SSL_CERT_DIR"
        | "NATS_URL"
        | "CLAWBUS_HOME"
        | "CLAWBUS_CONFIG"
        | "CLAWBUS_MODEL"
        | "CLAWBUS_FALLBACK_MODELS" => Grant::Services,
        n if ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"]
            .contains(&n.to_ascii_uppercase().as_str()) =>
        {
            Grant::Only(OUTBOUND)
        }
        "OPENAI_API_KEY" | "ANTHROPIC_API_KEY" | "GEMINI_API_KEY" | "OPENAI_BASE_URL"
        | "ANTHROPIC_BASE_URL" | "GEMINI_BASE_URL" => Grant::Only(AGENT),
        "TELEGRAM_BOT_TOKEN" => Grant::Secret(&[Service::Channels]),
        "DATABASE_URL" => Grant::Only(&[Service::Store]),
        "CLAWBUS_GATEWAY_TOKEN" => Grant::Only(&[Service::Gateway]),
        "CLAWBUS_HOOKS_TOKEN" => Grant::Secret(&[Service::Gateway]),
        n => match n.strip_prefix("CLAWBUS__") {
            Some(path) => config_grant(path, value),
            None => Grant::Nobody,
        },
    }
}

/// Who gets `CLAWBUS__<path>`: everyone, unless it holds a secret (a secret field, or
/// an inline table naming one), which goes to the services of its section.
fn config_grant(path: &str, value: &str) -> Grant {
    let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_uppercase()).collect();
    let last = parts.last().map(String::as_str).unwrap_or_default();
    let lower = value.to_ascii_lowercase();
    let table = value.trim_start().starts_with(['{', '[']);
    let table_secret = table
        && SECRET_FIELDS
            .iter()
            .any(|f| lower.contains(&f.to_ascii_lowercase()));
    if !SECRET_FIELDS.contains(&last) && !table_secret {
        return Grant::Services;
    }
    // A table in place of a string would not read: a table is left out, not replaced.
    let shaped = |owners| {
        if table {
            Grant::Only(owners)
        } else {
            Grant::Secret(owners)
        }
    };
    match parts.first().map(String::as_str).unwrap_or_default() {
        "AGENT" => Grant::Only(&[Service::Agent]),
        // Slack's Events API and Socket Mode come in through the gateway.
        "CHANNELS" if parts.get(1).is_some_and(|c| c == "SLACK") => {
            shaped(&[Service::Channels, Service::Gateway])
        }
        "CHANNELS" => shaped(&[Service::Channels]),
        "GATEWAY" => Grant::Only(&[Service::Gateway]),
        "HOOKS" => shaped(&[Service::Gateway]),
        "STORE" => Grant::Only(&[Service::Store]),
        "SANDBOX" => Grant::Only(&[Service::Sandbox]),
        "ROUTER" => Grant::Only(&[Service::Router]),
        // A NATS of your own: every service connects as the configured user.
        _ => Grant::Services,
    }
}

/// Keeps the variables of `env` that `to` may have (`None`: nats-server), with
/// [`WITHHELD`] in place of the secrets it only needs the shape of.
fn filter_env(
    env: impl IntoIterator<Item = (OsString, OsString)>,
    to: Option<Service>,
) -> Vec<(OsString, OsString)> {
    env.into_iter()
        .filter_map(|(k, v)| {
            let name = k.to_str()?;
            let g = grant(name, &v.to_string_lossy());
            let keep = match (g, to) {
                (Grant::System, _) => Some(v),
                (_, None) | (Grant::Nobody, _) => None,
                (Grant::Services, Some(_)) => Some(v),
                (Grant::Only(owners), Some(s)) => owners.contains(&s).then_some(v),
                (Grant::Secret(owners), Some(s)) if owners.contains(&s) => Some(v),
                (Grant::Secret(_), Some(_)) => Some(WITHHELD.into()),
            };
            keep.map(|v| (k, v))
        })
        .collect()
}

impl Service {
    /// The variables of `env` (the supervisor's environment) this service is started
    /// with: the system's basics, the suite's configuration, and only its own secrets.
    pub fn child_env(
        self,
        env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Vec<(OsString, OsString)> {
        filter_env(env, Some(self))
    }
}

/// The variables of `env` nats-server is started with: the system's basics only.
pub fn nats_server_env(
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    filter_env(env, None)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail closures return figment::Error
mod env_tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn get(vars: &[(OsString, OsString)], name: &str) -> Option<String> {
        vars.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_string_lossy().into_owned())
    }

    #[test]
    fn each_service_gets_only_its_secrets() {
        let all = env(&[
            ("PATH", "/bin"),
            ("LC_ALL", "C"),
            ("SECRET_X", "x"),
            ("AWS_SECRET_ACCESS_KEY", "x"),
            ("OPENAI_API_KEY", "sk"),
            ("TELEGRAM_BOT_TOKEN", "tg"),
            ("DATABASE_URL", "postgres://u:p@db/x"),
            ("CLAWBUS_GATEWAY_TOKEN", "gw"),
            ("CLAWBUS_HOOKS_TOKEN", "hooks-token-0123456789"),
            ("CLAWBUS__AGENT__CONCURRENCY", "8"),
            ("CLAWBUS__AGENT__ANTHROPIC__API_KEY", "ak"),
            ("CLAWBUS__AGENT__MAX_TOKENS", "100"),
            ("CLAWBUS__CHANNELS__DISCORD__BOT_TOKEN", "dc"),
            ("CLAWBUS__CHANNELS__SLACK__SIGNING_SECRET", "ss"),
            ("CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY", "open"),
            (
                "CLAWBUS__CHANNELS__TELEGRAM__ACCOUNTS",
                "{work={bot_token=\"t\"}}",
            ),
        ]);
        let of = |s: Service| s.child_env(all.clone());
        for s in SERVICES {
            let e = of(s);
            assert_eq!(get(&e, "PATH").as_deref(), Some("/bin"));
            assert_eq!(get(&e, "LC_ALL").as_deref(), Some("C"));
            assert_eq!(get(&e, "SECRET_X"), None);
            assert_eq!(get(&e, "AWS_SECRET_ACCESS_KEY"), None);
            assert_eq!(get(&e, "CLAWBUS__AGENT__CONCURRENCY").as_deref(), Some("8"));
            assert_eq!(
                get(&e, "CLAWBUS__AGENT__MAX_TOKENS").as_deref(),
                Some("100")
            );
            assert_eq!(
                get(&e, "CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY").as_deref(),
                Some("open")
            );
            let owns = |owner: bool, name: &str, value: &str| {
                let got = get(&e, name);
                if owner {
                    assert_eq!(got.as_deref(), Some(value), "{s:?} {name}");
                } else {
                    assert_ne!(got.as_deref(), Some(value), "{s:?} {name}");
                }
            };
            owns(s == Service::Agent, "OPENAI_API_KEY", "sk");
            owns(
                s == Service::Agent,
                "CLAWBUS__AGENT__ANTHROPIC__API_KEY",
                "ak",
            );
            owns(s == Service::Channels, "TELEGRAM_BOT_TOKEN", "tg");
            owns(
                s == Service::Channels,
                "CLAWBUS__CHANNELS__DISCORD__BOT_TOKEN",
                "dc",
            );
            let slack = matches!(s, Service::Channels | Service::Gateway);
            owns(slack, "CLAWBUS__CHANNELS__SLACK__SIGNING_SECRET", "ss");
            owns(s == Service::Store, "DATABASE_URL", "postgres://u:p@db/x");
            owns(s == Service::Gateway, "CLAWBUS_GATEWAY_TOKEN", "gw");
            owns(
                s == Service::Gateway,
                "CLAWBUS_HOOKS_TOKEN",
                "hooks-token-0123456789",
            );
            let accounts = get(&e, "CLAWBUS__CHANNELS__TELEGRAM__ACCOUNTS");
            assert_eq!(accounts.is_some(), s == Service::Channels, "{s:?}");
        }
        // Shape-bearing secrets stand in as WITHHELD, the others are left out.
        let router = of(Service::Router);
        assert_eq!(
            get(&router, "TELEGRAM_BOT_TOKEN").as_deref(),
            Some(WITHHELD)
        );
        assert_eq!(
            get(&router, "CLAWBUS_HOOKS_TOKEN").as_deref(),
            Some(WITHHELD)
        );
        assert_eq!(get(&router, "OPENAI_API_KEY"), None);
        let nats = nats_server_env(all);
        let names: Vec<_> = nats.iter().map(|(k, _)| k.to_string_lossy()).collect();
        assert_eq!(names, ["PATH", "LC_ALL"]);
    }

    #[test]
    fn a_service_without_the_secrets_it_does_not_need_still_loads_its_configuration() {
        let vars = env(&[
            ("OPENAI_API_KEY", "sk"),
            ("TELEGRAM_BOT_TOKEN", "tg"),
            ("CLAWBUS_HOOKS_TOKEN", "hooks-token-0123456789"),
            ("CLAWBUS__HOOKS__ENABLED", "true"),
            (
                "CLAWBUS__CHANNELS__TELEGRAM__WEBHOOK_URL",
                "https://bot.example.org/tg",
            ),
            (
                "CLAWBUS__CHANNELS__TELEGRAM__WEBHOOK_SECRET",
                "s3cret_value_0123456789",
            ),
        ]);
        for s in SERVICES {
            let mine = s.child_env(vars.clone());
            figment::Jail::expect_with(|jail| {
                jail.clear_env();
                for (k, v) in &mine {
                    jail.set_env(k.to_string_lossy(), v.to_string_lossy());
                }
                let cfg = crate::Config::from_figment(crate::Config::figment(None))
                    .map_err(|e| format!("{s:?}: {e}"))?;
                assert_eq!(cfg.channel_accounts().len(), 1, "{s:?}: the same accounts");
                Ok(())
            });
        }
    }
}
