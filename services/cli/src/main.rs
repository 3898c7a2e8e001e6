//! `clawbus`: runs the whole suite locally and talks to a running one.
//!
//! ```text
//! clawbus up [--replicas N]   start nats-server (unless NATS_URL is set) and every
//!                   service; router, agent and store as N replicas (or CLAWBUS_REPLICAS)
//! clawbus provision create or verify streams, buckets and fixed consumers (as the
//!                   `provision` NATS user; `up` does it before starting services)
//! clawbus status    readiness of each service, and the bus's queues
//! clawbus token     print the gateway token
//! clawbus send TEXT [--session KEY]   send one message through the gateway
//! clawbus dlq       the latest dead letters with their reasons
//! clawbus approvals list | allow <id> [--always] | deny <id>
//! clawbus pairing list [channel] | approve <channel> <code>
//! clawbus cron add ... | list | rm <id>   scheduled turns (see `cron.rs`)
//!                   the owner's answers to tool calls waiting for approval
//! clawbus usage [--session KEY] [--days N]   tokens per day and model (from the
//!                   store's database: DATABASE_URL or [store] database_url)
//! clawbus nats-config [--env-passwords]   the nats-server `authorization` block with
//!                   every user's rights, for a NATS of your own
//! ```
//!
//! Bus commands connect as the configured NATS user (`[nats] user`), else as the user
//! whose password `clawbus up` generated for the command: `operator` for `status` and
//! `dlq` (read only), `admin` for `pairing`, `approvals` and `cron`, `provision` for
//! `provision`.

#![forbid(unsafe_code)]

mod approvals;
mod auth;
mod cron;
mod pairing;
mod state;
mod supervisor;

use std::process::ExitCode;
use std::time::Duration;

use clawbus_bus::topology;
use clawbus_config::Config;

const USAGE: &str = "usage: clawbus <up [--replicas N]|provision|status|token|send TEXT [--session KEY]|dlq|usage [--session KEY] [--days N]|approvals list|allow ID [--always]|deny ID|pairing list [CHANNEL]|approve CHANNEL CODE|cron add ...|list|rm ID|nats-config [--env-passwords]|help>";
/// Dead letters `clawbus dlq` shows at most (the newest).
const DLQ_SHOWN: u64 = 100;

#[tokio::main]
async fn main() -> ExitCode {
    // Tokens, credentials, the database and logs this process or its children create
    // are their owner's alone, whatever umask the shell had.
    state::private_umask();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("clawbus: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("up") => match supervisor::replicas_from(&args[1..]) {
            Ok(n) => supervisor::up(cfg, n).await,
            Err(e) => {
                eprintln!("clawbus: {e}");
                return ExitCode::from(2);
            }
        },
        Some("provision") if args.len() == 1 => auth::provision(&cfg).await.map(|()| {
            println!("Streams, buckets and consumers provisioned");
        }),
        Some("nats-config") => nats_config(&cfg, &args[1..]),
        Some("status") if args.len() == 1 => status(&cfg).await,
        Some("token") if args.len() == 1 => token(&cfg),
        Some("dlq") if args.len() == 1 => dlq(&cfg).await,
        Some("usage") => usage(&cfg, &args[1..]).await,
        Some("approvals") => approvals::run(&cfg, &args[1..]).await,
        Some("pairing") => pairing::run(&cfg, &args[1..]).await,
        Some("cron") => cron::run(&cfg, &args[1..]).await,
        Some("send") => send(&cfg, &args[1..]).await,
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clawbus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn token(cfg: &Config) -> anyhow::Result<()> {
    let t = clawbus_config::ensure_gateway_token(cfg)?;
    println!("{}", t.token);
    Ok(())
}

fn nats_config(cfg: &Config, args: &[String]) -> anyhow::Result<()> {
    match args {
        [] => print!(
            "{}",
            clawbus_bus::rights::render_authorization(
                &clawbus_bus::rights::Scope::of(cfg),
                |u| format!("\"<password of {u}>\"")
            )
        ),
        [flag] if flag == "--env-passwords" => print!("{}", clawbus_bus::rights::compose_config()),
        _ => anyhow::bail!("usage: clawbus nats-config [--env-passwords]"),
    }
    Ok(())
}

async fn status(cfg: &Config) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut all = true;
    for (name, addr) in supervisor::admin_addrs(cfg) {
        let state = match http.get(format!("http://{addr}/readyz")).send().await {
            Ok(r) if r.status().is_success() => "ready".to_owned(),
            Ok(r) => format!("not ready ({})", r.text().await.unwrap_or_default().trim()),
            Err(_) => "down".to_owned(),
        };
        all &= state == "ready";
        println!("{name:<10} {addr:<22} {state}");
    }
    match queues(cfg).await {
        Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
        Err(e) => {
            all = false;
            println!("bus        {e:#}");
        }
    }
    if all {
        Ok(())
    } else {
        anyhow::bail!("some services are not ready")
    }
}

/// Messages in each stream and, per consumer, what waits and what is in flight.
async fn queues(cfg: &Config) -> anyhow::Result<Vec<String>> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(auth::connect(cfg, clawbus_bus::rights::OPERATOR).await?);
    let mut lines = Vec::new();
    for name in [
        topology::STREAM_INBOUND,
        topology::STREAM_TURNS,
        topology::STREAM_OUTBOUND,
        topology::STREAM_EVENTS,
        topology::STREAM_DEAD_LETTERS,
    ] {
        let mut stream = js.get_stream(name).await?;
        let messages = stream.info().await?.state.messages;
        lines.push(format!("stream     {name:<22} {messages} messages"));
        let mut consumers = stream.consumers();
        while let Some(c) = consumers.next().await {
            let c = c?;
            lines.push(format!(
                "consumer   {:<22} {} pending, {} in flight",
                format!("{name}/{}", c.name),
                c.num_pending,
                c.num_ack_pending
            ));
        }
    }
    Ok(lines)
}

async fn send(cfg: &Config, args: &[String]) -> anyhow::Result<()> {
    let mut text = None;
    let mut session = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--session" => {
                session = Some(
                    it.next()
                        .ok_or_else(|| anyhow::anyhow!("--session needs a value"))?
                        .clone(),
                )
            }
            t if text.is_none() => text = Some(t.to_owned()),
            other => anyhow::bail!("unexpected argument `{other}`\n{USAGE}"),
        }
    }
    let text = text.ok_or_else(|| anyhow::anyhow!("nothing to send\n{USAGE}"))?;
    let token = clawbus_config::ensure_gateway_token(cfg)?.token;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(cfg.gateway.request_timeout_secs + 5))
        .build()?;
    let mut req = http
        .post(format!("http://{}/v1/chat/completions", cfg.gateway.bind))
        .bearer_auth(token)
        .json(&serde_json::json!({"model": "clawbus", "messages": [{"role": "user", "content": text}]}));
    req = req.header(
        "x-clawbus-session-key",
        session.unwrap_or_else(|| format!("agent:{}:main", cfg.router.default_agent)),
    );
    let resp = req.send().await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        anyhow::bail!(
            "gateway answered {status}: {}",
            body["error"]["message"].as_str().unwrap_or("?")
        );
    }
    println!(
        "{}",
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
    );
    Ok(())
}

async fn dlq(cfg: &Config) -> anyhow::Result<()> {
    let client = auth::connect(cfg, clawbus_bus::rights::OPERATOR).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("CLAW_DLQ").await?;
    let state = stream.info().await?.state.clone();
    if state.messages == 0 {
        println!("no dead letters");
        return Ok(());
    }
    let first = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(DLQ_SHOWN - 1));
    println!(
        "{} dead letters; showing sequences {first}..={}",
        state.messages, state.last_sequence
    );
    for seq in first..=state.last_sequence {
        let Ok(m) = stream.direct_get(seq).await else {
            continue;
        };
        let h = |name: &str| {
            m.headers
                .get(name)
                .map(|v| v.to_string())
                .unwrap_or_default()
        };
        println!(
            "{seq}\t{}\tfrom {} (seq {})\t{} bytes\t{}",
            m.subject,
            h("Clawbus-Dlq-Subject"),
            h("Clawbus-Dlq-Stream-Seq"),
            m.payload.len(),
            h("Clawbus-Dlq-Reason"),
        );
    }
    Ok(())
}

/// Token usage per day and model, read from the store's database.
async fn usage(cfg: &Config, args: &[String]) -> anyhow::Result<()> {
    use clawbus_store::TranscriptStore;
    let mut session = None;
    let mut days: i64 = 30;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--session" => {
                let v = value()?;
                anyhow::ensure!(
                    !v.is_empty() && v.len() <= 512,
                    "--session: a session key of 1-512 bytes"
                );
                session = Some(v.clone());
            }
            "--days" => {
                let v = value()?;
                days = match v.parse::<i64>() {
                    Ok(n) if (1..=3650).contains(&n) => n,
                    _ => anyhow::bail!("--days must be a number from 1 to 3650, got `{v}`"),
                };
            }
            other => anyhow::bail!("unexpected argument `{other}`\n{USAGE}"),
        }
    }
    let url = cfg.database_url();
    let db = clawbus_store::Database::open_reader(&url)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the store's database: {e}"))?;
    const DAY_MS: i64 = 86_400_000;
    let since = (clawbus_wire::now_ms() / DAY_MS - (days - 1)) * DAY_MS;
    let rows = db.usage_by_day(session.as_deref(), since).await?;
    if rows.is_empty() {
        println!("no usage in the last {days} days");
        return Ok(());
    }
    println!(
        "{:<10}  {:<32} {:>6} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "day", "model", "runs", "prompt", "completion", "total", "cached", "reasoning", "cost USD"
    );
    let mut sum = [0u64; 6];
    let mut cost_sum = Some(0.0);
    for r in &rows {
        let day = time::OffsetDateTime::from_unix_timestamp(r.day_ms / 1000)
            .map(|t| t.date().to_string())
            .unwrap_or_else(|_| r.day_ms.to_string());
        // As the runs recorded it (their time's prices), else at today's configured
        // prices ([agent.models]); "-" for a model without prices.
        let cost = r.cost_usd.or_else(|| {
            r.model
                .as_deref()
                .and_then(|m| cfg.agent.model_spec(m))
                .map(|spec| spec.cost_usd(r.prompt_tokens, r.completion_tokens))
        });
        cost_sum = cost_sum.zip(cost).map(|(a, b)| a + b);
        println!(
            "{day:<10}  {:<32} {:>6} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10}",
            r.model.as_deref().unwrap_or("-"),
            r.runs,
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.cached_tokens,
            r.reasoning_tokens,
            cost.map_or("-".into(), |c| format!("{c:.4}"))
        );
        let row = [
            r.runs,
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.cached_tokens,
            r.reasoning_tokens,
        ];
        for (s, v) in sum.iter_mut().zip(row) {
            *s += v;
        }
    }
    println!(
        "{:<10}  {:<32} {:>6} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "total",
        "",
        sum[0],
        sum[1],
        sum[2],
        sum[3],
        sum[4],
        sum[5],
        cost_sum.map_or("-".into(), |c| format!("{c:.4}"))
    );
    Ok(())
}
