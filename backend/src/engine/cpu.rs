//! The CPU executor: weights in host memory as they were stored (GGUF's quantized blocks, whose
//! products run on 8-bit integers, or f32), multi-threaded products, the kernels crate's
//! reference implementations for everything else. Always built; the reference for other
//! executors and the path CI runs.

use super::executor::{AdapterPreparer, Batch, Executor, ExecutorError, FusedLayer, PreparedAdapter, Retired};
use crate::adapters::AdapterWeights;
use crate::model::{HostTensor, ModelConfig, ModelWeights, Module, TensorData};
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};
use std::sync::Arc;
use switchyard_kernels::lora::LoraHalf;
use switchyard_kernels::ops::Half;
use switchyard_kernels::quant::{self, Path, Precision, Q8Rows, QuantMatrix};
use switchyard_kernels::team::{self, Beside};
use switchyard_kernels::{AttentionSeq, KvLayout, KvValue, LoraMat, attention, lora, matmul, ops};

/// Sizes the thread pool the CPU executor computes on (default: one thread per core). Call it
/// before anything else uses the pool.
pub fn set_threads(threads: usize) -> Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| format!("cannot set the CPU executor's threads to {threads}: {e}"))
}

/// A weight matrix `[out, in]` as the CPU computes on it.
#[derive(Debug)]
enum Linear {
    F32(Vec<f32>),
    /// bf16 as stored, times f32 activations (`matmul::linear_half`).
    Bf16(Vec<bf16>),
    /// f16 as stored, likewise.
    F16(Vec<f16>),
    /// Quantized blocks: activations are quantized per block (to the executor's [`Precision`])
    /// and multiplied as integers (`switchyard_kernels::quant`).
    Quant(QuantMatrix),
    /// Matrices stacked along their rows that do not merge into one (files mix formats within a
    /// layer: `Q4_K_M` stores some `v` and `down` projections in a finer format than the rest),
    /// each with its rows: each writes its own block of output columns.
    Parts(Vec<(Linear, usize)>),
}

impl Linear {
    /// Tensors stacked along their first dimension. When `keep`: one quantized matrix if every
    /// part is quantized in one format (whole rows stack, so the blocks stay intact), one bf16
    /// (f16) matrix if every part is bf16 (f16), else the parts side by side, each as it is
    /// stored. f32 when not `keep` or nothing is stored otherwise.
    fn stacked(parts: &[&HostTensor], keep: bool) -> Linear {
        if !keep || parts.iter().all(|t| matches!(t.data, TensorData::F32(_))) {
            return Linear::F32(parts.iter().flat_map(|t| t.to_f32().into_owned()).collect());
        }
        let quantized: Vec<&QuantMatrix> = parts
            .iter()
            .filter_map(|t| match &t.data {
                TensorData::Quant(q) => Some(q),
                _ => None,
            })
            .collect();
        if quantized.len() == parts.len()
            && let Ok(q) = QuantMatrix::stack(&quantized)
        {
            return Linear::Quant(q);
        }
        // Every part's values, if every one is held as `pick` finds them.
        fn all<'a, T: Copy>(parts: &[&'a HostTensor], pick: fn(&'a TensorData) -> Option<&'a [T]>) -> Option<Vec<T>> {
            parts.iter().map(|t| pick(&t.data)).collect::<Option<Vec<&[T]>>>().map(|v| v.concat())
        }
        if let Some(v) = all(parts, |d| if let TensorData::Bf16(v) = d { Some(v) } else { None }) {
            return Linear::Bf16(v);
        }
        if let Some(v) = all(parts, |d| if let TensorData::F16(v) = d { Some(v) } else { None }) {
            return Linear::F16(v);
        }
        let rows = |t: &HostTensor| t.shape.first().copied().unwrap_or(0);
        Linear::Parts(parts.iter().map(|&t| (Linear::of(t.clone(), keep), rows(t))).collect())
    }

    fn of(t: HostTensor, keep: bool) -> Linear {
        match t.data {
            TensorData::Quant(q) if keep => Linear::Quant(q),
            TensorData::Bf16(v) if keep => Linear::Bf16(v),
            TensorData::F16(v) if keep => Linear::F16(v),
            _ => Linear::F32(t.into_f32()),
        }
    }

    /// A vector's values (norm weights and biases are f32 whatever the file stores).
    fn into_vector(self) -> Vec<f32> {
        match self {
            Linear::F32(v) => v,
            Linear::Bf16(v) => v.iter().map(|v| v.to_f32()).collect(),
            Linear::F16(v) => v.iter().map(|v| v.to_f32()).collect(),
            Linear::Quant(q) => q.dequantize(),
            Linear::Parts(parts) => parts.into_iter().flat_map(|(p, _)| p.into_vector()).collect(),
        }
    }

    /// Whether any of the matrix is in `form`'s variant (`Parts` looked into).
    fn holds(&self, form: fn(&Linear) -> bool) -> bool {
        match self {
            Linear::Parts(parts) => parts.iter().any(|(p, _)| p.holds(form)),
            other => form(other),
        }
    }

    /// `y[m, out] = x[m, k] · selfᵀ`, `y`'s rows `y_stride` apart. `acts` is scratch space for
    /// the quantized activations.
    #[allow(clippy::too_many_arguments)]
    fn forward(&self, x: &[f32], m: usize, k: usize, out: usize, y: &mut [f32], y_stride: usize, acts: &mut Acts) {
        self.quantize_input(x, m, k, acts);
        self.multiply(x, m, k, out, y, y_stride, &acts.rows, None);
    }

    /// Whether any part is quantized: its input is then quantized first, once for every part.
    fn quantized(&self) -> bool {
        self.holds(|l| matches!(l, Linear::Quant(_)))
    }

    /// Quantizes the input `x` (`m` rows of `k`) into `acts` where the matrix needs it.
    fn quantize_input(&self, x: &[f32], m: usize, k: usize, acts: &mut Acts) {
        if self.quantized() {
            acts.rows.quantize(x, m, k, acts.precision);
        }
    }

    /// Has `make(r, row)` write every input row `r` into `x` (`m` rows of `k`) and quantizes
    /// the row into `acts` where the matrix needs it, in one parallel section: the row-wise
    /// step before a product (a norm, SwiGLU) and the product's quantization share it.
    fn make_input(
        &self,
        x: &mut [f32],
        m: usize,
        k: usize,
        acts: &mut Acts,
        make: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        if self.quantized() {
            acts.rows.quantize_made(x, m, k, acts.precision, make);
        } else {
            team::for_each_row(&mut x[..m * k], k, make);
        }
    }

    /// [`Linear::forward`] with `x` already quantized into `q` (where any part is quantized), and
    /// `beside`'s items in the product's parallel section (see `quant::matmul_beside`), or in one
    /// of their own where the product is not quantized.
    #[allow(clippy::too_many_arguments)]
    fn multiply(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        out: usize,
        y: &mut [f32],
        y_stride: usize,
        q: &Q8Rows,
        beside: Option<&dyn Beside>,
    ) {
        match self {
            Linear::F32(w) => matmul::linear(x, m, k, w, out, y, y_stride, false),
            Linear::Bf16(w) => matmul::linear_half(x, m, k, w, out, y, y_stride),
            Linear::F16(w) => matmul::linear_half(x, m, k, w, out, y, y_stride),
            Linear::Quant(w) => return quant::matmul_beside(Path::detect(), w, q, y, y_stride, beside),
            Linear::Parts(parts) => {
                // The items go beside the first part's product.
                let (mut col, mut beside) = (0, beside);
                for (part, rows) in parts {
                    part.multiply(x, m, k, *rows, &mut y[col..], y_stride, q, beside.take());
                    col += rows;
                }
                return;
            }
        }
        // The dense products have no section to share.
        if let Some(beside) = beside {
            team::run_beside(beside);
        }
    }

    /// Row `id` (an embedding lookup) into `out`.
    fn row(&self, id: usize, out: &mut [f32]) {
        let width = out.len();
        match self {
            Linear::F32(w) => out.copy_from_slice(&w[id * width..(id + 1) * width]),
            Linear::Bf16(w) => widen_row(&w[id * width..(id + 1) * width], out),
            Linear::F16(w) => widen_row(&w[id * width..(id + 1) * width], out),
            Linear::Quant(q) => q.dequantize_row(id, out),
            Linear::Parts(parts) => {
                let mut id = id;
                for (part, rows) in parts {
                    if id < *rows {
                        return part.row(id, out);
                    }
                    id -= rows;
                }
            }
        }
    }
}

/// `out[i] = row[i]` widened to f32.
fn widen_row<T: Half>(row: &[T], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(row) {
        *o = v.widen();
    }
}

/// Scratch space for quantized activations, and their precision.
#[derive(Debug, Default)]
struct Acts {
    rows: Q8Rows,
    precision: Precision,
}

/// A decoder layer as the CPU holds it.
#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    qkv: Linear,
    qkv_bias: Option<Vec<f32>>,
    o: Linear,
    o_bias: Option<Vec<f32>>,
    gate_up: Linear,
    gate_up_bias: Option<Vec<f32>>,
    down: Linear,
    down_bias: Option<Vec<f32>>,
}

impl Layer {
    fn new(f: FusedLayer<Linear>) -> Layer {
        let vector = |l: Option<Linear>| l.map(Linear::into_vector);
        Layer {
            input_norm: f.input_norm.into_vector(),
            post_norm: f.post_norm.into_vector(),
            qkv: f.qkv,
            qkv_bias: vector(f.qkv_bias),
            o: f.o,
            o_bias: vector(f.o_bias),
            gate_up: f.gate_up,
            gate_up_bias: vector(f.gate_up_bias),
            down: f.down,
            down_bias: vector(f.down_bias),
        }
    }
}

/// KV pools of one layer: f32 for the f32 executor (the reference), f16 for the quantized one
/// (llama.cpp's default: half the memory, and half the bytes attention reads).
#[derive(Debug)]
enum LayerCache {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<f16>, v: Vec<f16> },
}

impl LayerCache {
    fn new(values: usize, half: bool) -> LayerCache {
        if half {
            // From zeroed u16s, as `vec![0.0; n]` for f32: the allocator hands out zero pages the
            // system commits when a block is first written, so resident memory grows with use.
            let zeros = || -> Vec<f16> { vec![0u16; values].reinterpret_into() };
            LayerCache::F16 { k: zeros(), v: zeros() }
        } else {
            LayerCache::F32 { k: vec![0.0; values], v: vec![0.0; values] }
        }
    }
}

/// What a layer's attention needs besides its pools and rows: the same for every layer of a step.
struct Attend<'a> {
    layout: KvLayout,
    qkv_w: usize,
    /// `q_dim`, `kv_dim` and the query heads.
    dims: (usize, usize, usize),
    batch: &'a Batch,
    seqs: &'a [AttentionSeq<'a>],
    /// What the `qkv` rows still need before attention: what their projection owes them and
    /// the rotary embedding.
    prepare: &'a (dyn Fn(usize, &mut [f32]) + Sync),
    scale: f32,
    window: Option<usize>,
}

/// Finishes a step's fused `qkv` rows, writes their keys and values (the `k` and `v` columns)
/// into a layer's pools, and attends over them.
fn attend_cached<T: KvValue>(a: &Attend<'_>, qkv: &mut [f32], (k, v): (&mut [T], &mut [T]), out: &mut [f32]) {
    let (q_dim, kv_dim, heads) = a.dims;
    let columns = (q_dim, q_dim + kv_dim);
    attention::write_kv_rows(a.layout, qkv, a.qkv_w, columns, &a.batch.kv_slots, (&mut *k, &mut *v), a.prepare);
    attention::paged_attention(a.layout, qkv, a.qkv_w, heads, a.seqs, k, v, a.scale, a.window, out);
}

/// An adapter as the CPU executor holds it: its validated weights (for prefill-shaped batches)
/// and, per layer and module, the form decode-shaped batches read (see `lora::bgmv`).
#[derive(Debug)]
struct CpuAdapter {
    weights: AdapterWeights,
    decode: Vec<[Option<DecodeForm>; 7]>,
}

#[derive(Debug)]
enum DecodeForm {
    /// `B` transposed, `[rank, out]`: a row expands with `rank` contiguous multiply-adds.
    F32 { bt: Vec<f32> },
    /// `A` and `Bᵀ` in bf16 (the quantized dtypes): half the bytes for every row of every step.
    Bf16 { a: Vec<bf16>, bt: Vec<bf16> },
}

impl CpuAdapter {
    fn new(weights: AdapterWeights, half: bool) -> CpuAdapter {
        let decode = weights
            .layers
            .iter()
            .map(|modules| {
                modules.each_ref().map(|m| {
                    m.as_ref().map(|m| {
                        let out = m.b.len() / m.rank.max(1);
                        let bt = (0..m.rank).flat_map(|r| (0..out).map(move |o| m.b[o * m.rank + r]));
                        if half {
                            DecodeForm::Bf16 {
                                a: m.a.iter().map(|&v| bf16::from_f32(v)).collect(),
                                bt: bt.map(bf16::from_f32).collect(),
                            }
                        } else {
                            DecodeForm::F32 { bt: bt.collect() }
                        }
                    })
                })
            })
            .collect();
        CpuAdapter { weights, decode }
    }
}

/// The longest run of a batch's rows sharing an adapter that LoRA does a row at a time (BGMV:
/// a decode step's rows, whose adapter is read from memory for the first and from cache for
/// the rest); a batch with a longer run (a prompt's) multiplies each run as a matrix (SGMV).
const BGMV_RUN: usize = 8;

/// Which rows of a batch use which adapter, and scratch space: the rank-sized intermediate
/// (SGMV) and the adapters' part of a projection (BGMV beside it).
struct LoraRows {
    rows: Vec<Option<u32>>,
    segs: Vec<lora::Segment>,
    shrink: Vec<f32>,
    delta: Vec<f32>,
}

/// The CPU implementation of [`Executor`].
#[derive(Debug)]
pub struct CpuExecutor {
    config: ModelConfig,
    embed: Linear,
    /// `None` when tied to `embed`.
    lm_head: Option<Linear>,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    cache: Vec<LayerCache>,
    layout: KvLayout,
    inv_freq: Vec<f32>,
    rope_scale: f32,
    adapters: Vec<Option<CpuAdapter>>,
    max_rank: usize,
    /// Quantized matrices kept, with activations of this precision
    /// ([`CpuExecutor::new_quantized`]).
    quant: Option<Precision>,
    /// The 16-bit float the matrices are kept in (`bf16` or `f16`), where they are (and none is
    /// quantized).
    half: Option<&'static str>,
}

impl CpuExecutor {
    /// Takes ownership of the weights (fusing projections, as f32) and allocates a KV cache of
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
        CpuExecutor::build(config, weights, kv_blocks, block_size, max_loras, max_rank, None)
    }

    /// As [`CpuExecutor::new`], keeping matrices in the form they were stored in: GGUF's block
    /// formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) a third to an eighth of f32's
    /// memory and bandwidth, multiplied by activations quantized per block to `precision`, and bf16
    /// ones as they are; the KV cache holds f16 whatever the weights (the service runs a model of
    /// f32 matrices on [`CpuExecutor::new`] instead: `service::dtype_for_weights`). With 16 bits
    /// (`q16`) SmolLM2's logits stay within about 5e-4 of f32's; with 8 bits (`q8`, llama.cpp's
    /// arithmetic) the rounding moves them by up to a few percent of their size on a 30-layer
    /// model, so greedy choices between near-tied tokens can differ from an f32 reference.
    pub fn new_quantized(
        config: &ModelConfig,
        weights: ModelWeights,
        kv_blocks: usize,
        block_size: usize,
        max_loras: usize,
        max_rank: usize,
        precision: Precision,
    ) -> CpuExecutor {
        CpuExecutor::build(config, weights, kv_blocks, block_size, max_loras, max_rank, Some(precision))
    }

    fn build(
        config: &ModelConfig,
        weights: ModelWeights,
        kv_blocks: usize,
        block_size: usize,
        max_loras: usize,
        max_rank: usize,
        quant: Option<Precision>,
    ) -> CpuExecutor {
        let keep = quant.is_some();
        let ModelWeights { embed_tokens, layers, final_norm, lm_head } = weights;
        // Layer by layer, each source layer freed once fused.
        let layers: Vec<Layer> = layers
            .into_iter()
            .map(|l| {
                let stacked = |parts: &[&HostTensor]| Ok::<_, std::convert::Infallible>(Linear::stacked(parts, keep));
                match FusedLayer::build(&l, stacked) {
                    Ok(layer) => Layer::new(layer),
                    Err(never) => match never {},
                }
            })
            .collect();
        let layout = KvLayout { block_size, kv_heads: config.num_kv_heads, head_dim: config.head_dim };
        let pool = kv_blocks * block_size * layout.slot_width();
        let (inv_freq, rope_scale) = config.rope_inv_freq();
        let embed = Linear::of(embed_tokens, keep);
        let lm_head = lm_head.map(|t| Linear::of(t, keep));
        // A model with nothing quantized (safetensors) computes on its bf16 or f16 matrices or in
        // f32, whatever precision was asked.
        let holds = |form: fn(&Linear) -> bool| {
            let kept = |l: &Linear| l.holds(form);
            kept(&embed)
                || lm_head.as_ref().is_some_and(kept)
                || layers.iter().any(|l: &Layer| [&l.qkv, &l.o, &l.gate_up, &l.down].into_iter().any(kept))
        };
        let any = holds(|l| matches!(l, Linear::Quant(_)));
        let half = if any {
            None
        } else if holds(|l| matches!(l, Linear::Bf16(_))) {
            Some("bf16")
        } else {
            holds(|l| matches!(l, Linear::F16(_))).then_some("f16")
        };
        let cache = (0..config.num_layers).map(|_| LayerCache::new(pool, keep)).collect();
        CpuExecutor {
            config: config.clone(),
            embed,
            lm_head,
            final_norm: final_norm.into_f32(),
            layers,
            cache,
            layout,
            inv_freq,
            rope_scale,
            adapters: (0..max_loras).map(|_| None).collect(),
            max_rank,
            quant: quant.filter(|_| any),
            half,
        }
    }

    /// `y[n, out] = x[n, k] · linearᵀ` (`x` already in `acts` where `linear` is quantized)
    /// plus, for every `(m, off)` of `modules` (projections of the same input, each into its
    /// own column block of `y`) and every row whose adapter targets `m` in `layer`, that
    /// adapter's product. Decode-shaped batches (no run of rows sharing an adapter longer than
    /// [`BGMV_RUN`]) do the rows' adapters a row at a time (BGMV) beside the projection, in its
    /// parallel section, into `lr.delta`, whose rows come back to be added to `y`'s by the
    /// section that reads them next ([`Owed`]); prefill-shaped ones add SGMV's products after
    /// the projection.
    #[allow(clippy::too_many_arguments)]
    fn project<'l>(
        &self,
        linear: &Linear,
        lr: &'l mut LoraRows,
        layer: usize,
        modules: &[(Module, usize)],
        x: &[f32],
        (k, out): (usize, usize),
        y: &mut [f32],
        acts: &Acts,
    ) -> team::Rows<'l, f32> {
        let n = lr.rows.len();
        if lr.segs.is_empty() {
            linear.multiply(x, n, k, out, y, out, &acts.rows, None);
            return team::Rows::default();
        }
        let mat = |slot: u32, m: Module| {
            let adapter = self.adapters.get(slot as usize)?.as_ref()?;
            let lm = adapter.weights.layers[layer][m.index()].as_ref()?;
            let (bt, half) = match &adapter.decode[layer][m.index()] {
                Some(DecodeForm::F32 { bt }) => (Some(bt.as_slice()), None),
                Some(DecodeForm::Bf16 { a, bt }) => (None, Some(LoraHalf { a, bt })),
                None => (None, None),
            };
            Some(LoraMat { a: &lm.a, b: &lm.b, bt, half, rank: lm.rank, scale: lm.scale })
        };
        if lr.segs.iter().all(|s| s.len as usize <= BGMV_RUN) {
            let targets: Vec<lora::Target> = modules
                .iter()
                .map(|&(m, y_offset)| lora::Target { out_dim: self.config.module_shape(m).1, y_offset })
                .collect();
            // All zeros: the section that pays a row zeroes it again.
            let delta = &mut lr.delta[..n * out];
            let job = lora::Bgmv::new(x, k, &lr.rows, &targets, |slot, j| mat(slot, modules[j].0), delta, out);
            linear.multiply(x, n, k, out, y, out, &acts.rows, Some(&job));
            drop(job);
            return team::Rows::new(delta, out);
        }
        linear.multiply(x, n, k, out, y, out, &acts.rows, None);
        for &(m, y_offset) in modules {
            let out_dim = self.config.module_shape(m).1;
            let mat = |slot: u32| mat(slot, m);
            lora::sgmv_shrink(x, k, &lr.segs, mat, &mut lr.shrink, self.max_rank);
            lora::sgmv_expand(&lr.shrink, self.max_rank, &lr.segs, mat, out_dim, y, out, y_offset);
        }
        team::Rows::default()
    }
}

/// What a projection still owes its output rows when its parallel section ends: its bias, and
/// the rows' adapters' part where BGMV did them beside it. The row-wise section that reads the
/// rows next pays it, so a decode step has no serial pass between its sections.
struct Owed<'a> {
    bias: Option<&'a [f32]>,
    /// [`CpuExecutor::project`]'s rows of `LoraRows::delta`, zeroed again as they are paid.
    delta: team::Rows<'a, f32>,
}

impl Owed<'_> {
    /// Adds what row `r` is owed to `row`.
    fn pay(&self, r: usize, row: &mut [f32]) {
        if let Some(bias) = self.bias {
            ops::add_inplace(row, bias);
        }
        if let Some(mut delta) = self.delta.get(r) {
            for (y, d) in row.iter_mut().zip(delta.iter_mut()) {
                *y += std::mem::take(d);
            }
        }
    }

    /// The residual connection of row `r`: `x += y` and what `y` is owed.
    fn pay_residual(&self, r: usize, x: &mut [f32], y: &[f32]) {
        ops::add_inplace(x, y);
        self.pay(r, x);
    }
}

/// The CPU executor computes on the validated f32 weights as they are (taken over, no copy),
/// plus each module's decode form; preparing checks the rank and makes that form.
#[derive(Debug, Clone, Copy)]
pub struct CpuPreparer {
    /// The slots' rank (`--max-lora-rank`).
    pub max_rank: usize,
    /// The executor computes on quantized matrices (`q8`, `q16`): decode reads adapters in
    /// bf16 too.
    pub bf16_decode: bool,
}

impl AdapterPreparer for CpuPreparer {
    fn prepare(&self, adapter: AdapterWeights) -> Result<PreparedAdapter, ExecutorError> {
        if adapter.max_rank > self.max_rank {
            return Err(ExecutorError::Invalid(format!(
                "adapter rank {} exceeds slot rank {}",
                adapter.max_rank, self.max_rank
            )));
        }
        Ok(PreparedAdapter::from_weights(adapter, |w| CpuAdapter::new(w, self.bf16_decode)))
    }
}

impl Executor for CpuExecutor {
    fn device(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn dtype(&self) -> &'static str {
        match self.quant {
            None => self.half.unwrap_or("f32"),
            Some(Precision::Int8) => "q8",
            Some(Precision::Int16) => "q16",
        }
    }

    fn preparer(&self) -> Arc<dyn AdapterPreparer> {
        Arc::new(CpuPreparer { max_rank: self.max_rank, bf16_decode: self.quant.is_some() })
    }

    fn install_adapter(&mut self, slot: u32, adapter: PreparedAdapter) -> Result<Option<Retired>, ExecutorError> {
        let entry = self
            .adapters
            .get_mut(slot as usize)
            .ok_or_else(|| ExecutorError::Invalid(format!("adapter slot {slot} does not exist")))?;
        Ok(entry.replace(*adapter.into_form::<CpuAdapter>()?).map(Retired::new))
    }

    fn unload_adapter(&mut self, slot: u32) -> Option<Retired> {
        self.adapters.get_mut(slot as usize)?.take().map(Retired::new)
    }

    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>, ExecutorError> {
        // On one of the pool's threads: the many short parallel sections of a step then split
        // work with the other threads directly, instead of each waking this thread at its end.
        rayon::scope(|_| self.forward_on_pool(batch))
    }
}

impl CpuExecutor {
    fn forward_on_pool(&mut self, batch: &Batch) -> Result<Vec<f32>, ExecutorError> {
        let c = &self.config;
        let n = batch.tokens.len();
        let (h, q_dim, kv_dim, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let qkv_w = q_dim + 2 * kv_dim;
        if let Some(bad) = batch.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ExecutorError::Invalid(format!("token id {bad} outside the vocabulary")));
        }
        let rows = batch.row_adapters();
        let segs = lora::segments(&rows);
        let adapted = |width: usize| if segs.is_empty() { 0 } else { n * width };
        let (shrink, delta) = (vec![0f32; adapted(self.max_rank)], vec![0f32; adapted(qkv_w.max(h).max(2 * inter))]);
        let mut lr = LoraRows { rows, segs, shrink, delta };

        let mut x = vec![0f32; n * h];
        for (row, &id) in x.chunks_exact_mut(h).zip(&batch.tokens) {
            self.embed.row(id as usize, row);
        }
        let mut acts = Acts { precision: self.quant.unwrap_or_default(), ..Acts::default() };
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
        let turns = ops::rope_turns(&batch.positions, &self.inv_freq, self.rope_scale);

        let eps = c.rms_norm_eps;
        let rotated = (c.num_heads + c.num_kv_heads) * c.head_dim;
        let qkv_modules = [(Module::Q, 0), (Module::K, q_dim), (Module::V, q_dim + kv_dim)];
        let gate_up_modules = [(Module::Gate, 0), (Module::Up, inter)];
        // The previous layer's MLP output, added to the residual by the next norm's section.
        let mut mlp: Option<Owed<'_>> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block: the residual connection, the norm and its quantization in one
            // section; the projection; the rows' bias, adapters and rotary embedding and the
            // cache write in one; attention.
            let owed = mlp.take();
            let xs = team::Rows::new(&mut x, h);
            layer.qkv.make_input(&mut normed, n, h, &mut acts, &|r, o| {
                let mut x = xs.row(r);
                if let Some(owed) = &owed {
                    owed.pay_residual(r, &mut x, &proj[r * h..(r + 1) * h]);
                }
                ops::rms_norm_row(&x, &layer.input_norm, eps, o);
            });
            drop((xs, owed));
            let delta = self.project(&layer.qkv, &mut lr, li, &qkv_modules, &normed, (h, qkv_w), &mut qkv, &acts);
            let owed = Owed { bias: layer.qkv_bias.as_deref(), delta };
            let prepare = |t: usize, row: &mut [f32]| {
                owed.pay(t, row);
                ops::rope_row(&mut row[..rotated], c.head_dim, &turns[t * c.head_dim..(t + 1) * c.head_dim]);
            };
            let attend = Attend {
                layout: self.layout,
                qkv_w,
                dims: (q_dim, kv_dim, c.num_heads),
                batch,
                seqs: &attn_seqs,
                prepare: &prepare,
                scale,
                window: c.sliding_window,
            };
            match &mut self.cache[li] {
                LayerCache::F32 { k, v } => attend_cached(&attend, &mut qkv, (k, v), &mut attn),
                LayerCache::F16 { k, v } => attend_cached(&attend, &mut qkv, (k, v), &mut attn),
            }
            drop(owed);
            layer.o.quantize_input(&attn, n, q_dim, &mut acts);
            let delta = self.project(&layer.o, &mut lr, li, &[(Module::O, 0)], &attn, (q_dim, h), &mut proj, &acts);
            let owed = Owed { bias: layer.o_bias.as_deref(), delta };

            // MLP block: the residual connection, the norm and its quantization in one section;
            // the projection; its bias and adapters, SwiGLU and its quantization in one; the
            // projection, added to the residual by the next layer's first section.
            let xs = team::Rows::new(&mut x, h);
            layer.gate_up.make_input(&mut normed, n, h, &mut acts, &|r, o| {
                let mut x = xs.row(r);
                owed.pay_residual(r, &mut x, &proj[r * h..(r + 1) * h]);
                ops::rms_norm_row(&x, &layer.post_norm, eps, o);
            });
            drop((xs, owed));
            let gate_up_shape = (h, 2 * inter);
            let delta = self.project(
                &layer.gate_up,
                &mut lr,
                li,
                &gate_up_modules,
                &normed,
                gate_up_shape,
                &mut gate_up,
                &acts,
            );
            let owed = Owed { bias: layer.gate_up_bias.as_deref(), delta };
            let rows = team::Rows::new(&mut gate_up, 2 * inter);
            layer.down.make_input(&mut act, n, inter, &mut acts, &|r, o| {
                let mut gate_up = rows.row(r);
                owed.pay(r, &mut gate_up);
                ops::silu_mul_row(&gate_up, o);
            });
            drop((rows, owed));
            let delta =
                self.project(&layer.down, &mut lr, li, &[(Module::Down, 0)], &act, (inter, h), &mut proj, &acts);
            mlp = Some(Owed { bias: layer.down_bias.as_deref(), delta });
        }
        if let Some(owed) = mlp {
            team::for_each_row(&mut x, h, &|r, x| owed.pay_residual(r, x, &proj[r * h..(r + 1) * h]));
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
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; wanted.len() * c.vocab_size];
        head.forward(&last_normed, wanted.len(), h, c.vocab_size, &mut logits, c.vocab_size, &mut acts);
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use rand::{Rng, SeedableRng};
    use switchyard_kernels::quant::Format;

    /// A random `[rows, cols]` matrix in GGUF `format` (`Q8_0` or `Q4_0`: a scale, then quants).
    fn random(format: Format, rows: usize, cols: usize, rng: &mut rand_chacha::ChaCha8Rng) -> HostTensor {
        let quants = if format == Format::Q8_0 { 32 } else { 16 };
        let mut data = Vec::new();
        for _ in 0..rows * cols / 32 {
            data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
            data.extend((0..quants).map(|_| rng.random::<u8>()));
        }
        HostTensor::quantized(QuantMatrix::from_ggml(format, rows, cols, &data).expect("sized right"))
    }

    #[test]
    fn a_stack_of_mixed_formats_keeps_each_part_and_multiplies_like_its_f32_values() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (m, k) = (3, 64);
        // As a Q4_K_M file's q, k and v: two parts in one format, the third in another, and an
        // f32 part besides.
        let parts = [
            random(Format::Q4_0, 20, k, &mut rng),
            random(Format::Q4_0, 4, k, &mut rng),
            random(Format::Q8_0, 7, k, &mut rng),
            HostTensor::new(vec![5, k], (0..5 * k).map(|_| rng.random_range(-0.1..0.1)).collect()),
        ];
        let refs: Vec<&HostTensor> = parts.iter().collect();
        let out: usize = parts.iter().map(|t| t.shape[0]).sum();
        let stacked = Linear::stacked(&refs, true);
        let Linear::Parts(kept) = &stacked else { panic!("expected parts, got {stacked:?}") };
        assert_eq!(kept.iter().map(|(_, rows)| *rows).collect::<Vec<_>>(), [20, 4, 7, 5]);
        assert!(kept[..3].iter().all(|(p, _)| matches!(p, Linear::Quant(_))), "quantized parts stay quantized");
        let dense = Linear::stacked(&refs, false);
        assert!(matches!(dense, Linear::F32(_)));

        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut acts = Acts { rows: Q8Rows::default(), precision: Precision::Int16 };
        // Output rows wider than the stack: the columns past it stay untouched.
        let stride = out + 2;
        let (mut got, mut want) = (vec![7.0f32; m * stride], vec![7.0f32; m * stride]);
        stacked.forward(&x, m, k, out, &mut got, stride, &mut acts);
        dense.forward(&x, m, k, out, &mut want, stride, &mut acts);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // 16-bit activations: within 1/64516 of each block's largest, times the weights.
            assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "[{i}]: {g} vs {w}");
        }
        assert!((0..m).all(|r| got[r * stride + out..(r + 1) * stride] == [7.0, 7.0]));
    }
}
