//! Choosing the next token from logits: the request's logit bias and repetition penalties
//! first, then greedy, or temperature / min-p / top-k / top-p sampling with a per-request
//! seeded generator.
//!
//! The adjustments follow OpenAI and vLLM: `logit_bias` is added to the named tokens' logits;
//! `repetition_penalty` (vLLM, after CTRL) divides the positive logits of every token seen in the
//! prompt or the output and multiplies the negative ones; `frequency_penalty` is subtracted once
//! per earlier occurrence of a token in the output, `presence_penalty` once if it occurred at
//! all. They apply to greedy decoding too.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};
use switchyard_kernels::ops;

/// Temperatures below this are greedy. Dividing logits by a smaller one overflows f32 (a
/// temperature of `1e-39` turns every logit into an infinity, and the softmax into NaN), and
/// long before that the distribution is one-hot to within f32 anyway. vLLM uses the same bound.
pub const MIN_TEMPERATURE: f32 = 1e-5;
/// Most `logit_bias` entries one request may give.
pub const MAX_LOGIT_BIAS: usize = 1024;
/// A logit bias is within ±this (OpenAI's range).
pub const MAX_BIAS: f32 = 100.0;
/// `presence_penalty` and `frequency_penalty` are within ±this (OpenAI's range).
pub const MAX_PENALTY: f32 = 2.0;
/// Most alternatives a request may ask for with each token's log-probability (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Sampling settings of one request, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Below [`MIN_TEMPERATURE`] (0 included) means greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 disables nucleus filtering.
    pub top_p: f32,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    /// In [0, 1]: tokens less likely than this times the most likely one are dropped; 0
    /// disables.
    pub min_p: f32,
    /// In [-2, 2], over the tokens generated so far.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Over the prompt's and the output's tokens; above 0, 1 disables.
    pub repetition_penalty: f32,
    /// Added to these tokens' logits: unique ids, each bias in [-100, 100].
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks ranges against a vocabulary of `vocab` tokens; the message names the field.
    pub fn validate(&self, vocab: usize) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&v) {
                return Err(format!("{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], got {v}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be a finite number > 0, got {}", self.repetition_penalty));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(format!("logit_bias has {} entries; the most is {MAX_LOGIT_BIAS}", self.logit_bias.len()));
        }
        let mut ids = HashSet::with_capacity(self.logit_bias.len());
        for &(id, bias) in &self.logit_bias {
            if id as usize >= vocab {
                return Err(format!("logit_bias names token {id}, outside the vocabulary (size {vocab})"));
            }
            if !(-MAX_BIAS..=MAX_BIAS).contains(&bias) {
                return Err(format!("logit_bias for token {id} must be in [-{MAX_BIAS}, {MAX_BIAS}], got {bias}"));
            }
            if !ids.insert(id) {
                return Err(format!("logit_bias names token {id} twice"));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < MIN_TEMPERATURE || self.top_k == 1
    }

    /// Whether any adjustment of the logits is asked for.
    fn adjusts(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
    }
}

/// A request's sampler: its settings, its random stream, and the tokens its penalties count.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// The candidates (weight, token) and every token's weight, reused from draw to draw.
    candidates: Vec<(f32, u32)>,
    weights: Vec<f32>,
    /// The row of logits after the request's adjustments (when it has any).
    adjusted: Vec<f32>,
    /// How often each token has been generated (presence and frequency penalties).
    counts: HashMap<u32, u32>,
    /// Every token of the prompt and the output (repetition penalty; empty when it is off).
    seen: HashSet<u32>,
}

impl Sampler {
    /// A sampler for a request with `prompt`.
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Sampler {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        let seen = match params.repetition_penalty != 1.0 {
            true => prompt.iter().copied().collect(),
            false => HashSet::new(),
        };
        let (candidates, weights, adjusted) = (Vec::new(), Vec::new(), Vec::new());
        Sampler { params, rng, candidates, weights, adjusted, counts: HashMap::new(), seen }
    }

    /// Picks the next token from one row of logits, and counts it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = if self.params.adjusts() {
            let mut adjusted = std::mem::take(&mut self.adjusted);
            self.adjust(logits, &mut adjusted);
            let token = choose(&self.params, &mut self.rng, (&mut self.candidates, &mut self.weights), &adjusted);
            self.adjusted = adjusted;
            token
        } else {
            choose(&self.params, &mut self.rng, (&mut self.candidates, &mut self.weights), logits)
        };
        *self.counts.entry(token).or_default() += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token);
        }
        token
    }

    /// `logits` with the bias and the penalties applied, into `out`.
    fn adjust(&self, logits: &[f32], out: &mut Vec<f32>) {
        let p = &self.params;
        out.clear();
        out.extend_from_slice(logits);
        for &(id, bias) in &p.logit_bias {
            if let Some(l) = out.get_mut(id as usize) {
                *l += bias;
            }
        }
        let r = p.repetition_penalty;
        for &id in &self.seen {
            if let Some(l) = out.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&id, &n) in &self.counts {
                if let Some(l) = out.get_mut(id as usize) {
                    *l -= p.frequency_penalty * n as f32 + p.presence_penalty;
                }
            }
        }
    }
}

/// Picks a token from `logits` under `p`: greedy, or a draw from `rng` among the candidates
/// min-p, top-k and top-p leave, each as likely as its softmax weight at the temperature.
///
/// Only top-p needs the candidates in order, and only as far as the nucleus reaches: it sorts
/// a prefix of the heaviest at a time, growing it until it holds `top_p` of the mass. A sort
/// of the whole vocabulary took about 1.5 ms a token on SmolLM2's 49K, a third of a decode
/// step at batch 1.
fn choose(p: &SamplingParams, rng: &mut ChaCha8Rng, (c, w): Scratch<'_>, logits: &[f32]) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let t = p.temperature;
    let max = logits.iter().map(|&l| l / t).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // Every logit -inf (or NaN), or one so large at this temperature that it is certain.
        return argmax(logits);
    }
    // Each token's weight: its probability over the most likely one's, e^(l/t − max).
    w.resize(logits.len(), 0.0);
    ops::exp_scaled(logits, t, max, w);
    // min_p keeps p_i >= min_p · p_max: a weight of at least min_p. NaNs never pass.
    c.clear();
    c.extend(w.iter().enumerate().filter_map(|(i, &w)| (w >= p.min_p).then_some((w, i as u32))));
    let heavier_first = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
    if p.top_k > 0 && p.top_k < c.len() {
        c.select_nth_unstable_by(p.top_k - 1, heavier_first);
        c.truncate(p.top_k);
    }
    let mut total: f32 = c.iter().map(|c| c.0).sum();
    if p.top_p < 1.0 {
        // Nucleus: the fewest heaviest candidates whose mass reaches top_p.
        let need = p.top_p * total;
        let mut prefix = NUCLEUS_PREFIX.min(c.len());
        loop {
            if prefix < c.len() {
                c.select_nth_unstable_by(prefix - 1, heavier_first);
            }
            c[..prefix].sort_unstable_by(heavier_first);
            let mut mass = 0f32;
            if let Some(keep) = c[..prefix].iter().position(|cand| {
                mass += cand.0;
                mass >= need
            }) {
                c.truncate(keep + 1);
                break;
            }
            if prefix == c.len() {
                break;
            }
            prefix = (4 * prefix).min(c.len());
        }
        total = c.iter().map(|c| c.0).sum();
    }
    let mut r = rng.random::<f32>() * total;
    for &(w, id) in c.iter() {
        if r < w {
            return id;
        }
        r -= w;
    }
    // Rounding left a sliver past the last weight, or nothing passed: the heaviest there is.
    c.iter().max_by(|a, b| a.0.total_cmp(&b.0)).map_or_else(|| argmax(logits), |c| c.1)
}

/// [`choose`]'s reusable buffers: the candidates (weight, token), and every token's weight.
type Scratch<'a> = (&'a mut Vec<(f32, u32)>, &'a mut Vec<f32>);

/// How many of the heaviest candidates the nucleus search sorts first (then four times as
/// many, until the nucleus is found): a confident model's nucleus is a few tokens, a flat
/// distribution's most of the vocabulary.
const NUCLEUS_PREFIX: usize = 64;

/// A generated token's log-probability, and the most likely tokens' at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// `(token, log-probability)`, most likely first (the lower id first on ties).
    pub top: Vec<(u32, f32)>,
}

/// The log-probabilities at one position, from its raw logits: the model's own distribution,
/// before the request's bias, penalties and temperature (as vLLM reports them by default):
/// `token`'s, and those of the `top` most likely tokens.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_total = f64::from(max) + sum.ln();
    let logprob = |l: f32| (f64::from(l) - log_total) as f32;
    // The `top` largest, kept sorted (largest first, lower id first on ties) as the row is read.
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (id, &l) in logits.iter().enumerate() {
            if best.len() == top && best.last().is_some_and(|&(worst, _)| l <= worst) {
                continue;
            }
            let at = best.partition_point(|&(b, _)| b >= l);
            best.insert(at, (l, id as u32));
            best.truncate(top);
        }
    }
    TokenLogprobs {
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&l| logprob(l)),
        top: best.into_iter().map(|(l, id)| (id, logprob(l))).collect(),
    }
}

/// Index of the largest logit (the first one on ties; NaNs are passed over, and 0 where
/// nothing else is found). Two passes that vectorize, the largest value and then its first
/// index, where one compare-and-remember loop runs a value at a time: a vocabulary of 49K is
/// read in a few microseconds.
pub fn argmax(logits: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = m.max(l);
        }
    }
    let max = rest.iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed: Some(42), ..SamplingParams::default() }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn argmax_finds_the_first_largest_logit_past_nans_at_any_length() {
        for len in [1, 15, 16, 17, 49152] {
            let mut logits: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
            // The definition, a value at a time.
            let want = (0..len).fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
            assert_eq!(argmax(&logits) as usize, want, "{len} logits");
            if len > 1 {
                // A tie later on keeps the first; a NaN first is passed over.
                logits[len - 1] = logits[want];
                logits[0] = f32::NAN;
                let want = if want == 0 { len - 1 } else { want };
                assert_eq!(argmax(&logits) as usize, want, "{len} logits, a tie and a NaN");
            }
        }
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [5.0, 4.9, 4.8, -3.0, -3.0];
        let mut s = Sampler::new(params(1.0, 1.0, 2), &[]);
        for _ in 0..200 {
            assert!(s.sample(&logits) < 2);
        }
        // The top token alone holds more than 0.3 of the mass.
        let mut s = Sampler::new(params(1.0, 0.3, 0), &[]);
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn tokens_are_drawn_as_often_as_their_softmax_weight_within_the_nucleus() {
        // At temperature 0.5 the weights are e^(2l): with these logits, 0.50, 0.30, 0.12, 0.06
        // and 0.02 of the mass, near enough (computed below).
        let logits = [1.0f32, 0.744, 0.286, -0.061, -0.61];
        let weights: Vec<f64> = logits.iter().map(|&l| (f64::from(l) * 2.0).exp()).collect();
        let total: f64 = weights.iter().sum();
        let draws = 40_000;
        let counts = |top_p: f32| {
            let mut s = Sampler::new(SamplingParams { seed: Some(7), ..params(0.5, top_p, 0) }, &[]);
            let mut n = [0usize; 5];
            for _ in 0..draws {
                n[s.sample(&logits) as usize] += 1;
            }
            n
        };
        // Within five standard deviations of the expected count.
        let close = |got: usize, p: f64| {
            let (mean, sd) = (draws as f64 * p, (draws as f64 * p * (1.0 - p)).sqrt());
            (got as f64 - mean).abs() <= 5.0 * sd + 1.0
        };
        let all = counts(1.0);
        for (i, (&got, w)) in all.iter().zip(&weights).enumerate() {
            assert!(close(got, w / total), "token {i}: {got} of {draws}, weight {}", w / total);
        }
        // top_p 0.85: the three heaviest hold 0.92 of the mass, the two heaviest 0.80, so the
        // nucleus is three tokens, drawn in proportion among themselves.
        let nucleus = counts(0.85);
        let kept: f64 = weights[..3].iter().sum();
        assert_eq!(nucleus[3] + nucleus[4], 0, "{nucleus:?}");
        for (i, (&got, w)) in nucleus[..3].iter().zip(&weights).enumerate() {
            assert!(close(got, w / kept), "token {i}: {got} of {draws} in the nucleus");
        }
    }

    #[test]
    fn a_nucleus_wider_than_the_first_sorted_prefix_is_found_whole() {
        // 2000 slowly falling logits: the nucleus of 0.9 is about 1700 tokens, far past the
        // first prefix the search sorts.
        let logits: Vec<f32> = (0..2000).map(|i| -(i as f32) * 0.001).collect();
        let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut mass = 0.0;
        let size = 1 + weights
            .iter()
            .position(|w| {
                mass += w / total;
                mass >= 0.9
            })
            .unwrap_or(weights.len() - 1);
        assert!(size > 4 * NUCLEUS_PREFIX, "{size}");
        let mut s = Sampler::new(SamplingParams { seed: Some(3), ..params(1.0, 0.9, 0) }, &[]);
        let drawn: Vec<u32> = (0..5000).map(|_| s.sample(&logits)).collect();
        let last = drawn.iter().copied().max().unwrap_or(0) as usize;
        // The nucleus's edge can move by a token with rounding.
        assert!(last <= size, "drew token {last} outside the nucleus of {size}");
        assert!(last + 50 >= size, "never drew past token {last} of a nucleus of {size}");
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens_and_sampling_explores() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed: Some(seed), ..params(1.0, 1.0, 0) }, &[]);
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
            let mut s = Sampler::new(params(temperature, 1.0, 0), &[]);
            for _ in 0..50 {
                assert_eq!(s.sample(&logits), best, "temperature {temperature:e}");
            }
        }
        // Just above the bound it is still sampling, and still (nearly) one-hot here.
        let mut s = Sampler::new(params(MIN_TEMPERATURE, 1.0, 0), &[]);
        assert_eq!(s.sample(&logits), best);
    }

    #[test]
    fn rejects_out_of_range_settings_naming_the_field() {
        let refused = |p: SamplingParams, field: &str| {
            let e = p.validate(100).expect_err("refused");
            assert!(e.starts_with(field), "{e}");
        };
        refused(params(-1.0, 1.0, 0), "temperature");
        refused(params(f32::NAN, 1.0, 0), "temperature");
        refused(params(1.0, 0.0, 0), "top_p");
        refused(params(1.0, 1.5, 0), "top_p");
        refused(SamplingParams { min_p: 1.5, ..params(1.0, 1.0, 0) }, "min_p");
        refused(SamplingParams { presence_penalty: 2.5, ..params(1.0, 1.0, 0) }, "presence_penalty");
        refused(SamplingParams { frequency_penalty: f32::NAN, ..params(1.0, 1.0, 0) }, "frequency_penalty");
        refused(SamplingParams { repetition_penalty: 0.0, ..params(1.0, 1.0, 0) }, "repetition_penalty");
        refused(SamplingParams { logit_bias: vec![(100, 1.0)], ..params(1.0, 1.0, 0) }, "logit_bias");
        refused(SamplingParams { logit_bias: vec![(5, 101.0)], ..params(1.0, 1.0, 0) }, "logit_bias");
        refused(SamplingParams { logit_bias: vec![(5, 1.0), (5, 2.0)], ..params(1.0, 1.0, 0) }, "logit_bias");
        let many = (0..=MAX_LOGIT_BIAS as u32).map(|i| (i, 1.0)).collect();
        let e = SamplingParams { logit_bias: many, ..params(1.0, 1.0, 0) }.validate(10_000).expect_err("too many");
        assert!(e.contains("the most is 1024"), "{e}");
        assert!(params(0.7, 0.9, 40).validate(100).is_ok());
    }

    #[test]
    fn a_logit_bias_moves_greedy_and_sampled_choices() {
        let logits = [2.0, 1.0, 0.5, 0.0];
        let greedy = |bias: Vec<(u32, f32)>| {
            Sampler::new(SamplingParams { logit_bias: bias, ..SamplingParams::default() }, &[]).sample(&logits)
        };
        assert_eq!(greedy(vec![]), 0);
        assert_eq!(greedy(vec![(3, 2.5)]), 3);
        assert_eq!(greedy(vec![(0, -100.0)]), 1, "-100 bans a token");
        // Sampling: a +100 bias makes a token certain.
        let mut s = Sampler::new(SamplingParams { logit_bias: vec![(2, 100.0)], ..params(1.0, 1.0, 0) }, &[]);
        assert!((0..100).all(|_| s.sample(&logits) == 2));
    }

    #[test]
    fn penalties_count_what_was_generated_and_repetition_also_the_prompt() {
        let logits = [3.0, 2.9, -1.0, 2.0];
        // Greedy with a frequency penalty of 0.2: token 0 until it has come once (3.0 - 0.2 =
        // 2.8 < 2.9), then token 1, then 0 again (2.8 vs 2.7)...
        let mut s = Sampler::new(SamplingParams { frequency_penalty: 0.2, ..SamplingParams::default() }, &[]);
        let drawn: Vec<u32> = (0..4).map(|_| s.sample(&logits)).collect();
        assert_eq!(drawn, vec![0, 1, 0, 1]);
        // A presence penalty counts once, however often a token came: after 0, 1 and 3 have each
        // come, 0 (3.0 - 1.5) leads again, and stays ahead.
        let mut s = Sampler::new(SamplingParams { presence_penalty: 1.5, ..SamplingParams::default() }, &[]);
        let drawn: Vec<u32> = (0..5).map(|_| s.sample(&logits)).collect();
        assert_eq!(drawn, vec![0, 1, 3, 0, 0]);
        // The repetition penalty counts the prompt: token 0 was in it, so 3.0 / 1.1 < 2.9.
        let rep = SamplingParams { repetition_penalty: 1.1, ..SamplingParams::default() };
        assert_eq!(Sampler::new(rep.clone(), &[0, 2]).sample(&logits), 1);
        // A negative logit is made more negative, not less: token 2 (-1.0) stays last.
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 1.5, ..rep }, &[2]);
        let mut adjusted = Vec::new();
        s.adjust(&logits, &mut adjusted);
        assert_eq!(adjusted[2], -1.5);
        assert_eq!(s.sample(&logits), 0);
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_raw_logits() {
        let logits = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let total: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let expect = |l: f32| (f64::from(l) - total.ln()) as f32;
        let lp = logprobs(&logits, 4, 3);
        assert!((lp.logprob - expect(0.5)).abs() < 1e-6, "{lp:?}");
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 0], "most likely first, the lower id first on ties");
        assert!(lp.top.iter().zip([3.0, 3.0, 1.0]).all(|(t, l)| (t.1 - expect(l)).abs() < 1e-6));
        assert_eq!(logprobs(&logits, 0, 0).top, vec![]);
        assert_eq!(logprobs(&logits, 0, 9).top.len(), 5, "at most the vocabulary");
    }

    #[test]
    fn min_p_keeps_the_tokens_near_the_most_likely() {
        // Token 0 has e^2 times token 2's probability: min_p 0.2 keeps 0 and 1 (e^-0.1), drops
        // 2 (e^-2 < 0.2) and 3.
        let logits = [2.0, 1.9, 0.0, -5.0];
        let mut s = Sampler::new(SamplingParams { min_p: 0.2, ..params(1.0, 1.0, 0) }, &[]);
        let drawn: std::collections::HashSet<u32> = (0..300).map(|_| s.sample(&logits)).collect();
        assert_eq!(drawn, [0, 1].into_iter().collect());
    }
}
