//! `clawbus up`: starts nats-server and every service as its own process, writes pid
//! files, restarts a service that dies, and stops everything on SIGTERM.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clawbus_testkit::{bin_dir, free_port, nats_server_binary, wait_for, Emulator};
use clawbus_tests::user_msg;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};

fn read_pid(run: &Path, name: &str) -> Option<i32> {
    std::fs::read_to_string(run.join(format!("{name}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

#[tokio::test]
async fn clawbus_up_runs_restarts_and_stops_the_suite() {
    let home = tempfile::tempdir().unwrap();
    let emu = Emulator::start(None).await.unwrap();
    let gw = free_port();
    // Every service its own admin port (the defaults may be taken by another suite).
    let admin: Vec<(&str, u16)> = clawbus_testkit::SERVICES
        .iter()
        .map(|s| (s.name(), free_port()))
        .collect();
    let nats_url = format!("nats://127.0.0.1:{}", free_port());
    // Prices, for `clawbus usage`'s cost column.
    std::fs::write(
        home.path().join("clawbus.toml"),
        "[agent.models.\"openai/gpt-4o-mini\"]\ninput_usd_per_mtok = 1000.0\noutput_usd_per_mtok = 2000.0\n",
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new(bin_dir().join("clawbus"));
    cmd.args(["up", "--replicas", "2"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CLAWBUS_HOME", home.path())
        .env("CLAWBUS_NATS_SERVER", nats_server_binary())
        .env("CLAWBUS__NATS__URL", &nats_url)
        .env("CLAWBUS__GATEWAY__BIND", format!("127.0.0.1:{gw}"))
        .env("OPENAI_BASE_URL", emu.base_url())
        .env("CLAWBUS__AGENT__ACK_WAIT_SECS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (s, p) in &admin {
        cmd.env(
            format!("CLAWBUS__ADMIN__{}", s.to_uppercase()),
            format!("127.0.0.1:{p}"),
        );
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    // Generous: on a loaded 2-core machine (tests in parallel) seven processes may take
    // a while; the supervisor itself gives each 30 s.
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
        "clawbus up printed: {printed:?}\nlogs (last lines first): {:#?}",
        log_tails(home.path())
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let token = std::fs::read_to_string(home.path().join("gateway.token")).unwrap();
    assert!(
        printed.iter().any(|l| l.contains(token.trim())),
        "the generated token is printed once"
    );

    let run = home.path().join("run");
    const PROCS: [&str; 8] = [
        "nats-server",
        "store-0",
        "store-1",
        "router-0",
        "router-1",
        "agent-0",
        "agent-1",
        "gateway-0",
    ];
    for name in PROCS {
        assert!(read_pid(&run, name).is_some_and(alive), "{name} pid file");
    }
    // Each replica has its own admin port, written beside its pid file.
    let agent1_admin = std::fs::read_to_string(run.join("agent-1.admin")).unwrap();
    let metrics = reqwest::get(format!("http://{}/metrics", agent1_admin.trim()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("clawbus_agent_partitions_owned"),
        "{metrics}"
    );
    let http = reqwest::Client::new();
    let chat = || {
        http.post(format!("http://127.0.0.1:{gw}/v1/chat/completions"))
            .bearer_auth(token.trim())
            .json(&user_msg("via clawbus up"))
            .send()
    };
    assert_eq!(chat().await.unwrap().status(), 200);

    // The bus: no anonymous access; generated credentials only the owner can read;
    // the CLI's bus commands connect as the operator.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert!(async_nats::connect(nats_url.as_str()).await.is_err());
    let creds = home.path().join("credentials");
    assert_eq!(mode(&creds), 0o700);
    for user in clawbus_bus::rights::users() {
        assert_eq!(
            mode(&creds.join(format!("{user}.password"))),
            0o600,
            "{user}"
        );
    }
    let conf = home.path().join("nats-server.conf");
    assert_eq!(mode(&conf), 0o600);
    // nats-server gets hashes, never the passwords themselves.
    let conf = std::fs::read_to_string(conf).unwrap();
    let agent_pw = std::fs::read_to_string(creds.join("agent.password")).unwrap();
    assert!(!conf.contains(agent_pw.trim()) && conf.contains("password: \"$2"));
    let mut cli_env: Vec<(String, String)> = vec![
        ("CLAWBUS_HOME".into(), home.path().display().to_string()),
        ("CLAWBUS__NATS__URL".into(), nats_url.clone()),
    ];
    for (s, p) in &admin {
        cli_env.push((
            format!("CLAWBUS__ADMIN__{}", s.to_uppercase()),
            format!("127.0.0.1:{p}"),
        ));
    }
    let env: Vec<(&str, &str)> = cli_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (code, out) = run_cli_in(None, &["status"], &env).await;
    assert_eq!(code, 0, "{out}\nlogs: {:#?}", log_tails(home.path()));
    assert!(out.contains("consumer   CLAW_IN/router"), "{out}");
    assert!(out.contains("stream     CLAW_DLQ"), "{out}");
    let (code, out) = run_cli_in(None, &["dlq"], &env).await;
    assert_eq!((code, out.trim()), (0, "no dead letters"));
    // Usage per day and model, from the store's database.
    let counted = wait_for(Duration::from_secs(10), || async {
        let (code, out) = run_cli_in(None, &["usage", "--days", "2"], &env).await;
        code == 0 && out.contains("openai/gpt-4o-mini") && out.contains("total")
    })
    .await;
    assert!(counted, "{:?}", run_cli_in(None, &["usage"], &env).await);
    let (_, out) = run_cli_in(None, &["usage"], &env).await;
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.contains("openai/gpt-4o-mini"))
        .unwrap()
        .split_whitespace()
        .collect();
    let (prompt, completion): (f64, f64) = (row[3].parse().unwrap(), row[4].parse().unwrap());
    assert_eq!(
        row[8],
        format!("{:.4}", (prompt * 1000.0 + completion * 2000.0) / 1e6),
        "{out}"
    );

    // kill -9 an agent: the supervisor starts a new one.
    let old = read_pid(&run, "agent-0").unwrap();
    kill(Pid::from_raw(old), Signal::SIGKILL).unwrap();
    let agent_admin = admin.iter().find(|(s, _)| *s == "agent").unwrap().1;
    let restarted = wait_for(Duration::from_secs(20), || async {
        read_pid(&run, "agent-0").is_some_and(|p| p != old && alive(p))
            && http
                .get(format!("http://127.0.0.1:{agent_admin}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(restarted, "agent restarted");
    assert_eq!(chat().await.unwrap().status(), 200);

    // SIGTERM stops everything and removes the pid files.
    let pids: Vec<i32> = PROCS.iter().filter_map(|n| read_pid(&run, n)).collect();
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    for p in pids {
        assert!(!alive(p), "pid {p} still running");
    }
    assert!(
        std::fs::read_dir(&run).unwrap().next().is_none(),
        "pid files removed"
    );
}

/// The last lines of each process's log under `clawbus up`, newest first.
fn log_tails(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            format!("{}: {tail:?}", e.file_name().to_string_lossy())
        })
        .collect()
}

async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let home = tempfile::tempdir().unwrap();
    run_cli_in(Some(home.path()), args, env).await
}

/// Runs `clawbus` with `env` only (and `CLAWBUS_HOME=home` when given).
async fn run_cli_in(home: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(bin_dir().join("clawbus"));
    cmd.args(args).env_clear();
    if let Some(h) = home {
        cmd.env("CLAWBUS_HOME", h);
    }
    let out = cmd.envs(env.iter().copied()).output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn bad_cli_input_gets_clear_errors() {
    let (code, out) = run_cli(&["bogus"], &[]).await;
    assert_eq!(code, 2);
    assert!(out.contains("usage: clawbus"), "{out}");
    for bad in [
        ["up", "--replicas", "0"],
        ["up", "--replicas", "lots"],
        ["up", "--replica", "2"],
    ] {
        let (code, out) = run_cli(&bad, &[]).await;
        assert_eq!(code, 2, "{bad:?}");
        assert!(out.contains("replicas"), "{bad:?}: {out}");
    }
    let (code, out) = run_cli(&["send"], &[]).await;
    assert_eq!(code, 1);
    assert!(out.contains("nothing to send"), "{out}");
    let (code, out) = run_cli(&["send", "hi", "--session"], &[]).await;
    assert_eq!(code, 1);
    assert!(out.contains("--session needs a value"), "{out}");
    let (code, out) = run_cli(&["status"], &[("CLAWBUS__ROUTER__CONCURRENCY", "0")]).await;
    assert_eq!(code, 2);
    assert!(out.contains("router.concurrency"), "{out}");
    let (code, out) = run_cli(&["status"], &[("CLAWBUS__AGENT__NOPE", "1")]).await;
    assert_eq!(code, 2);
    assert!(out.contains("nope"), "{out}");
    // Nothing runs: status says so and fails.
    let (code, out) = run_cli(&["status"], &[("CLAWBUS__ADMIN__GATEWAY", "127.0.0.1:1")]).await;
    assert_eq!(code, 1);
    assert!(out.contains("down"), "{out}");
    for bad in [
        &["usage", "--days", "0"][..],
        &["usage", "--days", "many"],
        &["usage", "--session"],
        &["usage", "--bogus"],
    ] {
        let (code, out) = run_cli(bad, &[]).await;
        assert_eq!(code, 1, "{bad:?}: {out}");
        assert!(
            out.contains("--days") || out.contains("--session") || out.contains("unexpected"),
            "{bad:?}: {out}"
        );
    }
    let (code, out) = run_cli(&["nats-config", "--bogus"], &[]).await;
    assert_eq!(code, 1);
    assert!(out.contains("usage: clawbus nats-config"), "{out}");
    let (code, out) = run_cli(&["provision"], &[("NATS_URL", "nats://127.0.0.1:1")]).await;
    assert_eq!(code, 1);
    assert!(out.contains("cannot reach NATS"), "{out}");
    let (code, out) = run_cli(
        &["dlq"],
        &[
            ("CLAWBUS__NATS__USER", "operator"),
            ("CLAWBUS__NATS__PASSWORD_FILE", "/nonexistent"),
        ],
    )
    .await;
    assert_eq!(code, 2);
    assert!(out.contains("nats.password_file"), "{out}");
    let (code, out) = run_cli(&["token"], &[]).await;
    assert_eq!(code, 0);
    assert_eq!(out.trim().len(), 64);
}

#[tokio::test]
async fn a_service_with_bad_config_exits_with_a_clear_error() {
    for svc in ["gateway", "router", "agent", "store"] {
        let out = tokio::process::Command::new(bin_dir().join(format!("clawbus-{svc}")))
            .env_clear()
            .env("CLAWBUS__AGENT__PROVIDER__BASE_URL", "ftp://nowhere")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{svc}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("agent.provider.base_url"), "{svc}: {err}");
    }
}
