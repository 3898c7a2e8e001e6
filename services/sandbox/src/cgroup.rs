//! A process limit for `exec` that also holds when the sandbox runs as root (where
//! `RLIMIT_NPROC` is not enforced): each command runs in a pids cgroup of its own with
//! `pids.max = sandbox.processes`, so a fork bomb stops at the limit. Used when the
//! sandbox runs as root and a pids controller is writable (cgroup v1
//! `/sys/fs/cgroup/pids`, or v2 with `pids` enabled); `sandbox.cgroup = "off"` turns it
//! off. The command's shell moves itself into the cgroup before it starts anything
//! (`echo $$ > cgroup.procs && exec ...`), so every descendant is counted.
//!
//! The command cgroups of one agent are children of that agent's cgroup
//! (`<pid>-agent-<id>`), also limited to `sandbox.processes`: the limit holds for all
//! of an agent's boxes together, not once per call.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use clawbus_config::SandboxConfig;

/// Where this process's command cgroups go, when a pids controller is usable.
fn parent() -> Option<&'static Path> {
    static PARENT: OnceLock<Option<PathBuf>> = OnceLock::new();
    PARENT
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                return None;
            }
            let name = "clawbus-sandbox";
            let v1 = Path::new("/sys/fs/cgroup/pids");
            let v2 = Path::new("/sys/fs/cgroup");
            let found = if v1.join("pids.max").exists() || v1.join("cgroup.procs").exists() {
                Some(v1.join(name))
            } else if std::fs::read_to_string(v2.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|x| x == "pids"))
            {
                // Children of the root get a pids controller once it is delegated.
                let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+pids");
                Some(v2.join(name))
            } else {
                None
            };
            let dir = found?;
            match std::fs::create_dir_all(&dir) {
                Ok(()) if dir.join("pids.max").exists() || dir.join("cgroup.procs").exists() => {
                    // Under cgroup v2 the commands' cgroups need pids at this level too.
                    let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+pids");
                    sweep(&dir);
                    tracing::info!(cgroup = %dir.display(), "exec commands get a pids cgroup each");
                    Some(dir)
                }
                _ => {
                    tracing::warn!("No writable pids cgroup: as root, exec's process limit is the pid namespace and the timeout only");
                    None
                }
            }
        })
        .as_deref()
}

/// Removes the cgroups commands of sandbox processes no longer running left behind
/// (named `<pid>-<n>`): an empty cgroup directory goes with `rmdir`.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive && e.path().is_dir() {
            // An agent's cgroup holds its commands' cgroups: those go first.
            if let Ok(children) = std::fs::read_dir(e.path()) {
                for c in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(c.path());
                }
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// One command's cgroup; removed when dropped (after its processes are gone).
pub struct Cgroup {
    dir: PathBuf,
}

/// The cgroup of `agent`'s commands, limited to `cfg.processes` for all of them.
fn agent_dir(cfg: &SandboxConfig, agent: &str) -> Option<PathBuf> {
    static AGENTS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut known = AGENTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(d) = known.get(agent) {
        return Some(d.clone());
    }
    let dir = parent()?.join(format!("{}-agent-{agent}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&dir) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            tracing::warn!(cgroup = %dir.display(), error = %e, "Agent cgroup not made");
            return None;
        }
    }
    let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+pids");
    if let Err(e) = std::fs::write(dir.join("pids.max"), cfg.processes.to_string()) {
        tracing::warn!(cgroup = %dir.display(), error = %e, "Agent pids.max not written");
        return None;
    }
    known.insert(agent.to_owned(), dir.clone());
    Some(dir)
}

impl Cgroup {
    /// A new cgroup limited to `cfg.processes` processes, inside `agent`'s (limited
    /// to as many for all its commands), when one can be made.
    pub fn create(cfg: &SandboxConfig, agent: &str) -> Option<Cgroup> {
        if cfg.cgroup == "off" {
            return None;
        }
        let dir = agent_dir(cfg, agent)?.join(format!("{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).ok()?;
        let cg = Cgroup { dir };
        if std::fs::write(cg.dir.join("pids.max"), cfg.processes.to_string()).is_err() {
            tracing::warn!(cgroup = %cg.dir.display(), "pids.max not writable; no process limit for this command");
            return None;
        }
        Some(cg)
    }

    /// The file a process writes its pid to, to join.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // What the command left running goes first (cgroup v2 has cgroup.kill).
        let _ = std::fs::write(self.dir.join("cgroup.kill"), "1");
        if let Ok(procs) = std::fs::read_to_string(self.procs()) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let dir = self.dir.clone();
        // The kernel takes a moment to reap them; the directory goes once it has.
        std::thread::spawn(move || {
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            tracing::warn!(cgroup = %dir.display(), "Command cgroup not removed");
        });
    }
}
