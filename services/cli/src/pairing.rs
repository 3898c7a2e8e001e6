//! `clawbus pairing list [channel] | approve <channel> <code>`: the owner's answers to
//! senders asking for access (KV `claw_pairing`), as the `admin` user. An approved
//! sender is told on their channel.

use clawbus_bus::{pairing, rights, subjects, topology, Bus};
use clawbus_config::Config;
use clawbus_wire::{Envelope, OutboundMessage};

pub const USAGE: &str = "usage: clawbus pairing list [channel] | approve <channel> <code>";

pub async fn run(cfg: &Config, args: &[String]) -> anyhow::Result<()> {
    let client = crate::auth::connect(cfg, rights::ADMIN).await?;
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value(topology::KV_PAIRING).await?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["list"] => list(&kv, None).await,
        ["list", channel] => list(&kv, Some(channel)).await,
        ["approve", channel, code] => {
            let r = pairing::approve(&kv, channel, code)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            println!(
                "approved {} on {}/{} ({})",
                r.sender_id,
                r.channel,
                r.account,
                r.sender_name.as_deref().unwrap_or("no name")
            );
            tell(Bus::from_client(client), &r).await
        }
        _ => anyhow::bail!("{USAGE}"),
    }
}

async fn list(kv: &async_nats::jetstream::kv::Store, channel: Option<&str>) -> anyhow::Result<()> {
    if let Some(c) = channel.filter(|c| !subjects::is_token(c)) {
        anyhow::bail!("`{c}` is not a channel name");
    }
    let pending = pairing::pending(kv, channel, None)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    if pending.is_empty() {
        println!("no pairing requests pending");
        return Ok(());
    }
    let now = clawbus_wire::now_ms();
    println!(
        "{:<10}  {:<10}  {:<10}  {:<20}  {:<20}  expires in",
        "code", "channel", "account", "sender", "name"
    );
    for r in pending {
        println!(
            "{:<10}  {:<10}  {:<10}  {:<20}  {:<20}  {} min",
            r.code,
            r.channel,
            r.account,
            r.sender_id,
            r.sender_name.as_deref().unwrap_or("-"),
            (r.created_ms + pairing::CODE_TTL_MS - now) / 60_000
        );
    }
    Ok(())
}

/// Tells the approved sender, in the chat they asked from.
async fn tell(bus: Bus, r: &pairing::Request) -> anyhow::Result<()> {
    let Some(subject) = subjects::outbound(&r.channel, &r.account) else {
        return Ok(());
    };
    let id = format!("pairing:{}:{}:{}", r.channel, r.account, r.code);
    let out = OutboundMessage {
        run_id: id.clone(),
        channel: r.channel.clone(),
        account: r.account.clone(),
        chat_id: r.chat_id.clone(),
        inbound_id: id.clone(),
        last: true,
        text: "You are approved: send a message to start.".into(),
        ..Default::default()
    };
    let env = Envelope::new(format!("{id}:out:0"), clawbus_wire::now_ms(), out);
    bus.publish_durable(subject, &env, &clawbus_bus::TraceContext::root())
        .await?;
    Ok(())
}
