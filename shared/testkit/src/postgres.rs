//! A throw-away PostgreSQL cluster for tests, from Debian's binaries (`make setup`
//! installs them): `initdb` into a temporary directory, one `postgres` on a loopback
//! port, removed when dropped. PostgreSQL refuses to run as root, so as root (CI) the
//! cluster runs as the unprivileged `postgres` user that Debian's package creates.
//! It dies with the test process that started it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The directory of PostgreSQL's server binaries: `$CLAWBUS_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout).
pub fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CLAWBUS_PG_BIN").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server binaries not found (run `make setup`)")?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, p)| p)
        .context("no initdb under /usr/lib/postgresql (run `make setup`)")
}

/// A running PostgreSQL cluster with a `clawbus` superuser (trust auth, loopback only).
pub struct PostgresServer {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    pub port: u16,
    /// `postgres://clawbus@127.0.0.1:<port>/clawbus`
    pub url: String,
}

/// Runs `program` as the `postgres` user when this process is root (setpriv execs it
/// directly, so signals reach it), and kills it if the test process dies.
fn unprivileged(program: PathBuf) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"])
            .args(["--pdeathsig=KILL", "--"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    /// A cluster for tests: no fsync, no synchronous commit (quick, not durable).
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(false).await
    }

    /// `durable`: PostgreSQL's default fsync and synchronous commit, for benchmarks
    /// that compare with SQLite's durable commits.
    pub async fn start_with(durable: bool) -> anyhow::Result<Self> {
        let bin = postgres_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("clawbus-pg-").tempdir()?;
        let data = dir.path().join("data");
        if nix::unistd::geteuid().is_root() {
            let pg = nix::unistd::User::from_name("postgres")?
                .context("user `postgres` missing (install Debian's postgresql: `make setup`)")?;
            nix::unistd::chown(dir.path(), Some(pg.uid), Some(pg.gid))?;
        }
        let out = unprivileged(bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "clawbus",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .context("cannot run initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = crate::free_port();
        let mut cmd = unprivileged(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "max_connections=200"]);
        if !durable {
            // Durability is not under test: no fsync makes the cluster quick to use.
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start postgres")?;
        let mut s = Self {
            child: Some(child),
            _dir: dir,
            port,
            url: String::new(),
        };
        s.wait_ready(&bin).await?;
        let out = Command::new(bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "clawbus"])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc"])
            .arg("CREATE DATABASE clawbus")
            .output()
            .context("cannot run psql")?;
        if !out.status.success() {
            bail!("create database: {}", String::from_utf8_lossy(&out.stderr));
        }
        s.url = format!("postgres://clawbus@127.0.0.1:{port}/clawbus");
        Ok(s)
    }

    async fn wait_ready(&mut self, bin: &std::path::Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("postgres exited during start-up: {status}");
                }
            }
            if Instant::now() > deadline {
                bail!("postgres did not accept connections within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGQUIT: immediate shutdown (the data directory is thrown away anyway).
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
