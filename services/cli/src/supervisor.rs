//! `clawbus up`: nats-server plus every service as its own process, restarted when it
//! dies, all stopped cleanly on SIGINT/SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clawbus_config::Config;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

const SERVICES: [&str; 4] = ["store", "router", "agent", "gateway"];

/// Admin address of each service, from the config.
pub fn admin_addrs(cfg: &Config) -> Vec<(&'static str, String)> {
    vec![
        ("store", cfg.admin.store.clone()),
        ("router", cfg.admin.router.clone()),
        ("agent", cfg.admin.agent.clone()),
        ("gateway", cfg.admin.gateway.clone()),
    ]
}

struct Proc {
    name: &'static str,
    child: Option<Child>,
    restarts: u32,
    started: Instant,
    next_start: Option<Instant>,
}

pub async fn up(cfg: Config) -> anyhow::Result<()> {
    let state = cfg.state_dir();
    let run = state.join("run");
    let logs = state.join("logs");
    std::fs::create_dir_all(&run)
        .and_then(|_| std::fs::create_dir_all(&logs))
        .with_context(|| format!("state directory {}", state.display()))?;
    let token = clawbus_config::ensure_gateway_token(&cfg)?;
    if token.generated {
        println!(
            "Generated a gateway token (shown once, stored in {}):\n  {}",
            state.join("gateway.token").display(),
            token.token
        );
    }
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_owned();

    let external_nats = std::env::var("NATS_URL").ok().filter(|u| !u.is_empty());
    let mut nats = None;
    let nats_url = match external_nats {
        Some(u) => {
            println!("Using NATS at {u}");
            u
        }
        None => {
            let (child, url) = start_nats(&cfg, &bin_dir, &state, &logs).await?;
            write_pid(&run, "nats-server", child.id());
            nats = Some(child);
            url
        }
    };

    let mut procs: Vec<Proc> = SERVICES
        .iter()
        .map(|n| Proc {
            name: n,
            child: None,
            restarts: 0,
            started: Instant::now(),
            next_start: Some(Instant::now()),
        })
        .collect();
    let started = Instant::now();
    for p in procs.iter_mut() {
        start_service(p, &bin_dir, &nats_url, &run, &logs)?;
    }
    wait_all_ready(&cfg, started).await;
    println!(
        "clawbus is up: OpenAI-compatible API at http://{}/v1 (token: `clawbus token`), logs in {}. Ctrl-C stops.",
        cfg.gateway.bind,
        logs.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {}
        }
        for p in procs.iter_mut() {
            supervise(p, &bin_dir, &nats_url, &run, &logs);
        }
    }

    println!("Stopping services...");
    for p in procs.iter() {
        if let Some(pid) = p.child.as_ref().and_then(|c| c.id()) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for p in procs.iter_mut() {
        if let Some(c) = p.child.as_mut() {
            // Services drain for up to 30 s (the agent finishing model calls).
            if tokio::time::timeout(Duration::from_secs(40), c.wait())
                .await
                .is_err()
            {
                eprintln!("{} did not stop in 40 s; killing it", p.name);
                let _ = c.kill().await;
            }
        }
        let _ = std::fs::remove_file(run.join(format!("{}.pid", p.name)));
    }
    if let Some(mut n) = nats {
        if let Some(pid) = n.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), n.wait()).await;
        let _ = std::fs::remove_file(run.join("nats-server.pid"));
    }
    println!("Stopped.");
    Ok(())
}

/// Restarts a dead service with exponential backoff (reset after a minute of uptime).
fn supervise(p: &mut Proc, bin_dir: &Path, nats_url: &str, run: &Path, logs: &Path) {
    if let Some(c) = p.child.as_mut() {
        match c.try_wait() {
            Ok(None) => return,
            Ok(Some(status)) => {
                if p.started.elapsed() > Duration::from_secs(60) {
                    p.restarts = 0;
                }
                let delay = Duration::from_millis(250 * 2u64.pow(p.restarts.min(7)));
                eprintln!(
                    "{} exited ({status}); restarting in {} ms",
                    p.name,
                    delay.as_millis()
                );
                p.restarts += 1;
                p.child = None;
                p.next_start = Some(Instant::now() + delay);
            }
            Err(e) => {
                eprintln!("{}: cannot check process: {e}", p.name);
                return;
            }
        }
    }
    if p.next_start.is_some_and(|t| Instant::now() >= t) {
        if let Err(e) = start_service(p, bin_dir, nats_url, run, logs) {
            eprintln!("{}: {e:#}", p.name);
            p.next_start = Some(Instant::now() + Duration::from_secs(5));
        }
    }
}

fn start_service(
    p: &mut Proc,
    bin_dir: &Path,
    nats_url: &str,
    run: &Path,
    logs: &Path,
) -> anyhow::Result<()> {
    let bin = bin_dir.join(format!("clawbus-{}", p.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{}.log", p.name)))?;
    let child = Command::new(&bin)
        .env("NATS_URL", nats_url)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    write_pid(run, p.name, child.id());
    p.child = Some(child);
    p.started = Instant::now();
    p.next_start = None;
    Ok(())
}

fn write_pid(run: &Path, name: &str, pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::fs::write(run.join(format!("{name}.pid")), format!("{pid}\n"));
    }
}

fn find_nats_server(bin_dir: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("CLAWBUS_NATS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    for c in [
        bin_dir.join("nats-server"),
        bin_dir.join("../../.tools/bin/nats-server"),
    ] {
        if c.exists() {
            return c;
        }
    }
    PathBuf::from("nats-server")
}

async fn start_nats(
    cfg: &Config,
    bin_dir: &Path,
    state: &Path,
    logs: &Path,
) -> anyhow::Result<(Child, String)> {
    let url = cfg.nats.url.clone();
    let hostport = url.trim_start_matches("nats://").trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "4222"));
    if tokio::net::TcpStream::connect(hostport).await.is_ok() {
        bail!("something already listens on {hostport}; set NATS_URL to use a running nats-server, or stop it");
    }
    let bin = find_nats_server(bin_dir);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join("nats-server.log"))?;
    let store = state.join("nats");
    let child = Command::new(&bin)
        .args(["-a", host, "-p", port, "-js", "-sd"])
        .arg(&store)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "cannot start {} (run `make setup`, or set NATS_URL)",
                bin.display()
            )
        })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(hostport).await.is_err() {
        if Instant::now() > deadline {
            bail!(
                "nats-server did not start; see {}",
                logs.join("nats-server.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    println!("nats-server listening on {url} (store {})", store.display());
    Ok((child, url))
}

async fn wait_all_ready(cfg: &Config, since: Instant) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
    {
        Ok(h) => h,
        Err(_) => return,
    };
    for (name, addr) in admin_addrs(cfg) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = http
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                println!("{name:<8} ready after {} ms", since.elapsed().as_millis());
                break;
            }
            if Instant::now() > deadline {
                eprintln!("{name} not ready after 30 s; see its log");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
