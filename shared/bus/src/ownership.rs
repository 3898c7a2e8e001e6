//! Partition ownership: which replica works which partition.
//!
//! A partitioned service (the agent today) has one durable consumer per partition. A
//! replica works a partition only while it holds the partition's **lease**, a key
//! `<group>.p.<partition>` in the KV bucket `claw_leases`:
//!
//! - **Membership**: every replica writes `<group>.m.<replica>` each second. The bucket's
//!   `max_age` is the lease TTL, so the key of a replica that stopped writing vanishes.
//! - **Assignment**: rendezvous hashing over the live members. Every replica computes
//!   the same owner for every partition; when a replica joins, only its share moves;
//!   when one dies, only its partitions move.
//! - **Leases**: taken with `create` (fails while another holds it), renewed each second
//!   by compare-and-swap on the revision (`update`), released by a revision-checked
//!   delete once the work drained. A renewal that fails means the lease expired and may
//!   be someone else's: the work stops at once and its [`Fence`] reports it lost.
//! - **Fencing**: the lease's value is unique to one acquisition. A handler checks its
//!   [`Fence`] before writing effects a successor could also write; a stale owner (a
//!   paused process whose lease expired) finds another value and abandons the message.
//!   The consumer itself is recreated by each new owner (see the agent's takeover), so
//!   the server stops delivering to, and accepting acks from, the stale owner.
//!
//! A dead replica's partitions move within `LEASE_TTL` plus one heartbeat (about 7 s).
//!
//! Partitions are **numbered** (`0..n`, the same on every replica: the agent, router
//! and store split their subjects by a hash) or **named** ([`NamedMember`]: the
//! channels service's accounts, `telegram.default`). Replicas of a named group may know
//! different partitions (a rolling configuration change adds, removes or reorders
//! accounts), so a partition's lease is keyed by its name (`channels.p.telegram.default`,
//! never by its position in a list), each member's value lists the names it can run,
//! and a name's owner is chosen by rendezvous hashing among the members that list it:
//! a partition known only to some replicas runs on one of them, and nowhere twice.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{topology, Bus, BusError};

/// How long a lease or a membership lives without renewal. Longer than a NATS cluster
/// needs to elect a new leader for the bucket (a few seconds), so losing one node does
/// not cost every lease; short enough that a dead replica's partitions move within 15 s.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// A holder that could not renew for this long stops its work on its own: the server
/// may expire the lease soon, and a successor must not find it still working.
const SELF_EXPIRY: Duration = Duration::from_secs(7);
/// How often members and leases are renewed and the assignment recomputed.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// The lease under which a partition's messages are worked.
#[derive(Clone)]
pub struct Fence {
    inner: Arc<FenceInner>,
}

struct FenceInner {
    kv: kv::Store,
    key: String,
    token: Bytes,
    partition: u32,
    lost: CancellationToken,
    /// Until when the lease is known to be ours without asking the server: a write of
    /// the lease sent at `t` and acknowledged keeps it at least until `t + LEASE_TTL`
    /// (the key can only vanish by expiring); [`FENCE_MARGIN`] earlier, to leave time
    /// for what the check guards.
    valid_until: std::sync::Mutex<std::time::Instant>,
}

/// How long before a lease could expire a fence check stops trusting the last renewal
/// and reads the lease from the server (a replica frozen that long, or unable to renew).
pub const FENCE_MARGIN: Duration = Duration::from_secs(4);

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fence")
            .field("key", &self.inner.key)
            .field("lost", &self.inner.lost.is_cancelled())
            .finish()
    }
}

/// Why a fence check failed.
#[derive(Debug, thiserror::Error)]
pub enum Fenced {
    /// The lease expired or belongs to another replica: abandon the message.
    #[error("partition {0} is no longer owned by this replica")]
    Lost(u32),
    /// The lease could not be read (NATS unreachable): retry later.
    #[error("partition lease unreadable: {0}")]
    Unknown(String),
}

impl Fence {
    pub fn partition(&self) -> u32 {
        self.inner.partition
    }

    /// Cancelled when this replica learns it lost the lease.
    pub fn lost(&self) -> &CancellationToken {
        &self.inner.lost
    }

    fn valid_until(&self) -> std::sync::MutexGuard<'_, std::time::Instant> {
        self.inner
            .valid_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records an acknowledged write of the lease that was sent at `sent`.
    fn renewed(&self, sent: std::time::Instant) {
        let until = sent + LEASE_TTL.saturating_sub(FENCE_MARGIN);
        let mut v = self.valid_until();
        *v = (*v).max(until);
    }

    /// True once the lease is known to be lost (no I/O).
    pub fn is_lost(&self) -> bool {
        self.inner.lost.is_cancelled()
    }

    /// Verifies that the lease is still this acquisition's: from the last renewal when
    /// it was recent (no I/O on the hot path), else against the server.
    pub async fn check(&self) -> Result<(), Fenced> {
        if self.is_lost() {
            return Err(Fenced::Lost(self.inner.partition));
        }
        if std::time::Instant::now() < *self.valid_until() {
            return Ok(());
        }
        match self.inner.kv.get(&self.inner.key).await {
            Ok(Some(v)) if v == self.inner.token => Ok(()),
            Ok(_) => {
                self.inner.lost.cancel();
                Err(Fenced::Lost(self.inner.partition))
            }
            Err(e) => Err(Fenced::Unknown(e.to_string())),
        }
    }
}

/// The work done on one owned partition.
pub trait PartitionWork: Send + Sync + 'static {
    /// Works `partition` until `stop` is cancelled, then drains and returns. `epoch` is
    /// unique per acquisition and grows with each one.
    fn run(
        &self,
        partition: u32,
        epoch: u64,
        fence: Fence,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send;
}

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

/// Who takes part in ownership.
#[derive(Debug, Clone)]
pub struct Member {
    /// The service (`agent`): replicas of one group share its partitions.
    pub group: &'static str,
    /// This replica's id: `[A-Za-z0-9_-]`, unique among the group's live replicas.
    pub replica: String,
    pub partitions: u32,
}

/// A replica of a group whose partitions are named ([`run_named`]).
#[derive(Debug, Clone)]
pub struct NamedMember {
    /// The service (`channels`).
    pub group: &'static str,
    /// This replica's id: `[A-Za-z0-9_-]`, unique among the group's live replicas.
    pub replica: String,
    /// The partitions this replica can run, each a lease key's last part
    /// (`telegram.default`: 1-200 characters of `[-_.A-Za-z0-9]`, dot-separated
    /// non-empty tokens). [`PartitionWork::run`] is given a partition's position here.
    pub names: Vec<String>,
}

/// A member's value in a named group: who it is and what it can run.
#[derive(serde::Serialize, serde::Deserialize)]
struct Membership {
    replica: String,
    partitions: Vec<String>,
}

/// True when `name` can be a named partition (see [`NamedMember::names`]).
pub fn valid_partition_name(name: &str) -> bool {
    (1..=200).contains(&name.len())
        && name.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A live member of a group: its id, and for a named group the partitions it lists.
#[derive(Debug, Clone)]
struct Live {
    replica: String,
    names: HashSet<String>,
}

/// How this replica takes part: its group, its id and its partitions.
struct Plan {
    group: &'static str,
    replica: String,
    partitions: u32,
    /// Named partitions (`None`: numbered `0..partitions`).
    names: Option<Vec<String>>,
}

impl Plan {
    /// The lease key of partition `p` (a position in `names` for a named group).
    fn key(&self, p: u32) -> String {
        match &self.names {
            Some(names) => format!("{}.p.{}", self.group, names[p as usize]),
            None => lease_key(self.group, p),
        }
    }

    /// What this replica writes as its membership.
    fn membership(&self) -> Result<Bytes, BusError> {
        match &self.names {
            None => Ok(self.replica.clone().into()),
            Some(names) => serde_json::to_vec(&Membership {
                replica: self.replica.clone(),
                partitions: names.clone(),
            })
            .map(Bytes::from)
            .map_err(|e| BusError::Topology(format!("membership: {e}"))),
        }
    }

    /// The partitions `members` assign to this replica.
    fn wanted(&self, members: &[Live]) -> HashSet<u32> {
        let me = Some(self.replica.as_str());
        match &self.names {
            None => {
                let ids: Vec<String> = members.iter().map(|m| m.replica.clone()).collect();
                (0..self.partitions)
                    .filter(|p| owner(&ids, *p) == me)
                    .collect()
            }
            Some(names) => (0..self.partitions)
                .filter(|p| owner_of_name(members, &names[*p as usize]) == me)
                .collect(),
        }
    }
}

/// The owner of `partition` among `members` (rendezvous hashing).
pub fn owner(members: &[String], partition: u32) -> Option<&str> {
    let key = partition.to_string();
    members
        .iter()
        .max_by_key(|m| (score(m, &key), m.as_str()))
        .map(String::as_str)
}

/// The owner of named partition `name`: rendezvous hashing among the members that
/// list it (one that does not know it cannot run it).
fn owner_of_name<'a>(members: &'a [Live], name: &str) -> Option<&'a str> {
    members
        .iter()
        .filter(|m| m.names.contains(name))
        .max_by_key(|m| (score(&m.replica, name), m.replica.as_str()))
        .map(|m| m.replica.as_str())
}

fn score(member: &str, partition: &str) -> u64 {
    // FNV-1a, then a splitmix64 finaliser so near-equal inputs spread well.
    let mut z = crate::subjects::session_hash(&format!("{member}/{partition}"));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

struct Held {
    rev: u64,
    renewed: std::time::Instant,
    token: Bytes,
    fence: Fence,
    stop: CancellationToken,
    task: JoinHandle<()>,
    releasing: bool,
}

/// Takes part in the group's ownership until `shutdown`, running `work` on each
/// partition this replica owns; on shutdown it drains its partitions and hands their
/// leases back at once. `owned` is called with the number of partitions held.
pub async fn run<W: PartitionWork>(
    bus: &Bus,
    me: Member,
    work: Arc<W>,
    shutdown: CancellationToken,
    owned: impl Fn(usize) + Send,
) -> Result<(), BusError> {
    let plan = Plan {
        group: me.group,
        replica: me.replica,
        partitions: me.partitions,
        names: None,
    };
    run_plan(bus, plan, work, shutdown, owned).await
}

/// [`run`] for a group of named partitions: `work` is given the position in
/// `me.names` of each partition this replica owns.
pub async fn run_named<W: PartitionWork>(
    bus: &Bus,
    me: NamedMember,
    work: Arc<W>,
    shutdown: CancellationToken,
    owned: impl Fn(usize) + Send,
) -> Result<(), BusError> {
    let mut seen = HashSet::new();
    for n in &me.names {
        if !valid_partition_name(n) || !seen.insert(n.as_str()) {
            return Err(BusError::Topology(format!(
                "partition name `{n}` is invalid or repeated (1-200 characters of [-_.A-Za-z0-9], dot-separated)"
            )));
        }
    }
    let plan = Plan {
        group: me.group,
        replica: me.replica,
        partitions: u32::try_from(me.names.len())
            .map_err(|_| BusError::Topology("too many partitions".into()))?,
        names: Some(me.names),
    };
    run_plan(bus, plan, work, shutdown, owned).await
}

async fn run_plan<W: PartitionWork>(
    bus: &Bus,
    me: Plan,
    work: Arc<W>,
    shutdown: CancellationToken,
    owned: impl Fn(usize) + Send,
) -> Result<(), BusError> {
    if !crate::subjects::is_token(&me.replica) {
        return Err(BusError::Topology(format!(
            "replica id `{}` must be 1-64 characters of [A-Za-z0-9_-]",
            me.replica
        )));
    }
    let kv =
        crate::service::patiently("lease bucket", || bus.js.get_key_value(topology::KV_LEASES))
            .await
            .map_err(|e| BusError::Topology(format!("bucket {}: {e}", topology::KV_LEASES)))?;
    let member_key = format!("{}.m.{}", me.group, me.replica);
    let membership = me.membership()?;
    let mut held: HashMap<u32, Held> = HashMap::new();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled(), if !stopping => {}
        }
        if shutdown.is_cancelled() && !stopping {
            stopping = true;
            let _ = kv.delete(&member_key).await;
            for h in held.values_mut() {
                h.releasing = true;
                h.stop.cancel();
            }
        }
        if !stopping {
            if let Err(e) = kv.put(&member_key, membership.clone()).await {
                tracing::warn!(error = %e, "Cannot renew membership");
            }
        }
        renew(&kv, &me, &mut held).await;
        release_drained(&kv, &me, &mut held).await;
        if stopping {
            owned(held.values().filter(|h| !h.releasing).count());
            if held.is_empty() {
                return Ok(());
            }
            continue;
        }
        let members = match live_members(&bus.client, &kv, &me).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot list members; keeping current partitions");
                continue;
            }
        };
        let want = me.wanted(&members);
        for (p, h) in held.iter_mut() {
            if !want.contains(p) && !h.releasing {
                tracing::info!(partition = p, "Handing partition over to its new owner");
                h.releasing = true;
                h.stop.cancel();
            }
        }
        for p in want {
            if held.contains_key(&p) {
                continue;
            }
            let key = me.key(p);
            let token: Bytes = format!("{}:{:016x}", me.replica, rand::random::<u64>()).into();
            let sent = std::time::Instant::now();
            let Some(rev) = acquire(&kv, &key, &token, &me.replica).await else {
                continue; // still held by its previous owner, which will hand it over
            };
            tracing::info!(partition = p, lease = %key, epoch = rev, "Partition acquired");
            let fence = Fence {
                inner: Arc::new(FenceInner {
                    kv: kv.clone(),
                    key,
                    token: token.clone(),
                    partition: p,
                    lost: CancellationToken::new(),
                    valid_until: std::sync::Mutex::new(sent),
                }),
            };
            fence.renewed(sent);
            let stop = fence.lost().child_token();
            let task = {
                let (work, fence, stop) = (work.clone(), fence.clone(), stop.clone());
                tokio::spawn(async move { work.run(p, rev, fence, stop).await })
            };
            held.insert(
                p,
                Held {
                    rev,
                    renewed: std::time::Instant::now(),
                    token,
                    fence,
                    stop,
                    task,
                    releasing: false,
                },
            );
        }
        owned(held.values().filter(|h| !h.releasing).count());
    }
}

/// Takes a free lease, or one left by an earlier process with this replica id (ids
/// are unique among live replicas, so that process is dead): a restarted replica
/// resumes its partitions at once instead of waiting for the TTL.
async fn acquire(kv: &kv::Store, key: &str, token: &Bytes, replica: &str) -> Option<u64> {
    if let Ok(rev) = kv.create(key, token.clone()).await {
        return Some(rev);
    }
    let entry = kv.entry(key).await.ok()??;
    let mine = entry
        .value
        .strip_prefix(replica.as_bytes())
        .is_some_and(|rest| rest.first() == Some(&b':'));
    if mine && entry.operation == kv::Operation::Put {
        return kv.update(key, token.clone(), entry.revision).await.ok();
    }
    None
}

fn lease_key(group: &str, partition: u32) -> String {
    format!("{group}.p.{partition}")
}

async fn renew(kv: &kv::Store, me: &Plan, held: &mut HashMap<u32, Held>) {
    let mut lost = Vec::new();
    for (p, h) in held.iter_mut() {
        let key = me.key(*p);
        let sent = std::time::Instant::now();
        let result = match kv.update(&key, h.token.clone(), h.rev).await {
            Ok(rev) => {
                h.fence.renewed(sent);
                Ok(rev)
            }
            // An earlier renewal may have landed without its ack reaching us.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                match kv.entry(&key).await {
                    Ok(Some(en)) if en.value == h.token && en.operation == kv::Operation::Put => {
                        Ok(en.revision)
                    }
                    _ => Err((true, e.to_string())),
                }
            }
            Err(e) => Err((false, e.to_string())),
        };
        match result {
            Ok(rev) => {
                h.rev = rev;
                h.renewed = std::time::Instant::now();
            }
            Err((taken, error)) if taken || h.renewed.elapsed() > SELF_EXPIRY => {
                tracing::warn!(
                    partition = p,
                    error,
                    "Partition lease lost; stopping its work"
                );
                h.fence.lost().cancel();
                lost.push(*p);
            }
            Err((_, error)) => {
                tracing::warn!(
                    partition = p,
                    error,
                    "Cannot renew partition lease yet; keeping it"
                );
            }
        }
    }
    for p in lost {
        // Its work stops on its own (the fence's token); the lease is not ours to delete.
        held.remove(&p);
    }
}

async fn release_drained(kv: &kv::Store, me: &Plan, held: &mut HashMap<u32, Held>) {
    let done: Vec<u32> = held
        .iter()
        .filter(|(_, h)| h.releasing && h.task.is_finished())
        .map(|(p, _)| *p)
        .collect();
    for p in done {
        if let Some(h) = held.remove(&p) {
            let _ = kv.delete_expect_revision(me.key(p), Some(h.rev)).await;
            tracing::info!(partition = p, "Partition released");
        }
    }
}

async fn live_members(
    client: &async_nats::Client,
    kv: &kv::Store,
    me: &Plan,
) -> Result<Vec<Live>, String> {
    let prefix = format!("{}.m.", me.group);
    let named = me.names.is_some();
    let mut out: Vec<Live> = list_keys(client, kv, &prefix, named)
        .await?
        .into_iter()
        .filter_map(|(k, value)| {
            let replica = k.strip_prefix(&prefix)?.to_owned();
            let names = if named {
                // A member whose value cannot be read (an earlier release wrote only
                // its id) is taken to run none of the names.
                serde_json::from_slice::<Membership>(&value)
                    .ok()
                    .filter(|m| m.replica == replica)
                    .map(|m| m.partitions.into_iter().collect())
                    .unwrap_or_default()
            } else {
                HashSet::new()
            };
            Some(Live { replica, names })
        })
        .collect();
    out.sort_by(|a, b| a.replica.cmp(&b.replica));
    Ok(out)
}

/// Live keys of the lease bucket under `prefix` (ending in `.`), with their values
/// when `values` (else empty): a short-lived push consumer filtered to them, so a
/// group's rights need to cover only its own keys (`kv.keys()` would read the whole
/// bucket).
async fn list_keys(
    client: &async_nats::Client,
    kv: &kv::Store,
    prefix: &str,
    values: bool,
) -> Result<Vec<(String, Bytes)>, String> {
    use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy, ReplayPolicy};
    let inbox = client.new_inbox();
    // Subscribed before the consumer exists, so no delivery can come too early.
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| e.to_string())?;
    let subject_prefix = format!("$KV.{}.", topology::KV_LEASES);
    let created = kv
        .stream
        .create_consumer(push::Config {
            name: Some(format!("list-{}", rand::random::<u64>())),
            deliver_subject: inbox,
            filter_subject: format!("{subject_prefix}{prefix}>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ack_policy: AckPolicy::None,
            replay_policy: ReplayPolicy::Instant,
            headers_only: !values,
            inactive_threshold: Duration::from_secs(5),
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut pending = created.cached_info().num_pending;
    let mut keys = Vec::new();
    while pending > 0 {
        let m = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .map_err(|_| "member listing stalled".to_string())?
            .ok_or("member listing ended")?;
        pending -= 1;
        let deleted = m
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some();
        if let Some(k) = m.subject.strip_prefix(subject_prefix.as_str()) {
            if !deleted {
                keys.push((k.to_owned(), m.payload.clone()));
            }
        }
    }
    let _ = sub.unsubscribe().await;
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("agent-{i}")).collect()
    }

    #[test]
    fn every_partition_has_one_owner_and_shares_are_fair() {
        let m = members(3);
        let mut counts = HashMap::new();
        for p in 0..300 {
            *counts.entry(owner(&m, p).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(
            counts.values().all(|c| (60..=140).contains(c)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_joining_replica_moves_only_its_share() {
        let (before, after) = (members(2), members(3));
        for p in 0..256 {
            let (a, b) = (owner(&before, p).unwrap(), owner(&after, p).unwrap());
            assert!(
                a == b || b == "agent-2",
                "partition {p} moved from {a} to {b}"
            );
        }
    }

    #[test]
    fn no_members_no_owner() {
        assert_eq!(owner(&[], 3), None);
    }

    fn plan(replica: &str, names: Option<&[&str]>) -> Plan {
        Plan {
            group: "channels",
            replica: replica.into(),
            partitions: names.map_or(4, |n| n.len() as u32),
            names: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn live(p: &Plan) -> Live {
        Live {
            replica: p.replica.clone(),
            names: p.names.iter().flatten().cloned().collect(),
        }
    }

    #[test]
    fn numbered_groups_keep_their_keys_and_owners() {
        let p = plan("agent-1", None);
        assert_eq!(p.key(3), "channels.p.3");
        assert_eq!(&p.membership().unwrap()[..], b"agent-1");
        // The same hash input as before named partitions existed.
        assert_eq!(score("agent-1", "7"), {
            let mut z = crate::subjects::session_hash("agent-1/7");
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^ (z >> 31)
        });
        let m = members(3);
        let lives: Vec<Live> = m
            .iter()
            .map(|r| Live {
                replica: r.clone(),
                names: HashSet::new(),
            })
            .collect();
        for r in &m {
            let mine = Plan {
                replica: r.clone(),
                ..plan("", None)
            }
            .wanted(&lives);
            for p in 0..4 {
                assert_eq!(mine.contains(&p), owner(&m, p) == Some(r.as_str()));
            }
        }
    }

    #[test]
    fn named_partitions_run_once_among_the_replicas_that_know_them() {
        // A rolling change: a reordered list, one account added on `a`, one removed on `b`.
        let a = plan(
            "a",
            Some(&[
                "telegram.new",
                "telegram.default",
                "discord.default",
                "slack.x",
            ]),
        );
        let b = plan(
            "b",
            Some(&[
                "discord.default",
                "slack.x",
                "telegram.default",
                "telegram.gone",
            ]),
        );
        let members = vec![live(&a), live(&b)];
        let (wa, wb) = (a.wanted(&members), b.wanted(&members));
        let names = |p: &Plan, w: &HashSet<u32>| -> HashSet<String> {
            w.iter()
                .map(|i| p.names.as_ref().unwrap()[*i as usize].clone())
                .collect()
        };
        let (na, nb) = (names(&a, &wa), names(&b, &wb));
        assert!(na.is_disjoint(&nb), "{na:?} {nb:?}");
        let all: HashSet<String> = na.union(&nb).cloned().collect();
        for n in [
            "telegram.new",
            "telegram.default",
            "discord.default",
            "slack.x",
            "telegram.gone",
        ] {
            assert!(all.contains(n), "{n} runs nowhere: {na:?} {nb:?}");
        }
        assert!(na.contains("telegram.new") && nb.contains("telegram.gone"));
        assert_eq!(a.key(1), "channels.p.telegram.default");
        let m: Membership = serde_json::from_slice(&a.membership().unwrap()).unwrap();
        assert_eq!(m.partitions.len(), 4);
    }

    #[test]
    fn partition_names_are_lease_key_tokens() {
        assert!(valid_partition_name("telegram.default"));
        assert!(valid_partition_name("irc.my_bot-2"));
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>", "a/b", "é"] {
            assert!(!valid_partition_name(bad), "{bad}");
        }
    }
}
