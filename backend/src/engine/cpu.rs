//! The CPU executor: f32 weights in host memory, multi-threaded GEMMs, the kernels crate's
//! reference implementations for everything else. Always built; the reference for other
//! executors and the path CI runs.

use super::executor::{AdapterPreparer, Batch, Executor, ExecutorError, FusedLayer, PreparedAdapter, Retired};
use crate::adapters::AdapterWeights;
use crate::model::{HostTensor, ModelConfig, ModelWeights, Module};
use std::sync::Arc;
use switchyard_kernels::{AttentionSeq, KvLayout, LoraMat, attention, lora, matmul, ops};

type Layer = FusedLayer<Vec<f32>>;

/// KV pools of one layer.
#[derive(Debug)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Which rows of a batch use which adapter, and scratch space for the rank-sized intermediate.
struct LoraRows {
    rows: Vec<Option<u32>>,
    segs: Vec<lora::Segment>,
    shrink: Vec<f32>,
}

/// The CPU implementation of [`Executor`].
#[derive(Debug)]
pub struct CpuExecutor {
    config: ModelConfig,
    embed: Vec<f32>,
    /// `None` when tied to `embed`.
    lm_head: Option<Vec<f32>>,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    cache: Vec<LayerCache>,
    layout: KvLayout,
    inv_freq: Vec<f32>,
    rope_scale: f32,
    adapters: Vec<Option<AdapterWeights>>,
    max_rank: usize,
}

impl CpuExecutor {
    /// Takes ownership of the weights (fusing projections) and allocates a KV cache of
    /// `kv_blocks` blocks of `block_size` tokens, and `max_loras` adapter slots of rank up to
    /// `max_rank`.
    pub fn new(
        config: &ModelConfig,
        weights: ModelWeights,
        kv_blocks: usize,
        block_size: usize,
        max_loras: usize,
        max_rank: usize,
    ) -> CpuExecutor {
        let ModelWeights { embed_tokens, layers, final_norm, lm_head } = weights;
        let layers = layers
            .iter()
            .map(|l| {
                let stacked = |parts: &[&HostTensor]| {
                    Ok::<_, std::convert::Infallible>(parts.iter().flat_map(|t| t.data.iter().copied()).collect())
                };
                match FusedLayer::build(l, stacked) {
                    Ok(layer) => layer,
                    Err(never) => match never {},
                }
            })
            .collect();
        let layout = KvLayout { block_size, kv_heads: config.num_kv_heads, head_dim: config.head_dim };
        let pool = kv_blocks * block_size * layout.slot_width();
        let cache = (0..config.num_layers).map(|_| LayerCache { k: vec![0.0; pool], v: vec![0.0; pool] }).collect();
        let (inv_freq, rope_scale) = config.rope_inv_freq();
        CpuExecutor {
            config: config.clone(),
            embed: embed_tokens.data,
            lm_head: lm_head.map(|t| t.data),
            final_norm: final_norm.data,
            layers,
            cache,
            layout,
            inv_freq,
            rope_scale,
            adapters: vec![None; max_loras],
            max_rank,
        }
    }

    /// `y[:, off..off+out] += LoRA_m(x)` for every row whose adapter targets module `m` in
    /// `layer`. Prefill-shaped batches (segments longer than one row) use SGMV; decode-shaped
    /// ones (every segment one row) use BGMV.
    #[allow(clippy::too_many_arguments)]
    fn apply_lora(
        &self,
        lr: &mut LoraRows,
        layer: usize,
        m: Module,
        x: &[f32],
        y: &mut [f32],
        y_stride: usize,
        y_offset: usize,
    ) {
        if lr.segs.is_empty() {
            return;
        }
        let (in_dim, out_dim) = self.config.module_shape(m);
        let mat = |slot: u32| {
            let lm = self.adapters.get(slot as usize)?.as_ref()?.layers[layer][m.index()].as_ref()?;
            Some(LoraMat { a: &lm.a, b: &lm.b, rank: lm.rank, scale: lm.scale })
        };
        if lr.segs.iter().all(|s| s.len == 1) {
            lora::bgmv(x, in_dim, &lr.rows, mat, out_dim, y, y_stride, y_offset);
        } else {
            lora::sgmv_shrink(x, in_dim, &lr.segs, mat, &mut lr.shrink, self.max_rank);
            lora::sgmv_expand(&lr.shrink, self.max_rank, &lr.segs, mat, out_dim, y, y_stride, y_offset);
        }
    }
}

fn add_bias(y: &mut [f32], width: usize, bias: Option<&Vec<f32>>) {
    if let Some(bias) = bias {
        for row in y.chunks_exact_mut(width) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

/// The CPU executor computes on the validated f32 weights as they are: preparing an adapter
/// only checks its rank and takes it over (no copy).
#[derive(Debug, Clone, Copy)]
pub struct CpuPreparer {
    /// The slots' rank (`--max-lora-rank`).
    pub max_rank: usize,
}

impl AdapterPreparer for CpuPreparer {
    fn prepare(&self, adapter: AdapterWeights) -> Result<PreparedAdapter, ExecutorError> {
        if adapter.max_rank > self.max_rank {
            return Err(ExecutorError::Invalid(format!(
                "adapter rank {} exceeds slot rank {}",
                adapter.max_rank, self.max_rank
            )));
        }
        Ok(PreparedAdapter::of_weights(adapter))
    }
}

impl Executor for CpuExecutor {
    fn device(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn dtype(&self) -> &'static str {
        "f32"
    }

    fn preparer(&self) -> Arc<dyn AdapterPreparer> {
        Arc::new(CpuPreparer { max_rank: self.max_rank })
    }

    fn install_adapter(&mut self, slot: u32, adapter: PreparedAdapter) -> Result<Option<Retired>, ExecutorError> {
        let entry = self
            .adapters
            .get_mut(slot as usize)
            .ok_or_else(|| ExecutorError::Invalid(format!("adapter slot {slot} does not exist")))?;
        Ok(entry.replace(*adapter.into_form::<AdapterWeights>()?).map(Retired::new))
    }

    fn unload_adapter(&mut self, slot: u32) -> Option<Retired> {
        self.adapters.get_mut(slot as usize)?.take().map(Retired::new)
    }

    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>, ExecutorError> {
        let c = &self.config;
        let n = batch.tokens.len();
        let (h, q_dim, kv_dim, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let qkv_w = q_dim + 2 * kv_dim;
        if let Some(bad) = batch.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ExecutorError::Invalid(format!("token id {bad} outside the vocabulary")));
        }
        let rows = batch.row_adapters();
        let segs = lora::segments(&rows);
        let shrink = vec![0f32; if segs.is_empty() { 0 } else { n * self.max_rank }];
        let mut lr = LoraRows { rows, segs, shrink };

        let mut x = vec![0f32; n * h];
        ops::embedding(&self.embed, h, &batch.tokens, &mut x);
        let mut normed = vec![0f32; n * h];
        let mut qkv = vec![0f32; n * qkv_w];
        let mut attn = vec![0f32; n * q_dim];
        let mut proj = vec![0f32; n * h];
        let mut gate_up = vec![0f32; n * 2 * inter];
        let mut act = vec![0f32; n * inter];
        let attn_seqs: Vec<AttentionSeq<'_>> = batch
            .seqs
            .iter()
            .map(|s| AttentionSeq { q_start: s.start, q_len: s.len, context_len: s.context_len, blocks: &s.blocks })
            .collect();
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let (rope_freq, rope_scale) = (&self.inv_freq, self.rope_scale);

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            ops::rms_norm(&x, &layer.input_norm, c.rms_norm_eps, &mut normed);
            matmul::linear(&normed, n, h, &layer.qkv, qkv_w, &mut qkv, qkv_w, false);
            add_bias(&mut qkv, qkv_w, layer.qkv_bias.as_ref());
            for (m, off) in [(Module::Q, 0), (Module::K, q_dim), (Module::V, q_dim + kv_dim)] {
                self.apply_lora(&mut lr, li, m, &normed, &mut qkv, qkv_w, off);
            }
            ops::rope(&mut qkv, qkv_w, 0, c.num_heads, c.head_dim, &batch.positions, rope_freq, rope_scale);
            ops::rope(&mut qkv, qkv_w, q_dim, c.num_kv_heads, c.head_dim, &batch.positions, rope_freq, rope_scale);
            let cache = &mut self.cache[li];
            attention::write_kv(
                self.layout,
                &qkv,
                qkv_w,
                q_dim,
                q_dim + kv_dim,
                &batch.kv_slots,
                &mut cache.k,
                &mut cache.v,
            );
            attention::paged_attention(
                self.layout,
                &qkv,
                qkv_w,
                c.num_heads,
                &attn_seqs,
                &cache.k,
                &cache.v,
                scale,
                c.sliding_window,
                &mut attn,
            );
            matmul::linear(&attn, n, q_dim, &layer.o, h, &mut proj, h, false);
            add_bias(&mut proj, h, layer.o_bias.as_ref());
            self.apply_lora(&mut lr, li, Module::O, &attn, &mut proj, h, 0);
            ops::add_inplace(&mut x, &proj);

            // MLP block.
            ops::rms_norm(&x, &layer.post_norm, c.rms_norm_eps, &mut normed);
            matmul::linear(&normed, n, h, &layer.gate_up, 2 * inter, &mut gate_up, 2 * inter, false);
            add_bias(&mut gate_up, 2 * inter, layer.gate_up_bias.as_ref());
            self.apply_lora(&mut lr, li, Module::Gate, &normed, &mut gate_up, 2 * inter, 0);
            self.apply_lora(&mut lr, li, Module::Up, &normed, &mut gate_up, 2 * inter, inter);
            ops::silu_mul(&gate_up, inter, &mut act);
            matmul::linear(&act, n, inter, &layer.down, h, &mut proj, h, false);
            add_bias(&mut proj, h, layer.down_bias.as_ref());
            self.apply_lora(&mut lr, li, Module::Down, &act, &mut proj, h, 0);
            ops::add_inplace(&mut x, &proj);
        }

        // Logits only for the rows that need them: the last row of each finishing chunk (and
        // every row of a prompt whose log-probabilities are asked for).
        let wanted: Vec<usize> = batch.seqs.iter().flat_map(|s| s.wanted_rows()).collect();
        let mut last = Vec::with_capacity(wanted.len() * h);
        for &r in &wanted {
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut last_normed = vec![0f32; last.len()];
        ops::rms_norm(&last, &self.final_norm, c.rms_norm_eps, &mut last_normed);
        let head = self.lm_head.as_deref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; wanted.len() * c.vocab_size];
        matmul::linear(&last_normed, wanted.len(), h, head, c.vocab_size, &mut logits, c.vocab_size, false);
        Ok(logits)
    }
}
