//! How a box is started, so that nothing of the host shows or opens inside it.
//!
//! - **The box's host user.** bubblewrap maps the box's user (uid 1000 inside) to the
//!   user that runs it. As root that would be host uid 0, which owns `/etc/shadow` and
//!   every root-only file, so as root bubblewrap runs as `sandbox.run_as_uid`/`gid`
//!   (65534, `nobody`, unless set), dropped with `setpriv` (no supplementary groups).
//!   That user cannot reach the state directory (owner-only), so the workspace is
//!   bound first, in a private mount namespace of its own (`unshare --mount`), at a
//!   neutral path (`/tmp/workspace` on a fresh tmpfs) from a descriptor opened as root;
//!   the workspace's files are handed to that user before each command (see
//!   [`crate::quota`]). As another user the box runs as that user.
//! - **No nested user namespaces**: `--disable-userns` where bubblewrap has it (0.8+).
//! - **No host path in `/proc/*/cmdline`**: bubblewrap's arguments go through a pipe
//!   (`--args`), so the box's init shows `bwrap --args 3` and nothing else.
//!
//! What bubblewrap supports is read once from `bwrap --help`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use clawbus_config::SandboxConfig;

use crate::exec::which;
use crate::ToolError;

/// Where the workspace is bound for bubblewrap, in the launcher's mount namespace.
pub const NEUTRAL_WORKSPACE: &str = "/tmp/workspace";

/// The shell that starts bubblewrap. Arguments: the cgroup's `cgroup.procs` (or ""),
/// the workspace (or "": no private mount namespace), the uid and gid to drop to (or
/// ""), how many of bubblewrap's arguments are options (sent through the pipe), then
/// bubblewrap's program and arguments.
const LAUNCHER: &str = r#"set -e
cg=$1 ws=$2 uid=$3 gid=$4 n=$5
shift 5
if [ -n "$cg" ]; then echo $$ > "$cg"; fi
if [ -n "$ws" ]; then
  exec 5<"$ws"
  mount -t tmpfs -o size=64k,mode=0755 clawbus-box /tmp
  mkdir /tmp/workspace
  mount --no-canonicalize --bind /proc/self/fd/5 /tmp/workspace
  exec 5<&-
fi
bwrap=$1
shift
"#;

/// What this host's bubblewrap and tools allow.
#[derive(Debug, Clone, Default)]
pub struct Support {
    pub disable_userns: bool,
    pub tmpfs_size: bool,
    /// `unshare`, `mount` and `setpriv` (util-linux), needed as root.
    pub drop_tools: bool,
}

/// Reads what bubblewrap supports (once per process).
pub fn support(cfg: &SandboxConfig) -> &'static Support {
    static SUPPORT: OnceLock<Support> = OnceLock::new();
    SUPPORT.get_or_init(|| {
        let help = which(&cfg.bwrap)
            .and_then(|b| std::process::Command::new(b).arg("--help").output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let s = Support {
            disable_userns: help.contains("--disable-userns"),
            tmpfs_size: help.contains("--size"),
            drop_tools: ["unshare", "mount", "setpriv"]
                .iter()
                .all(|t| which(t).is_some()),
        };
        tracing::info!(
            disable_userns = s.disable_userns,
            tmpfs_size = s.tmpfs_size,
            as_root = as_root(),
            "Bubblewrap support read"
        );
        s
    })
}

/// Whether this sandbox runs as root (and so drops to `run_as_uid` for boxes).
pub fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The box's user on the host: `run_as_uid` as root, this process's user otherwise.
pub fn box_uid(cfg: &SandboxConfig) -> u32 {
    if as_root() {
        cfg.run_as_uid
    } else {
        nix::unistd::geteuid().as_raw()
    }
}

/// The command line that starts bubblewrap (`bwrap`) with `options` and then
/// `command` (after `--`) for a workspace, joining `cgroup_procs` first when given.
pub fn argv(
    cfg: &SandboxConfig,
    workspace: &Path,
    cgroup_procs: Option<PathBuf>,
    bwrap: &Path,
    options: Vec<String>,
    command: Vec<String>,
) -> Result<Vec<String>, ToolError> {
    let root = as_root();
    if root && !support(cfg).drop_tools {
        return Err(ToolError::unavailable(
            "as root, exec needs `unshare`, `mount` and `setpriv` (util-linux) to run \
             commands as an unprivileged user; install util-linux",
        ));
    }
    let mut v: Vec<String> = Vec::new();
    if root {
        v.extend(["unshare", "--mount", "--propagation", "private", "--"].map(String::from));
    }
    // The options go through a pipe on fd 3 (the command's standard input stays the
    // caller's, kept on fd 4 meanwhile); the command after `--` stays on the command
    // line, as bubblewrap reads only options from `--args`.
    let exec = if root {
        r#"setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$bwrap" --args 3 "$@""#
    } else {
        r#""$bwrap" --args 3 "$@""#
    };
    let script = format!(
        "{LAUNCHER}exec 4<&0\n{{ i=0; for a; do if [ $i -lt \"$n\" ]; then printf '%s\\0' \"$a\"; \
         fi; i=$((i+1)); done; }} 4<&- | {{ exec 3<&0 0<&4 4<&-; while [ \"$n\" -gt 0 ]; do \
         shift; n=$((n-1)); done; exec {exec}; }}\n"
    );
    v.extend(["/bin/sh".into(), "-c".into(), script, "clawbus-box".into()]);
    v.push(
        cgroup_procs
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    );
    if root {
        v.push(workspace.display().to_string());
        v.push(cfg.run_as_uid.to_string());
        v.push(cfg.run_as_gid.to_string());
    } else {
        v.extend([String::new(), String::new(), String::new()]);
    }
    v.push(options.len().to_string());
    v.push(bwrap.display().to_string());
    v.extend(options);
    v.push("--".into());
    v.extend(command);
    Ok(v)
}

/// The host path bubblewrap binds at `/workspace`.
pub fn bind_source(workspace: &Path) -> PathBuf {
    if as_root() {
        PathBuf::from(NEUTRAL_WORKSPACE)
    } else {
        workspace.to_path_buf()
    }
}
