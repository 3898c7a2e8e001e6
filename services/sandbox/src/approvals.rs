//! Approvals (`sandbox.ask`): an `exec` that needs its owner's word waits while its
//! request sits in KV `claw_approvals` (`pending.<id>`, an `approval` envelope anyone
//! may watch); the owner answers allow-once, allow-always or deny
//! (`clawbus approvals allow|deny <id>`); no answer within
//! `sandbox.approval_timeout_secs` denies. Allow-always records the program for the
//! agent (`always.<agent>.<program hash>`), so it is not asked for again.

use std::time::Duration;

use async_nats::jetstream::kv;
use clawbus_bus::subjects;
use clawbus_config::SandboxConfig;
use clawbus_wire::{decode, encode, Approval, ApprovalState, Envelope, ToolCall};

use crate::ToolError;

/// How often a waiting call looks for the owner's answer.
const POLL: Duration = Duration::from_millis(200);

/// The short id of a call's approval.
pub fn id(call_id: &str) -> String {
    format!(
        "{:012x}",
        subjects::session_hash(call_id) & 0xffff_ffff_ffff
    )
}

/// The program a command starts (its first word, without a path).
fn program(command: &str) -> &str {
    let first = command.split_whitespace().next().unwrap_or_default();
    first.rsplit('/').next().unwrap_or(first)
}

fn always_key(agent: &str, program: &str) -> String {
    format!("always.{agent}.{:016x}", subjects::session_hash(program))
}

/// Whether the call needs the owner's word under `cfg`.
async fn needed(cfg: &SandboxConfig, kv: &kv::Store, call: &ToolCall, command: &str) -> bool {
    match cfg.ask.as_str() {
        "always" => true,
        "on-miss" => {
            let p = program(command);
            if cfg.exec_allowlist.iter().any(|a| a == p) {
                return false;
            }
            !matches!(kv.get(always_key(&call.agent_id, p)).await, Ok(Some(_)))
        }
        _ => false,
    }
}

/// Asks the owner when the policy says so; `Ok` when the call may run.
pub async fn check(
    cfg: &SandboxConfig,
    kv: &kv::Store,
    call: &ToolCall,
    command: &str,
) -> Result<(), ToolError> {
    if !needed(cfg, kv, call, command).await {
        return Ok(());
    }
    let now = clawbus_wire::now_ms();
    let timeout = Duration::from_secs(cfg.approval_timeout_secs);
    let mut approval = Approval {
        id: id(&call.call_id),
        call_id: call.call_id.clone(),
        agent_id: call.agent_id.clone(),
        session_key: call.session_key.clone(),
        tool: call.tool.clone(),
        command: command.chars().take(4096).collect(),
        state: ApprovalState::Pending,
        requested_at: now,
        expires_at: now + timeout.as_millis() as i64,
    };
    let key = format!("pending.{}", approval.id);
    let put = |a: &Approval| {
        encode(&Envelope::new(
            a.id.clone(),
            clawbus_wire::now_ms(),
            a.clone(),
        ))
    };
    let bytes = put(&approval).map_err(|e| ToolError::internal(e.to_string()))?;
    kv.put(&key, bytes.into())
        .await
        .map_err(|e| ToolError::unavailable(format!("cannot ask for approval: {e}")))?;
    tracing::info!(id = %approval.id, agent = %call.agent_id, command = %approval.command, "Waiting for approval");
    let deadline = tokio::time::Instant::now() + timeout;
    let state = loop {
        if let Ok(Some(v)) = kv.get(&key).await {
            if let Ok(env) = decode::<Approval>(&v) {
                if env.body.state != ApprovalState::Pending {
                    break env.body.state;
                }
            }
        }
        if tokio::time::Instant::now() + POLL > deadline {
            break ApprovalState::Expired;
        }
        tokio::time::sleep(POLL).await;
    };
    if state == ApprovalState::Expired {
        approval.state = ApprovalState::Expired;
        if let Ok(b) = put(&approval) {
            let _ = kv.put(&key, b.into()).await;
        }
    }
    match state {
        ApprovalState::AllowedOnce => Ok(()),
        ApprovalState::AllowedAlways => {
            let p = program(command);
            let _ = kv
                .put(
                    always_key(&call.agent_id, p),
                    p.to_owned().into_bytes().into(),
                )
                .await;
            Ok(())
        }
        ApprovalState::Expired => Err(ToolError::denied(format!(
            "no approval within {} s: the command was not run (approval {})",
            timeout.as_secs(),
            approval.id
        ))),
        _ => Err(ToolError::denied(format!(
            "the owner denied this command (approval {}); do not retry it",
            approval.id
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_stable() {
        assert_eq!(id("run:x:tool:1"), id("run:x:tool:1"));
        assert_ne!(id("run:x:tool:1"), id("run:x:tool:2"));
        assert_eq!(id("a").len(), 12);
        assert_eq!(program("/usr/bin/git status"), "git");
        assert_eq!(program("  ls -la"), "ls");
    }
}
