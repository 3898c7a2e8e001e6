//! The whole suite as real OS processes, for end-to-end tests and benchmarks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::{wait_for, Emulator, NatsServer};

/// A service process of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    Gateway,
    Router,
    Agent,
    Store,
}

/// Every service, in start order.
pub const SERVICES: [Service; 4] = [
    Service::Store,
    Service::Router,
    Service::Agent,
    Service::Gateway,
];

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Gateway => "gateway",
            Service::Router => "router",
            Service::Agent => "agent",
            Service::Store => "store",
        }
    }
}

/// Where the service binaries are: `$CLAWBUS_BIN_DIR`, else the cargo target directory
/// of the running test (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CLAWBUS_BIN_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    // Test binaries live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.parent().expect("profile dir").to_owned()
    } else {
        dir.to_owned()
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Options of a suite.
#[derive(Debug, Clone)]
pub struct SuiteOpts {
    /// Start the provider emulator and point the agent at it.
    pub provider: bool,
    /// Agent ack wait (short in crash tests so redelivery is quick).
    pub agent_ack_wait_secs: u64,
    pub gateway_timeout_secs: u64,
    /// Extra environment for every service.
    pub env: Vec<(String, String)>,
    /// Environment for one service only (e.g. its NATS user).
    pub service_env: Vec<(Service, String, String)>,
    /// nats-server configuration file and the environment it reads.
    pub nats_config: Option<(PathBuf, Vec<(String, String)>)>,
}

impl Default for SuiteOpts {
    fn default() -> Self {
        Self {
            provider: true,
            agent_ack_wait_secs: 3,
            gateway_timeout_secs: 60,
            env: Vec::new(),
            service_env: Vec::new(),
            nats_config: None,
        }
    }
}

/// A running suite: nats-server, emulator and one process per service.
pub struct Suite {
    pub nats: NatsServer,
    pub emulator: Option<Emulator>,
    pub state: tempfile::TempDir,
    pub token: String,
    pub gateway_url: String,
    admin: HashMap<Service, u16>,
    env: Vec<(String, String)>,
    service_env: Vec<(Service, String, String)>,
    procs: HashMap<Service, Child>,
    pub http: reqwest::Client,
}

impl Suite {
    pub async fn start(opts: SuiteOpts) -> anyhow::Result<Suite> {
        let nats = match &opts.nats_config {
            Some((file, env)) => NatsServer::start_with(Some(file), env)?,
            None => NatsServer::start()?,
        };
        let emulator = if opts.provider {
            Some(Emulator::start(Some("test-key")).await?)
        } else {
            None
        };
        let state = tempfile::tempdir()?;
        let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
        let gw_port = free_port();
        let admin: HashMap<Service, u16> = SERVICES.iter().map(|s| (*s, free_port())).collect();
        let mut env: Vec<(String, String)> = vec![
            ("CLAWBUS_HOME".into(), state.path().display().to_string()),
            ("NATS_URL".into(), nats.url.clone()),
            ("CLAWBUS_GATEWAY_TOKEN".into(), token.clone()),
            (
                "CLAWBUS__GATEWAY__BIND".into(),
                format!("127.0.0.1:{gw_port}"),
            ),
            (
                "CLAWBUS__GATEWAY__REQUEST_TIMEOUT_SECS".into(),
                opts.gateway_timeout_secs.to_string(),
            ),
            (
                "CLAWBUS__AGENT__ACK_WAIT_SECS".into(),
                opts.agent_ack_wait_secs.to_string(),
            ),
            ("CLAWBUS__AGENT__PROVIDER__MAX_RETRIES".into(), "0".into()),
            ("CLAWBUS_MODEL".into(), "emulator-1".into()),
            (
                "RUST_LOG".into(),
                std::env::var("CLAWBUS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ];
        for s in SERVICES {
            env.push((
                format!("CLAWBUS__ADMIN__{}", s.name().to_uppercase()),
                format!("127.0.0.1:{}", admin[&s]),
            ));
        }
        if let Some(e) = &emulator {
            env.push(("OPENAI_BASE_URL".into(), e.base_url()));
            env.push(("OPENAI_API_KEY".into(), "test-key".into()));
        }
        env.extend(opts.env);
        let service_env = opts.service_env;
        std::fs::create_dir_all(state.path().join("logs"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        let mut suite = Suite {
            nats,
            emulator,
            state,
            token,
            gateway_url: format!("http://127.0.0.1:{gw_port}"),
            admin,
            env,
            service_env,
            procs: HashMap::new(),
            http,
        };
        for s in SERVICES {
            suite.spawn(s)?;
        }
        for s in SERVICES {
            suite.wait_ready(s).await?;
        }
        Ok(suite)
    }

    /// The emulator (panics when the suite runs without one).
    pub fn emu(&self) -> &Emulator {
        self.emulator
            .as_ref()
            .expect("suite started with a provider emulator")
    }

    pub fn admin_url(&self, s: Service) -> String {
        format!("http://127.0.0.1:{}", self.admin[&s])
    }

    pub fn log_path(&self, s: Service) -> PathBuf {
        self.state
            .path()
            .join("logs")
            .join(format!("{}.log", s.name()))
    }

    pub fn db_path(&self) -> PathBuf {
        self.state.path().join("clawbus.db")
    }

    /// Starts a service process (its logs append to `<state>/logs/<service>.log`).
    pub fn spawn(&mut self, s: Service) -> anyhow::Result<()> {
        let bin = bin_dir().join(format!("clawbus-{}", s.name()));
        if !bin.exists() {
            bail!(
                "{} is missing: build the services first (`cargo build --bins`)",
                bin.display()
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(s))?;
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(
                self.service_env
                    .iter()
                    .filter(|(x, _, _)| *x == s)
                    .map(|(_, k, v)| (k.as_str(), v.as_str())),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        self.procs.insert(s, child);
        Ok(())
    }

    /// Waits until the service answers 200 on `/readyz`.
    pub async fn wait_ready(&mut self, s: Service) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.admin_url(s));
        let http = self.http.clone();
        let ok = wait_for(Duration::from_secs(30), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        if !ok {
            let log = std::fs::read_to_string(self.log_path(s)).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!("{} not ready in 30 s; log tail:\n{tail}", s.name());
        }
        Ok(())
    }

    pub fn pid(&self, s: Service) -> Option<u32> {
        self.procs.get(&s).and_then(|c| c.id())
    }

    /// SIGKILLs a service and reaps it.
    pub async fn kill9(&mut self, s: Service) -> anyhow::Result<()> {
        if let Some(mut c) = self.procs.remove(&s) {
            if let Some(pid) = c.id() {
                kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
            }
            c.wait().await?;
        }
        Ok(())
    }

    /// SIGTERMs a service and waits for it to exit; returns its exit status.
    pub async fn terminate(&mut self, s: Service) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.procs.remove(&s).context("not running")?;
        if let Some(pid) = c.id() {
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), c.wait()).await??)
    }

    /// Starts a service again and waits until it is ready.
    pub async fn restart(&mut self, s: Service) -> anyhow::Result<()> {
        self.spawn(s)?;
        self.wait_ready(s).await
    }

    /// True while every service process is alive.
    pub fn all_alive(&mut self) -> bool {
        SERVICES.iter().all(|s| {
            self.procs
                .get_mut(s)
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        })
    }

    /// Resident set size of every service process, in bytes, summed.
    pub fn rss_bytes(&self) -> u64 {
        self.procs.values().filter_map(|c| c.id()).map(rss_of).sum()
    }

    /// GETs a URL and returns its body (panics on a transport error).
    pub async fn get_text(&self, url: &str) -> String {
        let r = self.http.get(url).send().await.expect("GET");
        r.text().await.expect("body")
    }

    /// GETs an admin endpoint of a service (`/metrics`, `/readyz`, ...).
    pub async fn admin_get(&self, s: Service, path: &str) -> String {
        self.get_text(&format!("{}{path}", self.admin_url(s))).await
    }

    /// POSTs one user message to a session (`x-clawbus-session-key`).
    pub fn chat_in(&self, session_key: &str, text: &str) -> reqwest::RequestBuilder {
        let body = serde_json::json!({"model": "clawbus", "messages": [{"role": "user", "content": text}]});
        self.chat(&body)
            .header("x-clawbus-session-key", session_key)
    }

    /// POSTs a chat completion with the suite's token.
    pub fn chat(&self, body: &serde_json::Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/chat/completions", self.gateway_url))
            .bearer_auth(&self.token)
            .json(body)
    }
}

/// RSS of a process from `/proc/<pid>/status`, in bytes (0 when unknown).
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
