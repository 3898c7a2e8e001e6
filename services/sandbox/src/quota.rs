//! The workspace quota (`sandbox.workspace_max_bytes`), and, as root, the hand-over of
//! the workspace's files to the box's unprivileged user.
//!
//! The workspace is measured by walking it through directory descriptors, never
//! following a symlink (a box may swap a directory for a link while it is walked):
//! allocated blocks, each entry counted at least [`MIN_ENTRY`] so that millions of
//! empty files cost too. `exec` measures before a command (its file size limit is what
//! is left, 0 when the workspace is full) and while it runs (a command that grows the
//! workspace past the quota is killed); the file tools measure before they write.

use std::os::fd::AsFd;
use std::path::Path;

use cap_std::fs::{Dir, MetadataExt};
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{fchown, fchownat, Gid, Uid};

use crate::ToolError;

/// What one file, directory or link counts at least (an inode and a block).
pub const MIN_ENTRY: u64 = 4096;

/// Who should own the workspace's entries (as root: the box's user), if anyone.
#[derive(Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Bytes the workspace at `path` holds; with `owner`, entries owned by someone else
/// are given to it on the way (files with several hard links are left as they are:
/// one may be a file outside the workspace).
pub fn usage(path: &Path, owner: Option<Owner>) -> Result<u64, ToolError> {
    let fail = |e: std::io::Error| {
        ToolError::internal(format!("the workspace could not be measured: {e}"))
    };
    // A descriptor that can be read and changed (not a path-only one).
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(e.into()))?;
    let root = Dir::from_std_file(std::fs::File::from(fd));
    if let Some(o) = owner {
        let m = root.dir_metadata().map_err(fail)?;
        if m.uid() != o.uid || m.gid() != o.gid {
            fchown(
                root.as_fd(),
                Some(Uid::from_raw(o.uid)),
                Some(Gid::from_raw(o.gid)),
            )
            .map_err(|e| fail(e.into()))?;
        }
    }
    let mut total = MIN_ENTRY;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for entry in dir.entries().map_err(fail)? {
            let entry = entry.map_err(fail)?;
            // Of the entry itself, not what a link points at.
            let m = match entry.metadata() {
                Ok(m) => m,
                // Gone meanwhile (a command deleting files).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(fail(e)),
            };
            total = total.saturating_add((m.blocks() * 512).max(MIN_ENTRY));
            let name = entry.file_name();
            if let Some(o) = owner {
                let single = m.is_dir() || m.nlink() <= 1;
                if single && (m.uid() != o.uid || m.gid() != o.gid) {
                    let _ = fchownat(
                        dir.as_fd(),
                        name.as_os_str(),
                        Some(Uid::from_raw(o.uid)),
                        Some(Gid::from_raw(o.gid)),
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    );
                }
            }
            if m.is_dir() {
                let flags =
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
                match openat(dir.as_fd(), name.as_os_str(), flags, Mode::empty()) {
                    Ok(fd) => stack.push(Dir::from_std_file(std::fs::File::from(fd))),
                    // Replaced by a link or removed meanwhile: not followed.
                    Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ELOOP) => {}
                    Err(nix::errno::Errno::ENOTDIR) => {}
                    Err(e) => return Err(fail(e.into())),
                }
            }
        }
    }
    Ok(total)
}

/// The error a write past the quota gets.
pub fn full(used: u64, max: u64) -> ToolError {
    ToolError::denied(format!(
        "the workspace is full: {used} bytes used of {max} (sandbox.workspace_max_bytes); \
         delete files before writing more"
    ))
}

/// Refuses a write of `adding` bytes that would take the workspace past `max`.
pub fn check_room(path: &Path, adding: u64, max: u64) -> Result<(), ToolError> {
    let used = usage(path, None)?;
    if used.saturating_add(adding) > max {
        return Err(full(used, max));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_blocks_and_entries_and_follows_no_link() {
        let d = tempfile::tempdir().unwrap();
        let empty = usage(d.path(), None).unwrap();
        assert_eq!(empty, MIN_ENTRY);
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::fs::write(d.path().join("a/big"), vec![1u8; 1 << 20]).unwrap();
        for i in 0..10 {
            std::fs::write(d.path().join(format!("e{i}")), "").unwrap();
        }
        // A link to the workspace itself and one out of it are counted, not walked.
        std::os::unix::fs::symlink(d.path(), d.path().join("a/loop")).unwrap();
        std::os::unix::fs::symlink("/usr", d.path().join("usr")).unwrap();
        let used = usage(d.path(), None).unwrap();
        assert!(used >= (1 << 20) + 13 * MIN_ENTRY, "{used}");
        assert!(used < (1 << 20) + 20 * MIN_ENTRY, "{used}");
        assert!(check_room(d.path(), 0, used).is_ok());
        let e = check_room(d.path(), 1, used).unwrap_err();
        assert!(e.message.contains("workspace is full"), "{}", e.message);
    }
}
