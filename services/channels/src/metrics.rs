//! The channels service's metrics.

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Registry};

#[derive(Clone)]
pub(crate) struct ChannelMetrics {
    /// Inbound messages published, by channel and account.
    pub inbound: IntCounterVec,
    /// Platform messages sent, by channel and account.
    pub sent: IntCounterVec,
    /// Pieces found already sent when a reply came again (a redelivery after a crash).
    pub resent_skipped: IntCounterVec,
    /// Platform calls that failed, by channel, account and why.
    pub errors: IntCounterVec,
    /// Platform events that could not be read, dead-lettered and skipped.
    pub unreadable: IntCounterVec,
    pub accounts_owned: IntGauge,
    /// 1 while an account this replica runs works (the platform took its
    /// credentials), 0 while it cannot.
    pub account_up: IntGaugeVec,
}

impl ChannelMetrics {
    pub fn new(r: &Registry) -> Self {
        use clawbus_telemetry::metrics::{counter_vec, gauge, gauge_vec};
        Self {
            inbound: counter_vec(
                r,
                "clawbus_channels_inbound_messages_total",
                "Platform messages published as inbound messages",
                &["channel", "account"],
            ),
            sent: counter_vec(
                r,
                "clawbus_channels_sent_messages_total",
                "Messages sent to the platform",
                &["channel", "account"],
            ),
            resent_skipped: counter_vec(
                r,
                "clawbus_channels_redelivered_pieces_skipped_total",
                "Pieces of a redelivered reply not sent again because they were recorded as sent",
                &["channel", "account"],
            ),
            errors: counter_vec(
                r,
                "clawbus_channels_platform_errors_total",
                "Platform calls that failed, by reason",
                &["channel", "account", "reason"],
            ),
            unreadable: counter_vec(
                r,
                "clawbus_channels_unreadable_events_total",
                "Platform events that could not be read, dead-lettered with their raw bytes and skipped",
                &["channel", "account"],
            ),
            account_up: gauge_vec(
                r,
                "clawbus_channels_account_up",
                "1 while the account works, 0 while the platform refuses it or cannot be reached",
                &["channel", "account"],
            ),
            accounts_owned: gauge(
                r,
                "clawbus_channels_accounts_owned",
                "Channel accounts this replica runs now",
            ),
        }
    }

    /// Counts a failed attempt to identify (or reach) an account's platform: `unauthorized`
    /// for refused credentials, else `identify`.
    pub fn identify_failed(&self, channel: &str, account: &str, e: &crate::SendError) {
        let reason = if matches!(e, crate::SendError::Unauthorized(_)) {
            "unauthorized"
        } else {
            "identify"
        };
        self.errors
            .with_label_values(&[channel, account, reason])
            .inc();
    }
}
