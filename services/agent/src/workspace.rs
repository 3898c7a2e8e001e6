//! An agent's workspace and the context it gives the model.
//!
//! Each agent has a workspace directory — `<state>/workspace` for the default agent
//! `main`, `<state>/workspace-<agentId>` for the others, or `[agent.workspaces] <id>` —
//! created on first start with starter files. The system prompt carries the files
//! OpenClaw users already keep there (AGENTS.md, SOUL.md, TOOLS.md, IDENTITY.md,
//! USER.md, and BOOTSTRAP.md and MEMORY.md when present), each capped, plus a list of
//! the skills in `skills/*/SKILL.md` (name and description from their front matter).
//! An OpenClaw workspace copied in works unchanged.
//!
//! The assembled context is cached per agent and checked against the files' sizes and
//! modification times at most once a second, so a turn costs no file reads and an edit
//! shows within a second.
//!
//! The workspace is the model's to write (`exec`, `write`): every file is read through
//! [`Confined`], so a symbolic or hard link to a host file (the gateway token, the
//! agent's environment) is refused, logged, and shown to the model as refused instead
//! of its content.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clawbus_config::Config;
use clawbus_workspace::{Confined, Refusal, Stamp};

/// Files injected into the system prompt, in order; `true`: expected (a missing one
/// gets a marker line), `false`: only when present.
pub const CONTEXT_FILES: [(&str, bool); 7] = [
    ("AGENTS.md", true),
    ("SOUL.md", true),
    ("TOOLS.md", true),
    ("IDENTITY.md", true),
    ("USER.md", true),
    ("BOOTSTRAP.md", false),
    ("MEMORY.md", false),
];

/// Largest SKILL.md read for its front matter, and most skills listed.
const SKILL_READ_BYTES: u64 = 64 * 1024;
const MAX_SKILLS: usize = 200;
/// How often the files are checked for changes.
const RECHECK: Duration = Duration::from_secs(1);

/// Starter files of a new workspace (short: they are the user's to rewrite).
const STARTERS: [(&str, &str); 5] = [
    (
        "AGENTS.md",
        "# AGENTS.md\n\nHow this agent works: its standing instructions. Edit freely; the \
         agent reads this file at the start of every turn.\n\n- Answer directly; ask when a \
         request is ambiguous.\n- Keep notes that should last in MEMORY.md.\n",
    ),
    (
        "SOUL.md",
        "# SOUL.md\n\nPersona, tone and boundaries. Describe who this agent is and what it \
         will not do.\n",
    ),
    (
        "TOOLS.md",
        "# TOOLS.md\n\nNotes on tools and local conventions (hosts, commands, paths) the \
         agent should know.\n",
    ),
    (
        "IDENTITY.md",
        "# IDENTITY.md\n\n- Name:\n- Emoji:\n- Style:\n",
    ),
    (
        "USER.md",
        "# USER.md\n\nWho the agent works for: name, how to address them, time zone, \
         preferences.\n",
    ),
];

/// The workspace directory of `agent`.
pub fn dir_for(cfg: &Config, agent: &str) -> PathBuf {
    cfg.workspace_dir(agent)
}

/// Creates the workspace with its starter files when it has none of the context files
/// yet; never overwrites a file. Returns true when it created starter files.
pub fn ensure(dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if CONTEXT_FILES.iter().any(|(f, _)| dir.join(f).exists()) {
        return Ok(false);
    }
    for (name, text) in STARTERS {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(name))
        {
            Ok(mut f) => std::io::Write::write_all(&mut f, text.as_bytes())?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Size caps of the injected files, in characters.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub per_file: usize,
    pub total: usize,
}

/// A skill found in the workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skill {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
}

/// The workspace context of one agent, as the model sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    pub text: String,
    /// Files cut to their cap: (file, its length in characters).
    pub truncated: Vec<(String, usize)>,
    /// Files not read because they lead outside the workspace or are not plain files:
    /// (file, why).
    pub refused: Vec<(String, Refusal)>,
    pub skills: usize,
}

/// Reads the workspace into the text given to the model.
pub fn assemble(dir: &Path, caps: Caps) -> Context {
    let mut ctx = Context::default();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Workspace\n\nYour workspace is {}. These files from it are part of your \
         instructions; the user may edit them.",
        dir.display()
    );
    let ws = match Confined::open(dir) {
        Ok(ws) => ws,
        Err(e) => {
            let _ = writeln!(text, "\n[The workspace cannot be opened: {e}]");
            ctx.text = text;
            return ctx;
        }
    };
    let mut budget = caps.total;
    for (name, expected) in CONTEXT_FILES {
        let (content, chars) = match read_capped(&ws, Path::new(name), caps.per_file.min(budget)) {
            Ok(read) => read,
            Err(Refusal::Missing) => {
                if expected {
                    let _ = write!(
                        text,
                        "\n## {name}\n\n[missing: {}]\n",
                        dir.join(name).display()
                    );
                }
                continue;
            }
            Err(why) => {
                let _ = write!(text, "\n## {name}\n\n[refused: {name}: {why}]\n");
                ctx.refused.push((name.to_owned(), why));
                continue;
            }
        };
        if content.trim().is_empty() {
            continue;
        }
        let shown = content.chars().count();
        budget = budget.saturating_sub(shown);
        let _ = write!(text, "\n## {name}\n\n{}\n", content.trim_end());
        if shown < chars {
            ctx.truncated.push((name.to_owned(), chars));
            let _ = writeln!(
                text,
                "\n[{name} is {chars} characters; only the first {shown} are shown here. \
                 Read the file for the rest.]"
            );
        }
    }
    let (skills, refused) = skills_in(&ws);
    if !skills.is_empty() {
        let _ = write!(
            text,
            "\n## Skills\n\nWhen a task matches a skill's description, read its SKILL.md \
             first and follow it.\n\n"
        );
        for s in &skills {
            let _ = writeln!(
                text,
                "- {}: {} ({})",
                s.name,
                s.description,
                s.path.display()
            );
        }
    }
    if !refused.is_empty() {
        let _ = write!(text, "\n## Skills refused\n\n");
        for (file, why) in &refused {
            let _ = writeln!(text, "- {file}: {why}");
        }
    }
    ctx.refused.extend(refused);
    ctx.skills = skills.len();
    ctx.text = text;
    ctx
}

/// A file's text cut to `max` characters, and its whole length in characters.
fn read_capped(ws: &Confined, rel: &Path, max: usize) -> Result<(String, usize), Refusal> {
    use std::io::Read;
    let mut file = ws.open_file(rel)?;
    // A character is at most 4 bytes: this many bytes hold `max` characters.
    let limit = (max as u64).saturating_mul(4).saturating_add(4);
    let mut bytes = Vec::new();
    (&mut file)
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| Refusal::Unreadable(e.to_string()))?;
    let text = String::from_utf8_lossy(&bytes);
    let mut chars = text.chars().count();
    if bytes.len() as u64 == limit {
        // More may follow: count its characters (UTF-8 lead bytes) without keeping it.
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            chars += buf[..n].iter().filter(|b| (**b & 0xC0) != 0x80).count();
        }
    }
    let shown: String = text.chars().take(max).collect();
    Ok((shown, chars))
}

/// The skills of a workspace (`skills/<dir>/SKILL.md`), sorted by name.
pub fn skills(dir: &Path) -> Vec<Skill> {
    Confined::open(dir)
        .map(|ws| skills_in(&ws).0)
        .unwrap_or_default()
}

/// The skills of a workspace, and the SKILL.md files refused (`skills/<dir>/SKILL.md`,
/// why).
fn skills_in(ws: &Confined) -> (Vec<Skill>, Vec<(String, Refusal)>) {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for dir_name in ws.list(Path::new("skills"), MAX_SKILLS * 4) {
        let rel = Path::new("skills").join(&dir_name).join("SKILL.md");
        let head = match ws.read(&rel, SKILL_READ_BYTES) {
            Ok(r) => String::from_utf8_lossy(&r.bytes).into_owned(),
            Err(why) => {
                if why.is_hostile() {
                    refused.push((rel.display().to_string(), why));
                }
                continue;
            }
        };
        let fields = front_matter(&head);
        let name = fields.get("name").cloned().unwrap_or(dir_name);
        let Some(description) = fields.get("description").cloned() else {
            continue; // a skill without a description cannot be chosen
        };
        out.push(Skill {
            name: one_line(&name, 64),
            description: one_line(&description, 1024),
            path: ws.root().join(rel),
        });
        if out.len() == MAX_SKILLS {
            break;
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    (out, refused)
}

/// The top-level scalar fields of a YAML front matter block (`---` … `---` at the start):
/// plain, quoted, and folded (`>`) or literal (`|`) block values.
pub fn front_matter(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let text = text.trim_start_matches('\u{feff}');
    let Some(rest) = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
    else {
        return out;
    };
    let lines: Vec<&str> = rest.lines().take_while(|l| l.trim_end() != "---").collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if line.starts_with([' ', '\t', '#']) || line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        let value = if value.starts_with('>') || value.starts_with('|') {
            let folded = value.starts_with('>');
            let mut parts = Vec::new();
            while i < lines.len() && (lines[i].starts_with([' ', '\t']) || lines[i].is_empty()) {
                parts.push(lines[i].trim());
                i += 1;
            }
            parts
                .join(if folded { " " } else { "\n" })
                .trim()
                .to_owned()
        } else {
            unquote(value)
        };
        out.insert(key.trim().to_owned(), value);
    }
    out
}

fn unquote(v: &str) -> String {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return if q == '"' {
                inner.replace("\\\"", "\"")
            } else {
                inner.replace("''", "'")
            };
        }
    }
    v.to_owned()
}

/// Whitespace collapsed to single spaces, at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(max)
        .collect()
}

/// What identifies a workspace's state: each context file's and skill's size and
/// modification time, as the confined reads see them.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, Stamp)> {
    let Ok(ws) = Confined::open(dir) else {
        return Vec::new();
    };
    let stat = |p: PathBuf| {
        let stamp = ws.stamp(&p);
        (p, stamp)
    };
    let mut out: Vec<_> = CONTEXT_FILES
        .iter()
        .map(|(f, _)| stat(PathBuf::from(f)))
        .collect();
    out.push(stat(PathBuf::from("skills")));
    for name in ws.list(Path::new("skills"), MAX_SKILLS * 4) {
        out.push(stat(Path::new("skills").join(name).join("SKILL.md")));
    }
    out
}

struct Cached {
    checked: Instant,
    fingerprint: Vec<(PathBuf, Stamp)>,
    context: Arc<Context>,
}

/// Workspace contexts of the agents, cached (see the module documentation).
pub struct Workspaces {
    cfg: Config,
    caps: Caps,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Workspaces {
    pub fn new(cfg: Config) -> Self {
        let caps = Caps {
            per_file: cfg.agent.workspace_file_max_chars,
            total: cfg.agent.workspace_total_max_chars,
        };
        Self {
            cfg,
            caps,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Creates the workspace of every configured agent that has none yet.
    pub fn ensure_all(&self) -> anyhow::Result<()> {
        for agent in &self.cfg.router.agents {
            let dir = dir_for(&self.cfg, agent);
            let created = ensure(&dir).map_err(|e| {
                anyhow::anyhow!("workspace of agent `{agent}` at {}: {e}", dir.display())
            })?;
            if created {
                tracing::info!(agent = %agent, dir = %dir.display(), "Workspace created with starter files");
            }
        }
        Ok(())
    }

    /// The workspace context of `agent` for the system prompt.
    pub async fn context(self: &Arc<Self>, agent: &str) -> Arc<Context> {
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(agent).filter(|c| c.checked.elapsed() < RECHECK) {
                return c.context.clone();
            }
        }
        let this = self.clone();
        let agent = agent.to_owned();
        // File system work off the async threads.
        tokio::task::spawn_blocking(move || this.refresh(&agent))
            .await
            .unwrap_or_default()
    }

    fn refresh(&self, agent: &str) -> Arc<Context> {
        let dir = dir_for(&self.cfg, agent);
        let print = fingerprint(&dir);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get_mut(agent) {
            c.checked = Instant::now();
            if c.fingerprint == print {
                return c.context.clone();
            }
        }
        let context = Arc::new(assemble(&dir, self.caps));
        for (file, chars) in &context.truncated {
            tracing::warn!(agent, file = %file, chars, cap = self.caps.per_file, "Workspace file longer than the cap; the model sees the start of it");
        }
        for (file, why) in &context.refused {
            tracing::warn!(agent, file = %file, reason = %why, "Workspace file refused; the model is told it was not read");
        }
        cache.insert(
            agent.to_owned(),
            Cached {
                checked: Instant::now(),
                fingerprint: print,
                context: context.clone(),
            },
        );
        context
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        Caps {
            per_file: 100,
            total: 1000,
        }
    }

    #[test]
    fn a_new_workspace_gets_starter_files_and_an_existing_one_is_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().join("workspace");
        assert!(ensure(&ws).unwrap());
        for (f, _) in STARTERS {
            assert!(ws.join(f).exists(), "{f}");
        }
        std::fs::write(ws.join("SOUL.md"), "mine").unwrap();
        std::fs::remove_file(ws.join("USER.md")).unwrap();
        assert!(!ensure(&ws).unwrap());
        assert_eq!(std::fs::read_to_string(ws.join("SOUL.md")).unwrap(), "mine");
        assert!(!ws.join("USER.md").exists(), "a deleted file stays deleted");
    }

    #[test]
    fn files_are_injected_capped_and_missing_ones_marked() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("AGENTS.md"), "Always answer in haiku.").unwrap();
        std::fs::write(d.path().join("SOUL.md"), "  \n").unwrap();
        std::fs::write(d.path().join("USER.md"), "é".repeat(250)).unwrap();
        std::fs::write(d.path().join("MEMORY.md"), "likes tea").unwrap();
        let c = assemble(d.path(), caps());
        assert!(c.text.contains("## AGENTS.md\n\nAlways answer in haiku."));
        assert!(!c.text.contains("## SOUL.md"), "blank files are skipped");
        assert!(c.text.contains("## TOOLS.md\n\n[missing: "));
        assert!(
            !c.text.contains("BOOTSTRAP.md"),
            "optional files only when present"
        );
        assert!(c.text.contains("## MEMORY.md\n\nlikes tea"));
        assert!(c.text.contains(&"é".repeat(100)) && !c.text.contains(&"é".repeat(101)));
        assert_eq!(c.truncated, vec![("USER.md".to_owned(), 250)]);
        assert!(c
            .text
            .contains("USER.md is 250 characters; only the first 100"));
    }

    #[test]
    fn the_total_cap_bounds_the_whole_context() {
        let d = tempfile::tempdir().unwrap();
        for f in ["AGENTS.md", "SOUL.md", "TOOLS.md", "IDENTITY.md", "USER.md"] {
            // A character no temporary path contains.
            std::fs::write(d.path().join(f), "§".repeat(90)).unwrap();
        }
        let c = assemble(
            d.path(),
            Caps {
                per_file: 100,
                total: 200,
            },
        );
        assert_eq!(c.text.matches('§').count(), 200);
    }

    #[test]
    fn skills_are_listed_from_their_front_matter() {
        let d = tempfile::tempdir().unwrap();
        let skill = |dir: &str, text: &str| {
            let p = d.path().join("skills").join(dir);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("SKILL.md"), text).unwrap();
        };
        skill(
            "weather",
            "---\nname: weather\ndescription: \"Get the forecast: wttr.in\"\nmetadata: {\"x\": 1}\n---\n# Weather\n",
        );
        skill(
            "pdf",
            "---\nname: pdf-tools\ndescription: >\n  Split, merge and\n  fill PDF forms.\n---\nbody\n",
        );
        skill("nodesc", "---\nname: nodesc\n---\n");
        skill("plain", "no front matter at all");
        let s = skills(d.path());
        let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["pdf-tools", "weather"]);
        assert_eq!(s[0].description, "Split, merge and fill PDF forms.");
        assert_eq!(s[1].description, "Get the forecast: wttr.in");
        let c = assemble(d.path(), caps());
        assert!(c.text.contains("- weather: Get the forecast: wttr.in ("));
        assert_eq!(c.skills, 2);
    }

    #[test]
    fn links_out_of_the_workspace_are_refused_and_reported() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().join("workspace");
        std::fs::create_dir_all(ws.join("skills/mine")).unwrap();
        std::fs::write(d.path().join("gateway.token"), "token-0123456789").unwrap();
        symlink("../gateway.token", ws.join("AGENTS.md")).unwrap();
        symlink("/proc/self/environ", ws.join("USER.md")).unwrap();
        std::fs::hard_link(d.path().join("gateway.token"), ws.join("MEMORY.md")).unwrap();
        symlink(d.path(), ws.join("skills/outside")).unwrap();
        std::fs::write(
            d.path().join("SKILL.md"),
            "---\nname: stolen\ndescription: token-0123456789\n---\n",
        )
        .unwrap();
        std::fs::write(
            ws.join("skills/mine/SKILL.md"),
            "---\nname: mine\ndescription: fine\n---\n",
        )
        .unwrap();
        symlink("AGENTS.md", ws.join("SOUL.md")).unwrap(); // inside, but to a refused link
        let c = assemble(&ws, caps());
        assert!(!c.text.contains("token-0123456789"), "{}", c.text);
        assert!(!c.text.contains("PATH="), "{}", c.text);
        assert!(c
            .text
            .contains("[refused: AGENTS.md: it leads outside the workspace"));
        assert!(c.text.contains("[refused: USER.md: it leads outside"));
        assert!(c
            .text
            .contains("[refused: MEMORY.md: it has several hard links"));
        assert!(c
            .text
            .contains("- skills/outside/SKILL.md: it leads outside"));
        assert!(c.text.contains("- mine: fine ("));
        let refused: Vec<_> = c.refused.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            refused,
            [
                "AGENTS.md",
                "SOUL.md",
                "USER.md",
                "MEMORY.md",
                "skills/outside/SKILL.md"
            ]
        );
    }

    #[test]
    fn hostile_front_matter_is_harmless() {
        assert!(front_matter("").is_empty());
        assert!(front_matter("---").is_empty());
        assert!(front_matter("---\n: : :\n---").contains_key(""));
        let long = format!("---\ndescription: {}\n---\n", "a ".repeat(10_000));
        assert_eq!(
            one_line(&front_matter(&long)["description"], 1024).len(),
            1024
        );
        let unterminated = "---\nname: x\ndescription: y";
        assert_eq!(front_matter(unterminated)["description"], "y");
    }

    #[test]
    fn workspace_directories_follow_the_agent_id() {
        let mut cfg = Config {
            state_dir: Some("/state".into()),
            ..Default::default()
        };
        assert_eq!(dir_for(&cfg, "main"), PathBuf::from("/state/workspace"));
        assert_eq!(dir_for(&cfg, "ops"), PathBuf::from("/state/workspace-ops"));
        cfg.agent.workspaces.insert("ops".into(), "/srv/ops".into());
        assert_eq!(dir_for(&cfg, "ops"), PathBuf::from("/srv/ops"));
    }
}
