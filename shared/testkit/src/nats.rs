//! A real nats-server for tests.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

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

/// A nats-server with JetStream, on a random port, with its own store directory.
pub struct NatsServer {
    child: Child,
    pub url: String,
    pub port: u16,
    _dir: tempfile::TempDir,
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
        let dir = tempfile::tempdir()?;
        let bin = nats_server_binary();
        let mut cmd = Command::new(&bin);
        if let Some(c) = config {
            cmd.arg("-c").arg(c).args(["-m", "-1"]);
        }
        let mut child = cmd
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} (run `make setup`)", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut port = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
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
            Ok(Some(port)) => Ok(Self {
                child,
                url: format!("nats://127.0.0.1:{port}"),
                port,
                _dir: dir,
            }),
            _ => {
                let _ = child.kill();
                bail!("nats-server did not become ready")
            }
        }
    }

    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(async_nats::connect(&self.url).await?)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
