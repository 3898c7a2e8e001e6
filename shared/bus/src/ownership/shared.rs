//! Shared durable consumers, one per partition, worked by the partition's owner.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{run, Fence, Member, PartitionWork};
use crate::{topology, Bus, BusError};

/// Work on shared durable consumers, one per partition (`decls[p]`), each worked by
/// the replica that holds the partition's lease; with one partition, one replica works
/// and the others stand by. A new holder rewinds the consumer to its ack floor, so what
/// the old one left unacked comes back at once and in stream order. Suits handlers
/// whose writes are idempotent (a stale holder's late write is harmless), unlike the
/// agent's, which cuts a stale owner off with a consumer of its own.
pub struct SharedConsumers<H> {
    pub bus: Bus,
    pub decls: Vec<topology::ConsumerDecl>,
    /// Where the runners report trouble.
    pub readiness: Option<clawbus_telemetry::Readiness>,
    /// Handler permits shared by the partitions this process owns (`None`: each
    /// partition's runner has `concurrency` of its own).
    pub permits: Option<Arc<tokio::sync::Semaphore>>,
    pub handler: Arc<H>,
    pub concurrency: usize,
    pub drain_deadline: Duration,
}

impl<H: crate::consumer::Handler> PartitionWork for SharedConsumers<H> {
    async fn run(&self, partition: u32, _epoch: u64, fence: Fence, stop: CancellationToken) {
        let Some(decl) = self.decls.get(partition as usize) else {
            tracing::error!(partition, "No consumer declared for this partition");
            return;
        };
        let consumer = loop {
            match topology::bind_consumer(&self.bus.consumer_js, decl).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(consumer = %decl.durable, error = %e, "Cannot bind consumer; retrying");
                    if crate::consumer::sleep_or_cancel(Duration::from_secs(1), &stop).await {
                        return;
                    }
                }
            }
        };
        let orphans = rewind(&self.bus, decl).await;
        let mut opts =
            crate::consumer::RunnerOpts::for_consumer(decl, self.concurrency, self.drain_deadline);
        opts.orphans = orphans;
        opts.fence = Some(fence);
        opts.readiness = self.readiness.clone();
        opts.rebind = Some(decl.clone());
        opts.permits = self.permits.clone();
        crate::consumer::run(self.bus.clone(), consumer, opts, self.handler.clone(), stop).await;
    }
}

/// Rewinds a shared consumer a new owner takes over to its ack floor, so what the
/// previous owner left unacknowledged comes back at once and in stream order; returns
/// those orphans, noted before the rewind clears them, to be counted across owners.
pub async fn rewind(bus: &Bus, decl: &topology::ConsumerDecl) -> Option<crate::handovers::Orphans> {
    let stream = bus.js.get_stream(decl.stream).await.ok()?;
    let mut orphans = None;
    if let Ok(info) = stream.consumer_info(&decl.durable).await {
        orphans = crate::handovers::Orphans::of(
            bus,
            decl.group,
            decl.stream,
            decl.max_deliver,
            std::slice::from_ref(&info),
        )
        .await;
    }
    if let Err(e) = stream.reset_consumer(&decl.durable, None).await {
        tracing::warn!(consumer = %decl.durable, error = %e, "Cannot rewind consumer; orphaned messages return after their ack wait");
    }
    orphans
}

/// Binds a service's shared partition consumers and takes part in ownership until
/// `shutdown`, exporting `clawbus_<group>_partitions_owned`.
pub async fn serve_shared<W: PartitionWork>(
    base: &crate::service::ServiceBase,
    me: Member,
    decls: &[topology::ConsumerDecl],
    work: Arc<W>,
) -> Result<(), BusError> {
    for d in decls {
        topology::bind_consumer(&base.bus.consumer_js, d).await?;
    }
    base.readiness.set("consumer", true);
    let owned = clawbus_telemetry::metrics::gauge(
        &base.registry,
        &format!("clawbus_{}_partitions_owned", me.group),
        "Partitions this replica owns now",
    );
    run(&base.bus, me, work, base.shutdown.clone(), move |n| {
        owned.set(n as i64)
    })
    .await
}
