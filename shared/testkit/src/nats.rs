//! A real nats-server for tests: one node, or a three-node JetStream cluster on
//! loopback ports whose nodes can be killed and restarted with their stores.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The nats-server binary: `$CLAWBUS_NATS_SERVER`, the project's `.tools/bin`, or `PATH`.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CLAWBUS_NATS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

/// One nats-server process and what it needs to start again as the same node.
struct Node {
    child: Option<Child>,
    port: u16,
    /// Cluster (route) port; `None` for a single server.
    cluster_port: Option<u16>,
    dir: tempfile::TempDir,
}

/// A nats-server with JetStream (or a cluster of them), each node with its own store.
pub struct NatsServer {
    nodes: Vec<Node>,
    /// Client URL: one server, or the comma-separated list of a cluster's nodes.
    pub url: String,
    /// Client port of the first node.
    pub port: u16,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
    /// Permission violations the servers logged (publish or subscribe refused).
    violations: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NatsServer {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None, &[])
    }

    /// Starts with a configuration file (its port and store are overridden) and
    /// environment (for `$VAR` references in the file).
    pub fn start_with(
        config: Option<&std::path::Path>,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let mut s = Self {
            nodes: vec![Node {
                child: None,
                port: 0,
                cluster_port: None,
                dir: tempfile::tempdir()?,
            }],
            url: String::new(),
            port: 0,
            config: config.map(|c| c.to_owned()),
            env: env.to_vec(),
            violations: Default::default(),
        };
        let port = s.spawn(0)?;
        s.nodes[0].port = port;
        s.port = port;
        s.url = format!("nats://127.0.0.1:{port}");
        Ok(s)
    }

    /// Starts a JetStream cluster of `n` nodes on loopback and waits until it has a
    /// meta leader (streams with replicas up to `n` can be created).
    pub async fn start_cluster(n: usize) -> anyhow::Result<Self> {
        let mut s = Self {
            nodes: Vec::new(),
            url: String::new(),
            port: 0,
            config: None,
            env: Vec::new(),
            violations: Default::default(),
        };
        for _ in 0..n {
            s.nodes.push(Node {
                child: None,
                port: crate::free_port(),
                cluster_port: Some(crate::free_port()),
                dir: tempfile::tempdir()?,
            });
        }
        for i in 0..n {
            s.spawn(i)?;
        }
        s.port = s.nodes[0].port;
        s.url = s
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        s.wait_jetstream().await?;
        Ok(s)
    }

    /// Starts node `i` (again) and returns its client port once it is ready.
    fn spawn(&mut self, i: usize) -> anyhow::Result<u16> {
        let bin = nats_server_binary();
        let routes: Vec<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.cluster_port)
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let node = &self.nodes[i];
        let mut cmd = Command::new(&bin);
        if let Some(c) = &self.config {
            cmd.arg("-c").arg(c).args(["-m", "-1"]);
        }
        let port = if node.port == 0 {
            "-1".to_owned()
        } else {
            node.port.to_string()
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(node.dir.path());
        if let Some(cp) = node.cluster_port {
            cmd.args(["-n", &format!("n{i}"), "--cluster_name", "clawbus"])
                .args(["--cluster", &format!("nats://127.0.0.1:{cp}")])
                .args(["--routes", &routes.join(",")]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} (run `make setup`)", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = mpsc::channel();
        let violations = self.violations.clone();
        std::thread::spawn(move || {
            let mut port = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Violation") {
                    violations
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(line.clone());
                }
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    let _ = tx.send(port);
                }
                // keep draining so the server never blocks on a full pipe
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(port)) => {
                self.nodes[i].child = Some(child);
                Ok(port)
            }
            _ => {
                let _ = child.kill();
                bail!("nats-server did not become ready")
            }
        }
    }

    /// Waits until JetStream can place a stream with one replica per node (a cluster
    /// has elected its meta leader and every peer has joined).
    async fn wait_jetstream(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = self.client().await?;
        let js = async_nats::jetstream::new(client);
        let probe = async_nats::jetstream::stream::Config {
            name: "TESTKIT_PROBE".into(),
            subjects: vec!["testkit.probe".into()],
            num_replicas: self.nodes.len(),
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        };
        loop {
            match js.get_or_create_stream(probe.clone()).await {
                Ok(_) => {
                    let _ = js.delete_stream("TESTKIT_PROBE").await;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => bail!("JetStream not available: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// SIGKILLs node `i` (its store stays for a restart).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on the same ports with the same store.
    pub async fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i)?;
        self.wait_jetstream().await
    }

    /// Permission violations logged so far (`Publish Violation`, `Subscription
    /// Violation`, with the user and subject).
    pub fn violations(&self) -> Vec<String> {
        self.violations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(|c| c.id()))
            .collect()
    }

    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .url
            .split(',')
            .map(|u| u.parse())
            .collect::<Result<_, _>>()?;
        let opts = async_nats::ConnectOptions::new().retry_on_initial_connect();
        Ok(opts.connect(addrs.as_slice()).await?)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}
