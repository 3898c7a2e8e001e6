//! The gateway's bearer token: configured, or generated once into the state directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rand::RngCore;
use secrecy::ExposeSecret;

use crate::{Config, ConfigError};

/// The token and whether this call created it (so the caller prints it once).
#[derive(Debug)]
pub struct GatewayToken {
    pub token: String,
    pub generated: bool,
}

/// Returns the configured token, else the one in `<state_dir>/gateway.token`, else
/// generates 32 random bytes (hex), stores them with mode 0600 and says so.
pub fn ensure_gateway_token(cfg: &Config) -> Result<GatewayToken, ConfigError> {
    if let Some(t) = cfg
        .gateway
        .token
        .as_ref()
        .map(|t| t.expose_secret().trim().to_owned())
    {
        if !t.is_empty() {
            return Ok(GatewayToken {
                token: t,
                generated: false,
            });
        }
    }
    let dir = cfg.state_dir();
    let io = |path: &Path, source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let path = dir.join("gateway.token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => {
            return Ok(GatewayToken {
                token: t.trim().to_owned(),
                generated: false,
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path, e)),
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // create_new: two processes racing to generate must not overwrite each other.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(token.as_bytes())
                .and_then(|_| f.sync_all())
                .map_err(|e| io(&path, e))?;
            Ok(GatewayToken {
                token,
                generated: true,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let t = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
            Ok(GatewayToken {
                token: t.trim().to_owned(),
                generated: false,
            })
        }
        Err(e) => Err(io(&path, e)),
    }
}
