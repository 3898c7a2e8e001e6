//! `apply_patch`: a unified diff (one or several files, as `git diff` or `diff -u`
//! write it) applied to the workspace, all or nothing: every file's new content is
//! computed first, and only when every hunk applies are the files written (each
//! atomically). `--- /dev/null` creates a file, `+++ /dev/null` deletes one.

use std::path::PathBuf;

use clawbus_config::SandboxConfig;
use serde::Deserialize;

use crate::files::{read_text, relative, remove, replace, Workspace};
use crate::ToolError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchArgs {
    patch: String,
}

/// What a patch does to one file.
enum Change {
    Write(PathBuf, String, String),
    Delete(PathBuf, String),
}

/// The patch split into one text per file (each from its `---` line).
fn files(patch: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let lines: Vec<&str> = patch.split_inclusive('\n').collect();
    for (i, l) in lines.iter().enumerate() {
        let starts =
            l.starts_with("--- ") && lines.get(i + 1).is_some_and(|n| n.starts_with("+++ "));
        if starts {
            out.push(String::new());
        }
        if let Some(f) = out.last_mut() {
            f.push_str(l);
        }
    }
    out
}

/// A diff file name as a workspace path: `a/` and `b/` prefixes and a timestamp after
/// a tab dropped; `None` for `/dev/null`.
fn name(n: &str) -> Option<&str> {
    let n = n.split('\t').next().unwrap_or(n).trim();
    if n == "/dev/null" {
        return None;
    }
    Some(
        n.strip_prefix("a/")
            .or_else(|| n.strip_prefix("b/"))
            .unwrap_or(n),
    )
}

pub fn apply(ws: &Workspace, cfg: &SandboxConfig, a: PatchArgs) -> Result<String, ToolError> {
    if a.patch.len() > cfg.write_max_bytes {
        return Err(ToolError::bad("the patch is over the write limit"));
    }
    let sections = files(&a.patch);
    if sections.is_empty() {
        return Err(ToolError::bad(
            "no file in the patch: a unified diff has `--- a/<path>` and `+++ b/<path>` lines",
        ));
    }
    let mut changes = Vec::new();
    for text in &sections {
        let p = diffy::Patch::from_str(text)
            .map_err(|e| ToolError::bad(format!("the patch does not parse: {e}")))?;
        let (old, new) = (p.original().and_then(name), p.modified().and_then(name));
        match (old, new) {
            (None, Some(path)) => {
                let content =
                    diffy::apply("", &p).map_err(|e| ToolError::bad(format!("`{path}`: {e}")))?;
                changes.push(Change::Write(relative(path)?, path.to_owned(), content));
            }
            (Some(path), None) => changes.push(Change::Delete(relative(path)?, path.to_owned())),
            (Some(path), Some(_)) => {
                let rel = relative(path)?;
                let base = read_text(ws, &rel, path, cfg.write_max_bytes)?;
                let content = diffy::apply(&base, &p).map_err(|e| {
                    ToolError::bad(format!(
                        "`{path}`: {e}; nothing was changed (read the file again and make \
                         the patch match it)"
                    ))
                })?;
                changes.push(Change::Write(rel, path.to_owned(), content));
            }
            (None, None) => return Err(ToolError::bad("a patch section names no file")),
        }
    }
    let mut done = Vec::new();
    for c in changes {
        match c {
            Change::Write(rel, path, content) => {
                if content.len() > cfg.write_max_bytes {
                    return Err(ToolError::bad(format!("`{path}` would be over the limit")));
                }
                replace(ws, &rel, &path, content.as_bytes())?;
                done.push(format!("updated {path}"));
            }
            Change::Delete(rel, path) => {
                remove(ws, &rel, &path)?;
                done.push(format!("deleted {path}"));
            }
        }
    }
    Ok(done.join("\n"))
}
