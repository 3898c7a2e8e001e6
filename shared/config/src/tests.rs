#![allow(clippy::result_large_err)] // figment::Jail closures return figment::Error
use figment::providers::{Format, Toml};
use figment::Figment;
use secrecy::ExposeSecret;

use super::*;

fn from_toml(s: &str) -> Result<Config, ConfigError> {
    Config::from_figment(Figment::new().merge(Toml::string(s)))
}

#[test]
fn defaults_are_valid() {
    let c = from_toml("").unwrap();
    assert_eq!(c.gateway.bind, "127.0.0.1:18789");
    assert_eq!(c.router.default_agent, "main");
    assert!(c.agent.provider.base_url().is_none());
}

#[test]
fn unknown_field_is_rejected() {
    let e = from_toml("[agent]\nmodle = \"x\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("modle"), "{e}");
}

#[test]
fn wrong_type_is_rejected() {
    let e = from_toml("[agent]\nconcurrency = \"many\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("concurrency"), "{e}");
}

#[test]
fn invalid_values_say_which_field() {
    for (toml, field) in [
        ("[gateway]\nbind = \"not an address\"", "gateway.bind"),
        ("[router]\nconcurrency = 0", "router.concurrency"),
        ("replica = \"a.b\"", "replica"),
        ("[router]\ndefault_agent = \"a.b\"", "router.default_agent"),
        (
            "[router]\ndefault_agent = \"other\"",
            "router.default_agent",
        ),
        (
            "[agent.provider]\nbase_url = \"ftp://x\"",
            "agent.provider.base_url",
        ),
        ("[log]\nformat = \"xml\"", "log.format"),
        (
            "[store]\ndatabase_url = \"mysql://db/clawbus\"",
            "store.database_url",
        ),
        ("[nats]\nuser = \"agent\"", "nats.user"),
        (
            "[agent.anthropic]\nbase_url = \"api.anthropic.com\"",
            "agent.anthropic.base_url",
        ),
        ("[agent]\nmodel = \"anthropic/\"", "agent.model"),
        ("[agent]\nthinking = \"extreme\"", "agent.thinking"),
        (
            "[agent.tools]\nmax_iterations = 0",
            "agent.tools.max_iterations",
        ),
        (
            "[agent.tools]\nloop_threshold = 0",
            "agent.tools.loop_threshold",
        ),
        (
            "[agent.tools]\nresult_max_bytes = 0",
            "agent.tools.result_max_bytes",
        ),
        ("[agent.compaction]\nthreshold = 1.5", "agent.compaction"),
        ("[agent.compaction]\nkeep = 0.9", "agent.compaction"),
        ("[agent.compaction]\nthreshold = -1.0", "agent.compaction"),
        (
            "[agent.models.\"openai/x\"]\ninput_usd_per_mtok = -1.0",
            "agent.models",
        ),
        (
            "[agent.models.\"openai/x\"]\nmax_output_tokens = 0",
            "agent.models",
        ),
        (
            "[agent]\nworkspace_file_max_chars = 0",
            "agent.workspace_file_max_chars",
        ),
        ("[agent.workspaces]\n\"a.b\" = \"/x\"", "agent.workspaces"),
        ("[nats]\npassword = \"pw\"", "nats.password"),
        (
            "[nats]\nuser = \"agent\"\npassword = \"pw\"\npassword_file = \"/p\"",
            "nats.password_file",
        ),
        (
            "[nats]\nuser = \"agent\"\npassword_file = \"/nonexistent/clawbus-pw\"",
            "nats.password_file",
        ),
    ] {
        let e = from_toml(toml).unwrap_err().to_string();
        assert!(e.contains(field), "{toml}: {e}");
    }
}

#[test]
fn malformed_toml_is_an_error() {
    assert!(from_toml("[agent\nmodel=").is_err());
}

#[test]
fn file_and_env_layers() {
    figment::Jail::expect_with(|jail| {
        jail.create_file(
            "c.toml",
            "[agent]\nmodel = \"from-file\"\nconcurrency = 3\n",
        )?;
        jail.set_env("CLAWBUS_MODEL", "from-standard-env");
        jail.set_env("CLAWBUS__AGENT__CONCURRENCY", "7");
        jail.set_env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1");
        jail.set_env("OPENAI_API_KEY", "sk-test");
        jail.set_env("CLAWBUS__ROUTER__CONCURRENCY", "4");
        jail.set_env("DATABASE_URL", "postgres://clawbus@db/clawbus");
        let c = Config::from_figment(Config::figment(Some(Path::new("c.toml")))).unwrap();
        assert_eq!(c.agent.model, "from-standard-env");
        assert_eq!(c.agent.concurrency, 7);
        assert_eq!(c.router.concurrency, 4);
        assert_eq!(c.agent.provider.base_url(), Some("http://127.0.0.1:9/v1"));
        assert_eq!(c.agent.provider.api_key(), Some("sk-test"));
        assert_eq!(c.database_url(), "postgres://clawbus@db/clawbus");
        // secrets never show in Debug output
        assert!(!format!("{c:?}").contains("sk-test"));
        Ok(())
    });
}

#[test]
fn empty_provider_env_means_unset() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("OPENAI_BASE_URL", "");
        let c = Config::from_figment(Config::figment(None)).unwrap();
        assert!(c.agent.provider.base_url().is_none());
        Ok(())
    });
}

#[test]
fn provider_variables_fill_their_sections() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("CLAWBUS_MODEL", "anthropic/claude-sonnet-4-5");
        jail.set_env("ANTHROPIC_API_KEY", "sk-ant-x");
        jail.set_env("ANTHROPIC_BASE_URL", "http://127.0.0.1:9/");
        jail.set_env("GEMINI_API_KEY", "g-key");
        jail.set_env("GEMINI_BASE_URL", "");
        jail.set_env(
            "CLAWBUS_FALLBACK_MODELS",
            "gemini/gemini-2.5-flash, openai/gpt-4o ,",
        );
        let c = Config::from_figment(Config::figment(None)).unwrap();
        assert_eq!(
            c.agent.fallback_models,
            ["gemini/gemini-2.5-flash", "openai/gpt-4o"]
        );
        assert_eq!(c.agent.model, "anthropic/claude-sonnet-4-5");
        assert_eq!(c.agent.anthropic.api_key(), Some("sk-ant-x"));
        assert_eq!(c.agent.anthropic.base_url(), Some("http://127.0.0.1:9/"));
        assert_eq!(c.agent.gemini.api_key(), Some("g-key"));
        assert!(c.agent.gemini.base_url().is_none());
        Ok(())
    });
}

#[test]
fn token_is_generated_once_and_kept() {
    let dir = tempfile_dir();
    let cfg = Config {
        state_dir: Some(dir.clone()),
        ..Default::default()
    };
    let a = ensure_gateway_token(&cfg).unwrap();
    assert!(a.generated);
    assert_eq!(a.token.len(), 64);
    let b = ensure_gateway_token(&cfg).unwrap();
    assert!(!b.generated);
    assert_eq!(a.token, b.token);
    let mode = std::fs::metadata(dir.join("gateway.token"))
        .unwrap()
        .permissions();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.mode() & 0o777, 0o600);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn nats_password_comes_from_a_file() {
    let dir = tempfile_dir();
    let f = dir.join("agent.password");
    std::fs::write(&f, "s3cret\n").unwrap();
    let c = from_toml(&format!(
        "[nats]\nuser = \"agent\"\npassword_file = \"{}\"",
        f.display()
    ))
    .unwrap();
    let (user, pw) = c.nats.credentials().unwrap().unwrap();
    assert_eq!((user.as_str(), pw.expose_secret()), ("agent", "s3cret"));
    std::fs::write(&f, "\n").unwrap();
    let e = c.nats.credentials().unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    assert!(from_toml("").unwrap().nats.credentials().unwrap().is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn subject_tokens() {
    assert!(is_token("main"));
    assert!(is_token("a-b_C9"));
    for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
        assert!(!is_token(bad), "{bad}");
    }
}

fn tempfile_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "clawbus-cfg-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn the_example_config_is_valid_and_complete() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/clawbus.example.toml"
    );
    let c = Config::from_figment(Figment::new().merge(Toml::file_exact(path))).unwrap();
    assert_eq!(c.agent.workspace_file_max_chars, 20_000);
    assert_eq!(c.gateway.account, "default");
}

#[test]
fn models_are_declared_with_prices() {
    let c = from_toml(
        "[agent.models.\"anthropic/claude-sonnet-4-5\"]\ninput_usd_per_mtok = 3.0\noutput_usd_per_mtok = 15.0\nmax_output_tokens = 8192\n[agent.models.gpt-4o-mini]\ninput_usd_per_mtok = 0.15\n",
    )
    .unwrap();
    let m = c.agent.model_spec("anthropic/claude-sonnet-4-5").unwrap();
    assert!((m.cost_usd(1_000_000, 100_000) - 4.5).abs() < 1e-9);
    assert_eq!(m.max_output_tokens, Some(8192));
    assert!(c.agent.model_spec("openai/gpt-4o-mini").is_some());
    assert!(c.agent.model_spec("gpt-4o-mini").is_some());
    assert!(c.agent.model_spec("gemini/x").is_none());
}

#[test]
fn the_household_example_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/household.toml");
    let c = Config::from_figment(Figment::new().merge(Toml::file_exact(path))).unwrap();
    assert_eq!(c.session.dm_scope, "per-channel-peer");
    assert_eq!(c.session.identity_links["alice"].len(), 2);
    assert_eq!(c.channels["telegram"].allow_from, ["111", "222"]);
    assert_eq!(
        c.channels["telegram"].groups["-1001234"].require_mention,
        Some(true)
    );
    assert_eq!(c.bindings[0].agent_id, "family");
    assert_eq!(c.sandbox.for_agent("family").profile, "messaging");
}

#[test]
fn routing_settings_are_checked() {
    for bad in [
        "[session]\ndm_scope = \"per-room\"\n",
        "[session.reset]\nmode = \"weekly\"\n",
        "[session.reset]\nmode = \"daily\"\nat_hour = 24\n",
        "[channels.x]\ndmPolicy = \"everyone\"\n",
        "[channels.x]\nmention_patterns = [\"(unclosed\"]\n",
        "[[bindings]]\nagent_id = \"ghost\"\nmatch = { channel = \"x\" }\n",
        "[[bindings]]\nagent_id = \"main\"\nmatch = { peer = { kind = \"room\", id = \"1\" } }\n",
        "[messages.queue]\nmode = \"later\"\n",
        "[messages.queue]\ndrop = \"random\"\n",
        "[messages.queue]\ncap = 0\n",
        "[messages.queue]\ncap = 100000\n",
        "[messages.queue]\ndebounceMs = 600000\n",
        "[messages.queue]\ndebounce_ms = -1\n",
    ] {
        assert!(from_toml(bad).is_err(), "{bad}");
    }
}

#[test]
fn queue_options_have_openclaw_defaults_and_names() {
    let q = Config::default().messages.queue;
    assert_eq!(
        (q.mode.as_str(), q.debounce_ms, q.cap, q.drop.as_str()),
        ("steer", 500, 20, "summarize")
    );
    let c = from_toml("[messages.queue]\nmode = \"collect\"\ndebounceMs = 1000\ncap = 5\ndrop = \"old\"\nbyChannel = { irc = \"followup\" }\n").unwrap();
    let q = c.messages.queue;
    assert_eq!((q.debounce_ms, q.cap, q.drop.as_str()), (1000, 5, "old"));
    assert_eq!(
        (q.mode_for("irc"), q.mode_for("slack")),
        ("followup", "collect")
    );
}

#[test]
fn debounces_parse_and_hostile_ones_are_refused() {
    for (s, ms) in [("0", 0), ("750ms", 750), ("2s", 2000), ("1m", 60_000)] {
        assert_eq!(crate::parse_debounce(s), Ok(ms), "{s}");
    }
    for bad in [
        "",
        "-1",
        "2x",
        "61s",
        "1h",
        "99999999999ms",
        "ms",
        "1.5s",
        &"9".repeat(5000),
    ] {
        let e = crate::parse_debounce(bad).unwrap_err();
        assert!(e.contains("not a debounce") && e.len() < 120, "{e}");
    }
}

#[test]
fn channel_accounts_come_from_the_channel_block_its_accounts_and_the_standard_variable() {
    use secrecy::ExposeSecret;
    let c = from_toml(
        "[channels.telegram]\nbotToken = \"1:a\"\ntextChunkLimit = 1000\n\
         [channels.telegram.accounts.work]\nbot_token = \"2:b\"\napi_root = \"http://127.0.0.1:9/\"\n\
         [channels.telegram.accounts.off]\nbot_token = \"3:c\"\nenabled = false\n\
         [channels.test]\ndm_policy = \"open\"\n",
    )
    .unwrap();
    let a = c.channel_accounts();
    let names: Vec<(&str, &str)> = a
        .iter()
        .map(|s| (s.channel.as_str(), s.account.as_str()))
        .collect();
    assert_eq!(names, [("telegram", "default"), ("telegram", "work")]);
    assert_eq!(a[0].token.expose_secret(), "1:a");
    assert_eq!(a[0].api_root, crate::TELEGRAM_API_ROOT);
    assert_eq!(a[1].api_root, "http://127.0.0.1:9/");
    assert_eq!(a[1].settings.text_chunk_limit, 1000);
    // No credentials, no account; the variable names the default account.
    assert!(Config::default().channel_accounts().is_empty());
    figment::Jail::expect_with(|jail| {
        jail.set_env("TELEGRAM_BOT_TOKEN", "9:z");
        let c = Config::from_figment(Config::figment(None)).unwrap();
        let a = c.channel_accounts();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].token.expose_secret(), "9:z");
        // The token never shows in the configuration's debug form.
        assert!(!format!("{c:?}").contains("9:z"));
        Ok(())
    });
}

#[test]
fn hostile_channel_settings_are_refused_clearly() {
    for (bad, field) in [
        ("[channels.myspace]\nbot_token = \"1:a\"\n", "channels"),
        (
            "[channels.telegram.accounts.\"a.b\"]\nbot_token = \"1:a\"\n",
            "channels.accounts",
        ),
        (
            "[channels.telegram]\nbot_token = \"1:a\"\napi_root = \"file:///etc/passwd\"\n",
            "channels.api_root",
        ),
        (
            "[channels.telegram]\ntext_chunk_limit = 10\n",
            "channels.text_chunk_limit",
        ),
        (
            "[channels.telegram]\npoll_timeout_secs = 0\n",
            "channels.poll_timeout_secs",
        ),
        ("[channels.telegram]\nbot_tokn = \"1:a\"\n", "bot_tokn"),
        (
            "[channels.telegram]\nstreamMode = \"fast\"\n",
            "channels.stream_mode",
        ),
    ] {
        let e = from_toml(bad).unwrap_err().to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
}

#[test]
fn irc_accounts_and_hostile_irc_settings() {
    let c = from_toml(
        "[channels.irc]\nserver = \"irc.libera.chat\"\nnick = \"claw\"\njoin = [\"#family\"]\n\
         [channels.irc.accounts.lan]\nserver = \"10.0.0.5:6667\"\ntls = false\n",
    )
    .unwrap();
    let a = c.channel_accounts();
    let irc: Vec<_> = a.iter().map(|s| s.irc.clone().unwrap()).collect();
    assert_eq!(
        (
            irc[0].host.as_str(),
            irc[0].port,
            irc[0].tls,
            irc[0].nick.as_str()
        ),
        ("irc.libera.chat", 6697, true, "claw")
    );
    assert_eq!(
        (irc[1].port, irc[1].tls, irc[1].nick.as_str()),
        (6667, false, "clawbus")
    );
    for (bad, field) in [
        (
            "[channels.irc]\nserver = \"irc.x:notaport\"\n",
            "channels.server",
        ),
        ("[channels.irc]\nserver = \"a b:1\"\n", "channels.server"),
        (
            "[channels.irc]\nserver = \"x:1\"\nnick = \"bad nick\"\n",
            "channels.nick",
        ),
        (
            "[channels.irc]\nserver = \"x:1\"\nnick = \"#chan\"\n",
            "channels.nick",
        ),
        (
            "[channels.irc]\nserver = \"x:1\"\njoin = [\"family\"]\n",
            "channels.join",
        ),
        (
            "[channels.irc]\nserver = \"x:1\"\njoin = [\"#a\\r\\nQUIT\"]\n",
            "channels.join",
        ),
        (
            "[channels.irc]\nserver = \"x:1\"\njoin = [\"#a,#b\"]\n",
            "channels.join",
        ),
    ] {
        let e = from_toml(bad).unwrap_err().to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
}

#[test]
fn a_telegram_webhook_needs_https_and_a_proper_secret() {
    let ok = from_toml(
        "[channels.telegram]\nbot_token = \"1:a\"\nwebhookUrl = \"https://bot.example.org/tg/hook\"\n\
         webhookSecret = \"s3cr3t_-X0123456789\"\nwebhookListen = \"0.0.0.0:8443\"\n",
    )
    .unwrap();
    let w = ok.channel_accounts()[0].webhook.clone().unwrap();
    assert_eq!(
        (w.path.as_str(), w.listen.as_str()),
        ("/tg/hook", "0.0.0.0:8443")
    );
    for (bad, field) in [
        (
            "[channels.telegram]\nbot_token = \"1:a\"\nwebhook_url = \"http://bot.example.org/h\"\nwebhook_secret = \"abc\"\n",
            "channels.webhook_url",
        ),
        (
            "[channels.telegram]\nbot_token = \"1:a\"\nwebhook_url = \"https://bot.example.org/h\"\n",
            "channels.webhook_secret",
        ),
        (
            "[channels.telegram]\nbot_token = \"1:a\"\nwebhook_url = \"https://b.org/h\"\nwebhook_secret = \"has space\"\n",
            "channels.webhook_secret",
        ),
        (
            "[channels.telegram]\nbot_token = \"1:a\"\nwebhook_url = \"https://b.org/h\"\nwebhook_secret = \"a123456789abcdef\"\nwebhook_listen = \"everywhere\"\n",
            "channels.webhook_listen",
        ),
    ] {
        let e = from_toml(bad).unwrap_err().to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
}

#[test]
fn a_matrix_account_names_its_homeserver() {
    use secrecy::ExposeSecret;
    let c = from_toml(
        "[channels.matrix]\nhomeserver = \"https://matrix.example.org\"\naccessToken = \"syt_abc\"\n",
    )
    .unwrap();
    let a = &c.channel_accounts()[0];
    assert_eq!(
        (a.channel.as_str(), a.api_root.as_str()),
        ("matrix", "https://matrix.example.org")
    );
    assert_eq!(a.token.expose_secret(), "syt_abc");
    let e = from_toml("[channels.matrix]\naccess_token = \"syt_abc\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("channels.homeserver"), "{e}");
    let e = from_toml("[channels.matrix]\naccess_token = \"t\"\nhomeserver = \"ftp://x\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("channels.api_root"), "{e}");
}

#[test]
fn a_signal_account_needs_a_number_and_the_daemon_url() {
    let c = from_toml(
        "[channels.signal]\nhttpUrl = \"http://127.0.0.1:8080\"\naccount = \"+15551234567\"\n",
    )
    .unwrap();
    let a = &c.channel_accounts()[0];
    assert_eq!(
        (a.channel.as_str(), a.number.as_deref()),
        ("signal", Some("+15551234567"))
    );
    for (bad, field) in [
        (
            "[channels.signal]\naccount = \"+15551234567\"\n",
            "channels.http_url",
        ),
        (
            "[channels.signal]\nhttp_url = \"http://x:1\"\naccount = \"15551234567\"\n",
            "channels.number",
        ),
        (
            "[channels.signal]\nhttp_url = \"http://x:1\"\nnumber = \"+1555abc\"\n",
            "channels.number",
        ),
    ] {
        let e = from_toml(bad).unwrap_err().to_string();
        assert!(e.contains(field), "{bad}: {e}");
    }
}

#[test]
fn active_hours_are_strict_hh_mm_and_never_overflow() {
    // Found by fuzzing: an hour of ten digits overflowed the minutes' product.
    let toml = r#"
[heartbeat]
active_hours = { start = "0001226704515:00", end = "24:00" }
"#;
    let err = from_toml(toml).unwrap_err().to_string();
    assert!(
        err.contains("heartbeat.active_hours") && err.contains("HH:MM"),
        "{err}"
    );
    assert_eq!(minute_of_day("7:05"), Some(425));
    assert_eq!(minute_of_day(" 24:00 "), Some(1440));
    for bad in [
        "24:01",
        "7:5",
        "007:05",
        "+7:05",
        "99999999999:00",
        "12:000",
        ":30",
        "12:",
    ] {
        assert_eq!(minute_of_day(bad), None, "{bad}");
    }
}
