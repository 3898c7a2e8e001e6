//! Agent metrics (units in names, bounded labels).

use clawbus_telemetry::metrics::{counter, counter_vec, gauge, histogram_vec};
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

/// Agent metrics.
#[derive(Clone)]
pub(crate) struct AgentMetrics {
    pub turns: IntCounterVec,
    pub provider_seconds: HistogramVec,
    pub tokens: IntCounterVec,
    pub history: IntCounterVec,
    pub fenced: IntCounter,
    pub partitions_owned: IntGauge,
    pub tool_calls: IntCounter,
    pub queue_dropped: IntCounterVec,
}

impl AgentMetrics {
    pub fn new(r: &Registry) -> Self {
        Self {
            turns: counter_vec(
                r,
                "clawbus_agent_turns_total",
                "Turns finished, by status",
                &["status"],
            ),
            provider_seconds: histogram_vec(
                r,
                "clawbus_agent_provider_duration_seconds",
                "Model call time, by result",
                &[
                    0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                ],
                &["result"],
            ),
            tokens: counter_vec(
                r,
                "clawbus_agent_tokens_total",
                "Tokens used, by kind",
                &["kind"],
            ),
            history: counter_vec(
                r,
                "clawbus_agent_history_loads_total",
                "Histories loaded for a turn, by source (cache, store)",
                &["source"],
            ),
            tool_calls: counter(
                r,
                "clawbus_agent_tool_calls_total",
                "Tool calls answered by the sandbox (or timed out)",
            ),
            fenced: counter(
                r,
                "clawbus_agent_fenced_turns_total",
                "Turns whose results were not published because the partition lease was lost",
            ),
            queue_dropped: counter_vec(
                r,
                "clawbus_agent_queue_dropped_messages_total",
                "Queued chat messages dropped from a full session queue, by drop policy",
                &["policy"],
            ),
            partitions_owned: gauge(
                r,
                "clawbus_agent_partitions_owned",
                "Turn partitions this replica owns now",
            ),
        }
    }
}
