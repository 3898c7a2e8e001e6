//! Secrets that let callers in: the gateway's bearer token (configured, or generated
//! once into the state directory), the hooks' token, Slack signing secrets and webhook
//! secrets. Each must be long enough to guess at no rate, and is compared in constant
//! time, never when the presented one is empty.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rand::RngCore;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{Config, ConfigError};

/// The fewest characters of a token or secret that lets callers in.
pub const MIN_SECRET_CHARS: usize = 16;

/// The token and whether this call created it (so the caller prints it once).
#[derive(Debug)]
pub struct GatewayToken {
    pub token: String,
    pub generated: bool,
}

/// What is wrong with `secret` as a token: `None` when it is fine (at least
/// [`MIN_SECRET_CHARS`] characters, all visible ASCII, as a header carries them).
pub fn secret_flaw(secret: &str) -> Option<String> {
    if secret.is_empty() {
        return Some("empty".into());
    }
    if secret.trim().is_empty() {
        return Some("blank".into());
    }
    if !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Some("not only visible ASCII characters (spaces, controls or other)".into());
    }
    let n = secret.chars().count();
    if n < MIN_SECRET_CHARS {
        return Some(format!("{n} characters, fewer than {MIN_SECRET_CHARS}"));
    }
    None
}

/// Refuses a configured secret of `field` that [`secret_flaw`] finds wanting.
pub(crate) fn check_secret(field: &'static str, secret: &str) -> Result<(), ConfigError> {
    match secret_flaw(secret) {
        None => Ok(()),
        Some(why) => Err(ConfigError::Invalid {
            field,
            reason: format!(
                "the secret is {why}: it must be at least {MIN_SECRET_CHARS} visible ASCII characters"
            ),
        }),
    }
}

/// True when a caller's `given` secret is `want`. Never for an empty one (on either
/// side); compared in constant time over digests, so neither the content nor the
/// length of the secret shows in the time taken.
pub fn secret_matches(given: &[u8], want: &[u8]) -> bool {
    if given.is_empty() || want.is_empty() {
        return false;
    }
    Sha256::digest(given).ct_eq(&Sha256::digest(want)).into()
}

/// Returns the configured token, else the one in `<state_dir>/gateway.token`, else
/// generates 32 random bytes (hex) and stores them there (mode 0600, written whole or
/// not at all). A token that is empty, blank, short or has spaces is refused, saying how
/// to make a new one: never would a gateway start that lets in an empty bearer.
pub fn ensure_gateway_token(cfg: &Config) -> Result<GatewayToken, ConfigError> {
    let dir = cfg.state_dir();
    let path = dir.join("gateway.token");
    if let Some(t) = cfg.gateway.token.as_ref() {
        let t = t.expose_secret().trim();
        if let Some(why) = secret_flaw(t) {
            return Err(ConfigError::Invalid {
                field: "gateway.token",
                reason: format!(
                    "the configured token (gateway.token or CLAWBUS_GATEWAY_TOKEN) is {why}: \
                     set one of at least {MIN_SECRET_CHARS} visible ASCII characters, or unset it \
                     to use the token generated into {}",
                    path.display()
                ),
            });
        }
        return Ok(GatewayToken {
            token: t.to_owned(),
            generated: false,
        });
    }
    let io = |path: &Path, source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    if let Some(token) = stored(&path)? {
        return Ok(GatewayToken {
            token,
            generated: false,
        });
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    // Written whole into a file of its own, then renamed into place: a start killed
    // midway, or a full disk, leaves no empty token behind.
    let mut tmp = tempfile::Builder::new()
        .prefix(".gateway.token.")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(&dir)
        .map_err(|e| io(&dir, e))?;
    tmp.write_all(token.as_bytes())
        .and_then(|_| tmp.as_file().sync_all())
        .map_err(|e| io(tmp.path(), e))?;
    // No clobbering: of two processes generating at once, the first one's token stays.
    match tmp.persist_noclobber(&path) {
        Ok(_) => {
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(&dir, e))?;
            Ok(GatewayToken {
                token,
                generated: true,
            })
        }
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            let token = stored(&path)?.ok_or_else(|| {
                io(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "removed while generating"),
                )
            })?;
            Ok(GatewayToken {
                token,
                generated: false,
            })
        }
        Err(e) => Err(io(&path, e.error)),
    }
}

/// The token stored at `path`, `None` when there is no file; a file whose token is
/// wanting is an error saying how to make a new one.
fn stored(path: &Path) -> Result<Option<String>, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ConfigError::Io {
                path: path.to_owned(),
                source: e,
            })
        }
    };
    // One trailing newline (an editor's, `echo`'s) is not part of the token.
    let token = text.strip_suffix('\n').unwrap_or(&text);
    let token = token.strip_suffix('\r').unwrap_or(token);
    match secret_flaw(token) {
        None => Ok(Some(token.to_owned())),
        Some(why) => Err(ConfigError::Invalid {
            field: "gateway.token",
            reason: format!(
                "{} holds a token that is {why}: delete the file to have a new token generated \
                 (by `clawbus token` or the gateway's next start), or write one of at least \
                 {MIN_SECRET_CHARS} visible ASCII characters into it",
                path.display()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::{Format, Toml};
    use figment::Figment;

    fn cfg(dir: &Path, token: Option<&str>) -> Config {
        let mut toml = format!("state_dir = {:?}\n", dir.display().to_string());
        if let Some(t) = token {
            toml.push_str(&format!("[gateway]\ntoken = {t:?}\n"));
        }
        Config::from_figment(Figment::new().merge(Toml::string(&toml))).unwrap()
    }

    #[test]
    fn a_wanting_token_file_is_refused_saying_how_to_make_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.token");
        for (content, why) in [
            ("", "empty"),
            ("\n", "empty"),
            ("   \n", "blank"),
            ("short-token", "11 characters"),
            ("has a space inside it", "visible ASCII"),
        ] {
            std::fs::write(&path, content).unwrap();
            let e = ensure_gateway_token(&cfg(dir.path(), None))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{content:?}: {e}");
            assert!(e.contains("delete the file"), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        // Deleted: a new one is generated, 0600, and read back as it is.
        std::fs::remove_file(&path).unwrap();
        let t = ensure_gateway_token(&cfg(dir.path(), None)).unwrap();
        assert!(t.generated);
        assert_eq!(t.token.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ensure_gateway_token(&cfg(dir.path(), None)).unwrap();
        assert_eq!((again.token, again.generated), (t.token, false));
        // No temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("gateway.token")]);
        // A token written by hand with a trailing newline is the token.
        std::fs::write(&path, "0123456789abcdef-by-hand\n").unwrap();
        let t = ensure_gateway_token(&cfg(dir.path(), None)).unwrap();
        assert_eq!(t.token, "0123456789abcdef-by-hand");
    }

    #[test]
    fn a_wanting_configured_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for t in ["", "   ", "short"] {
            let e = ensure_gateway_token(&cfg(dir.path(), Some(t)))
                .unwrap_err()
                .to_string();
            assert!(e.contains("CLAWBUS_GATEWAY_TOKEN"), "{t:?}: {e}");
        }
        let ok = ensure_gateway_token(&cfg(dir.path(), Some(" 0123456789abcdef "))).unwrap();
        assert_eq!(ok.token, "0123456789abcdef");
        assert!(!dir.path().join("gateway.token").exists());
    }

    #[test]
    fn racing_generators_agree_on_one_token() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), None);
        let tokens: Vec<GatewayToken> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ensure_gateway_token(&c).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(tokens.iter().filter(|t| t.generated).count(), 1);
        assert!(tokens.iter().all(|t| t.token == tokens[0].token));
    }

    #[test]
    fn secrets_match_only_whole_and_never_empty() {
        assert!(secret_matches(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!secret_matches(b"0123456789abcdeF", b"0123456789abcdef"));
        assert!(!secret_matches(b"0123456789abcde", b"0123456789abcdef"));
        assert!(!secret_matches(b"", b"0123456789abcdef"));
        assert!(!secret_matches(b"", b""));
        assert!(!secret_matches(b"0123456789abcdef ", b"0123456789abcdef"));
    }

    #[test]
    fn wanting_hook_slack_and_webhook_secrets_are_refused() {
        let load = |toml: &str| Config::from_figment(Figment::new().merge(Toml::string(toml)));
        for (toml, field) in [
            (
                "[hooks]\nenabled = true\ntoken = \"short\"",
                "hooks.token",
            ),
            (
                "[hooks]\nenabled = true\ntoken = \"with spaces in the token\"",
                "hooks.token",
            ),
            (
                "[channels.slack]\nbot_token = \"xoxb-1\"\nsigning_secret = \"\"",
                "channels.signing_secret",
            ),
            (
                "[channels.slack]\nbot_token = \"xoxb-1\"\nsigning_secret = \"   \"",
                "channels.signing_secret",
            ),
            (
                "[channels.slack.accounts.b]\nbot_token = \"xoxb-1\"\nsigning_secret = \"abc\"",
                "channels.signing_secret",
            ),
            (
                "[channels.telegram]\nbot_token = \"1:a\"\nwebhook_url = \"https://x.example/h\"\nwebhook_secret = \"short_secret\"",
                "channels.webhook_secret",
            ),
        ] {
            let e = load(toml).unwrap_err().to_string();
            assert!(e.contains(field), "{toml}: {e}");
        }
        load("[hooks]\nenabled = true\ntoken = \"0123456789abcdef\"").unwrap();
        load("[channels.slack]\nbot_token = \"xoxb-1\"\nsigning_secret = \"8f742231b10e8888abcd99yyyzzz85a5\"").unwrap();
    }
}
