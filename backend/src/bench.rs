//! Decode throughput measurement shared by `cargo bench` (CPU) and `switchyard bench` (any
//! device): a batch of sequences, each with an adapter slot or none, prefilled once and then
//! decoded step by step through the real scheduler and executor.

use crate::engine::executor::{Executor, ExecutorError};
use crate::engine::sampling::argmax;
use crate::engine::scheduler::{Scheduler, SchedulerConfig, Sequence};
use std::time::Instant;

/// Tokens per KV block in benchmarks.
pub const BLOCK_SIZE: usize = 16;

/// KV blocks a batch of `rows` sequences needs for `prompt_len + steps` tokens each.
pub fn blocks_needed(rows: usize, prompt_len: usize, steps: usize) -> usize {
    rows * (prompt_len + steps + 1).div_ceil(BLOCK_SIZE) + 1
}

/// Decode tokens per second of one batch: `adapters[i]` is the slot of row `i`. The prefill
/// step is not timed; each timed step generates one token per row (greedy).
pub fn decode_tokens_per_s(
    exec: &mut dyn Executor,
    vocab: usize,
    adapters: &[Option<u32>],
    prompt_len: usize,
    steps: usize,
) -> Result<f64, ExecutorError> {
    let blocks = blocks_needed(adapters.len(), prompt_len, steps);
    let cfg = SchedulerConfig::new(BLOCK_SIZE, blocks, adapters.len() * prompt_len.max(1), adapters.len());
    let mut sched = Scheduler::new(cfg);
    for (i, &a) in adapters.iter().enumerate() {
        let prompt = (0..prompt_len as u64).map(|t| ((t * 97 + i as u64 * 13) % vocab as u64) as u32).collect();
        sched.add(Sequence::new(i as u64, prompt, a));
    }
    let mut run_step = |sched: &mut Scheduler| -> Result<(), ExecutorError> {
        let step = sched.schedule();
        let logits = exec.forward(&step.batch)?;
        sched.complete(&step);
        let width = logits.len() / step.logits_for.len().max(1);
        for (row, &id) in step.logits_for.iter().enumerate() {
            sched.push_token(id, argmax(&logits[row * width..(row + 1) * width]));
        }
        Ok(())
    };
    run_step(&mut sched)?; // prefill, not timed
    let start = Instant::now();
    for _ in 0..steps {
        run_step(&mut sched)?;
    }
    Ok((adapters.len() * steps) as f64 / start.elapsed().as_secs_f64())
}
