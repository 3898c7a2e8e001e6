//! Reads of an agent's workspace that never leave it.
//!
//! A model with `exec` can put anything in its workspace, symbolic links included
//! (`ln -s /proc/self/environ USER.md`, `ln -s ../gateway.token AGENTS.md`). Every
//! service that reads workspace content outside the sandbox's box (the agent's context
//! files and skills, later the store's memory index) reads it through [`Confined`]:
//!
//! - paths resolve relative to a handle on the workspace directory (cap-std), so `..`,
//!   absolute paths and symbolic links that lead outside are refused by construction;
//!   a link to another file inside the workspace is followed;
//! - the file is opened first and checked afterwards, on the open handle (no race
//!   between check and read): only regular files with one hard link are read (a second
//!   link may be a file outside the workspace);
//! - files are opened non-blocking, so a named pipe cannot stall the reader.
//!
//! Every refusal says why ([`Refusal`]), so the reader can tell the model and the log.

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

use cap_std::fs::{Dir, MetadataExt, OpenOptions, OpenOptionsExt};

/// Why a workspace path was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it does not exist")]
    Missing,
    #[error("it leads outside the workspace (a symbolic link or `..`); it was not read")]
    Escapes,
    #[error("it is not a regular file; it was not read")]
    NotRegular,
    #[error("it has several hard links and may be a file outside the workspace; it was not read")]
    HardLinked,
    #[error("it cannot be read: {0}")]
    Unreadable(String),
}

impl Refusal {
    /// A refusal worth telling about (everything but a file that is simply absent).
    pub fn is_hostile(&self) -> bool {
        matches!(
            self,
            Refusal::Escapes | Refusal::HardLinked | Refusal::NotRegular
        )
    }

    fn from_io(e: std::io::Error) -> Refusal {
        use std::io::ErrorKind::*;
        match e.kind() {
            NotFound => Refusal::Missing,
            // cap-std reports an escape as PermissionDenied ("a path led outside of the
            // filesystem"); a symlink loop is ELOOP (`FilesystemLoop` is unstable).
            PermissionDenied => Refusal::Escapes,
            _ if e.raw_os_error() == Some(nix::libc::ELOOP) => Refusal::Escapes,
            _ if e.raw_os_error() == Some(nix::libc::ENXIO) => Refusal::NotRegular,
            _ => Refusal::Unreadable(e.to_string()),
        }
    }
}

/// A file's text: at most the bytes asked for, and the file's whole size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub bytes: Vec<u8>,
    pub size: u64,
}

/// Size and modification time of a workspace entry, when it can be read.
pub type Stamp = Option<(u64, Option<std::time::SystemTime>)>;

/// An agent's workspace directory, opened as a capability.
pub struct Confined {
    dir: Dir,
    root: PathBuf,
}

impl Confined {
    /// Opens the workspace directory `root` (itself given by the configuration).
    pub fn open(root: &Path) -> std::io::Result<Confined> {
        let dir = Dir::open_ambient_dir(root, cap_std::ambient_authority())?;
        Ok(Confined {
            dir,
            root: root.to_owned(),
        })
    }

    /// The workspace directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads at most `max` bytes of the regular file `rel`, with its whole size.
    pub fn read(&self, rel: &Path, max: u64) -> Result<Contents, Refusal> {
        let mut file = self.open_file(rel)?;
        let size = file
            .metadata()
            .map_err(|e| Refusal::Unreadable(e.to_string()))?
            .len();
        let mut bytes = Vec::new();
        (&mut file)
            .take(max)
            .read_to_end(&mut bytes)
            .map_err(Refusal::from_io)?;
        Ok(Contents { bytes, size })
    }

    /// Opens the regular file `rel` for reading, checked on the open handle.
    pub fn open_file(&self, rel: &Path) -> Result<cap_std::fs::File, Refusal> {
        let mut opts = OpenOptions::new();
        opts.read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY);
        let file = self.dir.open_with(rel, &opts).map_err(Refusal::from_io)?;
        let meta = file.metadata().map_err(Refusal::from_io)?;
        if !meta.is_file() {
            return Err(Refusal::NotRegular);
        }
        if meta.nlink() > 1 {
            return Err(Refusal::HardLinked);
        }
        Ok(file)
    }

    /// Size and modification time of `rel` as [`Confined::read`] would see it; `None`
    /// when it is missing or refused.
    pub fn stamp(&self, rel: &Path) -> Stamp {
        let m = self.dir.metadata(rel).ok()?;
        Some((m.len(), m.modified().ok().map(|t| t.into_std())))
    }

    /// Names of the entries of the directory `rel` inside the workspace, at most `max`,
    /// sorted; empty when it is missing or refused.
    pub fn list(&self, rel: &Path, max: usize) -> Vec<String> {
        let Ok(entries) = self.dir.read_dir(rel) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .flatten()
            .take(max)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn ws() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("workspace");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(d.path().join("gateway.token"), "secret-token").unwrap();
        (d, root)
    }

    #[test]
    fn a_file_inside_is_read_and_capped() {
        let (_d, root) = ws();
        std::fs::write(root.join("AGENTS.md"), "hello world").unwrap();
        let c = Confined::open(&root).unwrap();
        let r = c.read(Path::new("AGENTS.md"), 5).unwrap();
        assert_eq!((r.bytes.as_slice(), r.size), (&b"hello"[..], 11));
        // A link to another file inside the workspace is fine.
        symlink("AGENTS.md", root.join("SOUL.md")).unwrap();
        assert_eq!(c.read(Path::new("SOUL.md"), 100).unwrap().size, 11);
    }

    #[test]
    fn links_leading_outside_are_refused() {
        let (d, root) = ws();
        symlink("../gateway.token", root.join("AGENTS.md")).unwrap();
        symlink(d.path().join("gateway.token"), root.join("USER.md")).unwrap();
        symlink("/proc/self/environ", root.join("TOOLS.md")).unwrap();
        std::fs::create_dir(root.join("skills")).unwrap();
        symlink(d.path(), root.join("skills/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        let c = Confined::open(&root).unwrap();
        for f in [
            "AGENTS.md",
            "USER.md",
            "TOOLS.md",
            "skills/up/gateway.token",
            "loop",
        ] {
            assert_eq!(c.read(Path::new(f), 100), Err(Refusal::Escapes), "{f}");
            assert_eq!(c.stamp(Path::new(f)), None, "{f}");
        }
        assert_eq!(
            c.read(Path::new("../gateway.token"), 100),
            Err(Refusal::Escapes)
        );
        assert!(c.list(Path::new("skills/up"), 10).is_empty());
    }

    #[test]
    fn hard_links_pipes_and_directories_are_refused() {
        let (d, root) = ws();
        std::fs::hard_link(d.path().join("gateway.token"), root.join("MEMORY.md")).unwrap();
        nix::unistd::mkfifo(&root.join("USER.md"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::create_dir(root.join("SOUL.md")).unwrap();
        let c = Confined::open(&root).unwrap();
        assert_eq!(
            c.read(Path::new("MEMORY.md"), 100),
            Err(Refusal::HardLinked)
        );
        // Opening a pipe would block until a writer came: it must not.
        assert_eq!(c.read(Path::new("USER.md"), 100), Err(Refusal::NotRegular));
        assert_eq!(c.read(Path::new("SOUL.md"), 100), Err(Refusal::NotRegular));
        assert_eq!(c.read(Path::new("none.md"), 100), Err(Refusal::Missing));
    }
}
