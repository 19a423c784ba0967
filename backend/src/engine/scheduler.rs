//! Continuous batching as plain data: which sequences run this step, which tokens of each, and
//! where their keys and values go in the paged KV cache; who goes first when the backend is
//! shared.
//!
//! Every step the scheduler fills a token budget in this order: one token for every decoding
//! sequence, the next chunk of every sequence still in prefill (higher priority first), then
//! new sequences from the waiting queue. Sequences join and leave between any two steps.
//!
//! **Who is admitted next.** The highest priority waiting first. Within a priority, the tenant
//! with the smallest *virtual token counter* (VTC, Sheng et al., OSDI 2024): the tokens the
//! backend has served it, prompt tokens counting [`PROMPT_TOKEN_COST`] and generated tokens
//! [`OUTPUT_TOKEN_COST`], divided by its weight. Within a tenant, first come, first served. A
//! tenant that starts waiting after a pause has its counter lifted to the smallest counter of
//! those already waiting (or to the counter of the last tenant to stop waiting), so an idle
//! spell banks no credit: the service of two backlogged tenants differs by a bounded number of
//! tokens, and with weights 3:1 one is served three tokens for each of the other's. A tenant
//! may be capped in running sequences ([`SchedulerConfig::max_running_per_tenant`]); the
//! engine caps its waiting ones.
//!
//! **Prefix caching.** A sequence admitted from the queue (the first time or after a
//! preemption) takes the longest run of its leading full blocks already in the cache under its
//! root (its adapter's weights and its cache salt; see [`super::blocks`]), short of its last
//! token, and computes only the rest; only the rest is charged to its tenant. Blocks a step
//! fills are named for later sequences. Cached blocks no sequence holds count as free.
//!
//! **Preemption.** When the KV cache runs out of blocks, the running sequence of the lowest
//! priority, newest first, is preempted: its blocks are freed and it goes back to the waiting
//! queue, to be recomputed from its tokens (prompt plus what it generated) later; recomputing is
//! not charged to its tenant. A waiting sequence of a higher priority than some running ones
//! that finds the batch or the cache full preempts them (lowest priority, newest first) when
//! that makes room for it, so it starts at the next step instead of after them.

use super::blocks::{BlockHash, BlockPool, CacheChange};
use super::executor::{Batch, SeqChunk};
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// What a prompt token adds to its tenant's counter (before the tenant's weight divides it).
pub const PROMPT_TOKEN_COST: f64 = 1.0;
/// What a generated token adds: a decoded token costs a step each, a prompt token is one row of
/// a batched prefill (VTC's own weights).
pub const OUTPUT_TOKEN_COST: f64 = 2.0;
/// The range of tenant weights.
pub const MIN_WEIGHT: f64 = 0.01;
pub const MAX_WEIGHT: f64 = 100.0;

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the cache.
    pub num_blocks: usize,
    /// Most tokens one step processes (bounds prefill chunk size and step latency).
    pub max_batch_tokens: usize,
    /// Most sequences decoding at once.
    pub max_running: usize,
    /// Most sequences of one tenant decoding at once (`max_running` for no cap of its own).
    pub max_running_per_tenant: usize,
    /// Keep finished blocks and reuse them for sequences that start with the same tokens.
    pub prefix_caching: bool,
}

impl SchedulerConfig {
    /// Limits with no per-tenant cap.
    pub fn new(block_size: usize, num_blocks: usize, max_batch_tokens: usize, max_running: usize) -> SchedulerConfig {
        SchedulerConfig {
            block_size,
            num_blocks,
            max_batch_tokens,
            max_running,
            max_running_per_tenant: max_running,
            prefix_caching: true,
        }
    }
}

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Ids grow with arrival: a smaller id arrived first.
    pub id: u64,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in the cache.
    pub computed: usize,
    pub blocks: Vec<u32>,
    pub adapter: Option<u32>,
    /// Whom it is served for (`""`: no tenant named).
    pub tenant: Arc<str>,
    /// Higher is served first; 0 is normal.
    pub priority: u8,
    /// Its tenant's share of the backend relative to other tenants (clamped to
    /// [`MIN_WEIGHT`]..=[`MAX_WEIGHT`]; zero, or not a positive number, counts as 1).
    pub weight: f64,
    prompt_len: usize,
    /// Its prompt was charged to its tenant (when first admitted; recomputing it after a
    /// preemption is not charged again).
    charged_prompt: bool,
    /// Where its block names start: its adapter's weights and its cache salt.
    root: BlockHash,
    /// The name of every full block of its tokens.
    chain: Vec<BlockHash>,
    /// Prompt tokens found in the prefix cache when it was first admitted.
    pub cached_tokens: usize,
    /// The logits of every prompt position are wanted (prompt log-probabilities): the prompt is
    /// computed in full, never taken from the prefix cache.
    pub prompt_logits: bool,
}

impl Sequence {
    /// A sequence of no tenant, at normal priority, its blocks named apart from other adapter
    /// slots' (see [`Sequence::cached_under`]).
    pub fn new(id: u64, tokens: Vec<u32>, adapter: Option<u32>) -> Sequence {
        let prompt_len = tokens.len();
        Sequence {
            id,
            tokens,
            computed: 0,
            blocks: Vec::new(),
            adapter,
            tenant: Arc::from(""),
            priority: 0,
            weight: 1.0,
            prompt_len,
            charged_prompt: false,
            root: BlockHash::of_slot(adapter),
            chain: Vec::new(),
            cached_tokens: 0,
            prompt_logits: false,
        }
    }

    /// The same sequence, returning the logits of every prompt position as it is computed.
    pub fn with_prompt_logits(self) -> Sequence {
        Sequence { prompt_logits: true, ..self }
    }

    /// The same sequence, its blocks named from `root` (see [`BlockHash::root`]).
    pub fn cached_under(self, root: BlockHash) -> Sequence {
        Sequence { root, ..self }
    }

    /// The same sequence, served for `tenant` (of `weight`) at `priority`.
    pub fn served_for(self, tenant: Arc<str>, weight: f64, priority: u8) -> Sequence {
        Sequence { tenant, weight, priority, ..self }
    }

    /// Running order: higher priority first, then arrival; the last is the first to preempt.
    fn rank(&self) -> (Reverse<u8>, u64) {
        (Reverse(self.priority), self.id)
    }
}

/// What a step computes: the batch and, per sequence in it, how many tokens it advances and
/// whether it yields logits.
#[derive(Debug, Default)]
pub struct Step {
    pub batch: Batch,
    /// `(sequence id, tokens computed this step)` in batch order.
    pub chunks: Vec<(u64, usize)>,
    /// Ids of the sequences that sample a token from this step's logits, in order.
    pub logits_for: Vec<u64>,
    /// Every sequence's rows of logits, in the order the forward pass returns them:
    /// `(sequence id, position of the first row, rows)`; a sequence that samples has its
    /// sampling row last.
    pub logit_rows: Vec<(u64, usize, usize)>,
    /// Sequences pushed back to the queue this step.
    pub preempted: Vec<u64>,
    /// Sequences admitted from the queue this step (preempted ones included when readmitted).
    pub admitted: Vec<u64>,
}

/// One tenant's share of the backend.
#[derive(Debug, Clone, PartialEq)]
struct Share {
    /// Weighted tokens served, divided by the weight.
    counter: f64,
    weight: f64,
    waiting: usize,
    running: usize,
}

/// What the scheduler reports of a tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLoad {
    pub tenant: Arc<str>,
    pub waiting: usize,
    pub running: usize,
    /// Its virtual token counter.
    pub counter: f64,
}

/// The continuous-batching scheduler.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    /// Waiting sequences by priority (highest first), then tenant, each tenant's in arrival order.
    waiting: BTreeMap<Reverse<u8>, BTreeMap<Arc<str>, VecDeque<Sequence>>>,
    waiting_len: usize,
    /// Running sequences in [`Sequence::rank`] order.
    running: Vec<Sequence>,
    shares: HashMap<Arc<str>, Share>,
    /// The counter of the last tenant that stopped waiting: where a tenant arriving at an empty
    /// queue starts.
    last_left: f64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        Scheduler {
            cfg,
            pool: BlockPool::new(cfg.num_blocks, cfg.prefix_caching),
            waiting: BTreeMap::new(),
            waiting_len: 0,
            running: Vec::new(),
            shares: HashMap::new(),
            last_left: 0.0,
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting_len
    }

    /// How many sequences of `tenant` wait.
    pub fn waiting_of(&self, tenant: &str) -> usize {
        self.shares.get(tenant).map_or(0, |s| s.waiting)
    }

    fn waiting_seqs(&self) -> impl Iterator<Item = &Sequence> {
        self.waiting.values().flat_map(|level| level.values().flatten())
    }

    /// The adapter slots the running sequences use, and those the waiting ones will.
    pub fn adapter_slots(&self) -> (Vec<u32>, Vec<u32>) {
        let slots = |seqs: &mut dyn Iterator<Item = &Sequence>| seqs.filter_map(|s| s.adapter).collect();
        (slots(&mut self.running.iter()), slots(&mut self.waiting_seqs()))
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Blocks a sequence could be given: free, or cached with no sequence holding them.
    pub fn free_blocks(&self) -> usize {
        self.pool.available()
    }

    /// Blocks kept for reuse that no sequence holds.
    pub fn cached_blocks(&self) -> usize {
        self.pool.cached_unheld()
    }

    /// The names of every cached block (held or not).
    pub fn cached_names(&self) -> impl Iterator<Item = &BlockHash> {
        self.pool.names()
    }

    /// Changes to the cached blocks since the last call.
    pub fn take_cache_changes(&mut self) -> Vec<CacheChange> {
        self.pool.take_changes()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting_len == 0 && self.running.is_empty()
    }

    /// Every tenant with sequences waiting or running, by name.
    pub fn tenants(&self) -> Vec<TenantLoad> {
        let mut loads: Vec<TenantLoad> = self
            .shares
            .iter()
            .filter(|(_, s)| s.waiting + s.running > 0)
            .map(|(t, s)| TenantLoad { tenant: t.clone(), waiting: s.waiting, running: s.running, counter: s.counter })
            .collect();
        loads.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        loads
    }

    /// Queues a new sequence. Its weight becomes its tenant's.
    pub fn add(&mut self, mut seq: Sequence) {
        // Without caching, blocks are never named: no chain to keep.
        seq.chain.clear();
        if self.cfg.prefix_caching {
            let mut parent = seq.root;
            for block in seq.tokens.chunks_exact(self.cfg.block_size) {
                parent = parent.child(block);
                seq.chain.push(parent);
            }
        }
        let weight = match seq.weight {
            w if w.is_finite() && w > 0.0 => w.clamp(MIN_WEIGHT, MAX_WEIGHT),
            _ => 1.0,
        };
        let floor = self.floor();
        let share =
            self.shares.entry(seq.tenant.clone()).or_insert(Share { counter: floor, weight, waiting: 0, running: 0 });
        share.weight = weight;
        if share.waiting == 0 {
            // Back from a pause: no credit banked while it was not waiting.
            share.counter = share.counter.max(floor);
        }
        share.waiting += 1;
        self.enqueue(seq);
    }

    /// Where a tenant that starts waiting is lifted to: the smallest counter of those waiting,
    /// or the last one to stop waiting.
    fn floor(&self) -> f64 {
        self.shares
            .values()
            .filter(|s| s.waiting > 0)
            .map(|s| s.counter)
            .min_by(f64::total_cmp)
            .unwrap_or(self.last_left)
    }

    fn enqueue(&mut self, seq: Sequence) {
        let queue = self.waiting.entry(Reverse(seq.priority)).or_default().entry(seq.tenant.clone()).or_default();
        let at = queue.partition_point(|s| s.id < seq.id);
        queue.insert(at, seq);
        self.waiting_len += 1;
    }

    /// Takes the sequence at the head of a tenant's queue at `priority`.
    fn dequeue(&mut self, priority: u8, tenant: &str) -> Option<Sequence> {
        let level = self.waiting.get_mut(&Reverse(priority))?;
        let queue = level.get_mut(tenant)?;
        let seq = queue.pop_front()?;
        if queue.is_empty() {
            level.remove(tenant);
            if level.is_empty() {
                self.waiting.remove(&Reverse(priority));
            }
        }
        self.waiting_len -= 1;
        self.left_queue(&seq.tenant);
        Some(seq)
    }

    /// A sequence of `tenant` left the waiting queue.
    fn left_queue(&mut self, tenant: &str) {
        if let Some(share) = self.shares.get_mut(tenant) {
            share.waiting -= 1;
            if share.waiting == 0 {
                self.last_left = share.counter;
            }
        }
    }

    /// Forgets a tenant with nothing waiting or running whose counter is no more than where it
    /// would be lifted to anyway, and every tenant once nothing waits or runs (counters only
    /// matter between tenants that compete): the table holds the tenants of one busy spell.
    fn forget_if_idle(&mut self, tenant: &str) {
        if self.is_idle() {
            self.shares.clear();
            self.last_left = 0.0;
            return;
        }
        let floor = self.floor();
        if self.shares.get(tenant).is_some_and(|s| s.waiting + s.running == 0 && s.counter <= floor) {
            self.shares.remove(tenant);
        }
    }

    fn charge(&mut self, tenant: &str, cost: f64) {
        if let Some(share) = self.shares.get_mut(tenant) {
            share.counter += cost / share.weight;
        }
    }

    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running.iter().chain(self.waiting_seqs()).find(|s| s.id == id)
    }

    /// Appends a generated token to a running sequence, and charges its tenant for it.
    pub fn push_token(&mut self, id: u64, token: u32) {
        let (block, caching) = (self.cfg.block_size, self.cfg.prefix_caching);
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.push(token);
            if caching && s.tokens.len() % block == 0 {
                let parent = s.chain.last().copied().unwrap_or(s.root);
                s.chain.push(parent.child(&s.tokens[s.tokens.len() - block..]));
            }
            let tenant = s.tenant.clone();
            self.charge(&tenant, OUTPUT_TOKEN_COST);
        }
    }

    /// Removes a sequence (finished or cancelled) wherever it is and frees its blocks.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(i);
            if let Some(share) = self.shares.get_mut(&seq.tenant) {
                share.running -= 1;
            }
            seq
        } else {
            let (priority, tenant) =
                self.waiting_seqs().find(|s| s.id == id).map(|s| (s.priority, s.tenant.clone()))?;
            let level = self.waiting.get_mut(&Reverse(priority))?;
            let queue = level.get_mut(&tenant)?;
            let seq = queue.remove(queue.iter().position(|s| s.id == id)?)?;
            if queue.is_empty() {
                level.remove(&tenant);
                if level.is_empty() {
                    self.waiting.remove(&Reverse(priority));
                }
            }
            self.waiting_len -= 1;
            self.left_queue(&tenant);
            seq
        };
        self.pool.release(&seq.blocks);
        self.forget_if_idle(&seq.tenant);
        Some(seq)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Grows `seq`'s block table to `needed_blocks` blocks, if that many can be had.
    fn reserve(pool: &mut BlockPool, seq: &mut Sequence, needed_blocks: usize) -> bool {
        let extra = needed_blocks.saturating_sub(seq.blocks.len());
        if extra > pool.available() {
            return false;
        }
        for _ in 0..extra {
            if let Some(b) = pool.allocate() {
                seq.blocks.push(b);
            }
        }
        true
    }

    /// Sends the last running sequence (lowest priority, newest) back to the queue.
    fn preempt_last(&mut self, step: &mut Step) -> Option<u64> {
        let mut seq = self.running.pop()?;
        self.pool.release(&seq.blocks);
        seq.blocks.clear();
        seq.computed = 0;
        let id = seq.id;
        if let Some(share) = self.shares.get_mut(&seq.tenant) {
            share.running -= 1;
        }
        self.requeue(seq);
        step.preempted.push(id);
        Some(id)
    }

    /// Puts a sequence that was taken from the queue back in its place, as it is: it keeps
    /// its arrival order, and its tenant's counter is not lifted (it never stopped being served).
    fn requeue(&mut self, seq: Sequence) {
        if let Some(share) = self.shares.get_mut(&seq.tenant) {
            share.waiting += 1;
        }
        self.enqueue(seq);
    }

    /// Whose waiting sequence is admitted next: `(priority, tenant)`.
    fn pick(&self) -> Option<(u8, Arc<str>)> {
        let share = |t: &str| self.shares.get(t).map_or((0.0, 0), |s| (s.counter, s.running));
        self.waiting.iter().find_map(|(Reverse(priority), level)| {
            level
                .iter()
                .filter_map(|(t, queue)| queue.front().map(|head| (t, share(t), head.id)))
                .filter(|(_, (_, running), _)| *running < self.cfg.max_running_per_tenant)
                // The smallest counter; on a tie (a tenant lifted to another's counter), the
                // one running fewer sequences, then the earlier arrival.
                .min_by(|(_, (a, a_running), a_head), (_, (b, b_running), b_head)| {
                    a.total_cmp(b).then(a_running.cmp(b_running)).then(a_head.cmp(b_head))
                })
                .map(|(t, _, _)| (*priority, t.clone()))
        })
    }

    /// Makes a running slot and `needed` free blocks for a sequence of `priority`, preempting
    /// running sequences of lower priority (lowest, newest first) if that is enough. Whatever
    /// a preempted sequence had planned this step goes back to the budget.
    fn make_room(
        &mut self,
        priority: u8,
        needed: usize,
        plan: &mut Vec<(u64, usize)>,
        budget: &mut usize,
        step: &mut Step,
    ) -> bool {
        loop {
            let slot_free = self.running.len() < self.cfg.max_running;
            if slot_free && self.pool.available() >= needed {
                return true;
            }
            let (lower, lower_blocks) = self
                .running
                .iter()
                .rev()
                .take_while(|s| s.priority < priority)
                .fold((0, 0), |(n, blocks), s| (n + 1, blocks + s.blocks.len()));
            if lower == 0 || self.pool.available() + lower_blocks < needed {
                return false;
            }
            let Some(victim) = self.preempt_last(step) else {
                return false;
            };
            if let Some(i) = plan.iter().position(|&(id, _)| id == victim) {
                *budget += plan.remove(i).1;
            }
        }
    }

    /// Plans the next step. Returns an empty step when there is nothing to run.
    pub fn schedule(&mut self) -> Step {
        let mut step = Step::default();
        let mut budget = self.cfg.max_batch_tokens;
        // (sequence id, tokens this step)
        let mut plan: Vec<(u64, usize)> = Vec::new();

        // Running sequences, highest priority and oldest first: decodes and prefill chunks.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let remaining = self.running[i].tokens.len() - self.running[i].computed;
            let want = remaining.min(budget);
            let needed = self.blocks_for(self.running[i].computed + want);
            let mut ok = Self::reserve(&mut self.pool, &mut self.running[i], needed);
            while !ok {
                // Out of blocks: preempt the lowest-priority newest sequence (possibly this one).
                let Some(victim) = self.preempt_last(&mut step) else {
                    break;
                };
                plan.retain(|(id, _)| *id != victim);
                if i >= self.running.len() {
                    break;
                }
                ok = Self::reserve(&mut self.pool, &mut self.running[i], needed);
            }
            if !ok || i >= self.running.len() {
                break;
            }
            plan.push((self.running[i].id, want));
            budget -= want;
            i += 1;
        }

        // New sequences while there is room. A step that had to preempt to keep its running
        // sequences going admits nothing new: the cache is already over-committed.
        let over_committed = !step.preempted.is_empty();
        while budget > 0 && !over_committed {
            let Some((priority, tenant)) = self.pick() else {
                break;
            };
            let Some(head) = self.waiting.get(&Reverse(priority)).and_then(|l| l.get(&tenant)?.front()) else {
                break;
            };
            if step.preempted.contains(&head.id) {
                // Preempted this step to make room: it waits at least a step.
                break;
            }
            // Its leading blocks already in the cache, short of the last token, which must be
            // computed for its logits. Taking cached blocks no one holds uses up blocks too.
            let reusable = match head.prompt_logits {
                // Every prompt position's logits are wanted: nothing may be skipped.
                true => &[][..],
                false => &head.chain[..head.chain.len().min((head.tokens.len() - 1) / self.cfg.block_size)],
            };
            let (hit, unheld) = self.pool.peek(reusable);
            let start = hit * self.cfg.block_size;
            let want = (head.tokens.len() - start).min(budget);
            let needed = self.blocks_for(start + want) - hit + unheld;
            if !self.make_room(priority, needed, &mut plan, &mut budget, &mut step) {
                break;
            }
            let Some(mut seq) = self.dequeue(priority, &tenant) else {
                break;
            };
            seq.blocks = self.pool.take_cached(&seq.chain[..hit]);
            seq.computed = seq.blocks.len() * self.cfg.block_size;
            let want = (seq.tokens.len() - seq.computed).min(budget);
            let needed = self.blocks_for(seq.computed + want);
            if !Self::reserve(&mut self.pool, &mut seq, needed) {
                // make_room said there was room: not reached, but never lose a sequence.
                self.pool.release(&seq.blocks);
                seq.blocks.clear();
                seq.computed = 0;
                self.requeue(seq);
                break;
            }
            if !std::mem::replace(&mut seq.charged_prompt, true) {
                // Cached prompt tokens cost the backend nothing: they are not charged.
                seq.cached_tokens = seq.computed;
                self.charge(&tenant, (seq.prompt_len - seq.computed) as f64 * PROMPT_TOKEN_COST);
            }
            if let Some(share) = self.shares.get_mut(&tenant) {
                share.running += 1;
            }
            plan.push((seq.id, want));
            budget -= want;
            step.admitted.push(seq.id);
            let at = self.running.partition_point(|s| s.rank() < seq.rank());
            self.running.insert(at, seq);
        }

        // Rows grouped by adapter so each adapter's rows form one segment.
        let by_id = |id: u64| self.running.iter().find(|s| s.id == id);
        plan.sort_by_key(|&(id, _)| (by_id(id).and_then(|s| s.adapter).map_or(0, |a| a as u64 + 1), id));
        for (id, len) in plan {
            let Some(seq) = by_id(id) else { continue };
            let start = step.batch.tokens.len();
            let end = seq.computed + len;
            for pos in seq.computed..end {
                step.batch.tokens.push(seq.tokens[pos]);
                step.batch.positions.push(pos as u32);
                let block = seq.blocks[pos / self.cfg.block_size] as usize;
                step.batch.kv_slots.push(block * self.cfg.block_size + pos % self.cfg.block_size);
            }
            let samples = end == seq.tokens.len();
            let logit_rows = match seq.prompt_logits && seq.computed < seq.prompt_len {
                true => len,
                false => usize::from(samples),
            };
            step.batch.seqs.push(SeqChunk {
                start,
                len,
                context_len: end,
                blocks: seq.blocks.clone(),
                adapter: seq.adapter,
                logit_rows,
            });
            step.chunks.push((id, len));
            if logit_rows > 0 {
                step.logit_rows.push((id, end - logit_rows, logit_rows));
            }
            if samples {
                step.logits_for.push(id);
            }
        }
        step
    }

    /// Records that a step ran: each sequence's computed prefix grows by its chunk.
    pub fn complete(&mut self, step: &Step) {
        let block = self.cfg.block_size;
        for &(id, len) in &step.chunks {
            if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
                // Blocks this step filled are named, for later sequences to reuse.
                for i in s.computed / block..(s.computed + len) / block {
                    if let (Some(&b), Some(&name)) = (s.blocks.get(i), s.chain.get(i)) {
                        self.pool.name(b, name);
                    }
                }
                s.computed += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(num_blocks: usize, max_batch_tokens: usize) -> SchedulerConfig {
        SchedulerConfig::new(4, num_blocks, max_batch_tokens, 8)
    }

    /// Runs a step and pretends every sequence with logits sampled token 7.
    fn run(s: &mut Scheduler) -> Step {
        let step = s.schedule();
        s.complete(&step);
        for &id in &step.logits_for {
            s.push_token(id, 7);
        }
        step
    }

    #[test]
    fn prefill_is_chunked_by_the_token_budget_then_decodes_one_token_per_step() {
        let mut s = Scheduler::new(cfg(16, 6));
        s.add(Sequence::new(1, vec![1; 10], None));
        let step = run(&mut s);
        assert_eq!(step.chunks, vec![(1, 6)]);
        assert!(step.logits_for.is_empty(), "a partial prefill yields no logits");
        assert_eq!(step.batch.positions, (0..6).collect::<Vec<_>>());
        let step = run(&mut s);
        assert_eq!(step.chunks, vec![(1, 4)]);
        assert_eq!(step.logits_for, vec![1]);
        let step = run(&mut s);
        assert_eq!(step.chunks, vec![(1, 1)]);
        assert_eq!(step.batch.positions, vec![10]);
        assert_eq!(step.batch.seqs[0].context_len, 11);
    }

    #[test]
    fn new_requests_join_a_running_batch_and_rows_are_grouped_by_adapter() {
        let mut s = Scheduler::new(cfg(16, 64));
        s.add(Sequence::new(1, vec![1; 3], Some(2)));
        run(&mut s);
        s.add(Sequence::new(2, vec![1; 2], None));
        s.add(Sequence::new(3, vec![1; 2], Some(2)));
        let step = run(&mut s);
        // Base-model rows first, then adapter 2's rows together.
        assert_eq!(step.chunks, vec![(2, 2), (1, 1), (3, 2)]);
        assert_eq!(step.batch.row_adapters(), vec![None, None, Some(2), Some(2), Some(2)]);
        assert_eq!(step.logits_for, vec![2, 1, 3]);
    }

    #[test]
    fn kv_slots_follow_the_block_table() {
        let mut s = Scheduler::new(cfg(4, 64));
        s.add(Sequence::new(1, vec![1; 5], None));
        let step = run(&mut s);
        let blocks = &step.batch.seqs[0].blocks;
        assert_eq!(blocks.len(), 2);
        let want: Vec<usize> = (0..5).map(|p| blocks[p / 4] as usize * 4 + p % 4).collect();
        assert_eq!(step.batch.kv_slots, want);
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_sequence_and_resumes_it_later() {
        for caching in [true, false] {
            // Three blocks of 4 tokens: a 4-token and an 8-token prompt fill the cache.
            let mut s = Scheduler::new(SchedulerConfig { prefix_caching: caching, ..cfg(3, 64) });
            s.add(Sequence::new(1, vec![1; 4], None));
            s.add(Sequence::new(2, vec![2; 8], None));
            let step = run(&mut s);
            assert_eq!(step.logits_for, vec![1, 2]);
            assert_eq!(s.free_blocks(), 0);
            // Sequence 1 needs a block for its 5th token: sequence 2 is preempted, and one of
            // its blocks given to sequence 1.
            let step = run(&mut s);
            assert_eq!(step.preempted, vec![2]);
            assert_eq!(step.chunks, vec![(1, 1)]);
            assert_eq!(s.get(2).map(|q| (q.computed, q.tokens.len(), q.blocks.len())), Some((0, 9, 0)));
            // When sequence 1 finishes, sequence 2 resumes with its generated token. The block
            // given away was its last; its first is still cached, so 4 tokens are not computed
            // again. Without the cache, all nine are.
            s.remove(1);
            let step = run(&mut s);
            assert_eq!(step.chunks, vec![(2, if caching { 5 } else { 9 })], "caching {caching}");
            assert_eq!(step.logits_for, vec![2]);
        }
    }

    /// Runs a sequence of `prompt` to its first generated token and removes it.
    fn finish(s: &mut Scheduler, id: u64, root: BlockHash, prompt: Vec<u32>) {
        s.add(Sequence::new(id, prompt, None).cached_under(root));
        while !run(s).logits_for.contains(&id) {}
        s.remove(id);
    }

    #[test]
    fn a_prompt_that_starts_like_an_earlier_one_computes_only_the_rest() {
        let root = BlockHash::root(None, "");
        let mut s = Scheduler::new(cfg(16, 64));
        finish(&mut s, 1, root, (1..=10).collect());
        assert_eq!(s.cached_blocks(), 2, "its two full blocks stay cached; the partial third is freed");

        // Two full blocks (8 tokens) in common: computed from the 9th.
        let prompt: Vec<u32> = (1..=8).chain([50, 51, 52]).collect();
        s.add(Sequence::new(2, prompt.clone(), None).served_for(Arc::from("a"), 1.0, 0).cached_under(root));
        let step = run(&mut s);
        assert_eq!(step.chunks, vec![(2, 3)]);
        assert_eq!(step.batch.positions, vec![8, 9, 10]);
        assert_eq!(s.get(2).map(|q| q.cached_tokens), Some(8));
        assert_eq!(counter(&s, "a"), 3.0 + OUTPUT_TOKEN_COST, "only computed prompt tokens are charged");
        s.remove(2);

        // A prompt that is all cached still computes its last block, for the last token's logits.
        finish(&mut s, 3, root, (1..=8).collect());
        s.add(Sequence::new(4, (1..=8).collect(), None).cached_under(root));
        assert_eq!(run(&mut s).chunks, vec![(4, 4)]);
    }

    #[test]
    fn another_adapter_or_salt_shares_no_block() {
        let digest = |b| BlockHash::root(Some(&[b; 32]), "");
        for other in [digest(2), BlockHash::root(Some(&[1; 32]), "tenant-b"), BlockHash::root(None, "")] {
            let mut s = Scheduler::new(cfg(16, 64));
            finish(&mut s, 1, digest(1), (1..=9).collect());
            s.add(Sequence::new(2, (1..=9).collect(), None).cached_under(other));
            assert_eq!(run(&mut s).chunks, vec![(2, 9)], "computed in full");
            s.add(Sequence::new(3, (1..=9).collect(), None).cached_under(digest(1)));
            assert_eq!(run(&mut s).chunks, vec![(2, 1), (3, 1)], "the first root's blocks are still there");
        }
    }

    #[test]
    fn running_sequences_share_their_common_blocks_and_cached_ones_give_way_when_needed() {
        let root = BlockHash::root(None, "");
        // Four blocks of 4 tokens.
        let mut s = Scheduler::new(cfg(4, 64));
        s.add(Sequence::new(1, (1..=5).collect(), None).cached_under(root));
        run(&mut s);
        s.add(Sequence::new(2, (1..=6).collect(), None).cached_under(root));
        assert_eq!(run(&mut s).chunks, vec![(1, 1), (2, 2)]);
        let blocks = |id| s.get(id).map(|q| q.blocks.clone()).unwrap_or_default();
        assert_eq!(blocks(1)[0], blocks(2)[0], "the first block is held by both");
        assert_eq!(s.free_blocks(), 1, "three blocks for two sequences of two blocks");
        s.remove(1);
        s.remove(2);
        assert_eq!((s.free_blocks(), s.cached_blocks()), (4, 1), "the shared block stays cached");

        // A sequence that needs every block takes the cached one too.
        s.add(Sequence::new(3, vec![9; 16], None).cached_under(root));
        assert_eq!(run(&mut s).chunks, vec![(3, 16)]);
        assert_eq!((s.free_blocks(), s.cached_blocks()), (0, 0));
        s.remove(3);
        s.add(Sequence::new(4, (1..=6).collect(), None).cached_under(root));
        assert_eq!(run(&mut s).chunks, vec![(4, 6)], "the old prefix was given out, and is computed again");
    }

    #[test]
    fn removing_a_sequence_returns_its_blocks() {
        let mut s = Scheduler::new(cfg(8, 64));
        s.add(Sequence::new(1, vec![1; 9], None));
        run(&mut s);
        assert_eq!(s.free_blocks(), 5);
        s.remove(1);
        assert_eq!(s.free_blocks(), 8);
        assert!(s.is_idle());
    }

    fn seq(id: u64, tenant: &str, weight: f64, priority: u8, prompt: usize) -> Sequence {
        Sequence::new(id, vec![1; prompt], None).served_for(Arc::from(tenant), weight, priority)
    }

    fn counter(s: &Scheduler, tenant: &str) -> f64 {
        s.shares.get(tenant).map_or(f64::NAN, |share| share.counter)
    }

    /// Runs `steps` steps; a sequence finishes once it has generated `generated` tokens. Returns the
    /// tokens generated for each tenant.
    fn serve(s: &mut Scheduler, steps: usize, generated: usize) -> HashMap<Arc<str>, usize> {
        let mut served = HashMap::new();
        for _ in 0..steps {
            let step = run(s);
            for id in step.logits_for {
                let Some(q) = s.get(id) else { continue };
                *served.entry(q.tenant.clone()).or_default() += 1;
                if q.tokens.len() >= q.prompt_len + generated {
                    s.remove(id);
                }
            }
        }
        served
    }

    #[test]
    fn a_tenant_arriving_behind_a_flood_is_admitted_before_the_flood() {
        let mut s = Scheduler::new(SchedulerConfig::new(4, 64, 64, 2));
        for id in 1..=10 {
            s.add(seq(id, "a", 1.0, 0, 4));
        }
        assert_eq!(run(&mut s).admitted, vec![1, 2]);
        s.add(seq(11, "b", 1.0, 0, 4));
        // a's first sequence finishes: its slot goes to b, not to a's third.
        s.remove(1);
        assert_eq!(run(&mut s).admitted, vec![11]);
        s.remove(2);
        assert_eq!(run(&mut s).admitted, vec![3]);
    }

    #[test]
    fn backlogged_tenants_are_served_in_proportion_to_their_weights() {
        for (weight_a, weight_b) in [(1.0, 1.0), (3.0, 1.0)] {
            let mut s = Scheduler::new(SchedulerConfig::new(4, 256, 64, 4));
            // a's requests all arrive first: first come, first served would serve only a.
            for id in 0..200 {
                s.add(seq(id, "a", weight_a, 0, 8));
            }
            for id in 200..400 {
                s.add(seq(id, "b", weight_b, 0, 8));
            }
            let served = serve(&mut s, 300, 8);
            let (a, b) = (served[&Arc::<str>::from("a")] as f64, served[&Arc::<str>::from("b")] as f64);
            assert!(s.waiting_of("a") > 0 && s.waiting_of("b") > 0, "both stayed backlogged");
            let want = weight_a / weight_b;
            assert!((a / b - want).abs() <= 0.1 * want, "served a {a}, b {b}: want {want}:1");
        }
    }

    #[test]
    fn a_tenant_back_from_idling_banks_no_credit() {
        let mut s = Scheduler::new(SchedulerConfig::new(4, 256, 64, 2));
        for id in 0..100 {
            s.add(seq(id, "a", 1.0, 0, 4));
        }
        serve(&mut s, 60, 4);
        // b was idle all that time; from now on it shares the backend with a, no more.
        for id in 100..200 {
            s.add(seq(id, "b", 1.0, 0, 4));
        }
        assert!(counter(&s, "b") >= counter(&s, "a") - 4.0 * OUTPUT_TOKEN_COST);
        let served = serve(&mut s, 60, 4);
        let (a, b) = (served[&Arc::<str>::from("a")] as f64, served[&Arc::<str>::from("b")] as f64);
        assert!((a / b - 1.0).abs() < 0.15, "served a {a}, b {b}");
    }

    #[test]
    fn a_tenant_capped_in_running_sequences_leaves_the_rest_to_others() {
        let mut s = Scheduler::new(SchedulerConfig { max_running_per_tenant: 2, ..SchedulerConfig::new(4, 64, 64, 4) });
        for id in 1..=5 {
            s.add(seq(id, "a", 1.0, 0, 4));
        }
        assert_eq!(run(&mut s).admitted, vec![1, 2]);
        assert_eq!(run(&mut s).admitted, Vec::<u64>::new(), "slots are free, but a has its two");
        s.add(seq(6, "b", 1.0, 0, 4));
        assert_eq!(run(&mut s).admitted, vec![6]);
        assert_eq!(s.tenants().iter().map(|t| (t.waiting, t.running)).collect::<Vec<_>>(), vec![(3, 2), (0, 1)]);
    }

    #[test]
    fn a_higher_priority_sequence_at_a_full_backend_preempts_the_newest_lower_one() {
        let mut s = Scheduler::new(SchedulerConfig::new(4, 64, 64, 2));
        s.add(seq(1, "a", 1.0, 0, 4));
        s.add(seq(2, "a", 1.0, 0, 4));
        s.add(seq(3, "a", 1.0, 0, 4));
        assert_eq!(run(&mut s).admitted, vec![1, 2]);
        s.add(seq(4, "b", 1.0, 5, 4));
        let step = run(&mut s);
        assert_eq!((step.preempted, step.admitted), (vec![2], vec![4]));
        assert_eq!(step.chunks.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 4]);
        // The preempted sequence keeps its place: before 3, which arrived after it.
        s.remove(4);
        let step = run(&mut s);
        assert_eq!(step.admitted, vec![2]);
        assert_eq!(step.chunks, vec![(1, 1), (2, 1)], "its cached prompt is reused; its generated token is recomputed");
    }

    #[test]
    fn higher_priorities_are_admitted_first_and_equal_ones_never_preempt() {
        let mut s = Scheduler::new(SchedulerConfig::new(4, 64, 64, 1));
        s.add(seq(1, "a", 1.0, 1, 4));
        run(&mut s);
        s.add(seq(2, "a", 1.0, 1, 4));
        s.add(seq(3, "b", 1.0, 0, 4));
        s.add(seq(4, "b", 1.0, 2, 4));
        s.add(seq(5, "c", 1.0, 1, 4));
        // 4 outranks the running 1; 2 and 5 only equal it, 3 is below.
        let step = run(&mut s);
        assert_eq!((step.preempted, step.admitted), (vec![1], vec![4]));
        let mut order = Vec::new();
        while !s.is_idle() {
            s.remove(s.running[0].id);
            order.extend(run(&mut s).admitted);
        }
        // Priority 1 next: the preempted 1 (a and c tie on counters, neither runs anything,
        // and 1 arrived first), then c (a's counter is now ahead), then a's 2; priority 0 last.
        assert_eq!(order, vec![1, 5, 2, 3]);
    }

    #[test]
    fn out_of_blocks_the_lowest_priority_is_preempted_even_if_older_and_charged_once() {
        // Two blocks of 4 tokens: two 4-token prompts fill the cache.
        let mut s = Scheduler::new(SchedulerConfig::new(4, 2, 64, 8));
        s.add(seq(1, "a", 1.0, 0, 4));
        s.add(seq(2, "b", 1.0, 3, 4));
        assert_eq!(run(&mut s).admitted, vec![2, 1]);
        let charged = counter(&s, "a");
        assert_eq!(charged, 4.0 * PROMPT_TOKEN_COST + OUTPUT_TOKEN_COST);
        let step = run(&mut s);
        assert_eq!((step.preempted, step.chunks), (vec![1], vec![(2, 1)]));
        s.remove(2);
        let step = run(&mut s);
        assert_eq!(step.chunks, vec![(1, 5)]);
        assert_eq!(counter(&s, "a"), charged + OUTPUT_TOKEN_COST, "the recomputed prompt is not charged again");
    }

    #[test]
    fn tenants_with_nothing_left_are_forgotten() {
        let mut s = Scheduler::new(SchedulerConfig::new(4, 64, 64, 4));
        for (id, tenant) in ["a", "b", "c"].into_iter().enumerate() {
            s.add(seq(id as u64, tenant, 1.0, 0, 4));
        }
        serve(&mut s, 10, 2);
        assert!(s.is_idle() && s.tenants().is_empty());
        assert!(s.shares.is_empty(), "{:?}", s.shares);
    }
}
