//! Bus metrics. Labels are bounded: consumer names and message kinds, never ids.

use clawbus_telemetry::metrics::{counter_vec, gauge_vec, histogram_vec};
use prometheus::{HistogramVec, IntCounterVec, IntGaugeVec, Registry};

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
    pub lane_waiting: IntGaugeVec,
    pub handler_seconds: HistogramVec,
    pub published: IntCounterVec,
    pub publish_errors: IntCounterVec,
}

impl BusMetrics {
    pub fn new(r: &Registry) -> Self {
        let consumer = &["consumer"];
        let kind = &["kind"];
        Self {
            received: counter_vec(
                r,
                "clawbus_bus_messages_received_total",
                "Messages delivered to a consumer",
                consumer,
            ),
            outcomes: counter_vec(
                r,
                "clawbus_bus_messages_settled_total",
                "Messages settled, by outcome (ack, nak, term)",
                &["consumer", "outcome"],
            ),
            redeliveries: counter_vec(
                r,
                "clawbus_bus_redeliveries_total",
                "Messages delivered more than once",
                consumer,
            ),
            dead_letters: counter_vec(
                r,
                "clawbus_bus_dead_letters_total",
                "Messages moved to the dead-letter stream",
                consumer,
            ),
            stream_errors: counter_vec(
                r,
                "clawbus_bus_consumer_errors_total",
                "Transient errors of a consumer's message stream",
                consumer,
            ),
            in_flight: gauge_vec(
                r,
                "clawbus_bus_in_flight_messages",
                "Messages being handled now",
                consumer,
            ),
            ack_pending: gauge_vec(
                r,
                "clawbus_bus_consumer_ack_pending_messages",
                "Unacked messages of a durable consumer (label: its name), as the server reports",
                consumer,
            ),
            lane_waiting: gauge_vec(
                r,
                "clawbus_bus_lane_waiting_messages",
                "Messages held waiting for their lane (an earlier message of the same session)",
                consumer,
            ),
            handler_seconds: histogram_vec(
                r,
                "clawbus_bus_handler_duration_seconds",
                "Time from receipt to ack/nak/term of a message",
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ],
                consumer,
            ),
            published: counter_vec(
                r,
                "clawbus_bus_published_total",
                "Messages published, by kind",
                kind,
            ),
            publish_errors: counter_vec(
                r,
                "clawbus_bus_publish_errors_total",
                "Publishes that failed, by kind",
                kind,
            ),
        }
    }
}
