//! Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a
//! per-request seeded generator.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Temperatures below this are greedy. Dividing logits by a smaller one overflows f32 (a
/// temperature of `1e-39` turns every logit into an infinity, and the softmax into NaN), and
/// long before that the distribution is one-hot to within f32 anyway. vLLM uses the same bound.
pub const MIN_TEMPERATURE: f32 = 1e-5;

/// Sampling settings of one request, already validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Below [`MIN_TEMPERATURE`] (0 included) means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> SamplingParams {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None }
    }
}

impl SamplingParams {
    /// Checks ranges; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < MIN_TEMPERATURE || self.top_k == 1
    }
}

/// A request's sampler: its settings and its random stream.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler { params, rng, scratch: Vec::new() }
    }

    /// Picks a token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let p = self.params;
        let c = &mut self.scratch;
        c.clear();
        c.extend(logits.iter().enumerate().map(|(i, &l)| (l / p.temperature, i as u32)));
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);
        // Softmax over the candidates (they are sorted, so the max is first).
        let max = c[0].0;
        let mut total = 0f32;
        for cand in c.iter_mut() {
            cand.0 = (cand.0 - max).exp();
            total += cand.0;
        }
        // Nucleus: the smallest prefix whose mass reaches top_p.
        if p.top_p < 1.0 {
            let mut mass = 0f32;
            let mut keep = c.len();
            for (i, cand) in c.iter().enumerate() {
                mass += cand.0 / total;
                if mass >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|c| c.0).sum();
        }
        let mut r = self.rng.random::<f32>() * total;
        for &(w, id) in c.iter() {
            if r < w {
                return id;
            }
            r -= w;
        }
        c.last().map_or(0, |c| c.1)
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed: Some(42) }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 4.8, -3.0, -3.0];
        let mut s = Sampler::new(params(1.0, 1.0, 2));
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
        // The top token alone holds more than 0.3 of the mass.
        let mut s = Sampler::new(params(1.0, 0.3, 0));
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_sampling_explores() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed: Some(seed), ..params(1.0, 1.0, 0) });
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        assert!(draw(1).iter().collect::<std::collections::HashSet<_>>().len() > 5);
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        // The largest logit is not the first, so a sampler that overflowed and fell through to
        // its last candidate, or to token 0, would be caught.
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 64) as f32 * 0.25 - 4.0).collect();
        let best = argmax(&logits);
        assert_ne!(best, 0);
        for temperature in [1e-39, f32::MIN_POSITIVE, 1e-20, 1e-6] {
            let mut s = Sampler::new(params(temperature, 1.0, 0));
            for _ in 0..50 {
                assert_eq!(s.sample(&logits), best, "temperature {temperature:e}");
            }
        }
        // Just above the bound it is still sampling, and still (nearly) one-hot here.
        let mut s = Sampler::new(params(MIN_TEMPERATURE, 1.0, 0));
        assert_eq!(s.sample(&logits), best);
    }

    #[test]
    fn rejects_out_of_range_settings() {
        assert!(params(-1.0, 1.0, 0).validate().is_err());
        assert!(params(f32::NAN, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0.0, 0).validate().is_err());
        assert!(params(1.0, 1.5, 0).validate().is_err());
        assert!(params(0.7, 0.9, 40).validate().is_ok());
    }
}
