//! `[http]`: what every HTTP listener of the suite allows its clients (the gateway's
//! API, Telegram webhook listeners, the admin ports).

use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// A request's head (and a new connection's first request) must arrive within
    /// this; an HTTP/1 connection waiting for its next request is closed after it.
    pub header_timeout_secs: u64,
    /// A request's body must arrive whole within this of its head.
    pub body_timeout_secs: u64,
    /// A connection with no request in progress is closed after this; a response
    /// still streaming is a request in progress.
    pub idle_timeout_secs: u64,
    /// Most open connections of the gateway's API and of each webhook listener;
    /// beyond, new connections are answered 503.
    pub max_connections: usize,
    /// Most open connections of each admin port (`/livez`, `/readyz`, `/metrics`).
    pub admin_max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            idle_timeout_secs: 60,
            max_connections: 1024,
            admin_max_connections: 64,
        }
    }
}

impl HttpConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let range = |field: &'static str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::Invalid {
                    field,
                    reason: format!("{v} is not between {lo} and {hi}"),
                })
            }
        };
        range("http.header_timeout_secs", self.header_timeout_secs, 1, 300)?;
        range("http.body_timeout_secs", self.body_timeout_secs, 1, 3600)?;
        range("http.idle_timeout_secs", self.idle_timeout_secs, 1, 3600)?;
        range(
            "http.max_connections",
            self.max_connections as u64,
            1,
            1_000_000,
        )?;
        range(
            "http.admin_max_connections",
            self.admin_max_connections as u64,
            1,
            1_000_000,
        )
    }
}
