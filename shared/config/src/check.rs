//! Checks the sections' validations share, each naming the field it refuses.

use std::net::SocketAddr;

use crate::ConfigError;

/// At least 1.
pub(crate) fn positive(field: &'static str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            field,
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}

/// A `host:port` socket address.
pub(crate) fn socket_addr(field: &'static str, v: &str) -> Result<(), ConfigError> {
    v.parse::<SocketAddr>()
        .map(|_| ())
        .map_err(|e| ConfigError::Invalid {
            field,
            reason: format!("`{v}` is not host:port ({e})"),
        })
}

/// A NATS subject token ([`crate::is_token`]).
pub(crate) fn token(field: &'static str, v: &str) -> Result<(), ConfigError> {
    if crate::is_token(v) {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        field,
        reason: format!("`{v}`: letters, digits, `-` and `_` only, 1-64 characters"),
    })
}
