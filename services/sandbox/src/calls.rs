//! Exactly once: a call is recorded (KV `claw_tool_calls`, by call id) before it runs
//! and its result after. A request for a call already recorded gets the recorded
//! result, or — when the call started but no result was recorded (the sandbox died
//! while it ran) — an "interrupted" answer; it never runs twice.

use async_nats::jetstream::kv;
use clawbus_bus::subjects;
use clawbus_wire::ToolResult;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
enum Record {
    Running,
    Done(ToolResult),
}

/// The call's state when it was seen before.
pub enum Seen {
    /// First time: recorded as running now.
    New,
    /// Finished: its result.
    Done(ToolResult),
    /// Started but never finished: it may or may not have taken effect.
    Interrupted,
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`: a call id becomes two FNV-64 hashes.
pub fn key(call_id: &str) -> String {
    format!(
        "{:016x}{:016x}",
        subjects::session_hash(call_id),
        subjects::session_hash(&format!("tool:{call_id}"))
    )
}

/// Records the call as running unless it was seen before.
pub async fn begin(kv: &kv::Store, call_id: &str) -> Result<Seen, String> {
    let k = key(call_id);
    let running = rmp_serde::to_vec(&Record::Running).map_err(|e| e.to_string())?;
    match kv.create(&k, running.into()).await {
        Ok(_) => Ok(Seen::New),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            let v = kv.get(&k).await.map_err(|e| e.to_string())?;
            match v.and_then(|b| clawbus_wire::decode_bounded::<Record>(&b).ok()) {
                Some(Record::Done(r)) => Ok(Seen::Done(r)),
                _ => Ok(Seen::Interrupted),
            }
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Records the call's result.
pub async fn finish(kv: &kv::Store, call_id: &str, result: &ToolResult) -> Result<(), String> {
    let v = rmp_serde::to_vec(&Record::Done(result.clone())).map_err(|e| e.to_string())?;
    kv.put(key(call_id), v.into())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
