//! KV-aware routing: which backend already holds most of a request's prompt in its prefix cache.
//!
//! Each backend streams the ids of the KV blocks it caches (`WatchPrefixCache`: a snapshot, then
//! changes); a task per backend keeps this gateway's copy ([`PrefixIndex`]). For a request that
//! more than one backend could serve, the gateway has one of them tokenize the prompt, names
//! its full blocks as the backends do ([`switchyard_proto::prefix`]: the adapter's weight digest
//! and the tenant's cache salt at the root), and counts, per backend, the leading blocks it
//! holds. The backends are then ordered by what serving the request would cost there: the
//! prompt tokens still to compute, plus a price in tokens (`--prefix-queue-cost-tokens`,
//! default [`DEFAULT_QUEUE_COST_TOKENS`]) for every request already waiting or running there.
//! The prompt goes on as token ids, so it is tokenized once.
//!
//! A tenant's routing policy can see the same figures (`host.cached-prefix` of the policy
//! contract, answered by [`RequestPrefix`]): the prompt is then tokenized when the policy first
//! asks, and the tokens go on with the request.
//!
//! The copy is a hint, never the truth: a backend that evicts blocks after its update was sent,
//! or a stream that breaks (the copy is dropped until the next snapshot), only makes a request
//! compute more of its prompt than it might have. When nothing is known the order is the load
//! order.

use crate::Gateway;
use crate::cluster::BackendView;
use crate::policy::{PrefixOverlap, PrefixProbe};
use crate::upstream::{PrefixUpdate, Prompt};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use switchyard_proto::prefix::{BlockHash, block_ids};

/// What a request already waiting or running on a backend costs a new one there, by default, in
/// prompt tokens to compute: a backend holding this many more of the prompt is worth one more
/// request in its queue.
pub const DEFAULT_QUEUE_COST_TOKENS: usize = 32;

/// How long after a broken or refused watch the gateway asks again.
const RETRY_WATCH: Duration = Duration::from_secs(2);

/// How long a policy's first `cached-prefix` call waits for a backend to tokenize the prompt:
/// well inside the policy's own deadline.
const TOKENIZE_WAIT: Duration = Duration::from_millis(250);

/// The blocks each backend last said it caches.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    held: RwLock<HashMap<String, Held>>,
}

#[derive(Debug, Default)]
struct Held {
    block_size: u32,
    blocks: HashSet<u64>,
}

impl PrefixIndex {
    /// Applies one update from `backend`.
    pub fn apply(&self, backend: &str, update: PrefixUpdate) {
        let mut held = self.held.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let h = held.entry(backend.to_string()).or_default();
        if update.snapshot {
            h.blocks.clear();
        }
        h.block_size = update.block_size;
        for id in &update.removed {
            h.blocks.remove(id);
        }
        h.blocks.extend(update.stored);
    }

    /// Forgets what `backend` holds (its stream broke, or it left).
    pub fn forget(&self, backend: &str) {
        self.held.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(backend);
    }

    /// How many leading tokens of `tokens` each of `backends` holds under `root`, in whole
    /// blocks, short of the last token (which is always computed).
    pub fn cached_tokens(&self, backends: &[&str], root: BlockHash, tokens: &[u32]) -> Vec<usize> {
        let held = self.held.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let reusable = &tokens[..tokens.len().saturating_sub(1)];
        let mut ids_by_size: HashMap<u32, Vec<u64>> = HashMap::new();
        backends
            .iter()
            .map(|b| {
                let Some(h) = held.get(*b).filter(|h| h.block_size > 0) else { return 0 };
                let ids =
                    ids_by_size.entry(h.block_size).or_insert_with(|| block_ids(root, reusable, h.block_size as usize));
                ids.iter().take_while(|id| h.blocks.contains(id)).count() * h.block_size as usize
            })
            .collect()
    }
}

impl PrefixIndex {
    /// How many leading tokens of `tokens` each of `views` caches for `adapter` (`None`: the
    /// base model) under cache salt `salt`. Each backend is counted under the adapter's weights
    /// as it reports them, so one that swapped them holds nothing of the old ones; one that has
    /// not reported them holds nothing of the adapter.
    pub fn cached_for(&self, views: &[&BackendView], adapter: Option<&str>, salt: &str, tokens: &[u32]) -> Vec<usize> {
        let mut by_root: Vec<(BlockHash, Vec<usize>)> = Vec::new();
        for (i, view) in views.iter().enumerate() {
            let digest = match adapter {
                None => None,
                Some(name) => match view.adapters.get(name).and_then(|a| a.weights_digest) {
                    Some(digest) => Some(digest),
                    None => continue,
                },
            };
            let root = BlockHash::root(digest.as_ref(), salt);
            match by_root.iter_mut().find(|(r, _)| *r == root) {
                Some((_, members)) => members.push(i),
                None => by_root.push((root, vec![i])),
            }
        }
        let mut cached = vec![0; views.len()];
        for (root, members) in by_root {
            let addresses: Vec<&str> = members.iter().map(|&i| views[i].address.as_str()).collect();
            for (&i, c) in members.iter().zip(self.cached_tokens(&addresses, root, tokens)) {
                cached[i] = c;
            }
        }
        cached
    }
}

/// One request's answer to its policy's `cached-prefix` calls: the prompt is tokenized by the
/// least busy healthy backend the first time the policy asks, and counted against this
/// gateway's copy of each backend's cache under the tenant's salt. Only the backends and
/// adapters the policy was shown are counted, so a policy learns nothing its tenant may not see.
#[derive(Debug)]
pub struct RequestPrefix {
    gw: Arc<Gateway>,
    prompt: Prompt,
    salt: String,
    /// The healthy backends, listing only the adapters the tenant may use.
    views: Vec<BackendView>,
    /// The backend the tenant is pinned to, if it is: its prompts go nowhere else, not even to
    /// be tokenized.
    pin: Option<String>,
    tokens: tokio::sync::OnceCell<Result<Vec<u32>, String>>,
}

impl RequestPrefix {
    /// A probe for `prompt`, salted with `salt`, over `views` (the policy's view of the fleet),
    /// for a tenant pinned to `pin` or not.
    pub fn new(
        gw: Arc<Gateway>,
        prompt: Prompt,
        salt: String,
        views: &[BackendView],
        pin: Option<String>,
    ) -> RequestPrefix {
        let views = views.iter().filter(|v| v.healthy).cloned().collect();
        RequestPrefix { gw, prompt, salt, views, pin, tokens: tokio::sync::OnceCell::new() }
    }

    /// The prompt to send on: its token ids when a policy had it tokenized, else as it came.
    pub fn into_prompt(this: Arc<RequestPrefix>) -> Prompt {
        match Arc::try_unwrap(this) {
            Ok(probe) => match probe.tokens.into_inner() {
                Some(Ok(tokens)) => Prompt::Tokens(tokens),
                _ => probe.prompt,
            },
            // A policy host still holds it (it never should, past the call): copy.
            Err(shared) => match shared.tokens.get() {
                Some(Ok(tokens)) => Prompt::Tokens(tokens.clone()),
                _ => shared.prompt.clone(),
            },
        }
    }

    async fn tokenize(&self) -> Result<Vec<u32>, String> {
        if !self.gw.options.prefix_routing {
            return Err("this gateway does not follow the backends' prefix caches (--no-prefix-routing)".into());
        }
        let allowed = |v: &&BackendView| self.pin.as_ref().is_none_or(|pin| *pin == v.address);
        let Some(view) = self.views.iter().filter(allowed).min_by_key(|v| v.queue_depth()) else {
            return Err("no healthy backend this tenant may use to tokenize the prompt".into());
        };
        let address = &view.address;
        let Some(upstream) = self.gw.members.upstream(address) else {
            return Err(format!("backend {address} left the fleet"));
        };
        match tokio::time::timeout(TOKENIZE_WAIT, upstream.tokenize(&self.prompt)).await {
            Ok(Ok(tokens)) => Ok(tokens),
            Ok(Err(e)) => Err(format!("backend {address} could not tokenize the prompt: {e}")),
            Err(_) => {
                Err(format!("backend {address} did not tokenize the prompt within {} ms", TOKENIZE_WAIT.as_millis()))
            }
        }
    }
}

#[async_trait::async_trait]
impl PrefixProbe for RequestPrefix {
    async fn overlap(&self, adapter: Option<&str>) -> Result<PrefixOverlap, String> {
        if let Some(name) = adapter
            && !self.views.iter().any(|v| v.adapters.contains_key(name))
        {
            return Err(format!("adapter {name:?} is on no healthy backend, or not one this tenant may use"));
        }
        let tokens = self.tokens.get_or_init(|| self.tokenize()).await.as_ref().map_err(Clone::clone)?;
        let views: Vec<&BackendView> = self.views.iter().collect();
        let cached = self.gw.prefixes.cached_for(&views, adapter, &self.salt, tokens);
        Ok(PrefixOverlap {
            prompt_tokens: tokens.len(),
            backends: views.iter().zip(cached).map(|(v, c)| (v.address.clone(), c)).collect(),
        })
    }
}

/// Follows backend `id`'s prefix cache for as long as the task runs: the copy is replaced at
/// every snapshot, and dropped while the stream is broken.
pub async fn follow(gw: Arc<Gateway>, id: String) {
    loop {
        if let Some(upstream) = gw.members.upstream(&id) {
            match upstream.watch_prefix_cache().await {
                Ok(mut updates) => {
                    while let Some(update) = updates.next().await {
                        match update {
                            Ok(update) => gw.prefixes.apply(&id, update),
                            Err(e) => {
                                tracing::debug!(backend = %id, error = %e, "prefix cache watch ended");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(backend = %id, error = %e, "cannot watch the backend's prefix cache"),
            }
        }
        gw.prefixes.forget(&id);
        tokio::time::sleep(RETRY_WATCH).await;
    }
}

/// Orders `candidates` (`(index, cached tokens, queue depth)`, best first by load) by the cost
/// of serving a prompt of `tokens` there: the tokens not cached, plus `queue_cost` per request
/// in the queue. Ties keep the given order.
pub fn order_by_cost(candidates: &mut [(usize, usize, u32)], tokens: usize, queue_cost: usize) {
    candidates.sort_by_key(|&(_, cached, queue)| tokens.saturating_sub(cached) + queue as usize * queue_cost);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(snapshot: bool, removed: &[u64], stored: &[u64]) -> PrefixUpdate {
        PrefixUpdate { snapshot, block_size: 4, removed: removed.to_vec(), stored: stored.to_vec() }
    }

    #[test]
    fn a_backend_holds_the_leading_blocks_its_updates_left_and_nothing_once_forgotten() {
        let index = PrefixIndex::default();
        let root = BlockHash::root(None, "");
        let tokens: Vec<u32> = (0..13).collect();
        let ids = block_ids(root, &tokens, 4);
        index.apply("a", update(true, &[], &ids[..2]));
        index.apply("b", update(true, &[], &ids[1..3]));
        assert_eq!(index.cached_tokens(&["a", "b", "c"], root, &tokens), vec![8, 0, 0], "b lacks the first block");
        index.apply("a", update(false, &[], &[ids[2]]));
        assert_eq!(index.cached_tokens(&["a"], root, &tokens), vec![12]);
        assert_eq!(index.cached_tokens(&["a"], root, &tokens[..12]), vec![8], "the last token is always computed");
        index.apply("a", update(false, &[ids[1]], &[]));
        assert_eq!(index.cached_tokens(&["a"], root, &tokens), vec![4]);
        index.apply("a", update(true, &[], &[]));
        assert_eq!(index.cached_tokens(&["a"], root, &tokens), vec![0], "a snapshot replaces everything");
        index.apply("b", update(true, &[], &ids));
        index.forget("b");
        assert_eq!(index.cached_tokens(&["b"], root, &tokens), vec![0]);
        let other = BlockHash::root(None, "tenant-b");
        index.apply("a", update(true, &[], &ids));
        assert_eq!(index.cached_tokens(&["a"], other, &tokens), vec![0], "another salt names other blocks");
    }

    #[test]
    fn a_cached_prompt_outweighs_a_short_queue_but_not_a_long_one() {
        // (index, cached tokens, queue depth), in load order.
        let mut c = vec![(0, 0, 0), (1, 600, 1)];
        order_by_cost(&mut c, 800, 256);
        assert_eq!(c[0].0, 1, "600 cached tokens are worth one queued request at 256 each");
        let mut c = vec![(0, 0, 0), (1, 600, 3)];
        order_by_cost(&mut c, 800, 256);
        assert_eq!(c[0].0, 0, "but not three");
        let mut c = vec![(0, 0, 1), (1, 0, 1)];
        order_by_cost(&mut c, 800, 256);
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 1], "ties keep the load order");
    }
}
