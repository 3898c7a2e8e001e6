//! A turn's checkpoint (invariant 4): after each step — a model call answered, tool
//! calls about to be sent, each tool result — the turn's progress is written to the
//! `claw_runs` bucket, so a redelivered turn resumes where the crashed one stopped
//! and never sends a tool call twice. Writes are compare-and-set on the entry's
//! revision: a replica that lost the session to another stops at its next step.

use async_nats::jetstream::kv;
use clawbus_bus::subjects;
use clawbus_wire::{ChatMessage, Usage};
use serde::{Deserialize, Serialize};

/// The marker of a finished run (written by earlier releases too).
pub const DONE: &[u8] = b"done";

/// What a turn has done so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Messages the turn added after the user's, in order: assistant messages with
    /// tool calls, tool results.
    pub steps: Vec<ChatMessage>,
    /// Model call ids of the calls sent to the sandbox whose results are not in
    /// `steps` yet: after a crash they may or may not have run.
    pub sent: Vec<String>,
    /// Tool calls sent so far (the bus ids are `<run_id>:tool:<n>`).
    pub calls: u32,
    /// Model calls answered so far.
    pub model_calls: u32,
    /// Usage of every model call so far, summed.
    pub usage: Usage,
    /// The model that answered last.
    #[serde(default)]
    pub model: Option<String>,
    /// A compaction made by this turn: the summary, and the first sequence kept.
    #[serde(default)]
    pub summary: Option<(String, u64)>,
    /// The usage of each model call whose answer is a step: (index in `steps`, usage).
    #[serde(default)]
    pub step_usage: Vec<(usize, Usage)>,
    /// What the model calls so far cost (US dollars), for those with prices.
    #[serde(default)]
    pub cost_usd: Option<f64>,
    /// How much the model thinks in this turn.
    #[serde(default)]
    pub thinking: crate::providers::Thinking,
    /// Later turns of the session this run took (`steer`, `collect`): they never run
    /// on their own.
    #[serde(default)]
    pub absorbed: Vec<String>,
    /// `collect`: the run's message with the ones it took.
    #[serde(default)]
    pub collected: Option<String>,
}

impl Progress {
    /// Bytes of the steps' text (what the run event will carry).
    pub fn step_bytes(&self) -> usize {
        self.steps
            .iter()
            .map(|m| {
                m.content.len()
                    + m.tool_calls
                        .iter()
                        .map(|c| c.arguments.len() + c.name.len() + c.id.len() + 64)
                        .sum::<usize>()
                    + 64
            })
            .sum()
    }
}

/// Where a run's checkpoint lives, and the revision this turn last saw.
pub struct Checkpoint<'a> {
    kv: &'a kv::Store,
    key: String,
    revision: Option<u64>,
}

/// Why a checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("another replica advanced this run (it owns the session now)")]
    Superseded,
    #[error("checkpoint store: {0}")]
    Store(String),
}

impl<'a> Checkpoint<'a> {
    pub fn new(kv: &'a kv::Store, run_id: &str) -> Self {
        Self {
            kv,
            key: key(run_id),
            revision: None,
        }
    }

    /// The run's state: finished (`Ok(None)` with `done`), in progress, or new.
    pub async fn load(&mut self) -> Result<Loaded, CheckpointError> {
        let entry = self
            .kv
            .entry(self.key.clone())
            .await
            .map_err(|e| CheckpointError::Store(e.to_string()))?;
        let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(Loaded::New);
        };
        self.revision = Some(e.revision);
        if e.value.as_ref() == DONE {
            return Ok(Loaded::Done);
        }
        match clawbus_wire::decode_bounded::<Progress>(&e.value) {
            Ok(p) => Ok(Loaded::InProgress(Box::new(p))),
            Err(err) => {
                // Written by this code; unreadable means damaged: start over rather
                // than fail the turn forever (a tool call may repeat — logged).
                tracing::error!(key = %self.key, error = %err, "Unreadable checkpoint; the run starts over");
                Ok(Loaded::New)
            }
        }
    }

    /// Writes the run's progress, unless another writer got there first.
    pub async fn save(&mut self, p: &Progress) -> Result<(), CheckpointError> {
        let bytes =
            rmp_serde::to_vec_named(p).map_err(|e| CheckpointError::Store(e.to_string()))?;
        self.write(bytes.into()).await
    }

    /// Marks the run finished.
    pub async fn finish(&mut self) -> Result<(), CheckpointError> {
        self.write(DONE.into()).await
    }

    async fn write(&mut self, value: bytes::Bytes) -> Result<(), CheckpointError> {
        let rev = match self.revision {
            Some(rev) => self
                .kv
                .update(self.key.clone(), value, rev)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => CheckpointError::Superseded,
                    _ => CheckpointError::Store(e.to_string()),
                })?,
            None => self
                .kv
                .create(self.key.clone(), value)
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => CheckpointError::Superseded,
                    _ => CheckpointError::Store(e.to_string()),
                })?,
        };
        self.revision = Some(rev);
        Ok(())
    }
}

/// A run's state as its checkpoint says.
#[derive(Debug)]
pub enum Loaded {
    New,
    InProgress(Box<Progress>),
    Done,
}

/// KV keys allow `[-/_=.a-zA-Z0-9]`: a run id becomes two FNV-64 hashes.
pub fn key(run_id: &str) -> String {
    let salted = format!("clawbus:{run_id}");
    format!(
        "{:016x}{:016x}",
        subjects::session_hash(run_id),
        subjects::session_hash(&salted)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_keys_are_kv_safe() {
        let k = key("run:http:default:ab/c d");
        assert_eq!(k.len(), 32);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn progress_round_trips() {
        let p = Progress {
            steps: vec![ChatMessage::new(clawbus_wire::Role::Tool, "ok")],
            sent: vec!["c1".into()],
            calls: 1,
            ..Default::default()
        };
        let b = rmp_serde::to_vec_named(&p).unwrap();
        assert_eq!(rmp_serde::from_slice::<Progress>(&b).unwrap(), p);
    }
}
