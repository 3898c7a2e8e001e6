//! `memory_search` and `memory_get` over the agent's memory files: `MEMORY.md` and
//! `memory/*.md` of its workspace (OpenClaw's layout). The search is by keywords:
//! lines holding the most of the query's words first.

use std::path::{Path, PathBuf};

use clawbus_config::SandboxConfig;
use serde::Deserialize;

use crate::files::{dir, read_text, relative, Workspace};
use crate::ToolError;

/// Lines a search returns at most.
const HITS: usize = 20;

/// The memory files of the workspace that exist, as (path for people, path inside).
fn memory_files(ws: &Workspace) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if dir(ws).metadata("MEMORY.md").is_ok_and(|m| m.is_file()) {
        out.push(("MEMORY.md".to_owned(), PathBuf::from("MEMORY.md")));
    }
    if let Ok(entries) = dir(ws).read_dir("memory") {
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".md"))
            .collect();
        names.sort();
        out.extend(
            names
                .into_iter()
                .map(|n| (format!("memory/{n}"), Path::new("memory").join(n))),
        );
    }
    out
}

/// Whether a path names a memory file.
fn is_memory(rel: &Path) -> bool {
    rel == Path::new("MEMORY.md")
        || (rel.parent() == Some(Path::new("memory")) && rel.extension().is_some_and(|e| e == "md"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchArgs {
    query: String,
    #[serde(default, rename = "maxResults")]
    max_results: Option<usize>,
}

pub fn search(ws: &Workspace, cfg: &SandboxConfig, a: SearchArgs) -> Result<String, ToolError> {
    let words: Vec<String> = a
        .query
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 1)
        .map(str::to_owned)
        .collect();
    if words.is_empty() {
        return Err(ToolError::bad("the query has no words to look for"));
    }
    let mut hits: Vec<(usize, String, usize, String)> = Vec::new();
    for (name, rel) in memory_files(ws) {
        let Ok(text) = read_text(ws, &rel, &name, cfg.read_max_bytes) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            let score = words.iter().filter(|w| lower.contains(w.as_str())).count();
            if score > 0 {
                hits.push((score, name.clone(), i + 1, line.trim().to_owned()));
            }
        }
    }
    if hits.is_empty() {
        return Ok("No matches in MEMORY.md or memory/*.md.".into());
    }
    // Most words first, then file order.
    hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let n = a.max_results.unwrap_or(HITS).clamp(1, 100);
    Ok(hits
        .iter()
        .take(n)
        .map(|(_, f, l, t)| format!("{f}:{l}: {t}\n"))
        .collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetArgs {
    path: String,
    #[serde(default)]
    from: Option<usize>,
    #[serde(default)]
    lines: Option<usize>,
}

pub fn get(ws: &Workspace, cfg: &SandboxConfig, a: GetArgs) -> Result<String, ToolError> {
    let rel = relative(&a.path)?;
    if !is_memory(&rel) {
        return Err(ToolError::denied(format!(
            "`{}` is not a memory file (MEMORY.md or memory/*.md); use read for other files",
            a.path
        )));
    }
    let text = read_text(ws, &rel, &a.path, cfg.read_max_bytes)?;
    let from = a.from.unwrap_or(1).max(1);
    Ok(text
        .lines()
        .skip(from - 1)
        .take(a.lines.unwrap_or(usize::MAX))
        .map(|l| format!("{l}\n"))
        .collect())
}
