//! Agent metrics (units in names, bounded labels).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Agent metrics.
#[derive(Clone)]
pub(crate) struct AgentMetrics {
    pub turns: IntCounterVec,
    pub provider_seconds: HistogramVec,
    pub tokens: IntCounterVec,
    pub history: IntCounterVec,
}

impl AgentMetrics {
    pub fn new(r: &Registry) -> Self {
        let turns = IntCounterVec::new(
            Opts::new("clawbus_agent_turns_total", "Turns finished, by status"),
            &["status"],
        )
        .expect("valid metric");
        let provider_seconds = HistogramVec::new(
            HistogramOpts::new(
                "clawbus_agent_provider_duration_seconds",
                "Model call time, by result",
            )
            .buckets(vec![
                0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ]),
            &["result"],
        )
        .expect("valid metric");
        let tokens = IntCounterVec::new(
            Opts::new("clawbus_agent_tokens_total", "Tokens used, by kind"),
            &["kind"],
        )
        .expect("valid metric");
        let history = IntCounterVec::new(
            Opts::new(
                "clawbus_agent_history_loads_total",
                "Histories loaded for a turn, by source (cache, store)",
            ),
            &["source"],
        )
        .expect("valid metric");
        for m in [
            Box::new(turns.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(provider_seconds.clone()),
            Box::new(tokens.clone()),
            Box::new(history.clone()),
        ] {
            r.register(m).expect("metric registered once");
        }
        Self {
            turns,
            provider_seconds,
            tokens,
            history,
        }
    }
}
