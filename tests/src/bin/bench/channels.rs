//! `--channels N [--messages M]`: the channels service alone, against the Telegram
//! emulator. N Telegram accounts long-poll with nothing to read: the channels
//! process's RSS with all of them idle. Then M direct messages to the first account,
//! one at a time: the time from the update becoming available at the emulator to the
//! inbound message reaching a subscriber of `claw.v1.in.telegram.>` (the adapter's
//! long-poll answer, parsing, the publish), p50 and p99. The agent is stopped so
//! replies do not mix in.

use std::time::{Duration, Instant};

use clawbus_testkit::telegram::TelegramEmulator;
use clawbus_testkit::{Service, Suite, SuiteOpts};
use futures::StreamExt;

pub async fn run(accounts: usize, messages: usize) -> anyhow::Result<()> {
    let tokens: Vec<String> = (0..accounts.max(1))
        .map(|i| format!("{}:bench-token-{i}", 100_000 + i))
        .collect();
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let tg = TelegramEmulator::start_many(&refs).await?;
    let root = tg.api_root();
    let mut env: Vec<(String, String)> = vec![
        ("RUST_LOG".into(), "warn".into()),
        ("TELEGRAM_BOT_TOKEN".into(), tokens[0].clone()),
        ("CLAWBUS__CHANNELS__TELEGRAM__API_ROOT".into(), root.clone()),
        (
            "CLAWBUS__CHANNELS__TELEGRAM__DM_POLICY".into(),
            "open".into(),
        ),
        ("CLAWBUS__CHANNELS__TELEGRAM__TYPING".into(), "false".into()),
    ];
    for (i, t) in tokens.iter().enumerate().skip(1) {
        let k = format!("CLAWBUS__CHANNELS__TELEGRAM__ACCOUNTS__A{i}");
        env.push((format!("{k}__BOT_TOKEN"), t.clone()));
        env.push((format!("{k}__API_ROOT"), root.clone()));
    }
    let mut suite = Suite::start(SuiteOpts {
        env,
        ..Default::default()
    })
    .await?;
    suite.kill9_replica((Service::Agent, 0)).await?;
    let pid = suite
        .replica_pid((Service::Channels, 0))
        .ok_or_else(|| anyhow::anyhow!("no channels process"))?;
    let all_polling = clawbus_testkit::wait_for(Duration::from_secs(120), || async {
        tg.waiting_polls() >= accounts as u64
    })
    .await;
    anyhow::ensure!(
        all_polling,
        "only {} of {accounts} accounts poll",
        tg.waiting_polls()
    );
    let idle_rss = clawbus_testkit::rss_of(pid);
    println!(
        "channels idle: accounts={accounts} rss_mb={:.1}",
        idle_rss as f64 / 1e6
    );
    let client = suite.nats.client().await?;
    let mut sub = client.subscribe("claw.v1.in.telegram.>").await?;
    client.flush().await?;
    let mut lat = Vec::with_capacity(messages);
    for i in 0..messages {
        let t = Instant::now();
        tg.dm(5000 + (i % 100) as i64, &format!("message {i}"));
        tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        lat.push(t.elapsed());
    }
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    if !lat.is_empty() {
        println!(
            "channels inbound: messages={messages} p50_ms={:.3} p99_ms={:.3} rss_after_mb={:.1}",
            q(0.5).as_secs_f64() * 1e3,
            q(0.99).as_secs_f64() * 1e3,
            clawbus_testkit::rss_of(pid) as f64 / 1e6
        );
    }
    Ok(())
}
