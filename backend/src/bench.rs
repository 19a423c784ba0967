//! Decode throughput measurement shared by `cargo bench` (CPU) and `switchyard bench` (any
//! device): a batch of sequences, each with an adapter slot or none, prefilled once and then
//! decoded step by step through the real scheduler and executor.

use crate::engine::executor::{Executor, ExecutorError};
use crate::engine::sampling::{Sampler, SamplingParams, argmax};
use crate::engine::scheduler::{Scheduler, SchedulerConfig, Sequence};
use std::time::Instant;

/// Tokens per KV block in benchmarks.
pub const BLOCK_SIZE: usize = 16;

/// KV blocks a batch of `rows` sequences needs for `prompt_len + steps` tokens each.
pub fn blocks_needed(rows: usize, prompt_len: usize, steps: usize) -> usize {
    rows * (prompt_len + steps + 1).div_ceil(BLOCK_SIZE) + 1
}

/// Decode tokens per second of one batch: `adapters[i]` is the slot of row `i`. The prefill
/// step is not timed; each timed step generates one token per row, sampled under `sampling`
/// (row `i` seeded with `i`), as the engine samples them.
pub fn decode_tokens_per_s(
    exec: &mut dyn Executor,
    vocab: usize,
    adapters: &[Option<u32>],
    prompt_len: usize,
    steps: usize,
    sampling: &SamplingParams,
) -> Result<f64, ExecutorError> {
    let blocks = blocks_needed(adapters.len(), prompt_len, steps);
    let cfg = SchedulerConfig::new(BLOCK_SIZE, blocks, adapters.len() * prompt_len.max(1), adapters.len());
    let mut sched = Scheduler::new(cfg);
    let mut samplers = Vec::with_capacity(adapters.len());
    for (i, &a) in adapters.iter().enumerate() {
        let prompt: Vec<u32> =
            (0..prompt_len as u64).map(|t| ((t * 97 + i as u64 * 13) % vocab as u64) as u32).collect();
        samplers.push(Sampler::new(SamplingParams { seed: Some(i as u64), ..sampling.clone() }, &prompt));
        sched.add(Sequence::new(i as u64, prompt, a));
    }
    let mut run_step = |sched: &mut Scheduler| -> Result<(), ExecutorError> {
        let step = sched.schedule();
        let logits = exec.forward(&step.batch)?;
        sched.complete(&step);
        let width = logits.len() / step.logits_for.len().max(1);
        for (row, &id) in step.logits_for.iter().enumerate() {
            let sampler = samplers.get_mut(id as usize).ok_or_else(|| {
                ExecutorError::Invalid(format!("the scheduler returned sequence {id}, which the bench did not add"))
            })?;
            sched.push_token(id, sampler.sample(&logits[row * width..(row + 1) * width]));
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

/// What a user waits for before the first token of a long prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prefill {
    /// Prompt tokens computed per second.
    pub tokens_per_s: f64,
    /// From the request's arrival at the scheduler to its first token, in milliseconds.
    pub ttft_ms: f64,
}

/// Times the prefill of one `prompt_len`-token prompt through the real scheduler (chunks of at
/// most `max_batch_tokens`, as the backend runs them) up to its first sampled token.
pub fn prefill(
    exec: &mut dyn Executor,
    vocab: usize,
    adapter: Option<u32>,
    prompt_len: usize,
    max_batch_tokens: usize,
) -> Result<Prefill, ExecutorError> {
    let blocks = blocks_needed(1, prompt_len, 1);
    let mut sched = Scheduler::new(SchedulerConfig::new(BLOCK_SIZE, blocks, max_batch_tokens.max(1), 1));
    let prompt = (0..prompt_len as u64).map(|t| ((t * 31 + 7) % vocab as u64) as u32).collect();
    let start = Instant::now();
    sched.add(Sequence::new(0, prompt, adapter));
    loop {
        let step = sched.schedule();
        let logits = exec.forward(&step.batch)?;
        sched.complete(&step);
        if let Some(&id) = step.logits_for.first() {
            let width = logits.len() / step.logits_for.len();
            sched.push_token(id, argmax(&logits[..width]));
            let elapsed = start.elapsed().as_secs_f64();
            return Ok(Prefill { tokens_per_s: prompt_len as f64 / elapsed, ttft_ms: elapsed * 1e3 });
        }
        if step.batch.tokens.is_empty() {
            return Err(ExecutorError::Invalid("the scheduler ran nothing for the prompt".into()));
        }
    }
}
