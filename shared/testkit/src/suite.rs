//! The whole suite as real OS processes, for end-to-end tests and benchmarks.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::postgres::PostgresServer;
use crate::{wait_for, Emulator, NatsServer};

pub use clawbus_config::{Service, SERVICES};

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

/// A free loopback port, picked at random below the kernel's ephemeral range (so a
/// socket bound to port 0 — a nats-server started with `-p -1`, an outgoing
/// connection — cannot take it between our check and its use), and reserved for the
/// life of this process with a file lock, so that the tests running in parallel
/// processes never pick the same one.
pub fn free_port() -> u16 {
    use rand::Rng;
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("clawbus-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    let mut rng = rand::rng();
    for _ in 0..10_000 {
        let port = rng.random_range(12_000..32_000);
        let Ok(lock) = std::fs::File::create(dir.join(format!("{port}.lock"))) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue; // another test process holds it
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().unwrap_or_else(|p| p.into_inner()).push(lock);
            return port;
        }
    }
    panic!("no free port found")
}

/// How long a started service may take to report ready.
const READY_DEADLINE: Duration = Duration::from_secs(90);

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
    /// Environment for one replica only, after the others (replicas configured
    /// differently, as during a rolling change).
    pub replica_env: Vec<(Replica, String, String)>,
    /// Run nats-server as `clawbus up` does: no anonymous access, one user per service
    /// with only its rights (`clawbus_bus::rights`), generated passwords; provisioning
    /// as the `provision` user. Off: anonymous access to everything (tests that look
    /// into the bus), still with provisioning as its own step.
    pub auth: bool,
    /// Processes of each scaling service (router, agent, store); the gateway runs one.
    pub replicas: usize,
    /// Nodes of a nats-server cluster to run on (0: one server); streams and buckets
    /// then have this many replicas.
    pub cluster: usize,
    /// The store's database: SQLite in the state directory, or a throw-away Postgres
    /// cluster. Defaults to `$CLAWBUS_TEST_DATABASE` (`sqlite` or `postgres`), so the
    /// same tests run on either backend.
    pub postgres: bool,
    /// Run that Postgres with fsync and synchronous commit (benchmarks).
    pub durable_postgres: bool,
    /// The agent's model as `provider/model` (`anthropic/...`, `gemini/...`), with
    /// that provider's key and base URL pointing at the emulator; default the
    /// OpenAI-compatible `emulator-1`.
    pub model: Option<String>,
    /// Run the sandbox service (tests with the testkit's tool responder turn it off:
    /// both would answer the same subjects).
    pub sandbox: bool,
}

impl Default for SuiteOpts {
    fn default() -> Self {
        Self {
            provider: true,
            agent_ack_wait_secs: 3,
            gateway_timeout_secs: 60,
            env: Vec::new(),
            service_env: Vec::new(),
            replica_env: Vec::new(),
            auth: false,
            replicas: 1,
            cluster: 0,
            postgres: std::env::var("CLAWBUS_TEST_DATABASE").is_ok_and(|v| v == "postgres"),
            durable_postgres: false,
            model: None,
            sandbox: true,
        }
    }
}

/// One process of the suite: a service and its replica index.
pub type Replica = (Service, usize);

/// A running suite: nats-server, emulator and one process per service.
pub struct Suite {
    pub nats: NatsServer,
    /// Passwords of the NATS users when the suite runs with `auth`.
    passwords: Vec<(&'static str, String)>,
    /// The store's Postgres, when the suite runs on Postgres.
    pub postgres: Option<PostgresServer>,
    pub emulator: Option<Emulator>,
    pub state: tempfile::TempDir,
    pub token: String,
    pub gateway_url: String,
    admin: HashMap<Replica, u16>,
    env: Vec<(String, String)>,
    service_env: Vec<(Service, String, String)>,
    replica_env: Vec<(Replica, String, String)>,
    procs: HashMap<Replica, Child>,
    replicas: usize,
    /// The services this suite runs.
    services: Vec<Service>,
    pub http: reqwest::Client,
}

impl Suite {
    pub async fn start(opts: SuiteOpts) -> anyhow::Result<Suite> {
        // CLAWBUS_KEEP_STATE=1 keeps the state directory (logs, database) of a failed
        // test for a look afterwards; its path is printed.
        let keep = std::env::var_os("CLAWBUS_KEEP_STATE").is_some_and(|v| v == "1");
        let state = tempfile::Builder::new()
            .prefix("clawbus-suite-")
            .disable_cleanup(keep)
            .tempdir()?;
        if keep {
            eprintln!("suite state kept in {}", state.path().display());
        }
        let mut passwords = Vec::new();
        let nats = match (opts.auth, opts.cluster) {
            (true, 0 | 1) => {
                passwords = clawbus_bus::rights::users()
                    .iter()
                    .map(|u| (*u, format!("{}", uuid::Uuid::new_v4().simple())))
                    .collect();
                let conf = state.path().join("nats-server.conf");
                let pw = passwords.clone();
                std::fs::write(
                    &conf,
                    clawbus_bus::rights::render_authorization(
                        &clawbus_bus::rights::compose_scope(),
                        |u| {
                            let p = pw.iter().find(|(x, _)| *x == u).map(|(_, p)| p.as_str());
                            format!("\"{}\"", p.unwrap_or_default())
                        },
                    ),
                )?;
                NatsServer::start_with(Some(&conf), &[])?
            }
            (true, _) => bail!("a suite with auth runs on one nats-server"),
            (false, 0 | 1) => NatsServer::start()?,
            (false, n) => NatsServer::start_cluster(n).await?,
        };
        let emulator = if opts.provider {
            Some(Emulator::start(Some("test-key")).await?)
        } else {
            None
        };
        let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
        let gw_port = free_port();
        let replicas = opts.replicas.max(1);
        let services: Vec<Service> = SERVICES
            .into_iter()
            .filter(|s| opts.sandbox || *s != Service::Sandbox)
            .collect();
        let admin: HashMap<Replica, u16> = services
            .iter()
            .flat_map(|s| {
                (0..if s.scales() { replicas } else { 1 }).map(|i| ((*s, i), free_port()))
            })
            .collect();
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
        if let Some(e) = &emulator {
            env.push(("OPENAI_BASE_URL".into(), e.base_url()));
            env.push(("OPENAI_API_KEY".into(), "test-key".into()));
            for api in ["ANTHROPIC", "GEMINI"] {
                env.push((format!("{api}_BASE_URL"), e.root_url()));
                env.push((format!("{api}_API_KEY"), "test-key".into()));
            }
        }
        if let Some(m) = &opts.model {
            env.push(("CLAWBUS_MODEL".into(), m.clone()));
        }
        if opts.cluster > 1 {
            env.push(("CLAWBUS__NATS__REPLICAS".into(), opts.cluster.to_string()));
        }
        let postgres = if opts.postgres {
            let pg = PostgresServer::start_with(opts.durable_postgres).await?;
            env.push(("DATABASE_URL".into(), pg.url.clone()));
            Some(pg)
        } else {
            None
        };
        env.extend(opts.env);
        let mut service_env = opts.service_env;
        for (user, pw) in &passwords {
            if let Some(s) = Service::named(user) {
                service_env.push((s, "CLAWBUS__NATS__USER".into(), user.to_string()));
                service_env.push((s, "CLAWBUS__NATS__PASSWORD".into(), pw.clone()));
            }
        }
        std::fs::create_dir_all(state.path().join("logs"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            // No pooled connections: a replica thawed after a pause closes the ones it
            // held at once (their timeouts passed meanwhile), racing the next request.
            .pool_max_idle_per_host(0)
            .build()?;
        let mut suite = Suite {
            nats,
            passwords,
            postgres,
            emulator,
            state,
            token,
            gateway_url: format!("http://127.0.0.1:{gw_port}"),
            admin,
            env,
            service_env,
            replica_env: opts.replica_env,
            procs: HashMap::new(),
            http,
            replicas,
            services,
        };
        suite.provision().await?;
        for r in suite.replicas() {
            suite.spawn_replica(r)?;
        }
        for r in suite.replicas() {
            suite.wait_replica_ready(r).await?;
        }
        Ok(suite)
    }

    /// Runs the provisioning step as `clawbus up` does: `clawbus provision`, as the
    /// `provision` user when the suite runs with auth.
    pub async fn provision(&self) -> anyhow::Result<()> {
        let bin = bin_dir().join("clawbus");
        let mut cmd = Command::new(&bin);
        cmd.arg("provision")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(pw) = self.password("provision") {
            cmd.env("CLAWBUS__NATS__USER", "provision")
                .env("CLAWBUS__NATS__PASSWORD", pw);
        }
        let out = cmd
            .output()
            .await
            .with_context(|| format!("run {} (build the binaries first)", bin.display()))?;
        if !out.status.success() {
            bail!(
                "clawbus provision failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The password of a NATS user, when the suite runs with auth.
    pub fn password(&self, user: &str) -> Option<&str> {
        self.passwords
            .iter()
            .find(|(u, _)| *u == user)
            .map(|(_, p)| p.as_str())
    }

    /// A NATS connection as `user` with its password (`None`: anonymous), with the
    /// user's own inbox prefix as the services use.
    pub async fn connect_as(
        &self,
        user: &str,
        password: Option<&str>,
    ) -> anyhow::Result<async_nats::Client> {
        let opts =
            clawbus_bus::with_credentials(async_nats::ConnectOptions::new(), Some(user), password);
        Ok(opts.connect(self.nats.url.as_str()).await?)
    }

    /// The emulator (panics when the suite runs without one).
    pub fn emu(&self) -> &Emulator {
        self.emulator
            .as_ref()
            .expect("suite started with a provider emulator")
    }

    /// Every process of the suite, in start order.
    pub fn replicas(&self) -> Vec<Replica> {
        self.services
            .iter()
            .flat_map(|s| (0..if s.scales() { self.replicas } else { 1 }).map(|i| (*s, i)))
            .collect()
    }

    pub fn admin_url(&self, s: Service) -> String {
        self.replica_admin_url((s, 0))
    }

    pub fn replica_admin_url(&self, r: Replica) -> String {
        format!("http://127.0.0.1:{}", self.admin[&r])
    }

    pub fn log_path(&self, s: Service) -> PathBuf {
        self.replica_log_path((s, 0))
    }

    /// `<state>/logs/<service>.log` for replica 0, `<service>-<i>.log` for the others.
    pub fn replica_log_path(&self, (s, i): Replica) -> PathBuf {
        let name = if i == 0 {
            format!("{}.log", s.name())
        } else {
            format!("{}-{i}.log", s.name())
        };
        self.state.path().join("logs").join(name)
    }

    /// The store's database URL (SQLite in the state directory, or the Postgres).
    pub fn database_url(&self) -> String {
        match &self.postgres {
            Some(pg) => pg.url.clone(),
            None => format!(
                "sqlite://{}",
                self.state.path().join("clawbus.db").display()
            ),
        }
    }

    /// Starts a service process (its logs append to `<state>/logs/<service>.log`).
    pub fn spawn(&mut self, s: Service) -> anyhow::Result<()> {
        self.spawn_replica((s, 0))
    }

    /// Starts one replica of a service, with its own replica id and admin port.
    pub fn spawn_replica(&mut self, r: Replica) -> anyhow::Result<()> {
        let (s, i) = r;
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
            .open(self.replica_log_path(r))?;
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
            .envs(
                self.replica_env
                    .iter()
                    .filter(|(x, _, _)| *x == r)
                    .map(|(_, k, v)| (k.as_str(), v.as_str())),
            )
            .env(
                format!("CLAWBUS__ADMIN__{}", s.name().to_uppercase()),
                format!("127.0.0.1:{}", self.admin[&r]),
            )
            .env("CLAWBUS__REPLICA", format!("{}-{i}", s.name()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        self.procs.insert(r, child);
        Ok(())
    }

    /// Waits until the service answers 200 on `/readyz`.
    pub async fn wait_ready(&mut self, s: Service) -> anyhow::Result<()> {
        self.wait_replica_ready((s, 0)).await
    }

    /// Waits until one replica answers 200 on `/readyz`.
    pub async fn wait_replica_ready(&mut self, r: Replica) -> anyhow::Result<()> {
        let s = r.0;
        let url = format!("{}/readyz", self.replica_admin_url(r));
        let http = self.http.clone();
        // Generous: on a three-node cluster sharing two cores, binding every partition
        // consumer (each a replicated group) can take tens of seconds.
        let ok = wait_for(READY_DEADLINE, || {
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
            let log = std::fs::read_to_string(self.replica_log_path(r)).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            bail!(
                "{} not ready in {} s; log tail:\n{tail}",
                s.name(),
                READY_DEADLINE.as_secs()
            );
        }
        Ok(())
    }

    pub fn pid(&self, s: Service) -> Option<u32> {
        self.replica_pid((s, 0))
    }

    pub fn replica_pid(&self, r: Replica) -> Option<u32> {
        self.procs.get(&r).and_then(|c| c.id())
    }

    /// SIGKILLs a service and reaps it.
    pub async fn kill9(&mut self, s: Service) -> anyhow::Result<()> {
        self.kill9_replica((s, 0)).await
    }

    /// SIGSTOPs (`pause = true`) or SIGCONTs a replica: a process that is alive but
    /// does nothing, as after a long GC pause or a frozen VM.
    pub fn pause_replica(&self, r: Replica, pause: bool) -> anyhow::Result<()> {
        let pid = self.replica_pid(r).context("not running")?;
        let sig = if pause {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        kill(Pid::from_raw(pid as i32), sig)?;
        if pause {
            // The signal lands when the process next runs: wait until every thread of
            // it has stopped, so that nothing it does comes after this returns.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !stopped(pid) {
                anyhow::ensure!(std::time::Instant::now() < deadline, "{pid} did not stop");
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// SIGKILLs one replica and reaps it.
    pub async fn kill9_replica(&mut self, r: Replica) -> anyhow::Result<()> {
        if let Some(mut c) = self.procs.remove(&r) {
            if let Some(pid) = c.id() {
                kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
            }
            c.wait().await?;
        }
        Ok(())
    }

    /// SIGTERMs a service and waits for it to exit; returns its exit status.
    pub async fn terminate(&mut self, s: Service) -> anyhow::Result<std::process::ExitStatus> {
        let mut c = self.procs.remove(&(s, 0)).context("not running")?;
        if let Some(pid) = c.id() {
            kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), c.wait()).await??)
    }

    /// Starts a service again and waits until it is ready.
    pub async fn restart(&mut self, s: Service) -> anyhow::Result<()> {
        self.restart_replica((s, 0)).await
    }

    /// Starts one replica again and waits until it is ready.
    pub async fn restart_replica(&mut self, r: Replica) -> anyhow::Result<()> {
        self.spawn_replica(r)?;
        self.wait_replica_ready(r).await
    }

    /// True while every service process is alive.
    pub fn all_alive(&mut self) -> bool {
        self.replicas().iter().all(|r| {
            self.procs
                .get_mut(r)
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

/// CPU time (user + system) a process has used so far; zero when unreadable.
pub fn cpu_of(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            // USER_HZ is 100 on Linux.
            Some(Duration::from_millis(ticks * 10))
        })
        .unwrap_or_default()
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

/// True when every thread of `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true; // gone
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(true, |st| {
            // `<tid> (<comm>) <state> …`: the state follows the last `)`.
            st.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| matches!(state, "T" | "t"))
        })
    })
}
