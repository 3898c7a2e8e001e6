//! Workspace file tools. Every path is resolved inside the agent's workspace through a
//! capability handle on its directory (cap-std): `..`, absolute paths, and symlinks
//! that lead outside are refused by construction, not by string checks. Files with
//! more than one hard link (a link to a file elsewhere) and anything but regular files
//! and directories are refused; writes go to a temporary file renamed into place.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use cap_std::fs::{Dir, MetadataExt, OpenOptions};
use clawbus_config::SandboxConfig;
use serde::Deserialize;

use crate::ToolError;

/// Entries `ls` lists at most.
const LS_MAX: usize = 1000;

/// An agent's workspace, opened as a capability.
pub struct Workspace {
    dir: Dir,
}

impl Workspace {
    /// Opens (creating, 0700) the workspace directory.
    pub fn open(path: &Path) -> Result<Workspace, ToolError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| ToolError::internal(format!("workspace unavailable: {e}")))?;
        let dir = Dir::open_ambient_dir(path, cap_std::ambient_authority())
            .map_err(|e| ToolError::internal(format!("workspace unavailable: {e}")))?;
        Ok(Workspace { dir })
    }
}

/// A path argument as a path inside the workspace: relative, or absolute under
/// `/workspace` (what `exec` sees); never empty, never with NUL.
pub fn relative(path: &str) -> Result<PathBuf, ToolError> {
    if path.contains('\0') {
        return Err(ToolError::bad("the path contains a NUL character"));
    }
    let p = Path::new(path.trim());
    let p = match p.strip_prefix("/workspace") {
        Ok(rest) => rest,
        Err(_) if p.is_absolute() => {
            return Err(ToolError::denied(format!(
                "`{path}` is outside the workspace: use a path relative to it"
            )))
        }
        Err(_) => p,
    };
    // `..` that would climb above the workspace is refused here with a clear message
    // (cap-std would refuse it too).
    let mut depth = 0i32;
    for c in p.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(ToolError::denied(format!(
                "`{path}` leads outside the workspace"
            )));
        }
    }
    let clean: PathBuf = p
        .components()
        .filter(|c| !matches!(c, Component::CurDir | Component::RootDir))
        .collect();
    Ok(if clean.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        clean
    })
}

/// Maps an I/O error of a workspace operation to what the model is told.
fn io(path: &str, e: std::io::Error) -> ToolError {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound => ToolError::bad(format!("`{path}` does not exist")),
        PermissionDenied => ToolError::denied(format!(
            "`{path}` is outside the workspace or not accessible"
        )),
        _ if e.to_string().contains("outside of the filesystem") => {
            ToolError::denied(format!("`{path}` leads outside the workspace"))
        }
        IsADirectory => ToolError::bad(format!("`{path}` is a directory")),
        _ => ToolError::bad(format!("`{path}`: {e}")),
    }
}

/// Checks that `path` is a regular file with one link.
pub(crate) fn regular_file(ws: &Workspace, rel: &Path, path: &str) -> Result<u64, ToolError> {
    let m = ws.dir.metadata(rel).map_err(|e| io(path, e))?;
    if m.is_dir() {
        return Err(ToolError::bad(format!("`{path}` is a directory")));
    }
    if !m.is_file() {
        return Err(ToolError::denied(format!(
            "`{path}` is not a regular file (devices, sockets and pipes are refused)"
        )));
    }
    if m.nlink() > 1 {
        return Err(ToolError::denied(format!(
            "`{path}` has several hard links; it may be a file outside the workspace"
        )));
    }
    Ok(m.len())
}

/// The whole text of a regular file of at most `max` bytes.
pub(crate) fn read_text(
    ws: &Workspace,
    rel: &Path,
    path: &str,
    max: usize,
) -> Result<String, ToolError> {
    let size = regular_file(ws, rel, path)?;
    if size > max as u64 {
        return Err(ToolError::bad(format!(
            "`{path}` is over the {max}-byte limit"
        )));
    }
    ws.dir.read_to_string(rel).map_err(|e| io(path, e))
}

/// Removes a regular file.
pub(crate) fn remove(ws: &Workspace, rel: &Path, path: &str) -> Result<(), ToolError> {
    regular_file(ws, rel, path)?;
    ws.dir.remove_file(rel).map_err(|e| io(path, e))
}

/// The workspace's directory handle (for tools that walk it).
pub(crate) fn dir(ws: &Workspace) -> &Dir {
    &ws.dir
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadArgs {
    path: String,
    #[serde(default)]
    offset: Option<usize>,
    #[serde(default)]
    limit: Option<usize>,
}

pub fn read(ws: &Workspace, cfg: &SandboxConfig, a: ReadArgs) -> Result<String, ToolError> {
    let rel = relative(&a.path)?;
    let size = regular_file(ws, &rel, &a.path)?;
    let file = ws
        .dir
        .open_with(&rel, OpenOptions::new().read(true))
        .map_err(|e| io(&a.path, e))?;
    let mut bytes = Vec::new();
    file.take(cfg.read_max_bytes as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| io(&a.path, e))?;
    if bytes.contains(&0) {
        return Err(ToolError::bad(format!(
            "`{}` is a binary file; read text files only",
            a.path
        )));
    }
    let text = String::from_utf8_lossy(&bytes);
    let first = a.offset.unwrap_or(1).max(1);
    let lines: Vec<&str> = text.lines().collect();
    let take = a.limit.unwrap_or(usize::MAX);
    let mut out: String = lines
        .iter()
        .skip(first - 1)
        .take(take)
        .map(|l| format!("{l}\n"))
        .collect();
    if size > cfg.read_max_bytes as u64 {
        out.push_str(&format!(
            "[file cut: {} of {size} bytes read; use offset and limit for the rest]\n",
            cfg.read_max_bytes
        ));
    }
    if first > 1 && first > lines.len() {
        return Err(ToolError::bad(format!(
            "offset {first} is past the end of `{}` ({} lines)",
            a.path,
            lines.len()
        )));
    }
    Ok(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteArgs {
    path: String,
    content: String,
}

pub fn write(ws: &Workspace, cfg: &SandboxConfig, a: WriteArgs) -> Result<String, ToolError> {
    if a.content.len() > cfg.write_max_bytes {
        return Err(ToolError::bad(format!(
            "content of {} bytes is over the {}-byte limit",
            a.content.len(),
            cfg.write_max_bytes
        )));
    }
    let rel = relative(&a.path)?;
    replace(ws, &rel, &a.path, a.content.as_bytes())?;
    Ok(format!("wrote {} bytes to {}", a.content.len(), a.path))
}

/// Writes `bytes` to a temporary file beside `rel` and renames it into place.
pub(crate) fn replace(
    ws: &Workspace,
    rel: &Path,
    path: &str,
    bytes: &[u8],
) -> Result<(), ToolError> {
    let name = rel
        .file_name()
        .ok_or_else(|| ToolError::bad(format!("`{path}` is not a file name")))?;
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        // An existing parent is resolved inside the workspace (a symlink leading out
        // is refused here); a missing one is created.
        match ws.dir.metadata(p) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(ToolError::bad(format!("a parent of `{path}` is a file"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ws.dir.create_dir_all(p).map_err(|e| io(path, e))?
            }
            Err(e) => return Err(io(path, e)),
        }
    }
    if let Ok(m) = ws.dir.symlink_metadata(rel) {
        if m.is_dir() {
            return Err(ToolError::bad(format!("`{path}` is a directory")));
        }
    }
    let tmp_name = format!(
        ".{}.clawbus-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    );
    let tmp = parent.map_or_else(|| PathBuf::from(&tmp_name), |p| p.join(&tmp_name));
    let written = (|| {
        let mut f = ws
            .dir
            .open_with(&tmp, OpenOptions::new().write(true).create_new(true))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        ws.dir.rename(&tmp, &ws.dir, rel)
    })();
    if let Err(e) = written {
        let _ = ws.dir.remove_file(&tmp);
        return Err(io(path, e));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditArgs {
    path: String,
    #[serde(rename = "oldText")]
    old_text: String,
    #[serde(rename = "newText")]
    new_text: String,
}

pub fn edit(ws: &Workspace, cfg: &SandboxConfig, a: EditArgs) -> Result<String, ToolError> {
    if a.old_text.is_empty() {
        return Err(ToolError::bad("oldText is empty"));
    }
    let rel = relative(&a.path)?;
    let text = read_text(ws, &rel, &a.path, cfg.write_max_bytes)?;
    let n = text.matches(&a.old_text).count();
    match n {
        0 => Err(ToolError::bad(format!(
            "oldText was not found in `{}` (it must match exactly, whitespace included)",
            a.path
        ))),
        1 => {
            let new = text.replacen(&a.old_text, &a.new_text, 1);
            if new.len() > cfg.write_max_bytes {
                return Err(ToolError::bad("the edited file would be over the limit"));
            }
            replace(ws, &rel, &a.path, new.as_bytes())?;
            Ok(format!("edited {}", a.path))
        }
        n => Err(ToolError::bad(format!(
            "oldText occurs {n} times in `{}`; include more context to make it unique",
            a.path
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LsArgs {
    #[serde(default)]
    path: Option<String>,
}

pub fn ls(ws: &Workspace, a: LsArgs) -> Result<String, ToolError> {
    let path = a.path.unwrap_or_else(|| ".".into());
    let rel = relative(&path)?;
    let mut entries: Vec<(String, String)> = Vec::new();
    for e in ws.dir.read_dir(&rel).map_err(|e| io(&path, e))? {
        let e = e.map_err(|e| io(&path, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let kind = match e.file_type() {
            Ok(t) if t.is_dir() => "dir".to_owned(),
            Ok(t) if t.is_symlink() => "link".to_owned(),
            Ok(t) if t.is_file() => e
                .metadata()
                .map(|m| format!("{} bytes", m.len()))
                .unwrap_or_else(|_| "file".into()),
            _ => "other".to_owned(),
        };
        entries.push((name, kind));
    }
    entries.sort();
    let total = entries.len();
    let mut out: String = entries
        .iter()
        .take(LS_MAX)
        .map(|(n, k)| format!("{n}\t{k}\n"))
        .collect();
    if total > LS_MAX {
        out.push_str(&format!("[{} more entries not listed]\n", total - LS_MAX));
    }
    if out.is_empty() {
        out = "(empty)\n".into();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_relative_and_inside() {
        assert_eq!(relative("a/b.txt").unwrap(), PathBuf::from("a/b.txt"));
        assert_eq!(relative("./a").unwrap(), PathBuf::from("a"));
        assert_eq!(relative("/workspace/a").unwrap(), PathBuf::from("a"));
        assert_eq!(relative("/workspace").unwrap(), PathBuf::from("."));
        assert_eq!(relative("a/../b").unwrap(), PathBuf::from("a/../b"));
        for bad in [
            "../x",
            "a/../../x",
            "/etc/passwd",
            "/workspacex/../etc",
            "a\0b",
        ] {
            assert!(relative(bad).is_err(), "{bad}");
        }
    }
}
