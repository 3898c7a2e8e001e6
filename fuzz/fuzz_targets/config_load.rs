//! The configuration loader on arbitrary TOML: a configuration or a clear error.
#![no_main]

use figment::providers::{Format, Toml};
use figment::Figment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let fig = Figment::from(Toml::string(text));
    if let Ok(cfg) = clawbus_config::Config::from_figment(fig) {
        // A valid configuration answers what the services ask of it.
        let _ = cfg.channel_accounts();
        for agent in &cfg.router.agents {
            let _ = cfg.workspace_dir(agent);
        }
    }
});
