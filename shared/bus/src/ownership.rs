//! Partition ownership: which replica works which partition.
//!
//! A partitioned service (the agent, the router, the store, the channels service) has
//! one durable consumer per partition. A
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
//! A dead replica's partitions move within `LEASE_TTL` plus one heartbeat (about 11 s).
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

mod fence;
mod shared;
#[cfg(test)]
mod tests;

pub use fence::{Fence, Fenced, FENCE_MARGIN};
pub use shared::{rewind, serve_shared, SharedConsumers};

/// How long a lease or a membership lives without renewal. Longer than a NATS cluster
/// needs to elect a new leader for the bucket (a few seconds), so losing one node does
/// not cost every lease; short enough that a dead replica's partitions move within 15 s.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// A holder that could not renew for this long stops its work on its own: the server
/// may expire the lease soon, and a successor must not find it still working.
const SELF_EXPIRY: Duration = Duration::from_secs(7);
/// How often members and leases are renewed and the assignment recomputed.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

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
            let fence = Fence::acquired(kv.clone(), key, token.clone(), p, (sent, rev));
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
        // The work found the lease lost (a fence check): it has stopped, so the lease
        // must not be kept, or the partition would be held and worked by nobody. If
        // the lease is still this replica's, the next round takes it again.
        if h.fence.is_lost() && !h.releasing {
            tracing::warn!(
                partition = p,
                "Partition's work found its lease lost; letting it go"
            );
            lost.push(*p);
            continue;
        }
        let key = me.key(*p);
        let sent = std::time::Instant::now();
        let result = match kv.update(&key, h.token.clone(), h.rev).await {
            Ok(rev) => {
                h.fence.renewed(sent, rev);
                Ok(rev)
            }
            // An earlier renewal may have landed without its ack reaching us.
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                match kv.entry(&key).await {
                    // Answered by a replica that is behind (any replica answers a read;
                    // the server has a later revision): try again, as for an
                    // unreachable server.
                    Ok(Some(en)) if en.revision <= h.rev => {
                        Err((false, format!("{e}; a replica behind answered")))
                    }
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
