//! The boxes one agent may run at once on this replica
//! (`sandbox.max_concurrent_per_agent`): a semaphore per agent. A command waits its
//! turn within its own timeout; a command asked to go to the background does not wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ToolError;

/// Every agent's box permits on this replica.
#[derive(Default)]
pub struct Boxes {
    per_agent: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A box's place; the next waiting command starts when it is dropped.
pub type Permit = OwnedSemaphorePermit;

impl Boxes {
    fn semaphore(&self, agent: &str, cap: usize) -> Arc<Semaphore> {
        self.per_agent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(agent.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(cap)))
            .clone()
    }

    /// A place for one of `agent`'s boxes, waiting at most `wait` (none: not at all).
    pub async fn enter(
        &self,
        agent: &str,
        cap: usize,
        wait: Option<Duration>,
    ) -> Result<Permit, ToolError> {
        let sem = self.semaphore(agent, cap);
        let busy = || {
            ToolError::unavailable(format!(
                "busy: this agent already runs {cap} commands at once \
                 (sandbox.max_concurrent_per_agent); wait for one to end or kill a \
                 background one"
            ))
        };
        match wait {
            None => sem.try_acquire_owned().map_err(|_| busy()),
            Some(w) => match tokio::time::timeout(w, sem.acquire_owned()).await {
                Ok(Ok(p)) => Ok(p),
                _ => Err(busy()),
            },
        }
    }

    /// Boxes `agent` runs now.
    pub fn running(&self, agent: &str, cap: usize) -> usize {
        cap.saturating_sub(self.semaphore(agent, cap).available_permits())
    }
}
