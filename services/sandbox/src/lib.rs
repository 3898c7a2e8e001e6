//! The sandbox: runs every tool an agent calls, on request/reply subjects
//! (`claw.v1.tool.<tool>`, and the registry on `claw.v1.tools.list`), queue group
//! `sandbox`, as many replicas as wanted. It is where a prompt-injected model meets
//! the host, so every argument is hostile until checked: file tools reach only the
//! agent's workspace ([`files`]), `exec` runs in bubblewrap ([`exec`]), the profile
//! decides which tools exist ([`registry`]), and each call runs at most once
//! ([`calls`]).

#![forbid(unsafe_code)]

pub mod approvals;
pub mod boxes;
pub mod calls;
pub mod cgroup;
pub mod exec;
pub mod files;
pub mod launch;
pub mod memory;
pub mod message;
mod metrics;
pub mod patch;
pub mod process;
pub mod quota;
pub mod registry;
pub mod sessions;
pub mod web;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use clawbus_bus::request::{self, Responder, ResponderOpts};
use clawbus_bus::service::{self, ServiceBase};
use clawbus_bus::{subjects, topology};
use clawbus_config::Config;
use clawbus_wire::{Envelope, ErrorInfo, ToolCall, ToolListRequest, ToolListResponse, ToolResult};

/// Why a call did not do what it asked, as the model is told.
#[derive(Debug, Clone)]
pub struct ToolError {
    pub code: &'static str,
    pub message: String,
}

impl ToolError {
    /// Arguments that do not make sense.
    pub fn bad(m: impl Into<String>) -> Self {
        Self {
            code: "invalid_arguments",
            message: m.into(),
        }
    }

    /// Refused by the sandbox's rules (outside the workspace, policy).
    pub fn denied(m: impl Into<String>) -> Self {
        Self {
            code: "denied",
            message: m.into(),
        }
    }

    /// The sandbox cannot run this here (no bubblewrap, ...).
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self {
            code: "unavailable",
            message: m.into(),
        }
    }

    pub fn internal(m: impl Into<String>) -> Self {
        Self {
            code: "internal",
            message: m.into(),
        }
    }
}

/// The sandbox's tool runner.
pub struct Sandbox {
    pub cfg: Config,
    calls: Option<kv::Store>,
    approvals: Option<kv::Store>,
    bus: Option<clawbus_bus::Bus>,
    metrics: Option<metrics::SandboxMetrics>,
    jobs: Arc<process::Jobs>,
}

impl Sandbox {
    /// A sandbox recording its calls in `calls` (none: no exactly-once records, for
    /// tests of the tools alone).
    pub fn new(cfg: Config, calls: Option<kv::Store>) -> Self {
        Self {
            jobs: Arc::new(process::Jobs::new(cfg.replica_id(), None)),
            cfg,
            calls,
            approvals: None,
            bus: None,
            metrics: None,
        }
    }

    fn count(&self, tool: &str, outcome: &str) {
        if let Some(m) = &self.metrics {
            m.calls
                .with_label_values(&[metrics::SandboxMetrics::tool(tool), outcome])
                .inc();
        }
    }

    /// Runs one call and says what happened.
    pub async fn run(&self, call: &ToolCall) -> ToolResult {
        let started = std::time::Instant::now();
        let result = self.dispatch(call).await;
        if let Some(m) = &self.metrics {
            m.seconds
                .with_label_values(&[metrics::SandboxMetrics::tool(&call.tool)])
                .observe(started.elapsed().as_secs_f64());
        }
        self.count(&call.tool, if result.is_ok() { "ok" } else { "error" });
        match result {
            Ok(content) => ToolResult {
                call_id: call.call_id.clone(),
                ok: true,
                content,
                error: None,
            },
            Err(e) => ToolResult::failed(call.call_id.clone(), e.code, e.message),
        }
    }

    async fn dispatch(&self, call: &ToolCall) -> Result<String, ToolError> {
        if !subjects::is_token(&call.agent_id) {
            return Err(ToolError::bad("the call names no valid agent"));
        }
        if !self.cfg.router.agents.contains(&call.agent_id) {
            return Err(ToolError::denied(format!(
                "there is no agent `{}` here",
                call.agent_id
            )));
        }
        let agent_cfg = self
            .cfg
            .sandbox
            .for_call(&call.agent_id, call.sender.as_deref());
        let cfg = &agent_cfg;
        if !cfg.permits(&call.tool) {
            return Err(ToolError::denied(format!(
                "the tool `{}` is not allowed by the sandbox's profile",
                call.tool
            )));
        }
        if call.arguments.len() > cfg.write_max_bytes + 64 * 1024 {
            return Err(ToolError::bad("the arguments are too large"));
        }
        let args: serde_json::Value = serde_json::from_str(&call.arguments)
            .map_err(|e| ToolError::bad(format!("the arguments are not valid JSON: {e}")))?;
        let workspace = self.cfg.workspace_dir(&call.agent_id);
        let sandbox_cfg = cfg.clone();
        match call.tool.as_str() {
            "exec" => {
                let a: exec::ExecArgs = typed(args)?;
                if let Some(kv) = &self.approvals {
                    approvals::check(&sandbox_cfg, kv, call, a.command()).await?;
                } else if sandbox_cfg.ask != "off" {
                    return Err(ToolError::unavailable("approvals are not available"));
                }
                // Backgrounded when asked, or after `exec_yield_ms` when the agent may
                // manage background sessions.
                let auto = (sandbox_cfg.exec_yield_ms > 0 && sandbox_cfg.permits("process"))
                    .then(|| Duration::from_millis(sandbox_cfg.exec_yield_ms));
                if a.background() || a.yield_ms().is_some() {
                    if !sandbox_cfg.permits("process") {
                        return Err(ToolError::denied(
                            "background commands need the process tool, which this agent's \
                             policy does not allow; run the command in the foreground",
                        ));
                    }
                    let wait =
                        (!a.background()).then(|| Duration::from_millis(a.yield_ms().unwrap_or(0)));
                    self.jobs
                        .start(&sandbox_cfg, &call.agent_id, &workspace, a, wait, true)
                        .await
                } else if let Some(wait) = auto {
                    self.jobs
                        .start(
                            &sandbox_cfg,
                            &call.agent_id,
                            &workspace,
                            a,
                            Some(wait),
                            false,
                        )
                        .await
                } else {
                    exec::exec(
                        &sandbox_cfg,
                        &self.jobs.boxes,
                        &call.agent_id,
                        &workspace,
                        a,
                    )
                    .await
                }
            }
            "process" => {
                let a: process::ProcessArgs = typed(args)?;
                match a.replica() {
                    Some(r) if r != self.jobs.replica() => self.forward(call, r).await,
                    _ => self.jobs.call(&sandbox_cfg, &call.agent_id, a).await,
                }
            }
            "web_fetch" => web::fetch(&sandbox_cfg, typed(args)?).await,
            "message" => {
                let bus = self
                    .bus
                    .as_ref()
                    .ok_or_else(|| ToolError::unavailable("no bus to send messages"))?;
                message::send(bus, call, typed(args)?).await
            }
            "sessions_list" => {
                let bus = self
                    .bus
                    .as_ref()
                    .ok_or_else(|| ToolError::unavailable("no bus to reach the store"))?;
                sessions::list(bus, &call.agent_id, typed(args)?).await
            }
            "sessions_history" => {
                let bus = self
                    .bus
                    .as_ref()
                    .ok_or_else(|| ToolError::unavailable("no bus to reach the store"))?;
                sessions::history(bus, &call.agent_id, cfg.read_max_bytes, typed(args)?).await
            }
            "read" | "write" | "edit" | "ls" | "apply_patch" | "memory_search" | "memory_get" => {
                let tool = call.tool.clone();
                // What a call adds is at most its arguments' size.
                let adding = call.arguments.len() as u64;
                tokio::task::spawn_blocking(move || {
                    let ws = files::Workspace::open(&workspace)?;
                    if matches!(tool.as_str(), "write" | "edit" | "apply_patch") {
                        quota::check_room(&workspace, adding, sandbox_cfg.workspace_max_bytes)?;
                    }
                    match tool.as_str() {
                        "read" => files::read(&ws, &sandbox_cfg, typed(args)?),
                        "write" => files::write(&ws, &sandbox_cfg, typed(args)?),
                        "edit" => files::edit(&ws, &sandbox_cfg, typed(args)?),
                        "apply_patch" => patch::apply(&ws, &sandbox_cfg, typed(args)?),
                        "memory_search" => memory::search(&ws, &sandbox_cfg, typed(args)?),
                        "memory_get" => memory::get(&ws, &sandbox_cfg, typed(args)?),
                        _ => files::ls(&ws, typed(args)?),
                    }
                })
                .await
                .map_err(|e| ToolError::internal(e.to_string()))?
            }
            other => Err(ToolError::bad(format!(
                "this sandbox has no tool `{}`",
                other.chars().take(64).collect::<String>()
            ))),
        }
    }
}

impl Sandbox {
    /// Passes a `process` call on to the replica holding its session.
    async fn forward(&self, call: &ToolCall, replica: &str) -> Result<String, ToolError> {
        if !subjects::is_token(replica) {
            return Err(ToolError::bad("invalid sessionId"));
        }
        let bus = self
            .bus
            .as_ref()
            .ok_or_else(|| ToolError::unavailable("no bus to reach other sandbox replicas"))?;
        let env = Envelope::new(call.call_id.clone(), clawbus_wire::now_ms(), call.clone());
        match bus
            .request::<ToolCall, ToolResult>(
                subjects::sandbox_process(replica),
                &env,
                &clawbus_bus::TraceContext::root(),
                Duration::from_secs(15),
            )
            .await
        {
            Ok(r) if r.body.ok => Ok(r.body.content),
            Ok(r) => {
                let e = r.body.error.unwrap_or_else(|| ErrorInfo {
                    code: "internal".into(),
                    message: "no error given".into(),
                });
                Err(ToolError {
                    code: match e.code.as_str() {
                        "invalid_arguments" => "invalid_arguments",
                        "denied" => "denied",
                        _ => "unavailable",
                    },
                    message: e.message,
                })
            }
            Err(e) => Err(ToolError::bad(format!(
                "the sandbox replica `{replica}` that ran this session does not answer (the \
                 session ended with it): {e}"
            ))),
        }
    }
}

/// Answers `process` calls other replicas pass on for this replica's sessions.
struct ProcessResponder(Arc<Sandbox>);

impl Responder for ProcessResponder {
    type Req = ToolCall;
    type Resp = ToolResult;

    async fn respond(&self, req: Result<Envelope<ToolCall>, String>) -> ToolResult {
        match req {
            Ok(env) if env.body.tool == "process" => self.0.run(&env.body).await,
            Ok(env) => ToolResult::failed(
                env.body.call_id,
                "invalid_arguments",
                "only process calls are passed on",
            ),
            Err(e) => ToolResult::failed("", "malformed_request", e),
        }
    }
}

/// A tool's arguments in their typed form, with a clear error.
fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ToolError> {
    serde_json::from_value(v).map_err(|e| ToolError::bad(format!("invalid arguments: {e}")))
}

impl Responder for Sandbox {
    type Req = ToolCall;
    type Resp = ToolResult;

    async fn respond(&self, req: Result<Envelope<ToolCall>, String>) -> ToolResult {
        let call = match req {
            Ok(env) => env.body,
            Err(e) => return ToolResult::failed("", "malformed_request", e),
        };
        let Some(kv) = &self.calls else {
            return self.run(&call).await;
        };
        match calls::begin(kv, &call.call_id).await {
            Ok(calls::Seen::New) => {}
            Ok(calls::Seen::Done(r)) => {
                self.count(&call.tool, "replayed");
                return r;
            }
            Ok(calls::Seen::Interrupted) => {
                self.count(&call.tool, "interrupted");
                return ToolResult {
                    call_id: call.call_id,
                    ok: false,
                    content: String::new(),
                    error: Some(ErrorInfo {
                        code: "interrupted".into(),
                        message: "this call started before and did not finish; it may or may \
                                  not have taken effect, and it is not run again"
                            .into(),
                    }),
                };
            }
            Err(e) => {
                return ToolResult::failed(
                    call.call_id,
                    "unavailable",
                    format!("the sandbox cannot record the call: {e}"),
                )
            }
        }
        let result = self.run(&call).await;
        if let Err(e) = calls::finish(kv, &call.call_id, &result).await {
            tracing::warn!(call_id = %call.call_id, error = %e, "Tool result not recorded");
        }
        result
    }
}

/// Answers the tool registry.
struct RegistryResponder(Config, metrics::SandboxMetrics);

impl Responder for RegistryResponder {
    type Req = ToolListRequest;
    type Resp = ToolListResponse;

    async fn respond(&self, req: Result<Envelope<ToolListRequest>, String>) -> ToolListResponse {
        self.1.registry.inc();
        match req {
            Ok(env) => ToolListResponse {
                tools: registry::offered(
                    &self
                        .0
                        .sandbox
                        .for_call(&env.body.agent_id, env.body.sender.as_deref()),
                ),
                error: None,
            },
            Err(e) => ToolListResponse {
                tools: Vec::new(),
                error: Some(ErrorInfo {
                    code: "malformed_request".into(),
                    message: e,
                }),
            },
        }
    }
}

/// Runs the sandbox until shutdown.
pub async fn serve(base: &ServiceBase) -> anyhow::Result<()> {
    let cfg = base.cfg.clone();
    if cfg.sandbox.mode == "bwrap" && exec::which(&cfg.sandbox.bwrap).is_none() {
        tracing::warn!(bwrap = %cfg.sandbox.bwrap, "bubblewrap not found: exec will refuse until it is installed (or sandbox.mode = \"off\")");
    }
    if cfg.sandbox.mode == "off" {
        tracing::warn!("sandbox.mode = off: exec runs commands on the host without isolation");
    }
    let js = &base.bus.js;
    let kv = service::patiently("tool call records", || {
        js.get_key_value(topology::KV_TOOL_CALLS)
    })
    .await?;
    let approvals =
        service::patiently("approvals", || js.get_key_value(topology::KV_APPROVALS)).await?;
    let processes = service::patiently("process sessions", || {
        js.get_key_value(topology::KV_PROCESSES)
    })
    .await?;
    let metrics = metrics::SandboxMetrics::new(&base.registry);
    let mut sandbox = Sandbox::new(cfg.clone(), Some(kv));
    sandbox.metrics = Some(metrics.clone());
    sandbox.approvals = Some(approvals);
    sandbox.bus = Some(base.bus.clone());
    sandbox.jobs = Arc::new(process::Jobs::new(cfg.replica_id(), Some(processes)));
    sandbox.jobs.forget_previous_life().await;
    let sandbox = Arc::new(sandbox);
    let opts = |subject: &str, component: &'static str| ResponderOpts {
        subject: subject.to_owned(),
        queue: "sandbox",
        concurrency: cfg.sandbox.concurrency,
        drain_deadline: Duration::from_secs(cfg.sandbox.exec_timeout_secs.min(60)),
        readiness: Some((base.readiness.clone(), component)),
    };
    tracing::info!(profile = %cfg.sandbox.profile, mode = %cfg.sandbox.mode, "Sandbox ready");
    tokio::join!(
        request::serve(
            base.bus.clone(),
            opts(subjects::TOOLS_LIST, "registry"),
            Arc::new(RegistryResponder(cfg.clone(), metrics)),
            base.shutdown.clone(),
        ),
        request::serve(
            base.bus.clone(),
            opts("claw.v1.tool.*", "calls"),
            sandbox.clone(),
            base.shutdown.clone(),
        ),
        request::serve(
            base.bus.clone(),
            opts(&subjects::sandbox_process(&cfg.replica_id()), "processes"),
            Arc::new(ProcessResponder(sandbox)),
            base.shutdown.clone(),
        ),
    );
    Ok(())
}
