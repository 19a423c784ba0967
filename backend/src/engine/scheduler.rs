//! Continuous batching as plain data: which sequences run this step, which tokens of each, and
//! where their keys and values go in the paged KV cache.
//!
//! Every step the scheduler fills a token budget in this order: one token for every decoding
//! sequence, the next chunk of every sequence still in prefill, then new sequences from the
//! waiting queue (first come, first served). Sequences join and leave between any two steps.
//! When the KV cache runs out of blocks, the most recently admitted sequence is preempted: its
//! blocks are freed and it goes back to the head of the queue, to be recomputed from its tokens
//! (prompt plus what it generated) later.

use super::executor::{Batch, SeqChunk};
use std::collections::VecDeque;

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
}

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub id: u64,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose keys and values are in the cache.
    pub computed: usize,
    pub blocks: Vec<u32>,
    pub adapter: Option<u32>,
}

impl Sequence {
    pub fn new(id: u64, tokens: Vec<u32>, adapter: Option<u32>) -> Sequence {
        Sequence { id, tokens, computed: 0, blocks: Vec::new(), adapter }
    }
}

/// What a step computes: the batch and, per sequence in it, how many tokens it advances and
/// whether it yields logits.
#[derive(Debug, Default)]
pub struct Step {
    pub batch: Batch,
    /// `(sequence id, tokens computed this step)` in batch order.
    pub chunks: Vec<(u64, usize)>,
    /// Ids of the sequences whose logits the forward pass returns, in order.
    pub logits_for: Vec<u64>,
    /// Sequences pushed back to the queue this step.
    pub preempted: Vec<u64>,
}

/// The continuous-batching scheduler.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    free: Vec<u32>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        // Pop from the end: hand out low block numbers first.
        let free = (0..cfg.num_blocks as u32).rev().collect();
        Scheduler { cfg, free, waiting: VecDeque::new(), running: Vec::new() }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.cfg
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// The adapter slots the running sequences use, and those the waiting ones will.
    pub fn adapter_slots(&self) -> (Vec<u32>, Vec<u32>) {
        let slots = |seqs: &mut dyn Iterator<Item = &Sequence>| seqs.filter_map(|s| s.adapter).collect();
        (slots(&mut self.running.iter()), slots(&mut self.waiting.iter()))
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a new sequence.
    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running.iter().chain(self.waiting.iter()).find(|s| s.id == id)
    }

    /// Appends a generated token to a running sequence.
    pub fn push_token(&mut self, id: u64, token: u32) {
        if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
            s.tokens.push(token);
        }
    }

    /// Removes a sequence (finished or cancelled) wherever it is and frees its blocks.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        let seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.free.extend(seq.blocks.iter().rev());
        Some(seq)
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.cfg.block_size)
    }

    /// Grows `seq`'s block table to hold `tokens` tokens, if enough blocks are free.
    fn reserve(free: &mut Vec<u32>, seq: &mut Sequence, needed_blocks: usize) -> bool {
        let extra = needed_blocks.saturating_sub(seq.blocks.len());
        if extra > free.len() {
            return false;
        }
        for _ in 0..extra {
            if let Some(b) = free.pop() {
                seq.blocks.push(b);
            }
        }
        true
    }

    fn preempt_last(&mut self, step: &mut Step) -> Option<u64> {
        let mut seq = self.running.pop()?;
        self.free.extend(seq.blocks.drain(..).rev());
        seq.computed = 0;
        let id = seq.id;
        self.waiting.push_front(seq);
        step.preempted.push(id);
        Some(id)
    }

    /// Plans the next step. Returns an empty step when there is nothing to run.
    pub fn schedule(&mut self) -> Step {
        let mut step = Step::default();
        let mut budget = self.cfg.max_batch_tokens;
        // (index into running, tokens this step)
        let mut plan: Vec<(u64, usize)> = Vec::new();

        // Running sequences, oldest first: decodes and prefill chunks.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let remaining = self.running[i].tokens.len() - self.running[i].computed;
            let want = remaining.min(budget);
            let needed = self.blocks_for(self.running[i].computed + want);
            let mut ok = Self::reserve(&mut self.free, &mut self.running[i], needed);
            while !ok {
                // Out of blocks: preempt the newest sequence (possibly this one).
                let Some(victim) = self.preempt_last(&mut step) else {
                    break;
                };
                plan.retain(|(id, _)| *id != victim);
                if i >= self.running.len() {
                    break;
                }
                ok = Self::reserve(&mut self.free, &mut self.running[i], needed);
            }
            if !ok || i >= self.running.len() {
                break;
            }
            plan.push((self.running[i].id, want));
            budget -= want;
            i += 1;
        }

        // New sequences, first come first served, while there is room.
        // A step that had to preempt admits nothing new: the cache is already over-committed.
        while budget > 0 && self.running.len() < self.cfg.max_running && step.preempted.is_empty() {
            let Some(front) = self.waiting.front_mut() else {
                break;
            };
            let want = (front.tokens.len() - front.computed).min(budget);
            let needed = (front.computed + want).div_ceil(self.cfg.block_size);
            if !Self::reserve(&mut self.free, front, needed) {
                break;
            }
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            plan.push((seq.id, want));
            budget -= want;
            self.running.push(seq);
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
            let wants_logits = end == seq.tokens.len();
            step.batch.seqs.push(SeqChunk {
                start,
                len,
                context_len: end,
                blocks: seq.blocks.clone(),
                adapter: seq.adapter,
                wants_logits,
            });
            step.chunks.push((id, len));
            if wants_logits {
                step.logits_for.push(id);
            }
        }
        step
    }

    /// Records that a step ran: each sequence's computed prefix grows by its chunk.
    pub fn complete(&mut self, step: &Step) {
        for &(id, len) in &step.chunks {
            if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
                s.computed += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(num_blocks: usize, max_batch_tokens: usize) -> SchedulerConfig {
        SchedulerConfig { block_size: 4, num_blocks, max_batch_tokens, max_running: 8 }
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
        // Two blocks of 4 tokens: two 4-token prompts fill the cache.
        let mut s = Scheduler::new(cfg(2, 64));
        s.add(Sequence::new(1, vec![1; 4], None));
        s.add(Sequence::new(2, vec![1; 4], None));
        let step = run(&mut s);
        assert_eq!(step.logits_for, vec![1, 2]);
        assert_eq!(s.free_blocks(), 0);
        // Sequence 1 needs a block for its 5th token: sequence 2 is preempted.
        let step = run(&mut s);
        assert_eq!(step.preempted, vec![2]);
        assert_eq!(step.chunks, vec![(1, 1)]);
        assert_eq!(s.get(2).map(|q| (q.computed, q.tokens.len(), q.blocks.len())), Some((0, 5, 0)));
        // When sequence 1 finishes, sequence 2 is recomputed, generated token included.
        s.remove(1);
        let step = run(&mut s);
        assert_eq!(step.chunks, vec![(2, 5)]);
        assert_eq!(step.logits_for, vec![2]);
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
}
