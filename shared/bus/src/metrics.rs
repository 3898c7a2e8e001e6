//! Bus metrics. Labels are bounded: consumer names and message kinds, never ids.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Counters and histograms of the bus layer, registered once per process.
#[derive(Clone)]
pub struct BusMetrics {
    pub received: IntCounterVec,
    pub outcomes: IntCounterVec,
    pub redeliveries: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub stream_errors: IntCounterVec,
    pub in_flight: IntGaugeVec,
    pub ack_pending: IntGaugeVec,
    pub handler_seconds: HistogramVec,
    pub published: IntCounterVec,
    pub publish_errors: IntCounterVec,
}

impl BusMetrics {
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["consumer"]).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let handler_seconds = HistogramVec::new(
            HistogramOpts::new(
                "clawbus_bus_handler_duration_seconds",
                "Time from receipt to ack/nak/term of a message",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
            &["consumer"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(handler_seconds.clone()))
            .expect("metric registered once");
        Self {
            received: counter(
                "clawbus_bus_messages_received_total",
                "Messages delivered to a consumer",
                &["consumer"],
            ),
            outcomes: counter(
                "clawbus_bus_messages_settled_total",
                "Messages settled, by outcome (ack, nak, term)",
                &["consumer", "outcome"],
            ),
            redeliveries: counter(
                "clawbus_bus_redeliveries_total",
                "Messages delivered more than once",
                &["consumer"],
            ),
            dead_letters: counter(
                "clawbus_bus_dead_letters_total",
                "Messages moved to the dead-letter stream",
                &["consumer"],
            ),
            stream_errors: counter(
                "clawbus_bus_consumer_errors_total",
                "Transient errors of a consumer's message stream",
                &["consumer"],
            ),
            in_flight: gauge(
                "clawbus_bus_in_flight_messages",
                "Messages being handled now",
            ),
            ack_pending: gauge(
                "clawbus_bus_consumer_ack_pending_messages",
                "Unacked messages of a consumer, as the server reports",
            ),
            handler_seconds,
            published: counter(
                "clawbus_bus_published_total",
                "Messages published, by kind",
                &["kind"],
            ),
            publish_errors: counter(
                "clawbus_bus_publish_errors_total",
                "Publishes that failed, by kind",
                &["kind"],
            ),
        }
    }
}
