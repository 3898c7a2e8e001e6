//! `exec`: a shell command in the agent's workspace, isolated by bubblewrap — new user,
//! pid, ipc, uts, cgroup and network namespaces (network only when allowed), the
//! system read-only, the workspace bound at `/workspace` (read-write, read-only or not
//! at all), a private `/tmp` and `/proc`, the environment cleared to an allowlist,
//! resource limits (CPU time, address space, file size, open files; processes when the
//! sandbox does not run as root), and a wall-clock timeout that kills everything the
//! command started. As root the box runs as an unprivileged host user, with no nested
//! user namespaces and no host path in its `/proc` ([`crate::launch`]); the workspace
//! has a quota ([`crate::quota`]) and an agent a number of boxes at once
//! ([`crate::boxes`]) and of processes for all of them ([`crate::cgroup`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clawbus_config::SandboxConfig;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::boxes::Permit;
use crate::cgroup::Cgroup;
use crate::files::relative;
use crate::quota::{self, Owner};
use crate::{launch, ToolError};

/// System directories the sandbox sees, read-only (when they exist).
const SYSTEM: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"];
/// Variables an `env` argument may not set.
const RESERVED: &[&str] = &["PATH", "HOME", "LD_PRELOAD", "LD_LIBRARY_PATH"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    command: String,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    timeout: Option<f64>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default, rename = "yieldMs")]
    yield_ms: Option<u64>,
}

impl ExecArgs {
    pub fn command(&self) -> &str {
        &self.command
    }

    /// `background: true`: run in the background at once.
    pub fn background(&self) -> bool {
        self.background == Some(true)
    }

    /// `yieldMs`: wait this long, then leave the command running in the background.
    pub fn yield_ms(&self) -> Option<u64> {
        self.yield_ms
    }
}

/// Whether the policy lets `command` run.
fn allowed(cfg: &SandboxConfig, command: &str) -> Result<(), ToolError> {
    match cfg.exec_security.as_str() {
        "deny" => Err(ToolError::denied(
            "exec is disabled by the sandbox's policy (sandbox.exec_security = deny)",
        )),
        "allowlist" => {
            // One program with its arguments: no shell syntax that could start others.
            if command.contains([';', '|', '&', '$', '`', '<', '>', '(', ')', '\n', '\\']) {
                return Err(ToolError::denied(
                    "under sandbox.exec_security = allowlist a command is one program and its \
                     arguments, without shell operators",
                ));
            }
            let program = command.split_whitespace().next().unwrap_or_default();
            let base = program.rsplit('/').next().unwrap_or(program);
            if cfg.exec_allowlist.iter().any(|p| p == base || p == program) {
                Ok(())
            } else {
                Err(ToolError::denied(format!(
                    "`{base}` is not in sandbox.exec_allowlist"
                )))
            }
        }
        _ => Ok(()),
    }
}

/// The bubblewrap arguments for a command in the workspace bound from `workspace`.
pub fn bwrap_args(
    cfg: &SandboxConfig,
    support: &launch::Support,
    workspace: &Path,
    workdir: &Path,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "--unshare-all",
        "--unshare-user",
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--clearenv",
    ]
    .map(String::from)
    .to_vec();
    if support.disable_userns {
        a.push("--disable-userns".into());
    }
    // The box's /tmp is memory: bounded where bubblewrap can.
    if support.tmpfs_size {
        a.extend(["--size".into(), (cfg.tmp_max_mb * 1024 * 1024).to_string()]);
    }
    a.extend(["--tmpfs".into(), "/tmp".into()]);
    if cfg.network {
        a.push("--share-net".into());
    }
    for dir in SYSTEM {
        let p = Path::new(dir);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(p) {
                    a.extend([
                        "--symlink".into(),
                        target.display().to_string(),
                        dir.to_string(),
                    ]);
                }
            }
            Ok(_) => a.extend(["--ro-bind".into(), dir.to_string(), dir.to_string()]),
            Err(_) => {}
        }
    }
    let ws = workspace.display().to_string();
    match cfg.workspace_access.as_str() {
        "rw" => a.extend(["--bind".into(), ws, "/workspace".into()]),
        "ro" => a.extend(["--ro-bind".into(), ws, "/workspace".into()]),
        _ => a.extend(["--dir".into(), "/workspace".into()]),
    }
    let dir = if workdir == Path::new(".") {
        Path::new("/workspace").to_path_buf()
    } else {
        Path::new("/workspace").join(workdir)
    };
    a.extend(["--chdir".into(), dir.display().to_string()]);
    a
}

/// The `prlimit` arguments of the resource limits; `fsize`: the largest a file may
/// grow (what is left of the workspace quota, at most `file_size_mb`).
fn limits(cfg: &SandboxConfig, fsize: u64, cgroup: bool) -> Vec<String> {
    let mut l = vec![
        format!("--cpu={}", cfg.cpu_secs),
        format!("--as={}", cfg.memory_mb * 1024 * 1024),
        format!("--fsize={fsize}"),
        format!("--nofile={}", cfg.open_files),
    ];
    // The process limit counts every process of the box's host user: without a pids
    // cgroup it is the bound (shared by the boxes of that user).
    if !cgroup {
        l.push(format!("--nproc={}", cfg.processes));
    }
    l
}

/// A prepared command: what runs, for how long, its cgroup, and the workspace size
/// past which it is stopped.
pub struct Prepared {
    pub cmd: tokio::process::Command,
    pub timeout: Duration,
    pub cgroup: Option<Cgroup>,
    pub watch: Watch,
    /// Its place among the agent's boxes.
    pub permit: Permit,
}

/// The workspace a command may not grow past `limit` bytes.
#[derive(Clone)]
pub struct Watch {
    pub workspace: std::path::PathBuf,
    pub limit: u64,
    pub max: u64,
}

impl Watch {
    /// Returns (with the bytes used) once the workspace is over the limit; measures
    /// again and again (every 25 ms for a small workspace, less often when measuring
    /// takes long: a fifth of the time at most), so what a command writes past the
    /// quota is what it writes within one such pause.
    pub async fn over(&self) -> u64 {
        const LEAST: Duration = Duration::from_millis(25);
        let mut pause = LEAST;
        loop {
            tokio::time::sleep(pause).await;
            let started = std::time::Instant::now();
            let ws = self.workspace.clone();
            let used = tokio::task::spawn_blocking(move || quota::usage(&ws, None))
                .await
                .ok()
                .and_then(Result::ok);
            if let Some(used) = used.filter(|u| *u > self.limit) {
                return used;
            }
            pause = (started.elapsed() * 4).max(LEAST);
        }
    }

    /// What the model is told of a command stopped for the quota.
    pub fn stopped(&self, used: u64) -> String {
        format!(
            "Error: the command was stopped: the workspace went over its quota \
             ({used} bytes used of {} allowed, sandbox.workspace_max_bytes); everything it \
             started was stopped. Delete files before writing more.",
            self.max
        )
    }
}

/// Checks the arguments, takes a place among `agent`'s boxes (waiting for one within
/// the command's timeout, or not at all when `wait` is false) and builds the command
/// (stdin, stdout and stderr are the caller's to set), with its timeout: the `timeout`
/// argument capped at `exec_timeout_secs`, or at `background_timeout_secs` for a
/// command that may go on in the background.
pub async fn prepare(
    cfg: &SandboxConfig,
    boxes: &crate::boxes::Boxes,
    agent: &str,
    workspace: &Path,
    a: &ExecArgs,
    background: bool,
    wait: bool,
) -> Result<Prepared, ToolError> {
    if a.command.trim().is_empty() {
        return Err(ToolError::bad("command is empty"));
    }
    if a.command.len() > 64 * 1024 {
        return Err(ToolError::bad("command is over 64 KiB"));
    }
    allowed(cfg, &a.command)?;
    for (k, v) in &a.env {
        let valid = !k.is_empty()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !k.as_bytes()[0].is_ascii_digit();
        if !valid || v.contains('\0') || RESERVED.contains(&k.as_str()) {
            return Err(ToolError::bad(format!(
                "env: `{k}` cannot be set (names are letters, digits and _; PATH, HOME and LD_* are fixed)"
            )));
        }
    }
    let workdir = match &a.workdir {
        Some(w) => relative(w)?,
        None => ".".into(),
    };
    let cap = if background {
        cfg.background_timeout_secs
    } else {
        cfg.exec_timeout_secs
    } as f64;
    let timeout = Duration::from_secs_f64(
        a.timeout
            .filter(|t| t.is_finite() && *t > 0.0)
            .unwrap_or(cfg.exec_timeout_secs as f64)
            .min(cap),
    );
    let bwrap = match cfg.mode.as_str() {
        "off" => None,
        _ => Some(which(&cfg.bwrap).ok_or_else(|| {
            ToolError::unavailable(format!(
                "exec needs bubblewrap (`{}`), which is not installed; install it \
                 (make setup does) or set sandbox.mode = \"off\" to run commands without \
                 isolation",
                cfg.bwrap
            ))
        })?),
    };
    let permit = boxes
        .enter(agent, cfg.max_concurrent_per_agent, wait.then_some(timeout))
        .await?;
    // The workspace exists, belongs to the box's user (as root) and is measured.
    let owner = (bwrap.is_some() && launch::as_root()).then_some(Owner {
        uid: cfg.run_as_uid,
        gid: cfg.run_as_gid,
    });
    let ws = workspace.to_path_buf();
    let used = tokio::task::spawn_blocking(move || {
        crate::files::Workspace::open(&ws)?;
        quota::usage(&ws, owner)
    })
    .await
    .map_err(|e| ToolError::internal(e.to_string()))??;
    let max = cfg.workspace_max_bytes;
    // A file may grow by what is left (nothing once the workspace is full: a command
    // may still look and delete); a command that grows the workspace past the quota,
    // or, when it was over already, by more than a few empty files, is stopped.
    let fsize = (cfg.file_size_mb * 1024 * 1024).min(max.saturating_sub(used));
    let watch = Watch {
        workspace: workspace.to_path_buf(),
        limit: max.max(used.saturating_add(64 * quota::MIN_ENTRY)),
        max,
    };
    let cgroup = Cgroup::create(cfg, agent);
    let shell = ["--", "/bin/sh", "-c", a.command.as_str()].map(String::from);
    let mut argv: Vec<String> = match &bwrap {
        // Explicitly unsandboxed: the host, in the workspace, with a clean env.
        None => {
            let mut v: Vec<String> = std::iter::once("prlimit".to_owned())
                .chain(limits(cfg, fsize, cgroup.is_some()))
                .chain(shell)
                .collect();
            if let Some(cg) = &cgroup {
                let mut w: Vec<String> = ["/bin/sh", "-c", "echo $$ > \"$0\" && exec \"$@\""]
                    .map(String::from)
                    .to_vec();
                w.push(cg.procs().display().to_string());
                w.append(&mut v);
                v = w;
            }
            v
        }
        Some(bwrap) => {
            let support = launch::support(cfg);
            let mut v = bwrap_args(cfg, support, &launch::bind_source(workspace), &workdir);
            v.extend(["--setenv", "HOME", "/workspace"].map(String::from));
            for (k, val) in &a.env {
                v.extend(["--setenv".to_owned(), k.clone(), val.clone()]);
            }
            v.extend(
                [
                    "--setenv",
                    "PATH",
                    "/usr/local/bin:/usr/bin:/bin",
                    "--setenv",
                    "LANG",
                    "C.UTF-8",
                ]
                .map(String::from),
            );
            let command: Vec<String> = std::iter::once("prlimit".to_owned())
                .chain(limits(cfg, fsize, cgroup.is_some()))
                .chain(shell)
                .collect();
            launch::argv(
                cfg,
                workspace,
                cgroup.as_ref().map(Cgroup::procs),
                bwrap,
                v,
                command,
            )?
        }
    };
    let program = argv.remove(0);
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&argv).env_clear();
    if bwrap.is_none() {
        cmd.current_dir(workspace.join(&workdir))
            .env("HOME", workspace)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .envs(&a.env);
    } else {
        // The launcher's own tools (bubblewrap's environment is cleared anyway).
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .current_dir("/");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    Ok(Prepared {
        cmd,
        timeout,
        cgroup,
        watch,
        permit,
    })
}

/// Runs the command in the foreground; the text the model sees.
pub async fn exec(
    cfg: &SandboxConfig,
    boxes: &crate::boxes::Boxes,
    agent: &str,
    workspace: &Path,
    a: ExecArgs,
) -> Result<String, ToolError> {
    // The cgroup (if any) and the box's place live as long as the command.
    let Prepared {
        mut cmd,
        timeout,
        cgroup: _cgroup,
        watch,
        permit: _permit,
    } = prepare(cfg, boxes, agent, workspace, &a, false, true).await?;
    let mut child = cmd
        .spawn()
        .map_err(|e| ToolError::unavailable(format!("exec could not start: {e}")))?;
    let pgid = child.id();
    let cap = cfg.exec_output_max_bytes;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let run = async {
        let (o, e, status) = tokio::join!(capped(out, cap), capped(err, cap), child.wait());
        (o, e, status)
    };
    let ran = tokio::select! {
        r = tokio::time::timeout(timeout, run) => r,
        used = watch.over() => {
            kill_group(pgid);
            return Ok(watch.stopped(used));
        }
    };
    let (stdout, stderr, status) = match ran {
        Ok(r) => r,
        Err(_) => {
            kill_group(pgid);
            return Ok(format!(
                "Error: the command was killed after {:.0} s (timeout); everything it started \
                 was stopped.",
                timeout.as_secs_f64()
            ));
        }
    };
    // Whatever the command left running in its group goes with it.
    kill_group(pgid);
    let status = status.map_err(|e| ToolError::internal(format!("exec: {e}")))?;
    let mut text = stdout;
    if !stderr.is_empty() {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&stderr);
    }
    match status.code() {
        Some(0) => {}
        Some(c) => text.push_str(&format!("\n[exit code {c}]")),
        None => text.push_str("\n[killed by a signal: a resource limit, or the command itself]"),
    }
    if text.is_empty() {
        text = "(no output)".into();
    }
    Ok(text)
}

/// Reads a stream to its end, keeping at most `cap` bytes (the rest is counted and
/// dropped, so a flood of output costs no memory).
async fn capped<R: AsyncRead + Unpin>(r: Option<R>, cap: usize) -> String {
    let Some(mut r) = r else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut dropped = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                dropped += n.saturating_sub(room);
            }
        }
    }
    let mut s = String::from_utf8_lossy(&kept).into_owned();
    if dropped > 0 {
        s.push_str(&format!("\n[output cut: {dropped} more bytes]"));
    }
    s
}

pub(crate) fn kill_group(pgid: Option<u32>) {
    if let Some(p) = pgid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The program's path when it can be run.
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Path::new(program).is_file().then(|| program.into());
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowlist_takes_single_programs_only() {
        let cfg = SandboxConfig {
            exec_security: "allowlist".into(),
            exec_allowlist: vec!["ls".into(), "git".into()],
            ..Default::default()
        };
        assert!(allowed(&cfg, "ls -la").is_ok());
        assert!(allowed(&cfg, "/usr/bin/git status").is_ok());
        assert!(allowed(&cfg, "rm -rf /").is_err());
        assert!(allowed(&cfg, "ls; rm -rf /").is_err());
        assert!(allowed(&cfg, "ls $(rm x)").is_err());
        let deny = SandboxConfig {
            exec_security: "deny".into(),
            ..Default::default()
        };
        assert!(allowed(&deny, "true").is_err());
    }

    #[test]
    fn the_sandbox_binds_the_workspace_and_nothing_of_the_state() {
        let cfg = SandboxConfig::default();
        let support = launch::Support {
            disable_userns: true,
            tmpfs_size: true,
            drop_tools: true,
        };
        let a = bwrap_args(
            &cfg,
            &support,
            Path::new("/state/workspace"),
            Path::new("src"),
        );
        let joined = a.join(" ");
        assert!(joined.contains("--bind /state/workspace /workspace"));
        assert!(joined.contains("--chdir /workspace/src"));
        assert!(!joined.contains("--share-net"));
        assert!(!joined.contains("/state "), "{joined}");
        let ro = SandboxConfig {
            workspace_access: "ro".into(),
            network: true,
            ..Default::default()
        };
        let joined = bwrap_args(&ro, &support, Path::new("/w"), Path::new(".")).join(" ");
        assert!(joined.contains("--ro-bind /w /workspace") && joined.contains("--share-net"));
        assert!(joined.contains("--disable-userns"), "{joined}");
        assert!(joined.contains("--size 268435456 --tmpfs /tmp"), "{joined}");
    }
}
