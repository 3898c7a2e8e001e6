//! Tool calls straight to the sandbox service, as the agent sends them.

use std::path::PathBuf;
use std::time::Duration;

use clawbus_testkit::{Suite, SuiteOpts};
use clawbus_wire::{decode, encode, Envelope, ToolCall, ToolResult};
use serde_json::Value;

/// A suite with a connection to send tool calls as an agent would.
pub struct ToolBox {
    pub s: Suite,
    pub nats: async_nats::Client,
    pub n: std::sync::atomic::AtomicU64,
}

impl ToolBox {
    /// A suite with these environment variables set for its services.
    pub async fn start(env: &[(&str, &str)]) -> ToolBox {
        Self::with(SuiteOpts {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await
    }

    /// A suite started with `opts`.
    pub async fn with(opts: SuiteOpts) -> ToolBox {
        let s = Suite::start(opts).await.unwrap();
        let nats = s.nats.client().await.unwrap();
        ToolBox {
            s,
            nats,
            n: 0.into(),
        }
    }

    pub fn workspace(&self) -> PathBuf {
        self.s.state.path().join("workspace")
    }

    /// Sends a call as the agent would, with a fresh call id.
    pub async fn call(&self, tool: &str, args: Value) -> ToolResult {
        let n = self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let args = match args {
            Value::String(raw) => raw,
            v => v.to_string(),
        };
        self.call_as("main", &format!("run:test:tool:{n}"), tool, &args)
            .await
    }

    pub async fn call_as(&self, agent: &str, call_id: &str, tool: &str, args: &str) -> ToolResult {
        self.try_call_as(agent, call_id, tool, args, Duration::from_secs(60))
            .await
            .expect("the sandbox answers")
    }

    /// A call whose answer may not come (a replica just killed may still hold the
    /// request): `None` when none came.
    pub async fn try_call_as(
        &self,
        agent: &str,
        call_id: &str,
        tool: &str,
        args: &str,
        timeout: Duration,
    ) -> Option<ToolResult> {
        self.send(call_of(agent, None, call_id, tool, args), timeout)
            .await
    }

    /// A call of the main agent in a run that `sender` (`<channel>:<id>`) started.
    pub async fn call_from(
        &self,
        sender: &str,
        call_id: &str,
        tool: &str,
        args: &str,
    ) -> ToolResult {
        let call = call_of("main", Some(sender), call_id, tool, args);
        self.send(call, Duration::from_secs(60))
            .await
            .expect("the sandbox answers")
    }

    async fn send(&self, call: ToolCall, timeout: Duration) -> Option<ToolResult> {
        let tool = call.tool.clone();
        let env = Envelope::new(call.call_id.clone(), 1, call);
        let subject = format!("claw.v1.tool.{tool}");
        let request = async_nats::Request::new()
            .payload(encode(&env).unwrap().into())
            .timeout(Some(timeout));
        let reply = self.nats.send_request(subject, request).await.ok()?;
        Some(decode::<ToolResult>(&reply.payload).unwrap().body)
    }
}

/// A call as the agent sends it, in a test run of the main session.
fn call_of(agent: &str, sender: Option<&str>, call_id: &str, tool: &str, args: &str) -> ToolCall {
    ToolCall {
        call_id: call_id.into(),
        run_id: "run:test".into(),
        session_key: "agent:main:main".into(),
        tool: tool.into(),
        arguments: args.into(),
        agent_id: agent.into(),
        sender: sender.map(str::to_owned),
    }
}

/// The result's text, or its error's.
pub fn text(r: &ToolResult) -> String {
    match &r.error {
        Some(e) => format!("{}: {}", e.code, e.message),
        None => r.content.clone(),
    }
}

pub fn refused(r: &ToolResult, code: &str) -> bool {
    !r.ok && r.error.as_ref().is_some_and(|e| e.code == code)
}
