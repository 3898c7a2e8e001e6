//! The owner's answers to tool calls waiting for approval (KV `claw_approvals`,
//! `pending.<id>`): shared by `clawbus approvals` and the router's `/approve`.

use async_nats::jetstream::kv;
use clawbus_wire::{decode, encode, Approval, ApprovalState, Envelope};

/// Whether `id` looks like an approval id (12 hex digits).
pub fn is_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Decides a pending approval; the approval as decided, or why not.
pub async fn decide(kv: &kv::Store, id: &str, state: ApprovalState) -> Result<Approval, String> {
    if !is_id(id) {
        return Err(format!(
            "`{}` is not an approval id (12 hex digits, as listed)",
            id.chars().take(40).collect::<String>()
        ));
    }
    let key = format!("pending.{id}");
    let entry = kv
        .entry(&key)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no approval {id}"))?;
    let mut a = decode::<Approval>(&entry.value)
        .map_err(|e| e.to_string())?
        .body;
    if a.state != ApprovalState::Pending {
        return Err(format!("approval {id} is already decided ({:?})", a.state));
    }
    if a.expires_at <= clawbus_wire::now_ms() {
        return Err(format!("approval {id} has expired (the call was denied)"));
    }
    a.state = state;
    let bytes = encode(&Envelope::new(
        a.id.clone(),
        clawbus_wire::now_ms(),
        a.clone(),
    ))
    .map_err(|e| e.to_string())?;
    kv.update(&key, bytes.into(), entry.revision)
        .await
        .map_err(|e| format!("approval {id} changed meanwhile: {e}"))?;
    Ok(a)
}

/// How a decision reads.
pub fn said(state: ApprovalState) -> &'static str {
    match state {
        ApprovalState::AllowedOnce => "allowed once",
        ApprovalState::AllowedAlways => "allowed always (this program, for this agent)",
        _ => "denied",
    }
}
