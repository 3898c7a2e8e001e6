//! The agent's service: partition ownership with the other replicas, and the turn
//! runner on each partition it owns.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use clawbus_bus::consumer::{self, RunnerOpts};
use clawbus_bus::handovers::Orphans;
use clawbus_bus::ownership::{self, Fence, Member, PartitionWork};
use clawbus_bus::service::{self, ServiceBase};
use clawbus_bus::{topology, Bus, BusError};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::failover::Models;
use crate::history_cache::HistoryCache;
use crate::metrics::AgentMetrics;
use crate::tools::Registry;
use crate::turn::AgentService;
use crate::workspace::Workspaces;

/// The agent's work on one owned partition: take the partition's consumer over from
/// any previous owner, then run the turn runner on it until told to stop.
struct PartitionRunner {
    svc: Arc<AgentService>,
    bus: Bus,
    permits: Arc<Semaphore>,
    readiness: clawbus_telemetry::Readiness,
}

impl PartitionRunner {
    /// Deletes every earlier consumer of the partition (a previous owner's) and
    /// creates this acquisition's. On the
    /// work-queue stream acked turns are gone, so the new consumer starts at the oldest
    /// unfinished turn and delivers the orphaned ones again, in stream order.
    async fn take_over(
        &self,
        decl: &topology::ConsumerDecl,
        partition: u32,
    ) -> Result<(PullConsumer, Option<Orphans>), BusError> {
        let mut stream = self
            .bus
            .js
            .get_stream(topology::STREAM_TURNS)
            .await
            .map_err(|e| BusError::Topology(e.to_string()))?;
        let prefix = format!("{}-", topology::ConsumerDecl::agent_prefix(partition));
        let mut names = stream.consumer_names();
        let mut stale = Vec::new();
        while let Some(n) = names.next().await {
            let n = n.map_err(|e| BusError::Topology(e.to_string()))?;
            if n.starts_with(&prefix) && n != decl.durable {
                stale.push(n);
            }
        }
        // What the earlier owners left unacknowledged, read before their consumers go.
        let mut previous = Vec::new();
        for n in &stale {
            if let Ok(info) = stream.consumer_info(n).await {
                previous.push(info);
            }
        }
        let orphans = Orphans::of(
            &self.bus,
            decl.group,
            decl.stream,
            decl.max_deliver,
            &previous,
        )
        .await;
        for n in stale {
            if let Err(e) = stream.delete_consumer(&n).await {
                tracing::debug!(consumer = %n, error = %e, "Stale consumer already gone");
            }
        }
        // Every turn an earlier owner may have started is in the stream by now (its
        // consumers are gone): those up to here get their checkpoint read even on a
        // first delivery to this owner.
        let last = stream
            .info()
            .await
            .map_err(|e| BusError::Topology(e.to_string()))?
            .state
            .last_sequence;
        self.svc.adopt(partition, last);
        let consumer = topology::bind_consumer(&self.bus.consumer_js, decl).await?;
        Ok((consumer, orphans))
    }
}

impl PartitionWork for PartitionRunner {
    async fn run(&self, partition: u32, epoch: u64, fence: Fence, stop: CancellationToken) {
        let cfg = &self.svc.cfg;
        let decl = topology::ConsumerDecl::agent(
            partition,
            epoch,
            cfg.concurrency,
            Duration::from_secs(cfg.ack_wait_secs),
            cfg.max_deliver,
        );
        let (consumer, orphans) = loop {
            match self.take_over(&decl, partition).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "Cannot take the partition's consumer over; retrying");
                    if consumer::sleep_or_cancel(Duration::from_secs(1), &stop).await {
                        return;
                    }
                }
            }
        };
        let mut opts = RunnerOpts::for_consumer(&decl, cfg.concurrency, Duration::from_secs(30));
        opts.fence = Some(fence);
        opts.permits = Some(self.permits.clone());
        opts.readiness = Some(self.readiness.clone());
        opts.rebind = Some(decl.clone());
        opts.orphans = orphans;
        consumer::run(self.bus.clone(), consumer, opts, self.svc.clone(), stop).await;
    }
}

/// Runs the agent until shutdown: takes part in partition ownership with the other
/// agent replicas and runs the turns of the partitions it owns.
pub async fn serve(base: &ServiceBase) -> anyhow::Result<()> {
    let cfg = base.cfg.agent.clone();
    let js = &base.bus.js;
    let runs =
        service::patiently("run checkpoints", || js.get_key_value(topology::KV_RUNS)).await?;
    let profiles =
        service::patiently("key cooldowns", || js.get_key_value(topology::KV_PROFILES)).await?;
    let models = Models::new(&cfg, Some(profiles));
    if let Some(e) = models.unconfigured() {
        tracing::warn!(error = %e, "No model provider; turns will answer with setup instructions");
    }
    let metrics = AgentMetrics::new(&base.registry);
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let replica = base.cfg.replica_id();
    tracing::info!(model = %models.primary(), fallbacks = ?cfg.fallback_models, partitions = topology::PARTITIONS, "Agent ready");
    let workspaces = Arc::new(Workspaces::new(base.cfg.clone()));
    workspaces.ensure_all()?;
    let svc = Arc::new(AgentService {
        bus: base.bus.clone(),
        cfg,
        models,
        runs,
        metrics: metrics.clone(),
        history: HistoryCache::default(),
        workspaces,
        tools: Registry::default(),
        orphans: (0..topology::PARTITIONS)
            .map(|_| std::sync::atomic::AtomicU64::new(u64::MAX))
            .collect(),
        running: Arc::new(crate::queue::Running::default()),
        absorbed: crate::queue::Absorbed::default(),
        turn_stream: tokio::sync::OnceCell::new(),
    });
    tokio::spawn(crate::queue::listen(
        base.bus.clone(),
        svc.running.clone(),
        base.shutdown.clone(),
    ));
    let work = Arc::new(PartitionRunner {
        svc,
        bus: base.bus.clone(),
        permits,
        readiness: base.readiness.clone(),
    });
    let me = Member {
        group: topology::CONSUMER_AGENT,
        replica,
        partitions: topology::PARTITIONS,
    };
    base.readiness.set("consumer", true);
    let owned = metrics.partitions_owned.clone();
    ownership::run(&base.bus, me, work, base.shutdown.clone(), move |n| {
        owned.set(n as i64)
    })
    .await?;
    Ok(())
}
