//! Platform events an adapter cannot read.
//!
//! Each adapter decodes its platform's events one at a time, so one event it cannot
//! read (a lone surrogate escape, a field of an unexpected type, bytes that are not
//! UTF-8, a line that is no IRC message) never fails the events around it. Such an
//! event is parked in the dead letters (`claw.v1.dlq.channels` on stream `CLAW_DLQ`)
//! with its raw bytes as the platform sent them (module `unreadable` of the bus),
//! counted (`clawbus_channels_unreadable_events_total`), and the adapter moves past it:
//! the bot keeps answering every other chat.

use tokio_util::sync::CancellationToken;

pub(crate) use clawbus_bus::unreadable::Unreadable;

use crate::metrics::ChannelMetrics;

/// Parks `ev` in the channels service's dead letters and counts it, retrying until
/// JetStream has it; `Err` when `stop` came first (the adapter must not move past the
/// event then, so a successor parks it).
pub(crate) async fn dead_letter(
    bus: &clawbus_bus::Bus,
    metrics: &ChannelMetrics,
    ev: Unreadable<'_>,
    stop: &CancellationToken,
) -> Result<(), ()> {
    let counter = metrics
        .unreadable
        .with_label_values(&[ev.channel, ev.account]);
    clawbus_bus::unreadable::dead_letter(bus, "channels", ev, stop).await?;
    counter.inc();
    Ok(())
}
