//! `clawbus approvals list|allow <id> [--always]|deny <id>`: the owner's answers to tool
//! calls waiting for approval (KV `claw_approvals`), as the `admin` user.

use std::time::Duration;

use clawbus_bus::{rights, topology};
use clawbus_config::Config;
use clawbus_wire::{decode, Approval, ApprovalState};
use futures::StreamExt;

pub const USAGE: &str = "usage: clawbus approvals list | allow <id> [--always] | deny <id>";

pub async fn run(cfg: &Config, args: &[String]) -> anyhow::Result<()> {
    let client = crate::auth::connect(cfg, rights::ADMIN).await?;
    let js = async_nats::jetstream::new(client);
    let kv = js.get_key_value(topology::KV_APPROVALS).await?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["list"] => list(&kv).await,
        ["allow", id] => decide(&kv, id, ApprovalState::AllowedOnce).await,
        ["allow", id, "--always"] => decide(&kv, id, ApprovalState::AllowedAlways).await,
        ["deny", id] => decide(&kv, id, ApprovalState::Denied).await,
        _ => anyhow::bail!("{USAGE}"),
    }
}

/// The approvals still pending, oldest first.
async fn list(kv: &async_nats::jetstream::kv::Store) -> anyhow::Result<()> {
    let mut watch = kv.watch_with_history("pending.>").await?;
    let mut pending: Vec<Approval> = Vec::new();
    let now = clawbus_wire::now_ms();
    // The history comes first; an empty bucket sends nothing at all.
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), watch.next()).await
    {
        if let Ok(env) = decode::<Approval>(&e.value) {
            let a = env.body;
            if a.state == ApprovalState::Pending && a.expires_at > now {
                pending.push(a);
            }
        }
        if e.delta == 0 {
            break;
        }
    }
    if pending.is_empty() {
        println!("no approvals pending");
        return Ok(());
    }
    pending.sort_by_key(|a| a.requested_at);
    println!("{:<12}  {:<10}  {:<32}  command", "id", "agent", "session");
    for a in pending {
        println!(
            "{:<12}  {:<10}  {:<32}  {}",
            a.id,
            a.agent_id,
            a.session_key,
            a.command.replace('\n', " ")
        );
    }
    Ok(())
}

async fn decide(
    kv: &async_nats::jetstream::kv::Store,
    id: &str,
    state: ApprovalState,
) -> anyhow::Result<()> {
    let a = clawbus_bus::approvals::decide(kv, id, state)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "{id}: {}: {}",
        clawbus_bus::approvals::said(state),
        a.command
    );
    Ok(())
}
