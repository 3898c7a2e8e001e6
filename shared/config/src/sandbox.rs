//! `[sandbox]`: how the sandbox service runs the tools agents call.

use serde::Deserialize;

use crate::{ConfigError, ToolsConfig};

/// `[sandbox]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// `bwrap`: `exec` runs in bubblewrap (namespaces, read-only system, the workspace
    /// only). `off`: `exec` runs on the host as the sandbox's user — only when set
    /// explicitly; without bubblewrap and without this, `exec` refuses.
    pub mode: String,
    /// The tool profile: `minimal`, `coding`, `messaging`, `full`.
    pub profile: String,
    /// Tools added to the profile (names, `*` wildcards, `group:...`).
    pub allow: Vec<String>,
    /// Tools taken away, whatever the profile and `allow` say.
    pub deny: Vec<String>,
    /// `exec` may reach the network.
    pub network: bool,
    /// The workspace inside `exec`: `rw`, `ro` or `none`.
    pub workspace_access: String,
    /// `exec` policy: `deny`, `allowlist` (only programs in `exec_allowlist`), `full`.
    pub exec_security: String,
    /// Programs `exec` may start under `allowlist` (the command's first word).
    pub exec_allowlist: Vec<String>,
    /// When an `exec` waits for its owner's approval: `off`, `on-miss` (a program not in
    /// `exec_allowlist` nor allowed always), `always`.
    pub ask: String,
    /// How long an approval may take; no answer denies.
    pub approval_timeout_secs: u64,
    /// The longest an `exec` may run (its `timeout` argument is capped here).
    pub exec_timeout_secs: u64,
    /// Bytes of an `exec`'s output kept (the rest is cut with a note).
    pub exec_output_max_bytes: usize,
    /// An `exec` still running after this many milliseconds goes on in the background
    /// (a `process` session) when the agent may use `process`; 0 keeps every `exec` in
    /// the foreground. A call's `yieldMs` overrides it.
    pub exec_yield_ms: u64,
    /// The longest a command that may go on in the background runs (its `timeout`
    /// argument is capped here; without one, `exec_timeout_secs` applies).
    pub background_timeout_secs: u64,
    /// Bytes of a background session's output kept in memory (the newest).
    pub process_output_max_bytes: usize,
    /// How long a finished background session is kept for `process`.
    pub process_ttl_secs: u64,
    /// Background sessions one agent may run at once on one sandbox replica.
    pub max_background: usize,
    /// Bytes `read` returns at most; bytes `write` and `edit` take at most.
    pub read_max_bytes: usize,
    pub write_max_bytes: usize,
    /// Resource limits of an `exec` (per process, set with setrlimit).
    pub cpu_secs: u64,
    pub memory_mb: u64,
    /// Processes one agent's boxes may hold together (a pids cgroup per agent, as
    /// root), and one command at most.
    pub processes: u64,
    pub file_size_mb: u64,
    pub open_files: u64,
    /// `web_fetch`: bytes of a page read at most, characters returned at most, the
    /// longest a fetch may take, redirects followed at most.
    pub web_fetch_max_bytes: usize,
    pub web_fetch_max_chars: usize,
    pub web_fetch_timeout_secs: u64,
    pub web_fetch_max_redirects: usize,
    /// Hosts `web_fetch` may reach although they resolve to private addresses (an
    /// intranet wiki, a local test server): exact host names or addresses.
    pub web_allow_hosts: Vec<String>,
    /// Tool calls run at once by one sandbox replica.
    pub concurrency: usize,
    /// The `bwrap` program.
    pub bwrap: String,
    /// `auto`: as root, each `exec` gets a pids cgroup limited to `processes` (where a
    /// pids controller is writable); `off`: none.
    pub cgroup: String,
    /// When the sandbox runs as root, the host user and group `exec`'s box runs as
    /// (never 0): 65534 (`nobody`) unless set. As another user, the box runs as that
    /// user (mapped to uid 1000 inside).
    pub run_as_uid: u32,
    pub run_as_gid: u32,
    /// Bytes one agent's workspace may hold (allocated blocks; each file, directory and
    /// link counts at least 4 KiB). Past it, `write`, `edit` and `apply_patch` refuse,
    /// and an `exec` that grows the workspace over it is stopped.
    pub workspace_max_bytes: u64,
    /// Boxes (`exec` commands, background ones included) one agent runs at once on one
    /// sandbox replica; more wait their turn within their timeout.
    pub max_concurrent_per_agent: usize,
    /// Size of the box's private `/tmp` (memory), in MiB.
    pub tmp_max_mb: u64,
    /// Per agent, what differs from the settings above (`[sandbox.agents.<id>]`).
    pub agents: std::collections::BTreeMap<String, AgentSandbox>,
    /// Per sender (`[sandbox.senders."telegram:123"]`, `<channel>:<sender id>`), what
    /// differs for the runs they start, over the agent's.
    pub senders: std::collections::BTreeMap<String, AgentSandbox>,
}

/// `[sandbox.agents.<id>]`: an agent's own policy; what is not set is the sandbox's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSandbox {
    pub profile: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub network: Option<bool>,
    pub workspace_access: Option<String>,
    pub exec_security: Option<String>,
    pub exec_allowlist: Option<Vec<String>>,
    pub ask: Option<String>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            mode: "bwrap".into(),
            profile: "coding".into(),
            allow: Vec::new(),
            deny: Vec::new(),
            network: false,
            workspace_access: "rw".into(),
            exec_security: "full".into(),
            exec_allowlist: Vec::new(),
            ask: "off".into(),
            approval_timeout_secs: 300,
            exec_timeout_secs: 120,
            exec_output_max_bytes: 64 * 1024,
            exec_yield_ms: 10_000,
            background_timeout_secs: 1800,
            process_output_max_bytes: 1024 * 1024,
            process_ttl_secs: 1800,
            max_background: 8,
            read_max_bytes: 256 * 1024,
            write_max_bytes: 1024 * 1024,
            cpu_secs: 60,
            memory_mb: 1024,
            processes: 128,
            file_size_mb: 64,
            open_files: 256,
            web_fetch_max_bytes: 2 * 1024 * 1024,
            web_fetch_max_chars: 50_000,
            web_fetch_timeout_secs: 20,
            web_fetch_max_redirects: 5,
            web_allow_hosts: Vec::new(),
            concurrency: 64,
            bwrap: "bwrap".into(),
            cgroup: "auto".into(),
            run_as_uid: 65534,
            run_as_gid: 65534,
            workspace_max_bytes: 1024 * 1024 * 1024,
            max_concurrent_per_agent: 4,
            tmp_max_mb: 256,
            agents: Default::default(),
            senders: Default::default(),
        }
    }
}

/// The tool profiles and what each allows, OpenClaw's names.
pub const PROFILES: &[(&str, &[&str])] = &[
    ("minimal", &[]),
    (
        "coding",
        &[
            "group:fs",
            "group:runtime",
            "group:memory",
            "group:sessions",
            "group:web",
        ],
    ),
    ("messaging", &["group:messaging", "group:sessions"]),
    ("full", &["*"]),
];

impl SandboxConfig {
    /// The settings for a call of `agent` in a run `sender` started: the sender's
    /// `[sandbox.senders.<channel:id>]` over the agent's over the sandbox's.
    pub fn for_call(&self, agent: &str, sender: Option<&str>) -> SandboxConfig {
        let mut c = self.for_agent(agent);
        if let Some(s) = sender.and_then(|s| self.senders.get(s)) {
            c.apply(s);
        }
        c
    }

    /// Overrides what `a` sets.
    fn apply(&mut self, a: &AgentSandbox) {
        let a = a.clone();
        if let Some(v) = a.profile {
            self.profile = v;
        }
        if let Some(v) = a.allow {
            self.allow = v;
        }
        if let Some(v) = a.deny {
            self.deny = v;
        }
        if let Some(v) = a.network {
            self.network = v;
        }
        if let Some(v) = a.workspace_access {
            self.workspace_access = v;
        }
        if let Some(v) = a.exec_security {
            self.exec_security = v;
        }
        if let Some(v) = a.exec_allowlist {
            self.exec_allowlist = v;
        }
        if let Some(v) = a.ask {
            self.ask = v;
        }
    }

    /// The settings for `agent`: its `[sandbox.agents.<id>]` over the sandbox's.
    pub fn for_agent(&self, agent: &str) -> SandboxConfig {
        let mut c = self.clone();
        if let Some(a) = self.agents.get(agent) {
            c.apply(a);
        }
        c.agents.clear();
        c
    }

    /// Whether an agent may call `tool` under this profile and its lists.
    pub fn permits(&self, tool: &str) -> bool {
        let profile = PROFILES
            .iter()
            .find(|(p, _)| *p == self.profile)
            .map_or(&[][..], |(_, t)| *t);
        let allow: Vec<String> = profile
            .iter()
            .map(|s| s.to_string())
            .chain(self.allow.iter().cloned())
            .collect();
        // An empty allow list means "all" in [agent.tools]; here it means none.
        !allow.is_empty()
            && ToolsConfig {
                allow,
                deny: self.deny.clone(),
                ..ToolsConfig::default()
            }
            .permits(tool)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        for id in self.agents.keys() {
            if !crate::is_token(id) {
                return Err(ConfigError::Invalid {
                    field: "sandbox.agents",
                    reason: format!("`{id}` is not a valid agent id"),
                });
            }
            self.for_agent(id).validate_one()?;
        }
        for s in self.senders.values() {
            let mut c = self.clone();
            c.apply(s);
            c.validate_one()?;
        }
        self.validate_one()
    }

    fn validate_one(&self) -> Result<(), ConfigError> {
        let one_of = crate::routing::one_of;
        one_of("sandbox.mode", &self.mode, &["bwrap", "off"])?;
        one_of("sandbox.cgroup", &self.cgroup, &["auto", "off"])?;
        let profiles: Vec<&str> = PROFILES.iter().map(|(p, _)| *p).collect();
        one_of("sandbox.profile", &self.profile, &profiles)?;
        one_of(
            "sandbox.workspace_access",
            &self.workspace_access,
            &["rw", "ro", "none"],
        )?;
        one_of("sandbox.ask", &self.ask, &["off", "on-miss", "always"])?;
        one_of(
            "sandbox.exec_security",
            &self.exec_security,
            &["deny", "allowlist", "full"],
        )?;
        for (field, v) in [
            ("sandbox.exec_timeout_secs", self.exec_timeout_secs),
            ("sandbox.approval_timeout_secs", self.approval_timeout_secs),
            (
                "sandbox.exec_output_max_bytes",
                self.exec_output_max_bytes as u64,
            ),
            ("sandbox.read_max_bytes", self.read_max_bytes as u64),
            (
                "sandbox.background_timeout_secs",
                self.background_timeout_secs,
            ),
            (
                "sandbox.process_output_max_bytes",
                self.process_output_max_bytes as u64,
            ),
            ("sandbox.process_ttl_secs", self.process_ttl_secs),
            ("sandbox.max_background", self.max_background as u64),
            ("sandbox.write_max_bytes", self.write_max_bytes as u64),
            ("sandbox.cpu_secs", self.cpu_secs),
            ("sandbox.memory_mb", self.memory_mb),
            ("sandbox.processes", self.processes),
            ("sandbox.file_size_mb", self.file_size_mb),
            ("sandbox.open_files", self.open_files),
            ("sandbox.workspace_max_bytes", self.workspace_max_bytes),
            (
                "sandbox.max_concurrent_per_agent",
                self.max_concurrent_per_agent as u64,
            ),
            ("sandbox.tmp_max_mb", self.tmp_max_mb),
            ("sandbox.run_as_uid", u64::from(self.run_as_uid)),
            ("sandbox.run_as_gid", u64::from(self.run_as_gid)),
            ("sandbox.concurrency", self.concurrency as u64),
            (
                "sandbox.web_fetch_max_bytes",
                self.web_fetch_max_bytes as u64,
            ),
            (
                "sandbox.web_fetch_max_chars",
                self.web_fetch_max_chars as u64,
            ),
            (
                "sandbox.web_fetch_timeout_secs",
                self.web_fetch_timeout_secs,
            ),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    field,
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_may_have_its_own_policy() {
        let mut c = SandboxConfig::default();
        c.agents.insert(
            "public".into(),
            AgentSandbox {
                profile: Some("minimal".into()),
                allow: Some(vec!["web_fetch".into()]),
                ..Default::default()
            },
        );
        let p = c.for_agent("public");
        assert!(p.permits("web_fetch") && !p.permits("exec"));
        assert!(c.for_agent("main").permits("exec"));
        assert!(c.validate().is_ok());
        c.agents.insert(
            "bad".into(),
            AgentSandbox {
                profile: Some("root".into()),
                ..Default::default()
            },
        );
        assert!(c.validate().is_err());
    }

    #[test]
    fn profiles_allow_their_groups_and_deny_wins() {
        let mut c = SandboxConfig::default();
        assert!(c.permits("read") && c.permits("exec") && !c.permits("message"));
        c.profile = "minimal".into();
        assert!(!c.permits("read"));
        c.allow = vec!["read".into()];
        assert!(c.permits("read") && !c.permits("write"));
        c.profile = "full".into();
        c.deny = vec!["group:runtime".into()];
        assert!(c.permits("message") && !c.permits("exec"));
        c.profile = "messaging".into();
        c.allow.clear();
        assert!(c.permits("message") && !c.permits("read"));
    }
}
