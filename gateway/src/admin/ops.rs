//! Adapter operations as records in the state store: `ops/<name>` holds the one operation on
//! adapter `name` that is pending or recently finished. A record is written (create-only, so
//! two operations on one adapter cannot run at once) before any backend is called, carries the
//! revision of the adapter's record that it was authorised against, and receives its outcome in
//! the same transaction that changes the desired set.

use super::BackendResult;
use crate::error::Error;
use crate::loras::DesiredLora;
use crate::store::{Expect, Revision, Snapshot};
use serde::{Deserialize, Serialize};

/// Keys of operation records.
pub const KEY_PREFIX: &str = "ops/";

/// The store key of the operation on adapter `name`.
pub fn key(name: &str) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// One operation on one adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Random, so the gateway that recorded it recognises its own.
    pub id: String,
    pub action: Action,
    /// The adapter record's `mod_revision` when the operation was authorised (`None`: there
    /// was none). The outcome is recorded only if the record is still at it.
    pub expect: Option<Revision>,
    /// The tenant whose token asked for it.
    pub requested_by: String,
    /// The gateway that took the request.
    pub gateway: String,
    /// Seconds since the Unix epoch.
    pub requested_at: u64,
    /// Set by the leader before it calls any backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<Started>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

/// Which leader took an operation up, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Started {
    pub by: String,
    pub at: u64,
}

/// Seconds within which a leader must take up a recorded operation. A write that timed out
/// while the store had no quorum may still be committed when quorum returns, long after its
/// client was told 503: such a record, never started and this old, is failed, not run.
/// (A commit answers within the store's request deadline of being asked for; the rest is room
/// for a leader failover and clock skew between gateways.)
pub const ACCEPT_WITHIN_S: u64 = 15;

/// What an operation does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Load (or hot-swap) `lora` on every backend and make it the desired record.
    Load { lora: DesiredLora },
    /// Unload `lora` from every backend and remove its record.
    Unload { lora: DesiredLora },
}

impl Action {
    pub fn lora(&self) -> &DesiredLora {
        match self {
            Action::Load { lora } | Action::Unload { lora } => lora,
        }
    }
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    Done { hot_swap: bool, backends: Vec<BackendResult>, finished_at: u64 },
    Failed { error: Error, finished_at: u64 },
}

impl Outcome {
    pub fn finished_at(&self) -> u64 {
        match self {
            Outcome::Done { finished_at, .. } | Outcome::Failed { finished_at, .. } => *finished_at,
        }
    }
}

/// The operation on `name` in `snapshot`, with its record's revision.
pub fn read(snapshot: &Snapshot, name: &str) -> Option<(Operation, Revision)> {
    let entry = snapshot.entries.get(&key(name))?;
    match serde_json::from_str(&entry.value) {
        Ok(op) => Some((op, entry.mod_revision)),
        Err(e) => {
            tracing::warn!(key = %key(name), error = %e, "ignoring an operation record this gateway cannot read");
            None
        }
    }
}

/// Every operation record in `snapshot`, by adapter name.
pub fn all(snapshot: &Snapshot) -> Vec<(String, Operation, Revision)> {
    snapshot
        .under(KEY_PREFIX)
        .filter_map(|(name, _)| read(snapshot, name).map(|(op, rev)| (name.to_string(), op, rev)))
        .collect()
}

/// The expectation an operation's `expect` stands for.
pub fn expectation(expect: Option<Revision>) -> Expect {
    expect.map_or(Expect::Absent, Expect::At)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    crate::unix_seconds()
}
