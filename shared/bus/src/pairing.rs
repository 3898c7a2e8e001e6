//! Pairing: an unknown sender on a channel with `dmPolicy = "pairing"` gets a code; the
//! owner approves it (`clawbus pairing approve <channel> <code>`) and the sender is on
//! the channel account's allowlist from then on. Kept in the KV bucket `claw_pairing`,
//! so every router replica sees a request and an approval at once:
//! `pending.<channel>.<account>.<code>` → request, `allow.<channel>.<account>.<sender
//! hash>` → approval.

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use crate::{kv_keys, subjects};

/// Characters of a code: no 0/O, 1/I/L look-alikes.
const ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
pub const CODE_LEN: usize = 8;
/// How long a code may be approved.
pub const CODE_TTL_MS: i64 = 3600 * 1000;
/// Requests pending at once per channel account.
pub const MAX_PENDING: usize = 3;

/// A sender waiting to be approved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub code: String,
    pub channel: String,
    pub account: String,
    pub sender_id: String,
    #[serde(default)]
    pub sender_name: Option<String>,
    /// Where to tell the sender they were approved.
    pub chat_id: String,
    pub created_ms: i64,
}

impl Request {
    pub fn expired(&self, now: i64) -> bool {
        now >= self.created_ms + CODE_TTL_MS
    }
}

/// An approved sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approved {
    pub sender_id: String,
    pub code: String,
    pub approved_ms: i64,
}

/// What asking for a code gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Asked {
    /// A new code (the sender is told it).
    New(String),
    /// The sender already has this code pending (told again).
    Pending(String),
    /// The account has `MAX_PENDING` requests pending: no code for now.
    Full,
}

fn allow_key(channel: &str, account: &str, sender: &str) -> String {
    format!(
        "allow.{channel}.{account}.{:016x}",
        subjects::session_hash(sender)
    )
}

/// Whether `code` has the shape of a pairing code.
pub fn is_code(code: &str) -> bool {
    code.len() == CODE_LEN && code.bytes().all(|b| ALPHABET.contains(&b))
}

fn new_code() -> String {
    (0..CODE_LEN)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Whether the sender was approved on this channel account.
pub async fn is_approved(
    kv: &kv::Store,
    channel: &str,
    account: &str,
    sender: &str,
) -> Result<bool, String> {
    match kv.get(allow_key(channel, account, sender)).await {
        Ok(Some(_)) => Ok(true),
        Ok(None) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// The requests pending on `channel` (every account when `None` ... or one), oldest
/// first; expired ones are removed on the way.
pub async fn pending(
    kv: &kv::Store,
    channel: Option<&str>,
    account: Option<&str>,
) -> Result<Vec<Request>, String> {
    let filter = format!(
        "pending.{}.{}.*",
        channel.unwrap_or("*"),
        account.unwrap_or("*")
    );
    let now = clawbus_wire::now_ms();
    let mut out = Vec::new();
    for k in kv_keys(kv, &filter).await.map_err(|e| e.to_string())? {
        let Ok(Some(v)) = kv.get(&k).await else {
            continue;
        };
        match serde_json::from_slice::<Request>(&v) {
            Ok(r) if r.expired(now) => {
                let _ = kv.purge(&k).await;
            }
            Ok(r) => out.push(r),
            Err(_) => {}
        }
    }
    out.sort_by_key(|r| r.created_ms);
    Ok(out)
}

/// A code for a sender not approved yet: the one pending, a new one, or none when the
/// account has too many pending.
pub async fn ask(kv: &kv::Store, mut req: Request) -> Result<Asked, String> {
    let pending = pending(kv, Some(&req.channel), Some(&req.account)).await?;
    if let Some(p) = pending.iter().find(|p| p.sender_id == req.sender_id) {
        return Ok(Asked::Pending(p.code.clone()));
    }
    if pending.len() >= MAX_PENDING {
        return Ok(Asked::Full);
    }
    for _ in 0..5 {
        req.code = new_code();
        let key = format!("pending.{}.{}.{}", req.channel, req.account, req.code);
        let value = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        match kv.create(&key, value.into()).await {
            Ok(_) => return Ok(Asked::New(req.code)),
            // The same code taken already (or its expired request still there).
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("no free pairing code".into())
}

/// Approves a pending code on `channel`: the sender goes on the allowlist. The
/// request approved, for telling the sender.
pub async fn approve(kv: &kv::Store, channel: &str, code: &str) -> Result<Request, String> {
    let code = code.trim().to_ascii_uppercase();
    if !is_code(&code) {
        return Err(format!(
            "`{}` is not a pairing code ({CODE_LEN} letters and digits)",
            code.chars().take(40).collect::<String>()
        ));
    }
    if !subjects::is_token(channel) {
        return Err(format!("`{channel}` is not a channel name"));
    }
    let found = pending(kv, Some(channel), None)
        .await?
        .into_iter()
        .find(|r| r.code == code)
        .ok_or_else(|| {
            format!("no pending pairing request {code} on {channel} (expired, or never made)")
        })?;
    let approved = Approved {
        sender_id: found.sender_id.clone(),
        code: code.clone(),
        approved_ms: clawbus_wire::now_ms(),
    };
    kv.put(
        allow_key(&found.channel, &found.account, &found.sender_id),
        serde_json::to_vec(&approved)
            .map_err(|e| e.to_string())?
            .into(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let _ = kv
        .purge(format!(
            "pending.{}.{}.{}",
            found.channel, found.account, code
        ))
        .await;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_eight_unambiguous_characters() {
        for _ in 0..100 {
            let c = new_code();
            assert!(is_code(&c), "{c}");
            assert!(!c.contains(['0', 'O', '1', 'I', 'L']));
        }
        assert!(!is_code("abcdefgh") && !is_code("ABCDEFG") && !is_code("ABCDEFG0"));
    }
}
