//! `clawbus up`: nats-server plus every service as its own process, restarted when it
//! dies, all stopped cleanly on SIGINT/SIGTERM.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clawbus_config::{Config, Service, SERVICES};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Admin address of every running process: `<state>/run/<service>-<i>.admin` files
/// written by `clawbus up`, else the configured address of each service.
pub fn admin_addrs(cfg: &Config) -> Vec<(String, String)> {
    let run = cfg.state_dir().join("run");
    let mut out = Vec::new();
    for s in SERVICES {
        let name = s.name();
        let mut i = 0;
        while let Ok(a) = std::fs::read_to_string(run.join(format!("{name}-{i}.admin"))) {
            out.push((format!("{name}-{i}"), a.trim().to_owned()));
            i += 1;
        }
        if i == 0 {
            out.push((name.to_owned(), s.admin(cfg).to_owned()));
        }
    }
    out
}

/// Replicas per scaling service: `--replicas N`, else `CLAWBUS_REPLICAS`, else 1.
pub fn replicas_from(args: &[String]) -> anyhow::Result<usize> {
    let raw = match args {
        [] => std::env::var("CLAWBUS_REPLICAS")
            .ok()
            .filter(|v| !v.is_empty()),
        [flag, n] if flag == "--replicas" => Some(n.clone()),
        _ => bail!("usage: clawbus up [--replicas N]"),
    };
    match raw {
        None => Ok(1),
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=16).contains(&n) => Ok(n),
            _ => bail!("replicas must be a number from 1 to 16, got `{v}`"),
        },
    }
}

struct Proc {
    service: Service,
    name: &'static str,
    index: usize,
    admin: String,
    child: Option<Child>,
    restarts: u32,
    started: Instant,
    next_start: Option<Instant>,
}

pub async fn up(cfg: Config, replicas: usize) -> anyhow::Result<()> {
    let state = cfg.state_dir();
    let run = state.join("run");
    let logs = state.join("logs");
    // The state directory is the owner's alone: it holds the database, the token and
    // the NATS credentials.
    let tightened = crate::state::prepare(&state)?;
    if !tightened.is_empty() {
        eprintln!(
            "clawbus: the state directory {} was open to other users; made {} entries \
             owner-only (directories 0700, files 0600): {}",
            state.display(),
            tightened.len(),
            tightened
                .iter()
                .take(8)
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
                + if tightened.len() > 8 { ", ..." } else { "" }
        );
    }
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
    // With our own nats-server, every service connects as its own user with a
    // generated password; with yours, the services use what their config says.
    let mut own_users = false;
    let nats_url = match external_nats {
        Some(u) => {
            println!("Using NATS at {}", clawbus_bus::service::redact_url(&u));
            u
        }
        None => {
            let passwords = crate::auth::ensure_passwords(&state)?;
            let conf = crate::auth::write_nats_config(&state, &cfg, &passwords)?;
            let (child, url) = start_nats(&cfg, &bin_dir, &state, &conf, &logs).await?;
            write_pid(&run, "nats-server", child.id());
            nats = Some(child);
            own_users = true;
            url
        }
    };
    crate::auth::provision(&cfg)
        .await
        .context("provisioning streams, buckets and consumers")?;
    let launch = Launch {
        bin_dir: bin_dir.clone(),
        nats_url: nats_url.clone(),
        credentials: own_users.then(|| state.clone()),
        run: run.clone(),
        logs: logs.clone(),
    };

    let mut procs = Vec::new();
    // Ports picked for the replicas stay bound until every one is picked, so no two
    // replicas get the same.
    let mut reserved = Vec::new();
    for s in SERVICES {
        let name = s.name();
        for index in 0..if s.scales() { replicas } else { 1 } {
            let admin = if index == 0 {
                s.admin(&cfg).to_owned()
            } else {
                let l = std::net::TcpListener::bind("127.0.0.1:0")?;
                let addr = l.local_addr()?.to_string();
                reserved.push(l);
                addr
            };
            write_private(&run.join(format!("{name}-{index}.admin")), &admin)?;
            procs.push(Proc {
                service: s,
                name,
                index,
                admin,
                child: None,
                restarts: 0,
                started: Instant::now(),
                next_start: Some(Instant::now()),
            });
        }
    }
    drop(reserved);
    let started = Instant::now();
    for p in procs.iter_mut() {
        start_service(p, &launch)?;
    }
    wait_all_ready(&procs, started).await;
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
            supervise(p, &launch);
        }
    }

    println!("Stopping services...");
    for p in procs.iter() {
        if let Some(pid) = p.child.as_ref().and_then(|c| c.id()) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for p in procs.iter_mut() {
        let id = p.id();
        if let Some(c) = p.child.as_mut() {
            // Services drain for up to 30 s (the agent finishing model calls).
            if tokio::time::timeout(Duration::from_secs(40), c.wait())
                .await
                .is_err()
            {
                eprintln!("{id} did not stop in 40 s; killing it");
                let _ = c.kill().await;
            }
        }
        let _ = std::fs::remove_file(run.join(format!("{id}.pid")));
        let _ = std::fs::remove_file(run.join(format!("{id}.admin")));
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

impl Proc {
    /// `<service>-<i>`: its replica id, pid file and admin file name.
    fn id(&self) -> String {
        format!("{}-{}", self.name, self.index)
    }
}

/// What every service process is started with.
struct Launch {
    bin_dir: PathBuf,
    nats_url: String,
    /// The state directory when each service connects as its own NATS user with the
    /// password `clawbus up` generated there.
    credentials: Option<PathBuf>,
    run: PathBuf,
    logs: PathBuf,
}

/// Restarts a dead service with exponential backoff (reset after a minute of uptime).
fn supervise(p: &mut Proc, launch: &Launch) {
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
                    p.id(),
                    delay.as_millis()
                );
                p.restarts += 1;
                p.child = None;
                p.next_start = Some(Instant::now() + delay);
            }
            Err(e) => {
                eprintln!("{}: cannot check process: {e}", p.id());
                return;
            }
        }
    }
    if p.next_start.is_some_and(|t| Instant::now() >= t) {
        if let Err(e) = start_service(p, launch) {
            eprintln!("{}: {e:#}", p.id());
            p.next_start = Some(Instant::now() + Duration::from_secs(5));
        }
    }
}

fn start_service(p: &mut Proc, launch: &Launch) -> anyhow::Result<()> {
    let Launch {
        bin_dir,
        nats_url,
        credentials,
        run,
        logs,
    } = launch;
    let bin = bin_dir.join(format!("clawbus-{}", p.name));
    let log = open_log(&logs.join(format!("{}.log", p.id())))?;
    let mut cmd = Command::new(&bin);
    // Only what the registry grants this service: no other service's secrets, nothing
    // of the supervisor's environment the suite does not read.
    cmd.env_clear()
        .envs(p.service.child_env(std::env::vars_os()));
    if let Some(state) = credentials.as_deref() {
        cmd.env("CLAWBUS__NATS__USER", p.name)
            .env(
                "CLAWBUS__NATS__PASSWORD_FILE",
                crate::auth::password_file(state, p.name),
            )
            .env_remove("CLAWBUS__NATS__PASSWORD");
    }
    let child = cmd
        .env("NATS_URL", nats_url)
        .env("CLAWBUS__REPLICA", p.id())
        .env(
            format!("CLAWBUS__ADMIN__{}", p.name.to_uppercase()),
            &p.admin,
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    write_pid(run, &p.id(), child.id());
    p.child = Some(child);
    p.started = Instant::now();
    p.next_start = None;
    Ok(())
}

fn write_pid(run: &Path, name: &str, pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = write_private(&run.join(format!("{name}.pid")), &format!("{pid}\n"));
    }
}

/// Writes `text` to a file only its owner may read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

/// A process's log, appended to; only its owner may read it (logs hold transcripts'
/// fragments and errors with request details).
fn open_log(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
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
    conf: &Path,
    logs: &Path,
) -> anyhow::Result<(Child, String)> {
    let url = cfg.nats.url.clone();
    let hostport = url.trim_start_matches("nats://").trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "4222"));
    if tokio::net::TcpStream::connect(hostport).await.is_ok() {
        bail!("something already listens on {hostport}; set NATS_URL to use a running nats-server, or stop it");
    }
    let bin = find_nats_server(bin_dir);
    let log = open_log(&logs.join("nats-server.log"))?;
    let store = state.join("nats");
    let child = Command::new(&bin)
        .env_clear()
        .envs(clawbus_config::nats_server_env(std::env::vars_os()))
        .arg("-c")
        .arg(conf)
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
    println!(
        "nats-server listening on {url} (store {}; one user per service, passwords in {})",
        store.display(),
        crate::auth::credentials_dir(state).display()
    );
    Ok((child, url))
}

async fn wait_all_ready(procs: &[Proc], since: Instant) {
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
    {
        Ok(h) => h,
        Err(_) => return,
    };
    for p in procs {
        let (name, addr) = (p.id(), &p.admin);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = http
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                println!("{name:<10} ready after {} ms", since.elapsed().as_millis());
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
