//! The fence of a partition lease: what a handler checks before writing effects a
//! successor could also write.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::LEASE_TTL;

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
    /// The highest revision of the lease this acquisition wrote and saw acknowledged:
    /// an answer older than it comes from a replica that is behind.
    revision: std::sync::atomic::AtomicU64,
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
    /// The fence of a lease acquired at revision `rev` with a write sent at `sent`.
    pub(super) fn acquired(
        kv: kv::Store,
        key: String,
        token: Bytes,
        partition: u32,
        (sent, rev): (std::time::Instant, u64),
    ) -> Fence {
        let fence = Fence {
            inner: Arc::new(FenceInner {
                kv,
                key,
                token,
                partition,
                lost: CancellationToken::new(),
                valid_until: std::sync::Mutex::new(sent),
                revision: std::sync::atomic::AtomicU64::new(rev),
            }),
        };
        fence.renewed(sent, rev);
        fence
    }

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

    /// Records an acknowledged write of the lease, at revision `rev`, that was sent at
    /// `sent`.
    pub(super) fn renewed(&self, sent: std::time::Instant, rev: u64) {
        let until = sent + LEASE_TTL.saturating_sub(FENCE_MARGIN);
        let mut v = self.valid_until();
        *v = (*v).max(until);
        self.inner
            .revision
            .fetch_max(rev, std::sync::atomic::Ordering::Relaxed);
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
        // A read of the lease may be answered by any replica of the bucket (a direct
        // get), one that is behind included (a node restarted and catching up): an
        // answer older than what this acquisition wrote says nothing, and must not stop
        // the partition's work while its lease is in fact still ours.
        let known = self
            .inner
            .revision
            .load(std::sync::atomic::Ordering::Relaxed);
        match self.inner.kv.entry(&self.inner.key).await {
            Ok(Some(e)) if e.revision < known => Err(Fenced::Unknown(format!(
                "a replica behind answered revision {} (ours is {known})",
                e.revision
            ))),
            Ok(Some(e)) if e.value == self.inner.token && e.operation == kv::Operation::Put => {
                Ok(())
            }
            // No lease at all, before ours could have expired: a replica behind.
            Ok(None) if std::time::Instant::now() < *self.valid_until() + FENCE_MARGIN => Err(
                Fenced::Unknown("a replica behind does not know the lease yet".into()),
            ),
            Ok(_) => {
                self.inner.lost.cancel();
                Err(Fenced::Lost(self.inner.partition))
            }
            Err(e) => Err(Fenced::Unknown(e.to_string())),
        }
    }
}
