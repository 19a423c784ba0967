//! The CUDA executor: weights, KV cache and adapter slots in device memory (bf16 for serving,
//! f32 for exact comparison with the reference); GEMMs for the base projections (cuBLAS on a
//! GPU); the project's own kernels for everything else. One stream; a step uploads its small
//! batch tables once and downloads only the logits.
//!
//! Generic over the [`Device`]: a real GPU ([`CudaDevice`]) in production, the CPU emulation of
//! one ([`Emulator`](switchyard_kernels::cuda::Emulator)) in tests, with this logic unchanged.

use super::executor::{AdapterPreparer, Batch, Executor, ExecutorError, FusedLayer, PreparedAdapter, Retired};
use crate::adapters::AdapterWeights;
use crate::model::{HostTensor, ModelConfig, ModelWeights, Module};
use half::bf16;
use std::marker::PhantomData;
use std::sync::Arc;
use switchyard_kernels::cuda::{
    CudaDevice, CudaError, CudaKernels, Device, Element, Gemm, LoraRows, LoraSlotEntry, Segments,
};
use switchyard_kernels::{KvLayout, lora};

impl From<CudaError> for ExecutorError {
    fn from(e: CudaError) -> ExecutorError {
        if e.is_out_of_memory() {
            ExecutorError::OutOfMemory(e.to_string())
        } else if e.is_device_fault() {
            ExecutorError::DeviceFault(e.to_string())
        } else {
            ExecutorError::Invalid(e.to_string())
        }
    }
}

/// An adapter's matrices on the device (A as `[r, in]`, Bᵀ as `[r, out]`), kept alive while
/// the slot tables point at them, and the table entries that point at them.
#[derive(Debug)]
struct DeviceAdapter<D: Device, E: Element> {
    _buffers: Vec<D::Buffer<E>>,
    /// Per layer, per module.
    entries: Vec<[LoraSlotEntry; 7]>,
    max_rank: usize,
}

/// Prepares adapters for a [`CudaExecutor`] on any thread: converts to the executor's element
/// type, transposes B, and uploads, on the executor's device (its one stream orders the
/// uploads before any kernel that reads them).
#[derive(Debug)]
struct CudaPreparer<E: Element, D: Device> {
    dev: Arc<D>,
    max_rank: usize,
    num_layers: usize,
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, D: Device> AdapterPreparer for CudaPreparer<E, D> {
    fn prepare(&self, adapter: AdapterWeights) -> Result<PreparedAdapter, ExecutorError> {
        if adapter.max_rank > self.max_rank {
            return Err(ExecutorError::Invalid(format!(
                "adapter rank {} exceeds slot rank {}",
                adapter.max_rank, self.max_rank
            )));
        }
        let dev = self.dev.as_ref();
        let mut buffers = Vec::new();
        let mut entries = vec![[LoraSlotEntry::default(); 7]; self.num_layers];
        for (l, modules) in adapter.layers.iter().enumerate().take(self.num_layers) {
            for (mi, lm) in modules.iter().enumerate() {
                let Some(lm) = lm else { continue };
                let out = lm.b.len() / lm.rank;
                let mut b_t = vec![0f32; lm.b.len()];
                for o in 0..out {
                    for r in 0..lm.rank {
                        b_t[r * out + o] = lm.b[o * lm.rank + r];
                    }
                }
                let a = upload::<D, E>(dev, &lm.a)?;
                let b_t = upload::<D, E>(dev, &b_t)?;
                let (pa, pb) = (dev.address(&a), dev.address(&b_t));
                entries[l][mi] = LoraSlotEntry { a: pa, b_t: pb, rank: lm.rank as i32, scale: lm.scale };
                buffers.push(a);
                buffers.push(b_t);
            }
        }
        let max_rank = adapter.max_rank;
        Ok(PreparedAdapter::new(&adapter, DeviceAdapter::<D, E> { _buffers: buffers, entries, max_rank }))
    }
}

/// The CUDA implementation of [`Executor`].
#[derive(Debug)]
pub struct CudaExecutor<E: Element = bf16, D: Device = CudaDevice> {
    config: ModelConfig,
    kernels: CudaKernels<D>,
    embed: D::Buffer<E>,
    lm_head: Option<D::Buffer<E>>,
    final_norm: D::Buffer<E>,
    layers: Vec<FusedLayer<D::Buffer<E>>>,
    k_cache: Vec<D::Buffer<E>>,
    v_cache: Vec<D::Buffer<E>>,
    layout: KvLayout,
    inv_freq: D::Buffer<f32>,
    rope_scale: f32,
    adapters: Vec<Option<DeviceAdapter<D, E>>>,
    /// `[layer][module]`: the slot table the LoRA kernels read, and its host mirror.
    tables: Vec<Vec<D::Buffer<LoraSlotEntry>>>,
    host_tables: Vec<Vec<Vec<LoraSlotEntry>>>,
    max_rank: usize,
}

/// Converts to the device type (in parallel: a 7B model is billions of values) and uploads.
fn upload<D: Device, E: Element>(dev: &D, data: &[f32]) -> Result<D::Buffer<E>, CudaError> {
    use rayon::prelude::*;
    let host: Vec<E> = data.par_iter().map(|&v| E::from_f32(v)).collect();
    dev.upload(&host)
}

/// Uploads tensors stacked along their first dimension (fused projections).
fn upload_concat<D: Device, E: Element>(dev: &D, parts: &[&HostTensor]) -> Result<D::Buffer<E>, CudaError> {
    use rayon::prelude::*;
    let host: Vec<E> =
        parts.iter().flat_map(|t| t.to_f32().par_iter().map(|&v| E::from_f32(v)).collect::<Vec<_>>()).collect();
    dev.upload(&host)
}

/// Per-step LoRA state: which rows use which slot, in the shape the kernels want.
struct LoraStep<D: Device> {
    rows: usize,
    row_slots: D::Buffer<i32>,
    segments: Option<Segments<D>>,
    shrink: D::Buffer<f32>,
    /// Largest rank among the batch's adapters (0: no row uses an adapter).
    max_rank: usize,
}

impl<E: Element> CudaExecutor<E, CudaDevice> {
    /// Opens CUDA device `ordinal` (compiling the kernels for it) and builds the executor there.
    pub fn open(
        ordinal: usize,
        config: &ModelConfig,
        weights: ModelWeights,
        kv_blocks: usize,
        block_size: usize,
        max_loras: usize,
        max_rank: usize,
    ) -> Result<CudaExecutor<E, CudaDevice>, ExecutorError> {
        let dev = CudaDevice::open(ordinal)?;
        CudaExecutor::new(dev, config, weights, kv_blocks, block_size, max_loras, max_rank)
    }
}

impl<E: Element, D: Device> CudaExecutor<E, D> {
    /// Uploads the weights to `dev` (consumed layer by layer, so host memory is released as it
    /// goes) and allocates the KV cache and adapter slot tables.
    pub fn new(
        dev: D,
        config: &ModelConfig,
        weights: ModelWeights,
        kv_blocks: usize,
        block_size: usize,
        max_loras: usize,
        max_rank: usize,
    ) -> Result<CudaExecutor<E, D>, ExecutorError> {
        let kernels = CudaKernels::new(dev);
        let dev = kernels.device();
        let ModelWeights { embed_tokens, layers: host_layers, final_norm, lm_head } = weights;
        let mut layers = Vec::with_capacity(host_layers.len());
        for l in host_layers {
            // Each layer's host copy is released once it is on the device.
            layers.push(FusedLayer::build(&l, |parts| upload_concat(dev, parts))?);
        }
        let layout = KvLayout { block_size, kv_heads: config.num_kv_heads, head_dim: config.head_dim };
        let pool = kv_blocks * block_size * layout.slot_width();
        let mut k_cache = Vec::with_capacity(config.num_layers);
        let mut v_cache = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            k_cache.push(dev.alloc_zeros::<E>(pool.max(1))?);
            v_cache.push(dev.alloc_zeros::<E>(pool.max(1))?);
        }
        let (inv_freq, rope_scale) = config.rope_inv_freq();
        let empty = vec![LoraSlotEntry::default(); max_loras.max(1)];
        let mut tables = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            let mut per_module = Vec::with_capacity(7);
            for _ in Module::ALL {
                per_module.push(dev.upload(&empty)?);
            }
            tables.push(per_module);
        }
        let exec = CudaExecutor {
            config: config.clone(),
            embed: upload(dev, &embed_tokens.to_f32())?,
            lm_head: lm_head.map(|t| upload(dev, &t.to_f32())).transpose()?,
            final_norm: upload(dev, &final_norm.to_f32())?,
            layers,
            k_cache,
            v_cache,
            layout,
            inv_freq: dev.upload(&inv_freq)?,
            rope_scale,
            adapters: (0..max_loras).map(|_| None).collect(),
            host_tables: vec![vec![empty.clone(); 7]; config.num_layers],
            tables,
            max_rank,
            kernels,
        };
        exec.kernels.device().synchronize()?;
        Ok(exec)
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` through cuBLAS (row-major operands, f32 accumulation).
    fn linear(
        &self,
        x: &D::Buffer<E>,
        m: usize,
        k: usize,
        w: &D::Buffer<E>,
        n: usize,
        y: &mut D::Buffer<E>,
    ) -> Result<(), ExecutorError> {
        if m == 0 {
            return Ok(());
        }
        // Row-major y = x·wᵀ is column-major yᵀ = w·xᵀ: A = w (transposed), B = x.
        let op = Gemm { transa: true, transb: false, m: n, n: m, k, lda: k, ldb: k, ldc: n };
        // SAFETY: `y` is borrowed mutably, so it is neither `x` nor `w`; the device checks the
        // three buffers against the shape.
        Ok(unsafe { self.kernels.device().gemm(op, w, x, y) }?)
    }

    #[allow(clippy::too_many_arguments)]
    fn lora(
        &self,
        step: &mut LoraStep<D>,
        layer: usize,
        m: Module,
        x: &D::Buffer<E>,
        y: &mut D::Buffer<E>,
        y_stride: usize,
        y_offset: usize,
    ) -> Result<(), ExecutorError> {
        if step.max_rank == 0 {
            return Ok(());
        }
        let (in_dim, out_dim) = self.config.module_shape(m);
        let table = &self.tables[layer][m.index()];
        let rows = match &step.segments {
            None => LoraRows::PerRow { slots: &step.row_slots, rows: step.rows },
            Some(segs) => LoraRows::Segments(segs),
        };
        let k = &self.kernels;
        k.lora_shrink(x, in_dim, rows, table, step.max_rank, &mut step.shrink, self.max_rank)?;
        k.lora_expand(&step.shrink, self.max_rank, rows, table, y, y_stride, y_offset, out_dim)?;
        Ok(())
    }

    fn bias(
        &self,
        y: &mut D::Buffer<E>,
        bias: Option<&D::Buffer<E>>,
        rows: usize,
        width: usize,
    ) -> Result<(), ExecutorError> {
        if let Some(b) = bias {
            self.kernels.add_bias(y, b, rows, width)?;
        }
        Ok(())
    }

    fn write_tables(&mut self, slot: usize, entries: &[[LoraSlotEntry; 7]]) -> Result<(), ExecutorError> {
        for l in 0..self.config.num_layers {
            for m in 0..7 {
                let entry = entries.get(l).map_or(LoraSlotEntry::default(), |e| e[m]);
                self.host_tables[l][m][slot] = entry;
                self.kernels.device().write(&self.host_tables[l][m], &mut self.tables[l][m])?;
            }
        }
        Ok(())
    }
}

impl<E: Element, D: Device> Executor for CudaExecutor<E, D> {
    fn device(&self) -> String {
        self.kernels.device().name()
    }

    fn dtype(&self) -> &'static str {
        E::DTYPE.suffix()
    }

    fn preparer(&self) -> Arc<dyn AdapterPreparer> {
        Arc::new(CudaPreparer::<E, D> {
            dev: self.kernels.shared_device(),
            max_rank: self.max_rank,
            num_layers: self.config.num_layers,
            _element: PhantomData,
        })
    }

    fn install_adapter(&mut self, slot: u32, adapter: PreparedAdapter) -> Result<Option<Retired>, ExecutorError> {
        let slot = slot as usize;
        if slot >= self.adapters.len() {
            return Err(ExecutorError::Invalid(format!("adapter slot {slot} does not exist")));
        }
        let adapter = adapter.into_form::<DeviceAdapter<D, E>>()?;
        // Tables first, then the old adapter's buffers are released (on another thread): both
        // are ordered on the one stream after every kernel that may still read the old weights.
        self.write_tables(slot, &adapter.entries)?;
        Ok(self.adapters[slot].replace(*adapter).map(Retired::new))
    }

    fn unload_adapter(&mut self, slot: u32) -> Option<Retired> {
        let slot = slot as usize;
        if slot >= self.adapters.len() {
            return None;
        }
        if let Err(e) = self.write_tables(slot, &[]) {
            tracing::error!(error = %e, slot, "could not clear the adapter slot tables");
        }
        self.adapters[slot].take().map(Retired::new)
    }

    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>, ExecutorError> {
        let c = self.config.clone();
        let n = batch.tokens.len();
        let (h, q_dim, kv_dim, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let qkv_w = q_dim + 2 * kv_dim;
        if let Some(bad) = batch.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ExecutorError::Invalid(format!("token id {bad} outside the vocabulary")));
        }
        let s = self.kernels.device();
        let up_i32 = |v: Vec<i32>| s.upload(&if v.is_empty() { vec![0] } else { v });

        // The step's tables, uploaded once.
        let d_tokens = up_i32(batch.tokens.iter().map(|&t| t as i32).collect())?;
        let d_pos = up_i32(batch.positions.iter().map(|&p| p as i32).collect())?;
        let d_kv_slots = up_i32(batch.kv_slots.iter().map(|&p| p as i32).collect())?;
        let (mut flat, mut row_table) = (Vec::new(), Vec::with_capacity(n));
        for seq in &batch.seqs {
            let off = flat.len() as i32;
            flat.extend(seq.blocks.iter().map(|&b| b as i32));
            row_table.extend(std::iter::repeat_n(off, seq.len));
        }
        let (d_flat, d_row_table) = (up_i32(flat)?, up_i32(row_table)?);
        let rows = batch.row_adapters();
        let segs = lora::segments(&rows);
        let max_rank = rows
            .iter()
            .flatten()
            .filter_map(|&s| self.adapters.get(s as usize)?.as_ref().map(|a| a.max_rank))
            .max()
            .unwrap_or(0);
        let mut step = LoraStep {
            rows: n,
            row_slots: up_i32(rows.iter().map(|r| r.map_or(-1, |s| s as i32)).collect())?,
            segments: if segs.iter().all(|s| s.len == 1) { None } else { Some(Segments::upload(s, &segs)?) },
            shrink: s.alloc_zeros::<f32>((n * self.max_rank).max(1))?,
            max_rank,
        };

        let alloc = |len: usize| s.alloc_zeros::<E>(len.max(1));
        let mut x = alloc(n * h)?;
        let mut normed = alloc(n * h)?;
        let mut qkv = alloc(n * qkv_w)?;
        let mut attn = alloc(n * q_dim)?;
        let mut proj = alloc(n * h)?;
        let mut gate_up = alloc(n * 2 * inter)?;
        let mut act = alloc(n * inter)?;
        let k = &self.kernels;
        k.embedding(&d_tokens, &self.embed, &mut x, n, h)?;
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        for li in 0..c.num_layers {
            let layer = &self.layers[li];
            k.rms_norm(&x, &layer.input_norm, &mut normed, n, h, c.rms_norm_eps)?;
            self.linear(&normed, n, h, &layer.qkv, qkv_w, &mut qkv)?;
            self.bias(&mut qkv, layer.qkv_bias.as_ref(), n, qkv_w)?;
            for (m, off) in [(Module::Q, 0), (Module::K, q_dim), (Module::V, q_dim + kv_dim)] {
                self.lora(&mut step, li, m, &normed, &mut qkv, qkv_w, off)?;
            }
            k.rope(&mut qkv, qkv_w, 0, c.num_heads, c.head_dim, &d_pos, &self.inv_freq, self.rope_scale, n)?;
            k.rope(&mut qkv, qkv_w, q_dim, c.num_kv_heads, c.head_dim, &d_pos, &self.inv_freq, self.rope_scale, n)?;
            let (kc, vc) = (&mut self.k_cache[li], &mut self.v_cache[li]);
            k.write_kv(&qkv, qkv_w, q_dim, q_dim + kv_dim, &d_kv_slots, kc, vc, kv_dim, n)?;
            k.paged_attention(
                &qkv,
                qkv_w,
                &self.k_cache[li],
                &self.v_cache[li],
                &mut attn,
                &d_pos,
                &d_row_table,
                &d_flat,
                self.layout,
                c.num_heads,
                scale,
                c.sliding_window,
                n,
            )?;
            let layer = &self.layers[li];
            self.linear(&attn, n, q_dim, &layer.o, h, &mut proj)?;
            self.bias(&mut proj, layer.o_bias.as_ref(), n, h)?;
            self.lora(&mut step, li, Module::O, &attn, &mut proj, h, 0)?;
            k.add_inplace(&mut x, &proj, n * h)?;

            k.rms_norm(&x, &layer.post_norm, &mut normed, n, h, c.rms_norm_eps)?;
            self.linear(&normed, n, h, &layer.gate_up, 2 * inter, &mut gate_up)?;
            self.bias(&mut gate_up, layer.gate_up_bias.as_ref(), n, 2 * inter)?;
            self.lora(&mut step, li, Module::Gate, &normed, &mut gate_up, 2 * inter, 0)?;
            self.lora(&mut step, li, Module::Up, &normed, &mut gate_up, 2 * inter, inter)?;
            k.silu_mul(&gate_up, &mut act, n, inter)?;
            self.linear(&act, n, inter, &layer.down, h, &mut proj)?;
            self.bias(&mut proj, layer.down_bias.as_ref(), n, h)?;
            self.lora(&mut step, li, Module::Down, &act, &mut proj, h, 0)?;
            k.add_inplace(&mut x, &proj, n * h)?;
        }

        // Logits for the rows that want them (the last row of each finishing chunk, every row
        // of a prompt whose log-probabilities are asked for): gather those rows (the embedding
        // kernel over `x` as the table), norm, project.
        let wanted: Vec<i32> = batch.seqs.iter().flat_map(|q| q.wanted_rows()).map(|r| r as i32).collect();
        let m = wanted.len();
        if m == 0 {
            return Ok(Vec::new());
        }
        let d_wanted = up_i32(wanted)?;
        let mut last = alloc(m * h)?;
        k.embedding(&d_wanted, &x, &mut last, m, h)?;
        let mut last_normed = alloc(m * h)?;
        k.rms_norm(&last, &self.final_norm, &mut last_normed, m, h, c.rms_norm_eps)?;
        let mut logits = alloc(m * c.vocab_size)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.linear(&last_normed, m, h, head, c.vocab_size, &mut logits)?;
        let host = s.download(&logits)?;
        Ok(host.into_iter().take(m * c.vocab_size).map(Element::to_f32).collect())
    }
}
