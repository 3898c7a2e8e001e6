//! `clawbus`: runs the whole suite locally and talks to a running one.
//!
//! ```text
//! clawbus up [--replicas N]   start nats-server (unless NATS_URL is set) and every
//!                   service; router, agent and store as N replicas (or CLAWBUS_REPLICAS)
//! clawbus status    readiness of each service
//! clawbus token     print the gateway token
//! clawbus send TEXT [--session KEY]   send one message through the gateway
//! clawbus dlq       the latest dead letters with their reasons
//! ```

#![forbid(unsafe_code)]

mod supervisor;

use std::process::ExitCode;
use std::time::Duration;

use clawbus_config::Config;

const USAGE: &str =
    "usage: clawbus <up [--replicas N]|status|token|send TEXT [--session KEY]|dlq|help>";
/// Dead letters `clawbus dlq` shows at most (the newest).
const DLQ_SHOWN: u64 = 100;

#[tokio::main]
async fn main() -> ExitCode {
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
        Some("status") if args.len() == 1 => status(&cfg).await,
        Some("token") if args.len() == 1 => token(&cfg),
        Some("dlq") if args.len() == 1 => dlq(&cfg).await,
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
    if all {
        Ok(())
    } else {
        anyhow::bail!("some services are not ready")
    }
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
    use secrecy::ExposeSecret;
    let mut opts = async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(3));
    if let (Some(u), Some(p)) = (&cfg.nats.user, &cfg.nats.password) {
        opts = opts.user_and_password(u.clone(), p.expose_secret().to_owned());
    }
    let client = opts
        .connect(cfg.nats.url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach NATS at {}: {e}", cfg.nats.url))?;
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
