//! Who may call: `Authorization: Bearer <token>` (the scheme in any case, RFC 9110
//! §11.1), compared in constant time with the gateway's token, or the hooks' own. An
//! empty credential never matches, whatever the protocol kept of the header.

use axum::http::{header, HeaderMap, StatusCode};
use clawbus_config::secret_matches;

use crate::openai::ApiError;

/// The credential of an `Authorization: Bearer <credential>` header: `None` without
/// one, or with another scheme. Nothing is trimmed from the credential (HTTP/1 strips
/// the value's outer spaces; HTTP/2 keeps them, and they then do not match).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let space = v.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = v.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    // `1*SP` between the scheme and the credential.
    let start = rest.iter().position(|b| *b != b' ').unwrap_or(rest.len());
    Some(&rest[start..])
}

/// Refuses a request whose bearer is not `token`.
pub(crate) fn authorized(token: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    match bearer(headers) {
        Some(given) if secret_matches(given, token.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key".into()),
            "missing or invalid bearer token (Authorization: Bearer <gateway token>)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static(v));
        h
    }

    const TOKEN: &str = "tok-0123456789abcdef";

    #[test]
    fn the_scheme_in_any_case_and_nothing_else() {
        for ok in [
            "Bearer tok-0123456789abcdef",
            "bearer tok-0123456789abcdef",
            "BEARER tok-0123456789abcdef",
            "bEaReR  tok-0123456789abcdef",
        ] {
            assert!(authorized(TOKEN, &with(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "Bearer ",
            "Bearer",
            "Bearer  ",
            "Bearer tok-0123456789abcdef ",
            "Bearer tok-0123456789abcdeF",
            "Basic tok-0123456789abcdef",
            "Bearertok-0123456789abcdef",
            "tok-0123456789abcdef",
        ] {
            assert!(authorized(TOKEN, &with(bad)).is_err(), "{bad:?}");
        }
        assert!(authorized(TOKEN, &HeaderMap::new()).is_err());
        // An empty token lets nobody in, not even an empty bearer.
        assert!(authorized("", &with("Bearer ")).is_err());
    }
}
