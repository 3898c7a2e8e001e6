//! clawbus-bench: drives N chat turns through the whole suite and prints the figures.
//!
//! Starts nats-server, the provider emulator (answering at once) and every service as
//! its own process (binaries from `CLAWBUS_BIN_DIR`), then runs `--turns` turns from
//! `--concurrency` concurrent sessions through the gateway's HTTP API.
//!
//! Added latency = client-side latency of a turn minus the emulator's own time for it.
//! RSS = sum over the four service processes after the run (nats-server excluded).
//!
//! ```text
//! clawbus-bench [--turns N] [--concurrency C] [--warmup W] [--replicas R] [--cluster K]
//!               [--postgres] [--auth] [--tools] [--store-writes N]
//! ```
//! `--sandbox-calls N` measures the sandbox alone: N `read` calls of a small file and N
//! `exec` calls of `true` (in bubblewrap), one at a time, over the bus as the agent
//! sends them, and prints their round-trip p50 and p99.
//! `--tools` makes every turn a tool turn: the model calls one tool (`echo`, answered by
//! the testkit's tool responder over the bus), then answers with its result — two
//! model calls and one tool call per turn; compare its added latency with a plain run's
//! for what the tool step costs.
//! `--replicas` runs R processes of router, agent and store; `--cluster` runs the suite
//! on a K-node nats-server cluster (streams with K replicas); `--auth` runs every
//! service as its own NATS user with only its rights, as `clawbus up` does (one
//! nats-server); `--postgres` puts the
//! store on a throw-away Postgres instead of SQLite. `--store-writes N` measures the
//! store's database layer alone: N turn records (a run event with two entries) written
//! from `--concurrency` tasks, on SQLite and on Postgres. Postgres runs with its
//! default durability (fsync, synchronous commit), like SQLite's WAL commits here.
//! `--routing N [--sessions S]` measures the router alone (module `routing`): N direct
//! messages from S senders queued with no agent running; the routing decision's p50
//! and the router's memory with all of them queued.
//! `--channels N [--messages M]` measures the channels service alone (module
//! `channels`): the RSS of N idle Telegram accounts and the inbound adapter overhead.
//! The last line is `bench: turns_per_s=<n> p50_ms=<n> p99_ms=<n> rss_mb=<n>`.

mod channels;
mod routing;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawbus_testkit::{cpu_of, Suite, SuiteOpts};
use serde_json::json;

struct Args {
    turns: usize,
    concurrency: usize,
    warmup: usize,
    replicas: usize,
    cluster: usize,
    postgres: bool,
    auth: bool,
    tools: bool,
    store_writes: usize,
    sandbox_calls: usize,
    routing: usize,
    sessions: usize,
    channels: usize,
    messages: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        turns: 20_000,
        concurrency: 64,
        warmup: 1_000,
        replicas: 1,
        cluster: 0,
        postgres: false,
        auth: false,
        tools: false,
        store_writes: 0,
        sandbox_calls: 0,
        routing: 0,
        sessions: 1_000,
        channels: 0,
        messages: 1_000,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let mut v = || -> anyhow::Result<usize> {
            Ok(it
                .next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))?
                .parse()?)
        };
        match k.as_str() {
            "--turns" => a.turns = v()?,
            "--concurrency" => a.concurrency = v()?.max(1),
            "--warmup" => a.warmup = v()?,
            "--replicas" => a.replicas = v()?.clamp(1, 16),
            "--cluster" => a.cluster = v()?,
            "--postgres" => a.postgres = true,
            "--auth" => a.auth = true,
            "--tools" => a.tools = true,
            "--store-writes" => a.store_writes = v()?,
            "--sandbox-calls" => a.sandbox_calls = v()?,
            "--routing" => a.routing = v()?,
            "--sessions" => a.sessions = v()?.max(1),
            "--channels" => a.channels = v()?,
            "--messages" => a.messages = v()?,
            other => anyhow::bail!("unknown argument {other}; usage: clawbus-bench [--turns N] [--concurrency C] [--warmup W] [--replicas R] [--cluster K] [--postgres] [--auth] [--tools] [--store-writes N] [--sandbox-calls N] [--routing N [--sessions S]] [--channels N [--messages M]]"),
        }
    }
    Ok(a)
}

/// Runs `n` turns over `c` sessions; returns per-turn latencies (µs) and elapsed time.
async fn drive(
    suite: &Suite,
    n: usize,
    c: usize,
    tag: &str,
    tools: bool,
) -> anyhow::Result<(Vec<u64>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..c {
        let next = next.clone();
        let req = suite.http.clone();
        let url = format!("{}/v1/chat/completions", suite.gateway_url);
        let token = suite.token.clone();
        let session = format!("agent:main:bench-{tag}-{w}");
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let text = if tools {
                    format!(r#"tools: [[{{"name": "echo", "arguments": {{"text": "turn {i}"}}}}]]"#)
                } else {
                    format!("turn {i}")
                };
                let body =
                    json!({"model": "clawbus", "messages": [{"role": "user", "content": text}]});
                let t = Instant::now();
                let r = req
                    .post(&url)
                    .bearer_auth(&token)
                    .header("x-clawbus-session-key", &session)
                    .json(&body)
                    .send()
                    .await?;
                let status = r.status();
                let _ = r.bytes().await?;
                if !status.is_success() {
                    anyhow::bail!("turn {i} failed with {status}");
                }
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for w in workers {
        all.extend(w.await??);
    }
    Ok((all, started.elapsed()))
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Every process whose CPU time the run is charged with, by name.
fn processes(suite: &Suite) -> Vec<(String, u32)> {
    let mut procs: Vec<(String, u32)> = suite
        .replicas()
        .into_iter()
        .filter_map(|(s, i)| Some((format!("{}-{i}", s.name()), suite.replica_pid((s, i))?)))
        .collect();
    for (i, pid) in suite.nats.pids().into_iter().enumerate() {
        procs.push((format!("nats-{i}"), pid));
    }
    procs.push(("bench+emulator".into(), std::process::id()));
    procs
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    if a.store_writes > 0 {
        return store_writes(a.store_writes, a.concurrency).await;
    }
    if a.sandbox_calls > 0 {
        return sandbox_calls(a.sandbox_calls).await;
    }
    if a.routing > 0 {
        return routing::run(a.routing, a.sessions).await;
    }
    if a.channels > 0 {
        return channels::run(a.channels, a.messages).await;
    }
    let t0 = Instant::now();
    let suite = Suite::start(SuiteOpts {
        agent_ack_wait_secs: 30,
        env: vec![("RUST_LOG".into(), "warn".into())],
        replicas: a.replicas,
        cluster: a.cluster,
        postgres: a.postgres,
        durable_postgres: true,
        auth: a.auth,
        // --tools answers the tool subjects with the testkit's responder.
        sandbox: !a.tools,
        ..Default::default()
    })
    .await?;
    let startup = t0.elapsed();
    suite.emu().state.record.store(false, Ordering::Relaxed);
    let _tools = if a.tools {
        anyhow::ensure!(!a.auth, "--tools runs without --auth (no sandbox user yet)");
        Some(clawbus_testkit::ToolResponder::start(&suite.nats.url, None).await?)
    } else {
        None
    };
    println!(
        "suite ready (nats-server x{} + emulator + services, replicas {}, store on {}) in {} ms",
        a.cluster.max(1),
        a.replicas,
        if a.postgres { "postgres" } else { "sqlite" },
        startup.as_millis()
    );
    if a.warmup > 0 {
        drive(&suite, a.warmup, a.concurrency, "warm", a.tools).await?;
    }
    let emu = &suite.emu().state;
    let busy0 = emu.busy_nanos.load(Ordering::Relaxed);
    let served0 = emu.served.load(Ordering::Relaxed);
    let procs = processes(&suite);
    let cpu0: Vec<Duration> = procs.iter().map(|(_, pid)| cpu_of(*pid)).collect();
    let (mut lat, elapsed) = drive(&suite, a.turns, a.concurrency, "run", a.tools).await?;
    let cpu: Vec<String> = procs
        .iter()
        .zip(cpu0)
        .map(|((name, pid), before)| {
            let used = cpu_of(*pid).saturating_sub(before);
            format!("{name}={}", used.as_micros() as usize / a.turns)
        })
        .collect();
    // The emulator's time per turn (a tool turn calls it twice).
    let served = emu.served.load(Ordering::Relaxed) - served0;
    let emu_us = ((emu.busy_nanos.load(Ordering::Relaxed) - busy0) / 1000)
        .checked_div(a.turns as u64)
        .unwrap_or(0);
    lat.sort_unstable();
    let added = |p: f64| pct(&lat, p).saturating_sub(emu_us) as f64 / 1000.0;
    let tps = a.turns as f64 / elapsed.as_secs_f64();
    // RSS once the suite has settled: the store has applied every event.
    let client = match suite.password("operator") {
        Some(pw) => suite.connect_as("operator", Some(pw)).await?,
        None => suite.nats.client().await?,
    };
    let js = async_nats::jetstream::new(client);
    let settled = clawbus_testkit::wait_for(Duration::from_secs(10), || async {
        for p in 0..clawbus_bus::topology::PARTITIONS {
            let durable = clawbus_bus::topology::ConsumerDecl::store(p, 1).durable;
            if !clawbus_tests::consumer_is_idle(&js, "CLAW_EVT", &durable).await {
                return false;
            }
        }
        true
    })
    .await;
    if !settled {
        println!("note: the store had not applied every event 10 s after the run");
    }
    let rss_total = suite.rss_bytes();
    println!(
        "turns={} model_calls={} concurrency={} replicas={} elapsed_s={:.2} emulator_us_per_turn={} client_p50_ms={:.2} client_p99_ms={:.2} client_max_ms={:.2}",
        a.turns,
        served,
        a.concurrency,
        a.replicas,
        elapsed.as_secs_f64(),
        emu_us,
        pct(&lat, 0.5) as f64 / 1000.0,
        pct(&lat, 0.99) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    println!("cpu_us_per_turn {}", cpu.join(" "));
    for (s, i) in suite.replicas() {
        if let Some(pid) = suite.replica_pid((s, i)) {
            println!(
                "rss {}-{i}={:.1} MB",
                s.name(),
                clawbus_testkit::rss_of(pid) as f64 / 1e6
            );
        }
    }
    println!(
        "bench: turns_per_s={:.0} p50_ms={:.2} p99_ms={:.2} rss_mb={:.1}",
        tps,
        added(0.5),
        added(0.99),
        rss_total as f64 / 1e6
    );
    Ok(())
}

/// Writes `n` turn records through the store's database layer from `c` tasks, on each
/// backend, and prints records/s.
async fn store_writes(n: usize, c: usize) -> anyhow::Result<()> {
    use clawbus_store::{Database, TranscriptStore};
    use clawbus_wire::{Role, RunEntry, RunEvent, RunStatus, Usage};
    let dir = tempfile::tempdir()?;
    let pg = clawbus_testkit::PostgresServer::start_with(true).await?;
    let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
    for url in [sqlite, pg.url.clone()] {
        let db = Arc::new(Database::open(&url).await?);
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..c)
            .map(|_| {
                let (db, next) = (db.clone(), next.clone());
                tokio::spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok::<(), clawbus_store::StoreError>(());
                        }
                        let run_id = format!("run:bench:{i}");
                        let entry = |role: Role, text: &str| RunEntry {
                            entry_id: format!("{run_id}:{}", role.as_str()),
                            role,
                            content: text.to_owned(),
                            ..Default::default()
                        };
                        let ev = RunEvent {
                            session_key: format!("agent:main:s{}", i % 64),
                            agent_id: "main".into(),
                            status: RunStatus::Completed,
                            model: Some("bench".into()),
                            usage: Some(Usage::default()),
                            cost_usd: None,
                            error: None,
                            attempt: 1,
                            duration_ms: 1,
                            entries: vec![
                                entry(Role::User, "a question of ordinary length"),
                                entry(
                                    Role::Assistant,
                                    "an answer of ordinary length, a bit longer",
                                ),
                            ],
                            run_id,
                        };
                        db.apply_run(&ev, i as u64 + 1, 0).await?;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "store_writes: backend={} records={n} concurrency={c} records_per_s={:.0}",
            db.backend(),
            n as f64 / secs
        );
    }
    Ok(())
}

/// Round trips of `n` sandbox calls of each kind, one at a time.
async fn sandbox_calls(n: usize) -> anyhow::Result<()> {
    use clawbus_wire::{decode, encode, Envelope, ToolCall, ToolResult};
    let suite = Suite::start(SuiteOpts {
        env: vec![("RUST_LOG".into(), "warn".into())],
        ..Default::default()
    })
    .await?;
    let nats = suite.nats.client().await?;
    let mut seq = 0u64;
    let mut call = |tool: &str, args: &str| {
        seq += 1;
        let env = Envelope::new(
            format!("run:bench:tool:{seq}"),
            1,
            ToolCall {
                call_id: format!("run:bench:tool:{seq}"),
                run_id: "run:bench".into(),
                session_key: "agent:main:bench".into(),
                tool: tool.into(),
                arguments: args.into(),
                agent_id: "main".into(),
                sender: None,
            },
        );
        (format!("claw.v1.tool.{tool}"), encode(&env))
    };
    let (subject, body) = call("write", r#"{"path": "bench.txt", "content": "hello\n"}"#);
    nats.request(subject, body?.into()).await?;
    for (tool, args) in [
        ("read", r#"{"path": "bench.txt"}"#),
        ("exec", r#"{"command": "true"}"#),
    ] {
        let mut lat = Vec::with_capacity(n);
        for i in 0..n + n / 10 {
            let (subject, body) = call(tool, args);
            let t = Instant::now();
            let reply = nats.request(subject, body?.into()).await?;
            let r = decode::<ToolResult>(&reply.payload)?.body;
            anyhow::ensure!(r.ok, "{tool} failed: {:?}", r.error);
            // The first tenth warms up.
            if i >= n / 10 {
                lat.push(t.elapsed().as_micros() as u64);
            }
        }
        lat.sort_unstable();
        println!(
            "sandbox {tool}: calls={n} p50_ms={:.2} p99_ms={:.2}",
            pct(&lat, 0.5) as f64 / 1000.0,
            pct(&lat, 0.99) as f64 / 1000.0
        );
    }
    Ok(())
}
