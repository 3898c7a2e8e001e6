//! The state directory is its owner's alone: it holds the database and its WAL (every
//! transcript), the logs, the gateway token, the NATS passwords and JetStream's store
//! (every message). `clawbus up` creates it 0700, and tightens one that existed before
//! (a user who made `~/.clawbus` for `clawbus.toml` got a 0755 directory): the
//! directory, the files in it, and `logs/`, `run/`, `credentials/` and `nats/` with
//! everything in them lose every group and other bit. It refuses a directory, or a file
//! in those places, that belongs to another user. Symbolic links are never followed
//! while tightening (a link's target is not ours to change); agent workspaces are left
//! as the sandbox keeps them (their files may be handed to the box's user), behind the
//! owner-only directory.
//!
//! Every process of the suite also runs with the umask 077, so whatever it creates is
//! owner-only whatever the umask it was started with.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Subdirectories tightened with everything in them.
const PRIVATE_SUBDIRS: [&str; 4] = ["logs", "run", "credentials", "nats"];

/// Makes everything this process creates from now on owner-only (umask 077).
pub fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// Creates the state directory (0700) or makes an existing one private; returns the
/// paths it had to tighten (empty for a directory that was already private).
pub fn prepare(state: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state)
        .with_context(|| format!("state directory {}", state.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    // The directory named (a symbolic link to it is fine: its target is checked).
    let meta =
        std::fs::metadata(state).with_context(|| format!("state directory {}", state.display()))?;
    if !meta.is_dir() {
        bail!("the state directory {} is not a directory", state.display());
    }
    let mut tightened = Vec::new();
    // The directory first: once it is 0700 and ours, nobody else can add, rename or
    // swap an entry while the rest is checked.
    tighten(state, &meta, me, &mut tightened)?;
    for entry in read_dir(state)? {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let name = entry.file_name();
        if PRIVATE_SUBDIRS.iter().any(|d| name == *d) && meta.is_dir() {
            tighten_tree(&path, &meta, me, &mut tightened)?;
        } else if !meta.is_dir() && !meta.file_type().is_symlink() {
            tighten(&path, &meta, me, &mut tightened)?;
        }
    }
    for d in PRIVATE_SUBDIRS.iter().take(3) {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(state.join(d))
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .with_context(|| format!("{}", state.join(d).display()))?;
    }
    Ok(tightened)
}

fn read_dir(dir: &Path) -> anyhow::Result<Vec<std::fs::DirEntry>> {
    std::fs::read_dir(dir)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot list {}", dir.display()))
}

/// Tightens `dir` and, depth first, everything in it (links left alone).
fn tighten_tree(
    dir: &Path,
    meta: &std::fs::Metadata,
    me: u32,
    tightened: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    tighten(dir, meta, me, tightened)?;
    for entry in read_dir(dir)? {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            tighten_tree(&path, &meta, me, tightened)?;
        } else {
            tighten(&path, &meta, me, tightened)?;
        }
    }
    Ok(())
}

/// Takes the group and other bits off `path` (not a link), which must be `me`'s.
fn tighten(
    path: &Path,
    meta: &std::fs::Metadata,
    me: u32,
    tightened: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    if meta.uid() != me {
        bail!(
            "{} belongs to uid {}, not to you (uid {me}); the state directory holds the \
             database, tokens and NATS passwords, so clawbus runs only in one that is \
             entirely yours: fix its owner, or set CLAWBUS_HOME to another directory",
            path.display(),
            meta.uid()
        );
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))
            .with_context(|| format!("cannot make {} private", path.display()))?;
        tightened.push(path.to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn an_open_state_directory_is_made_private_and_links_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let outside = tmp.path().join("outside.txt");
        std::fs::write(&outside, "not ours to change").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        for d in ["", "logs", "nats/jetstream", "workspace"] {
            std::fs::create_dir_all(state.join(d)).unwrap();
            std::fs::set_permissions(state.join(d), std::fs::Permissions::from_mode(0o755))
                .unwrap();
        }
        for f in [
            "clawbus.db",
            "logs/agent-0.log",
            "nats/jetstream/x.blk",
            "workspace/a",
        ] {
            std::fs::write(state.join(f), "x").unwrap();
            std::fs::set_permissions(state.join(f), std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        std::os::unix::fs::symlink(&outside, state.join("logs/link")).unwrap();
        let tightened = prepare(&state).unwrap();
        for p in [
            "",
            "logs",
            "run",
            "credentials",
            "nats",
            "nats/jetstream",
            "clawbus.db",
            "logs/agent-0.log",
            "nats/jetstream/x.blk",
        ] {
            assert_eq!(mode(&state.join(p)) & 0o077, 0, "{p}");
        }
        assert_eq!(mode(&state.join("clawbus.db")), 0o600);
        assert_eq!(mode(&outside), 0o644, "a link's target is left alone");
        assert_eq!(
            mode(&state.join("workspace/a")),
            0o644,
            "workspaces are the sandbox's"
        );
        assert_eq!(tightened.len(), 7, "{tightened:?}");
        assert!(prepare(&state).unwrap().is_empty(), "nothing left to do");
    }
}
