//! `[nats]`: where the bus is and who this process is on it.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

use crate::ConfigError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub url: String,
    pub user: Option<String>,
    pub password: Option<SecretString>,
    /// A file holding the password (a container secret, or what `clawbus up` writes
    /// under `<state_dir>/credentials`); instead of `password`.
    pub password_file: Option<PathBuf>,
    /// Stream replicas (1 on a laptop, 3 on a cluster).
    pub replicas: usize,
}

impl NatsConfig {
    /// The user and password to connect with: none, or both (`password` or the first
    /// line of `password_file`).
    pub fn credentials(&self) -> Result<Option<(String, SecretString)>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            field: "nats.password_file",
            reason,
        };
        let password = match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "set nats.password or nats.password_file, not both".into(),
                ))
            }
            (Some(p), None) => Some(p.clone()),
            (None, Some(f)) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| invalid(format!("{}: {e}", f.display())))?;
                let line = text.lines().next().unwrap_or("").trim().to_owned();
                if line.is_empty() {
                    return Err(invalid(format!("{} is empty", f.display())));
                }
                Some(SecretString::from(line))
            }
            (None, None) => None,
        };
        match (self.user.as_deref().filter(|u| !u.is_empty()), password) {
            (Some(u), Some(p)) => Ok(Some((u.to_owned(), p))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(ConfigError::Invalid {
                field: "nats.user",
                reason: "needs nats.password or nats.password_file".into(),
            }),
            (None, Some(_)) => Err(ConfigError::Invalid {
                field: "nats.password",
                reason: "needs nats.user".into(),
            }),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            user: None,
            password: None,
            password_file: None,
            replicas: 1,
        }
    }
}
