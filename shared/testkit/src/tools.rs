//! A tool responder standing in for the sandbox service: it answers the tool registry
//! (`claw.v1.tools.list`) and tool calls (`claw.v1.tool.<tool>`) in queue group
//! `sandbox`, speaking only the published schemas, and records every call so tests
//! can check that none ran twice.
//!
//! Tools: `write {path, content}` and `read {path}` on an in-memory file map per
//! agent, `echo {text}`, and `slow {text}`, which waits while the responder is held
//! (a test kills the agent meanwhile).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clawbus_wire::{
    decode, encode, Envelope, ErrorInfo, ToolCall, ToolListRequest, ToolListResponse, ToolResult,
    ToolSpec,
};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;

#[derive(Default)]
struct State {
    /// Every call received, in order.
    calls: Mutex<Vec<ToolCall>>,
    /// Files per agent.
    files: Mutex<HashMap<(String, String), String>>,
    held: AtomicU64,
    lists: AtomicU64,
    lists_held: AtomicU64,
}

/// A running tool responder.
pub struct ToolResponder {
    state: Arc<State>,
    hold: watch::Sender<bool>,
    hold_registry: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The tools the responder offers.
pub fn registry() -> Vec<ToolSpec> {
    let spec = |name: &str, description: &str, parameters: Value| ToolSpec {
        name: name.into(),
        description: description.into(),
        parameters: parameters.to_string(),
    };
    let string = json!({"type": "string"});
    vec![
        spec(
            "write",
            "Write a file of the workspace",
            json!({"type": "object", "properties": {"path": string, "content": string}, "required": ["path", "content"]}),
        ),
        spec(
            "read",
            "Read a file of the workspace",
            json!({"type": "object", "properties": {"path": string}, "required": ["path"]}),
        ),
        spec(
            "echo",
            "Say the text back",
            json!({"type": "object", "properties": {"text": string}, "required": ["text"]}),
        ),
        spec(
            "slow",
            "Say the text back, slowly",
            json!({"type": "object", "properties": {"text": string}}),
        ),
    ]
}

impl ToolResponder {
    /// Serves on the NATS server at `url` (with a user and password when given).
    pub async fn start(url: &str, credentials: Option<(&str, &str)>) -> anyhow::Result<Self> {
        let mut opts = async_nats::ConnectOptions::new();
        if let Some((u, p)) = credentials {
            opts = opts.user_and_password(u.into(), p.into());
        }
        let client = opts.connect(url).await?;
        let state = Arc::new(State::default());
        let (hold, _) = watch::channel(false);
        let (hold_registry, _) = watch::channel(false);
        let mut list = client
            .queue_subscribe("claw.v1.tools.list", "sandbox".into())
            .await?;
        let mut calls = client
            .queue_subscribe("claw.v1.tool.*", "sandbox".into())
            .await?;
        client.flush().await?;
        let mut tasks = Vec::new();
        let (c, st, mut gate) = (client.clone(), state.clone(), hold_registry.subscribe());
        tasks.push(tokio::spawn(async move {
            while let Some(m) = list.next().await {
                if *gate.borrow() {
                    st.lists_held.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.wait_for(|h| !*h).await;
                    st.lists_held.fetch_sub(1, Ordering::SeqCst);
                }
                st.lists.fetch_add(1, Ordering::SeqCst);
                let answer = match decode::<ToolListRequest>(&m.payload) {
                    Ok(_) => ToolListResponse {
                        tools: registry(),
                        error: None,
                    },
                    Err(e) => ToolListResponse {
                        tools: Vec::new(),
                        error: Some(ErrorInfo {
                            code: "malformed_request".into(),
                            message: e.to_string(),
                        }),
                    },
                };
                if let Some(reply) = m.reply {
                    let env = Envelope::new("tools", clawbus_wire::now_ms(), answer);
                    let _ = c
                        .publish(reply, encode(&env).unwrap_or_default().into())
                        .await;
                }
            }
        }));
        let (st, rx) = (state.clone(), hold.subscribe());
        tasks.push(tokio::spawn(async move {
            while let Some(m) = calls.next().await {
                let (c, st, mut rx) = (client.clone(), st.clone(), rx.clone());
                // Each call on its own task: calls run in parallel, as on the sandbox.
                tokio::spawn(async move {
                    let result = match decode::<ToolCall>(&m.payload) {
                        Ok(env) => run(&st, env.body, &mut rx).await,
                        Err(e) => ToolResult::failed("", "malformed_request", e.to_string()),
                    };
                    if let Some(reply) = m.reply {
                        let env = Envelope::new(
                            format!("{}:result", result.call_id),
                            clawbus_wire::now_ms(),
                            result,
                        );
                        let _ = c
                            .publish(reply, encode(&env).unwrap_or_default().into())
                            .await;
                    }
                });
            }
        }));
        Ok(Self {
            state,
            hold,
            hold_registry,
            tasks,
        })
    }

    /// Every call received, in order.
    pub fn calls(&self) -> Vec<ToolCall> {
        self.state.calls.lock().unwrap().clone()
    }

    /// Registry requests answered.
    pub fn registry_requests(&self) -> u64 {
        self.state.lists.load(Ordering::SeqCst)
    }

    /// Makes `slow` wait until [`ToolResponder::release`].
    pub fn hold(&self) {
        self.hold.send_replace(true);
    }

    pub fn release(&self) {
        self.hold.send_replace(false);
        self.hold_registry.send_replace(false);
    }

    /// Holds registry requests (an agent asks before its first model call) until
    /// [`ToolResponder::release`].
    pub fn hold_registry(&self) {
        self.hold_registry.send_replace(true);
    }

    /// Registry requests waiting now.
    pub fn registry_held(&self) -> u64 {
        self.state.lists_held.load(Ordering::SeqCst)
    }

    /// `slow` calls waiting now.
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }

    /// A file an agent wrote.
    pub fn file(&self, agent: &str, path: &str) -> Option<String> {
        self.state
            .files
            .lock()
            .unwrap()
            .get(&(agent.to_owned(), path.to_owned()))
            .cloned()
    }
}

impl Drop for ToolResponder {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn run(st: &State, call: ToolCall, hold: &mut watch::Receiver<bool>) -> ToolResult {
    st.calls.lock().unwrap().push(call.clone());
    let args: Value = serde_json::from_str(&call.arguments).unwrap_or_default();
    let arg = |k: &str| args[k].as_str().unwrap_or_default().to_owned();
    let key = |p: String| (call.agent_id.clone(), p);
    let (ok, content) = match call.tool.as_str() {
        "write" => {
            let content = arg("content");
            let n = content.len();
            st.files.lock().unwrap().insert(key(arg("path")), content);
            (true, format!("wrote {n} bytes to {}", arg("path")))
        }
        "read" => match st.files.lock().unwrap().get(&key(arg("path"))) {
            Some(c) => (true, c.clone()),
            None => (false, format!("Error: no file {}", arg("path"))),
        },
        "echo" => (true, arg("text")),
        "slow" => {
            if *hold.borrow() {
                st.held.fetch_add(1, Ordering::SeqCst);
                let _ = hold.wait_for(|h| !*h).await;
                st.held.fetch_sub(1, Ordering::SeqCst);
            }
            (true, arg("text"))
        }
        other => (false, format!("Error: unknown tool {other}")),
    };
    ToolResult {
        call_id: call.call_id,
        ok,
        content,
        error: None,
    }
}
