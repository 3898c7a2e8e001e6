//! Background `exec` sessions and the `process` tool that manages them (OpenClaw's
//! names: `exec {background, yieldMs}`, `process {action: list|poll|log|write|kill|
//! clear|remove, sessionId}`).
//!
//! A background command runs in the same bubblewrap box as a foreground one, on the
//! sandbox replica that started it, and dies with it (`--die-with-parent`). Its output
//! is kept in memory (the newest `process_output_max_bytes`); a finished session stays
//! until cleared or `process_ttl_secs` after it ended. The session id names the
//! replica (`<hex>-<replica>`), so a `process` call reaching another replica is passed
//! on to the one that holds the session (`claw.v1.sandbox.process.<replica>`); each
//! session is also listed in the KV bucket `claw_processes`, so `list` shows an agent's
//! sessions on every replica. Each agent sees only its own sessions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use clawbus_config::SandboxConfig;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::watch;

use crate::exec::{self, ExecArgs};
use crate::ToolError;

/// Lines `log` returns when no `limit` is given.
const DEFAULT_LOG_LINES: usize = 200;
/// Bytes one `write` may send.
const MAX_WRITE_BYTES: usize = 64 * 1024;

/// How a session ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Exited,
    Killed,
    Timeout,
    /// Its sandbox replica stopped (the command stopped with it).
    Lost,
}

/// What `claw_processes` records of a session (and `list` shows).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    pub session_id: String,
    pub agent_id: String,
    pub replica: String,
    pub name: String,
    pub command: String,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
}

/// The output kept of a session: the newest bytes, with the offset of the first.
#[derive(Default)]
struct Output {
    bytes: Vec<u8>,
    /// Bytes dropped from the front (the buffer's start as an absolute offset).
    dropped: usize,
    /// Absolute offset up to which `poll` has returned output.
    polled: usize,
}

impl Output {
    fn push(&mut self, data: &[u8], cap: usize) {
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > cap {
            let cut = self.bytes.len() - cap;
            self.bytes.drain(..cut);
            self.dropped += cut;
        }
    }

    /// The output not polled yet, and a note when some was dropped before it could be.
    fn take_new(&mut self) -> String {
        let from = self.polled.max(self.dropped);
        let mut s = String::new();
        if from > self.polled {
            s.push_str(&format!("[{} bytes dropped]\n", from - self.polled));
        }
        s.push_str(&String::from_utf8_lossy(&self.bytes[from - self.dropped..]));
        self.polled = self.dropped + self.bytes.len();
        s
    }
}

struct Job {
    listing: Mutex<Listing>,
    output: Mutex<Output>,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pgid: Option<u32>,
    /// Becomes true when the command has ended.
    done: watch::Receiver<bool>,
    /// Left running in the background (not a command waited for within its yield).
    backgrounded: std::sync::atomic::AtomicBool,
    timeout: Duration,
}

impl Job {
    fn listing(&self) -> Listing {
        lock(&self.listing).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `process` tool's arguments.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessArgs {
    action: String,
    #[serde(default, rename = "sessionId")]
    session_id: Option<String>,
    /// `write`: what to send to the command's standard input.
    #[serde(default)]
    data: Option<String>,
    /// `write`: close standard input afterwards.
    #[serde(default)]
    eof: Option<bool>,
    /// `log`: first line (from 0); without it, the last `limit` lines.
    #[serde(default)]
    offset: Option<usize>,
    #[serde(default)]
    limit: Option<usize>,
}

impl ProcessArgs {
    /// The replica holding the session named, when it is not a `list`.
    pub fn replica(&self) -> Option<&str> {
        self.session_id
            .as_deref()
            .and_then(|s| s.split_once('-'))
            .map(|(_, r)| r)
    }
}

/// The background sessions of one sandbox replica.
pub struct Jobs {
    replica: String,
    /// Every agent's boxes on this replica, foreground ones included.
    pub boxes: crate::boxes::Boxes,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    kv: Option<kv::Store>,
}

impl Jobs {
    pub fn new(replica: String, kv: Option<kv::Store>) -> Self {
        Self {
            replica,
            boxes: Default::default(),
            jobs: Mutex::new(HashMap::new()),
            kv,
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The listings recorded under `filter` (a key pattern: `<agent>.>`, `>`), read
    /// from the subjects the bucket's stream holds (no consumer to wait on).
    async fn listed(&self, filter: &str) -> Vec<Listing> {
        let Some(kv) = &self.kv else {
            return Vec::new();
        };
        let keys = clawbus_bus::kv_keys(kv, filter).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "Process sessions not listed");
            Vec::new()
        });
        let mut out = Vec::new();
        for k in keys {
            if let Ok(Some(v)) = kv.get(&k).await {
                if let Ok(l) = serde_json::from_slice::<Listing>(&v) {
                    out.push(l);
                }
            }
        }
        out
    }

    /// Marks the sessions a previous life of this replica left as lost: their commands
    /// died with it.
    pub async fn forget_previous_life(&self) {
        for mut l in self.listed(">").await {
            if l.replica == self.replica && l.status == Status::Running {
                l.status = Status::Lost;
                l.ended_ms = Some(clawbus_wire::now_ms());
                self.record(&l).await;
            }
        }
    }

    async fn record(&self, l: &Listing) {
        let Some(kv) = &self.kv else { return };
        let key = format!("{}.{}", l.agent_id, l.session_id);
        match serde_json::to_vec(l) {
            Ok(v) => {
                if let Err(e) = kv.put(&key, v.into()).await {
                    tracing::warn!(session = %l.session_id, error = %e, "Process session not listed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "Process listing not encoded"),
        }
    }

    async fn unrecord(&self, agent: &str, session: &str) {
        if let Some(kv) = &self.kv {
            let _ = kv.purge(format!("{agent}.{session}")).await;
        }
    }

    /// Background sessions of `agent` still running.
    fn running(&self, agent: &str) -> usize {
        lock(&self.jobs)
            .values()
            .filter(|j| {
                let l = j.listing();
                l.agent_id == agent
                    && l.status == Status::Running
                    && j.backgrounded.load(std::sync::atomic::Ordering::SeqCst)
            })
            .count()
    }

    /// Starts `args` in the background; with `yield_after`, waits that long first and
    /// answers like a foreground command when it ended by then. `explicit`: the call
    /// asked for the background (`background`, `yieldMs`): its input is kept open for
    /// `process write`, and it is refused at once when the agent has
    /// `max_background` sessions running; a command backgrounded only by
    /// `exec_yield_ms` is then waited for instead.
    pub async fn start(
        self: &Arc<Self>,
        cfg: &SandboxConfig,
        agent: &str,
        workspace: &Path,
        args: ExecArgs,
        yield_after: Option<Duration>,
        explicit: bool,
    ) -> Result<String, ToolError> {
        self.sweep(cfg);
        let running = self.running(agent);
        if explicit && running >= cfg.max_background {
            return Err(ToolError::denied(format!(
                "this agent already runs {running} background commands (sandbox.max_background); \
                 kill or wait for one first"
            )));
        }
        let stdin = explicit;
        // A command asked to go to the background does not wait for a place.
        let exec::Prepared {
            mut cmd,
            timeout,
            cgroup,
            watch,
            permit,
        } = exec::prepare(cfg, &self.boxes, agent, workspace, &args, true, !explicit).await?;
        if stdin {
            // `process write` feeds it; otherwise it reads an empty input.
            cmd.stdin(std::process::Stdio::piped());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| ToolError::unavailable(format!("exec could not start: {e}")))?;
        let id = format!("{:08x}-{}", rand::random::<u32>(), self.replica);
        let (tx, done) = watch::channel(false);
        let job = Arc::new(Job {
            listing: Mutex::new(Listing {
                session_id: id.clone(),
                agent_id: agent.to_owned(),
                replica: self.replica.clone(),
                name: short_name(args.command()),
                command: args.command().chars().take(500).collect(),
                status: Status::Running,
                exit_code: None,
                started_ms: clawbus_wire::now_ms(),
                ended_ms: None,
            }),
            output: Mutex::new(Output::default()),
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            pgid: child.id(),
            done,
            timeout,
            backgrounded: false.into(),
        });
        lock(&self.jobs).insert(id.clone(), job.clone());
        let cap = cfg.process_output_max_bytes;
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let readers = {
            let (a, b) = (job.clone(), job.clone());
            async move { tokio::join!(pump(out, &a, cap), pump(err, &b, cap)) }
        };
        let jobs = self.clone();
        let waiter = job.clone();
        tokio::spawn(async move {
            // The command's cgroup and its place among the agent's boxes go when it ends.
            let _cgroup = cgroup;
            let _permit = permit;
            let run = async { tokio::join!(readers, child.wait()).1 };
            let ran = tokio::select! {
                r = tokio::time::timeout(waiter.timeout, run) => Some(r),
                used = watch.over() => {
                    let note = format!("\n[{}]\n", watch.stopped(used));
                    lock(&waiter.output).push(note.as_bytes(), usize::MAX);
                    None
                }
            };
            let (status, code) = match ran {
                // Stopped for the workspace quota.
                None => {
                    lock(&waiter.listing).status = Status::Killed;
                    exec::kill_group(waiter.pgid);
                    let _ = child.wait().await;
                    (Status::Killed, None)
                }
                Some(Ok(Ok(s))) => match s.code() {
                    Some(c) => (Status::Exited, Some(c)),
                    // Killed by `process kill` or a resource limit.
                    None if lock(&waiter.listing).status == Status::Killed => {
                        (Status::Killed, None)
                    }
                    None => (Status::Exited, None),
                },
                Some(Ok(Err(_))) => (Status::Exited, None),
                Some(Err(_)) => (Status::Timeout, None),
            };
            exec::kill_group(waiter.pgid);
            let listing = {
                let mut l = lock(&waiter.listing);
                if l.status != Status::Killed {
                    l.status = status;
                }
                l.exit_code = code;
                l.ended_ms = Some(clawbus_wire::now_ms());
                l.clone()
            };
            // Listed only once it went to the background (see below).
            if waiter
                .backgrounded
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                jobs.record(&listing).await;
            }
            let _ = tx.send(true);
        });
        if let Some(wait) = yield_after {
            let mut done = job.done.clone();
            let mut ended = tokio::time::timeout(wait, done.wait_for(|d| *d))
                .await
                .is_ok();
            if !ended && !explicit && self.running(agent) >= cfg.max_background {
                // No room in the background: wait in the foreground (the job's own
                // timeout ends it).
                ended = done.wait_for(|d| *d).await.is_ok();
            }
            if ended {
                // Done before the yield: answered like a foreground command, and not
                // kept as a session.
                let (text, dropped) = {
                    let o = lock(&job.output);
                    (String::from_utf8_lossy(&o.bytes).into_owned(), o.dropped)
                };
                let l = job.listing();
                lock(&self.jobs).remove(&id);
                let text = cut(text, dropped, cfg.exec_output_max_bytes);
                return Ok(finished_text(text, &l, job.timeout));
            }
        }
        job.backgrounded
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.record(&job.listing()).await;
        let tail = tail(&lock(&job.output).take_new(), 2000);
        Ok(format!(
            "status: running\nsessionId: {id}\nThe command runs in the background (killed after \
             {} s). Use the process tool with this sessionId to poll its output, read its log, \
             write to its input or kill it.{}",
            job.timeout.as_secs(),
            if tail.is_empty() {
                String::new()
            } else {
                format!("\nOutput so far:\n{tail}")
            }
        ))
    }

    /// Drops finished sessions older than the TTL.
    fn sweep(&self, cfg: &SandboxConfig) {
        let now = clawbus_wire::now_ms();
        let ttl = i64::try_from(cfg.process_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        lock(&self.jobs).retain(|_, j| {
            j.listing()
                .ended_ms
                .is_none_or(|e| now.saturating_sub(e) < ttl)
        });
    }

    /// Runs a `process` call for a session this replica holds (or `list`).
    pub async fn call(
        &self,
        cfg: &SandboxConfig,
        agent: &str,
        a: ProcessArgs,
    ) -> Result<String, ToolError> {
        self.sweep(cfg);
        if a.action == "list" {
            return Ok(self.list(agent).await);
        }
        let actions = ["poll", "log", "write", "kill", "clear", "remove"];
        if !actions.contains(&a.action.as_str()) {
            return Err(ToolError::bad(format!(
                "unknown action `{}`: one of list, {}",
                a.action.chars().take(32).collect::<String>(),
                actions.join(", ")
            )));
        }
        let id = a
            .session_id
            .as_deref()
            .ok_or_else(|| ToolError::bad(format!("`{}` needs a sessionId", a.action)))?;
        let job = lock(&self.jobs).get(id).cloned();
        // Another agent's session does not exist for this one.
        let Some(job) = job.filter(|j| j.listing().agent_id == agent) else {
            return Err(ToolError::bad(format!(
                "no background session `{}` (finished sessions are kept {} s)",
                id.chars().take(64).collect::<String>(),
                cfg.process_ttl_secs
            )));
        };
        let l = job.listing();
        match a.action.as_str() {
            "poll" => {
                let text = lock(&job.output).take_new();
                Ok(format!(
                    "{}\n{}",
                    status_line(&l, job.timeout),
                    if text.is_empty() {
                        "(no new output)".into()
                    } else {
                        text
                    }
                ))
            }
            "log" => Ok(log(&lock(&job.output), a.offset, a.limit)),
            "write" => {
                let data = a.data.unwrap_or_default();
                if data.len() > MAX_WRITE_BYTES {
                    return Err(ToolError::bad(format!(
                        "data is over {MAX_WRITE_BYTES} bytes"
                    )));
                }
                if l.status != Status::Running {
                    return Err(ToolError::bad(
                        "the command has ended; nothing reads its input",
                    ));
                }
                let mut stdin = job.stdin.lock().await;
                let Some(pipe) = stdin.as_mut() else {
                    return Err(ToolError::bad("the command's input was closed (eof)"));
                };
                pipe.write_all(data.as_bytes()).await.map_err(|e| {
                    ToolError::bad(format!("the command does not read its input: {e}"))
                })?;
                let _ = pipe.flush().await;
                if a.eof == Some(true) {
                    *stdin = None;
                }
                Ok(format!(
                    "wrote {} bytes{}",
                    data.len(),
                    if a.eof == Some(true) {
                        " and closed the input"
                    } else {
                        ""
                    }
                ))
            }
            "kill" => {
                if l.status != Status::Running {
                    return Ok(format!("already ended: {}", status_line(&l, job.timeout)));
                }
                lock(&job.listing).status = Status::Killed;
                exec::kill_group(job.pgid);
                let mut done = job.done.clone();
                let _ = tokio::time::timeout(Duration::from_secs(5), done.wait_for(|d| *d)).await;
                Ok(format!("killed {id}"))
            }
            "clear" if l.status == Status::Running => Err(ToolError::bad(
                "the command still runs: kill it first, or use remove",
            )),
            _ => {
                // clear (ended) or remove (kill when running, then clear).
                if l.status == Status::Running {
                    lock(&job.listing).status = Status::Killed;
                    exec::kill_group(job.pgid);
                    let mut done = job.done.clone();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), done.wait_for(|d| *d)).await;
                }
                lock(&self.jobs).remove(id);
                self.unrecord(agent, id).await;
                Ok(format!("removed {id}"))
            }
        }
    }

    /// The agent's sessions on every replica (from `claw_processes`), or this
    /// replica's without the bucket.
    async fn list(&self, agent: &str) -> String {
        let mut all: Vec<Listing> = if self.kv.is_some() {
            self.listed(&format!("{agent}.>")).await
        } else {
            lock(&self.jobs)
                .values()
                .filter(|j| j.backgrounded.load(std::sync::atomic::Ordering::SeqCst))
                .map(|j| j.listing())
                .filter(|l| l.agent_id == agent)
                .collect()
        };
        if all.is_empty() {
            return "no background sessions".into();
        }
        all.sort_by_key(|l| l.started_ms);
        all.iter()
            .map(|l| {
                format!(
                    "{}  {}  {}  {}",
                    l.session_id,
                    match (&l.status, l.exit_code) {
                        (Status::Exited, Some(c)) => format!("exited {c}"),
                        (s, _) => format!("{s:?}").to_lowercase(),
                    },
                    l.name,
                    l.command.chars().take(80).collect::<String>()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Reads a command's stream into its session's output.
async fn pump<R: AsyncRead + Unpin>(r: Option<R>, job: &Job, cap: usize) {
    let Some(mut r) = r else { return };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => lock(&job.output).push(&buf[..n], cap),
        }
    }
}

/// `log`: lines of the kept output, `offset` from the first kept line, or the last
/// `limit` lines.
fn log(out: &Output, offset: Option<usize>, limit: Option<usize>) -> String {
    let text = String::from_utf8_lossy(&out.bytes);
    let lines: Vec<&str> = text.lines().collect();
    let limit = limit.unwrap_or(DEFAULT_LOG_LINES).max(1);
    let from = offset
        .unwrap_or_else(|| lines.len().saturating_sub(limit))
        .min(lines.len());
    let shown: Vec<&str> = lines.iter().skip(from).take(limit).copied().collect();
    let mut s = format!(
        "lines {}-{} of {}{}\n",
        from,
        from + shown.len(),
        lines.len(),
        if out.dropped > 0 {
            format!(" (the first {} bytes were dropped)", out.dropped)
        } else {
            String::new()
        }
    );
    s.push_str(&shown.join("\n"));
    s
}

fn status_line(l: &Listing, timeout: Duration) -> String {
    match (&l.status, l.exit_code) {
        (Status::Running, _) => "status: running".into(),
        (Status::Exited, Some(c)) => format!("status: exited with code {c}"),
        (Status::Exited, None) => "status: killed by a signal (a resource limit?)".into(),
        (Status::Killed, _) => "status: killed".into(),
        (Status::Timeout, _) => format!("status: killed after {} s (timeout)", timeout.as_secs()),
        (Status::Lost, _) => "status: lost (its sandbox replica stopped)".into(),
    }
}

/// A command that ended within its yield, told as a foreground one is.
fn finished_text(mut text: String, l: &Listing, timeout: Duration) -> String {
    match (&l.status, l.exit_code) {
        (Status::Timeout, _) => {
            return format!(
                "Error: the command was killed after {:.0} s (timeout); everything it started \
                 was stopped.",
                timeout.as_secs_f64()
            )
        }
        (Status::Exited, Some(0)) => {}
        (Status::Exited, Some(c)) => text.push_str(&format!("\n[exit code {c}]")),
        _ => text.push_str("\n[killed by a signal: a resource limit, or the command itself]"),
    }
    if text.is_empty() {
        "(no output)".into()
    } else {
        text
    }
}

/// The first `cap` bytes of a finished command's output, with a note of the rest
/// (and of what the session's buffer dropped).
fn cut(mut text: String, dropped: usize, cap: usize) -> String {
    let mut more = dropped;
    if text.len() > cap {
        let mut end = cap;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        more += text.len() - end;
        text.truncate(end);
    }
    if more > 0 {
        text.push_str(&format!("\n[output cut: {more} more bytes]"));
    }
    text
}

fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// A short name for a command: its program and first argument.
fn short_name(command: &str) -> String {
    command
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(40)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_the_newest_bytes_and_polls_each_once() {
        let mut o = Output::default();
        o.push(b"hello\n", 10);
        assert_eq!(o.take_new(), "hello\n");
        assert_eq!(o.take_new(), "");
        o.push(b"0123456789abc", 10);
        assert_eq!(o.bytes, b"3456789abc");
        let s = o.take_new();
        assert!(s.starts_with("[3 bytes dropped]"), "{s}");
        assert!(s.ends_with("3456789abc"), "{s}");
    }

    #[test]
    fn log_pages_by_lines() {
        let mut o = Output::default();
        o.push(b"a\nb\nc\nd\n", 1000);
        assert!(log(&o, None, Some(2)).ends_with("c\nd"));
        assert!(log(&o, Some(1), Some(2)).ends_with("b\nc"));
        assert!(log(&o, Some(10), None).starts_with("lines 4-4 of 4"));
    }

    #[test]
    fn the_session_id_names_its_replica() {
        let a: ProcessArgs = serde_json::from_value(
            serde_json::json!({"action": "poll", "sessionId": "0a1b2c3d-sandbox-1"}),
        )
        .unwrap();
        assert_eq!(a.replica(), Some("sandbox-1"));
    }
}
