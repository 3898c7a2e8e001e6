//! Sandbox metrics (units in names, bounded labels: tool names are the registry's).

use clawbus_telemetry::metrics::{counter, counter_vec, histogram_vec};
use prometheus::{HistogramVec, IntCounter, IntCounterVec, Registry};

#[derive(Clone)]
pub struct SandboxMetrics {
    pub calls: IntCounterVec,
    pub seconds: HistogramVec,
    pub registry: IntCounter,
}

impl SandboxMetrics {
    pub fn new(r: &Registry) -> Self {
        Self {
            calls: counter_vec(
                r,
                "clawbus_sandbox_tool_calls_total",
                "Tool calls answered, by tool and outcome (ok, error, replayed, interrupted)",
                &["tool", "outcome"],
            ),
            seconds: histogram_vec(
                r,
                "clawbus_sandbox_tool_duration_seconds",
                "Time to run a tool call, by tool",
                &[
                    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0,
                ],
                &["tool"],
            ),
            registry: counter(
                r,
                "clawbus_sandbox_registry_requests_total",
                "Tool registry requests answered",
            ),
        }
    }

    /// The label of a tool: its name when the registry has it.
    pub fn tool(name: &str) -> &str {
        if crate::registry::all().iter().any(|t| t.name == name) {
            name
        } else {
            "unknown"
        }
    }
}
