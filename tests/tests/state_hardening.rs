//! `clawbus up` keeps what it holds to its user and to the process that needs it: a
//! state directory other users could read is made private (and everything the suite
//! writes in it is owner-only, whatever the umask), and each child process is started
//! with only the variables the service registry grants it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawbus_testkit::{
    bin_dir, free_port, nats_server_binary, wait_for, Emulator, TelegramEmulator,
};
use clawbus_tests::user_msg;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A suite started by `clawbus up` in `home`.
struct Up {
    child: tokio::process::Child,
    home: PathBuf,
    gateway: String,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Up {
    /// Starts `clawbus up` with `env` (and nothing else of this process's environment
    /// but `PATH`) and waits until it says the suite is up.
    async fn start(home: &Path, env: &[(&str, String)]) -> Up {
        let gw = free_port();
        let mut cmd = tokio::process::Command::new(bin_dir().join("clawbus"));
        cmd.arg("up")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CLAWBUS_HOME", home)
            .env("CLAWBUS_NATS_SERVER", nats_server_binary())
            .env(
                "CLAWBUS__NATS__URL",
                format!("nats://127.0.0.1:{}", free_port()),
            )
            .env("CLAWBUS__GATEWAY__BIND", format!("127.0.0.1:{gw}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for s in clawbus_testkit::SERVICES {
            cmd.env(
                format!("CLAWBUS__ADMIN__{}", s.name().to_uppercase()),
                format!("127.0.0.1:{}", free_port()),
            );
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = err_lines.next_line().await {
                sink.lock().unwrap().push(l);
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed = Vec::new();
        let up = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(l)) = lines.next_line().await {
                printed.push(l.clone());
                if l.starts_with("clawbus is up") {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(up, Ok(true)),
            "clawbus up printed: {printed:?}\nstderr: {:?}",
            stderr.lock().unwrap()
        );
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Up {
            child,
            home: home.to_owned(),
            gateway: format!("http://127.0.0.1:{gw}"),
            stderr,
        }
    }

    /// One chat turn through the gateway: its status and answer.
    async fn chat(&self, text: &str) -> (u16, serde_json::Value) {
        let token = std::fs::read_to_string(self.home.join("gateway.token")).unwrap();
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", self.gateway))
            .bearer_auth(token.trim())
            .json(&user_msg(text))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    /// The pid files under `run/`: process name → pid.
    fn pids(&self) -> HashMap<String, i32> {
        std::fs::read_dir(self.home.join("run"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let name = e
                    .file_name()
                    .to_string_lossy()
                    .strip_suffix(".pid")?
                    .to_owned();
                let pid = std::fs::read_to_string(e.path())
                    .ok()?
                    .trim()
                    .parse()
                    .ok()?;
                Some((name, pid))
            })
            .collect()
    }

    /// The last lines of a process's log.
    fn log(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.home.join(format!("logs/{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(10).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// SIGTERM, and the supervisor's clean exit.
    async fn stop(mut self) {
        kill(
            Pid::from_raw(self.child.id().unwrap() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

/// Every file and directory under `dir` (links not followed) with its permission bits.
/// The services are running: a file gone between the listing and its look (a database
/// journal, a temporary file) is skipped.
fn modes(dir: &Path, out: &mut Vec<(PathBuf, u32)>) {
    use std::os::unix::fs::PermissionsExt;
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if gone(&e) => return,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    for e in entries.flatten() {
        let meta = match std::fs::symlink_metadata(e.path()) {
            Ok(m) => m,
            Err(err) if gone(&err) => continue,
            Err(err) => panic!("{}: {err}", e.path().display()),
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        out.push((e.path(), meta.permissions().mode() & 0o777));
        if meta.is_dir() {
            modes(&e.path(), out);
        }
    }
}

#[tokio::test]
async fn an_open_state_directory_is_made_private_and_everything_written_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    // As a user whose shell has the usual umask and who made ~/.clawbus for the config.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("clawbus");
    std::fs::create_dir_all(home.join("logs")).unwrap();
    std::fs::write(home.join("clawbus.toml"), "# mine\n").unwrap();
    std::fs::write(home.join("logs/gateway-0.log"), "an old transcript line\n").unwrap();
    for (p, m) in [("", 0o755), ("logs", 0o755), ("clawbus.toml", 0o644)] {
        std::fs::set_permissions(home.join(p), std::fs::Permissions::from_mode(m)).unwrap();
    }
    let emu = Emulator::start(None).await.unwrap();
    let up = Up::start(&home, &[("OPENAI_BASE_URL", emu.base_url())]).await;
    let said = up.stderr.lock().unwrap().join("\n");
    assert!(said.contains("was open to other users"), "{said}");
    // A turn, so the store writes transcripts (the database's WAL).
    let (status, _) = up.chat("a private turn").await;
    assert_eq!(status, 200);
    let wal = home.join("clawbus.db-wal");
    assert!(
        wait_for(Duration::from_secs(20), || async { wal.exists() }).await,
        "no WAL"
    );

    let mut all = Vec::new();
    modes(&home, &mut all);
    let open: Vec<_> = all.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "readable by others: {open:#?}");
    assert_eq!(
        std::fs::metadata(&home).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let pids = up.pids();
    for name in ["nats-server", "gateway-0", "agent-0", "store-0", "router-0"] {
        assert!(pids.contains_key(name), "{name}: {pids:?}");
    }
    for expected in [
        "clawbus.db",
        "clawbus.db-wal",
        "clawbus.toml",
        "gateway.token",
        "nats-server.conf",
        "credentials/agent.password",
        "logs/gateway-0.log",
        "logs/agent-0.log",
        "logs/nats-server.log",
        "run/agent-0.pid",
        "run/agent-0.admin",
        "nats/jetstream",
    ] {
        assert!(
            all.iter().any(|(p, _)| p == &home.join(expected)),
            "{expected} not there: {all:#?}"
        );
    }
    up.stop().await;
}

#[test]
fn a_state_directory_of_another_user_is_refused() {
    // Only root can make a directory another user's; as anyone else this is covered by
    // the ownership check's unit test.
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("theirs");
    std::fs::create_dir(&home).unwrap();
    nix::unistd::chown(&home, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let out = std::process::Command::new(bin_dir().join("clawbus"))
        .arg("up")
        .env_clear()
        .env("CLAWBUS_HOME", &home)
        .env(
            "CLAWBUS__NATS__URL",
            format!("nats://127.0.0.1:{}", free_port()),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("belongs to uid 65534, not to you"), "{err}");
    assert!(
        std::fs::read_dir(&home).unwrap().next().is_none(),
        "nothing written"
    );
}

/// The environment of process `pid` as it was started.
fn environ(pid: i32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| {
            let v = String::from_utf8_lossy(v);
            let (k, val) = v.split_once('=').unwrap_or((&v, ""));
            (k.to_owned(), val.to_owned())
        })
        .collect()
}

#[tokio::test]
async fn each_process_gets_only_its_own_secrets() {
    let n = std::process::id();
    let openai = format!("sk-sentinel-openai-{n}");
    let telegram = format!("123456:sentinel-telegram-{n}");
    let unrelated = format!("sentinel-unrelated-{n}");
    let emu = Emulator::start(Some(&openai)).await.unwrap();
    let tg = TelegramEmulator::start(&telegram).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(
        tmp.path(),
        &[
            ("OPENAI_BASE_URL", emu.base_url()),
            ("OPENAI_API_KEY", openai.clone()),
            ("TELEGRAM_BOT_TOKEN", telegram.clone()),
            ("CLAWBUS__CHANNELS__TELEGRAM__API_ROOT", tg.api_root()),
            ("SECRET_X", unrelated.clone()),
        ],
    )
    .await;
    // Each service started without what it does not hold: the gateway answers, the
    // agent reaches the provider with its key, the channels service polls its bot.
    let (status, v) = up.chat("hello").await;
    assert_eq!(status, 200, "{v}");
    assert!(
        wait_for(Duration::from_secs(20), || async {
            tg.waiting_polls() + tg.polls() > 0
        })
        .await,
        "the channels service never polled Telegram: {}",
        up.log("channels-0")
    );

    let pids = up.pids();
    for name in [
        "nats-server",
        "gateway-0",
        "agent-0",
        "store-0",
        "router-0",
        "sandbox-0",
        "channels-0",
    ] {
        assert!(pids.contains_key(name), "{name}: {pids:?}");
    }
    for (name, pid) in &pids {
        let env = environ(*pid);
        let holds = |secret: &str| env.iter().any(|(_, v)| v.contains(secret));
        assert_eq!(
            holds(&openai),
            name.starts_with("agent-"),
            "{name}: OpenAI key"
        );
        assert_eq!(
            holds(&telegram),
            name.starts_with("channels-"),
            "{name}: Telegram token"
        );
        assert!(!holds(&unrelated), "{name} got SECRET_X's value");
        assert!(
            !env.iter().any(|(k, _)| k == "SECRET_X"),
            "{name} got SECRET_X"
        );
        if name == "nats-server" {
            let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
            assert!(
                names
                    .iter()
                    .all(|k| ["PATH", "HOME", "LANG", "TZ"].contains(k) || k.starts_with("LC_")),
                "nats-server got {names:?}"
            );
        }
    }
    up.stop().await;
}
