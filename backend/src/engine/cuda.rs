//! The CUDA executor: weights, KV cache and adapter slots in device memory (bf16 for serving,
//! f32 for exact comparison with the reference); cuBLAS for the base projections; the project's
//! own NVRTC-compiled kernels for everything else. One stream; a step uploads its small batch
//! tables once and downloads only the logits.

use super::executor::{Batch, Executor, ExecutorError, FusedLayer};
use crate::adapters::AdapterWeights;
use crate::model::{HostTensor, ModelConfig, ModelWeights, Module};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use half::bf16;
use std::sync::Arc;
use switchyard_kernels::cuda::{CudaError, CudaKernels, Element, LoraRows, LoraSlotEntry, Segments, open_device};
use switchyard_kernels::{KvLayout, lora};

/// Element types the CUDA executor runs in: the kernels' types that cuBLAS multiplies.
pub trait DeviceFloat: Element
where
    CudaBlas: Gemm<Self>,
{
}

impl DeviceFloat for bf16 {}
impl DeviceFloat for f32 {}

impl From<CudaError> for ExecutorError {
    fn from(e: CudaError) -> ExecutorError {
        ExecutorError(e.to_string())
    }
}

fn driver(e: cudarc::driver::DriverError) -> ExecutorError {
    ExecutorError(format!("CUDA driver: {e}"))
}

fn cublas(e: cudarc::cublas::result::CublasError) -> ExecutorError {
    ExecutorError(format!("cuBLAS: {e:?}"))
}

/// An adapter's matrices on the device (A as `[r, in]`, Bᵀ as `[r, out]`), kept alive while
/// the slot tables point at them.
#[derive(Debug)]
struct DeviceAdapter<E> {
    _buffers: Vec<CudaSlice<E>>,
    max_rank: usize,
}

/// The CUDA implementation of [`Executor`].
#[derive(Debug)]
pub struct CudaExecutor<E: DeviceFloat = bf16>
where
    CudaBlas: Gemm<E>,
{
    config: ModelConfig,
    device: String,
    stream: Arc<CudaStream>,
    kernels: CudaKernels,
    blas: CudaBlas,
    embed: CudaSlice<E>,
    lm_head: Option<CudaSlice<E>>,
    final_norm: CudaSlice<E>,
    layers: Vec<FusedLayer<CudaSlice<E>>>,
    k_cache: Vec<CudaSlice<E>>,
    v_cache: Vec<CudaSlice<E>>,
    layout: KvLayout,
    inv_freq: CudaSlice<f32>,
    rope_scale: f32,
    adapters: Vec<Option<DeviceAdapter<E>>>,
    /// `[layer][module]`: the slot table the LoRA kernels read, and its host mirror.
    tables: Vec<Vec<CudaSlice<LoraSlotEntry>>>,
    host_tables: Vec<Vec<Vec<LoraSlotEntry>>>,
    max_rank: usize,
}

/// Converts to bf16 (in parallel: a 7B model is billions of values) and uploads.
fn upload<E: Element>(stream: &Arc<CudaStream>, data: &[f32]) -> Result<CudaSlice<E>, ExecutorError> {
    use rayon::prelude::*;
    let host: Vec<E> = data.par_iter().map(|&v| E::from_f32(v)).collect();
    stream.clone_htod(&host).map_err(driver)
}

/// Uploads tensors stacked along their first dimension (fused projections).
fn upload_concat<E: Element>(stream: &Arc<CudaStream>, parts: &[&HostTensor]) -> Result<CudaSlice<E>, ExecutorError> {
    use rayon::prelude::*;
    let host: Vec<E> =
        parts.iter().flat_map(|t| t.data.par_iter().map(|&v| E::from_f32(v)).collect::<Vec<_>>()).collect();
    stream.clone_htod(&host).map_err(driver)
}

/// Per-step LoRA state: which rows use which slot, in the shape the kernels want.
struct LoraStep {
    rows: usize,
    row_slots: CudaSlice<i32>,
    segments: Option<Segments>,
    shrink: CudaSlice<f32>,
    /// Largest rank among the batch's adapters (0: no row uses an adapter).
    max_rank: usize,
}

impl<E: DeviceFloat> CudaExecutor<E>
where
    CudaBlas: Gemm<E>,
{
    /// Opens CUDA device `ordinal`, compiles the kernels, uploads the weights (consumed layer by
    /// layer, so host memory is released as it goes) and allocates the KV cache and adapter
    /// slot tables.
    pub fn new(
        ordinal: usize,
        config: &ModelConfig,
        weights: ModelWeights,
        kv_blocks: usize,
        block_size: usize,
        max_loras: usize,
        max_rank: usize,
    ) -> Result<CudaExecutor<E>, ExecutorError> {
        let ctx = open_device(ordinal)?;
        // SAFETY: only tries to dlopen the library; no symbol is called.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(ExecutorError(
                "cuBLAS (libcublas.so.13) was not found; add the CUDA 13 libraries to LD_LIBRARY_PATH".into(),
            ));
        }
        let name = ctx.name().map_err(driver)?;
        let kernels = CudaKernels::new(&ctx)?;
        let stream = kernels.stream().clone();
        let blas = CudaBlas::new(stream.clone()).map_err(cublas)?;
        let ModelWeights { embed_tokens, layers: host_layers, final_norm, lm_head } = weights;
        let mut layers = Vec::with_capacity(host_layers.len());
        for l in host_layers {
            // Each layer's host copy is released once it is on the device.
            layers.push(FusedLayer::build(&l, |parts| upload_concat(&stream, parts))?);
        }
        let layout = KvLayout { block_size, kv_heads: config.num_kv_heads, head_dim: config.head_dim };
        let pool = kv_blocks * block_size * layout.slot_width();
        let mut k_cache = Vec::with_capacity(config.num_layers);
        let mut v_cache = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            k_cache.push(stream.alloc_zeros::<E>(pool.max(1)).map_err(driver)?);
            v_cache.push(stream.alloc_zeros::<E>(pool.max(1)).map_err(driver)?);
        }
        let (inv_freq, rope_scale) = config.rope_inv_freq();
        let empty = vec![LoraSlotEntry::default(); max_loras.max(1)];
        let mut tables = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            let mut per_module = Vec::with_capacity(7);
            for _ in Module::ALL {
                per_module.push(stream.clone_htod(&empty).map_err(driver)?);
            }
            tables.push(per_module);
        }
        let exec = CudaExecutor {
            config: config.clone(),
            device: format!("cuda:{ordinal} ({name})"),
            embed: upload(&stream, &embed_tokens.data)?,
            lm_head: lm_head.map(|t| upload(&stream, &t.data)).transpose()?,
            final_norm: upload(&stream, &final_norm.data)?,
            layers,
            k_cache,
            v_cache,
            layout,
            inv_freq: stream.clone_htod(&inv_freq).map_err(driver)?,
            rope_scale,
            adapters: (0..max_loras).map(|_| None).collect(),
            host_tables: vec![vec![empty.clone(); 7]; config.num_layers],
            tables,
            max_rank,
            kernels,
            blas,
            stream,
        };
        exec.stream.synchronize().map_err(driver)?;
        Ok(exec)
    }

    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` through cuBLAS (row-major operands, f32 accumulation).
    fn linear(
        &self,
        x: &CudaSlice<E>,
        m: usize,
        k: usize,
        w: &CudaSlice<E>,
        n: usize,
        y: &mut CudaSlice<E>,
    ) -> Result<(), ExecutorError> {
        if m == 0 {
            return Ok(());
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| ExecutorError(format!("GEMM dimension {v} too large")));
        // Row-major y = x·wᵀ is column-major yᵀ = w·xᵀ: A = w (transposed), B = x.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: int(n)?,
            n: int(m)?,
            k: int(k)?,
            alpha: E::from_f32(1.0),
            lda: int(k)?,
            ldb: int(k)?,
            beta: E::from_f32(0.0),
            ldc: int(n)?,
        };
        // SAFETY: w holds n·k values, x at least m·k and y at least m·n (the executor sized
        // every buffer from the same config); cuBLAS reads and writes only those.
        unsafe { self.blas.gemm(cfg, w, x, y) }.map_err(cublas)
    }

    #[allow(clippy::too_many_arguments)]
    fn lora(
        &self,
        step: &mut LoraStep,
        layer: usize,
        m: Module,
        x: &CudaSlice<E>,
        y: &mut CudaSlice<E>,
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
        y: &mut CudaSlice<E>,
        bias: Option<&CudaSlice<E>>,
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
                self.stream.memcpy_htod(&self.host_tables[l][m], &mut self.tables[l][m]).map_err(driver)?;
            }
        }
        Ok(())
    }
}

impl<E: DeviceFloat> Executor for CudaExecutor<E>
where
    CudaBlas: Gemm<E>,
{
    fn device(&self) -> String {
        self.device.clone()
    }

    fn dtype(&self) -> &'static str {
        E::DTYPE.suffix()
    }

    fn load_adapter(&mut self, slot: u32, adapter: &AdapterWeights) -> Result<(), ExecutorError> {
        let slot = slot as usize;
        if slot >= self.adapters.len() {
            return Err(ExecutorError(format!("adapter slot {slot} does not exist")));
        }
        if adapter.max_rank > self.max_rank {
            return Err(ExecutorError(format!(
                "adapter rank {} exceeds slot rank {}",
                adapter.max_rank, self.max_rank
            )));
        }
        let mut buffers = Vec::new();
        let mut entries = vec![[LoraSlotEntry::default(); 7]; self.config.num_layers];
        for (l, modules) in adapter.layers.iter().enumerate() {
            for (mi, lm) in modules.iter().enumerate() {
                let Some(lm) = lm else { continue };
                let out = lm.b.len() / lm.rank;
                let mut b_t = vec![0f32; lm.b.len()];
                for o in 0..out {
                    for r in 0..lm.rank {
                        b_t[r * out + o] = lm.b[o * lm.rank + r];
                    }
                }
                let a = upload(&self.stream, &lm.a)?;
                let b_t = upload(&self.stream, &b_t)?;
                let (pa, ga) = a.device_ptr(&self.stream);
                let (pb, gb) = b_t.device_ptr(&self.stream);
                drop((ga, gb));
                entries[l][mi] = LoraSlotEntry { a: pa, b_t: pb, rank: lm.rank as i32, scale: lm.scale };
                buffers.push(a);
                buffers.push(b_t);
            }
        }
        // Tables first, then the old adapter's buffers are released: both are ordered on the
        // one stream after every kernel that may still read the old weights.
        self.write_tables(slot, &entries)?;
        self.adapters[slot] = Some(DeviceAdapter { _buffers: buffers, max_rank: adapter.max_rank });
        Ok(())
    }

    fn unload_adapter(&mut self, slot: u32) {
        let slot = slot as usize;
        if slot >= self.adapters.len() {
            return;
        }
        if let Err(e) = self.write_tables(slot, &[]) {
            tracing::error!(error = %e, slot, "could not clear the adapter slot tables");
        }
        self.adapters[slot] = None;
    }

    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>, ExecutorError> {
        let c = self.config.clone();
        let n = batch.tokens.len();
        let (h, q_dim, kv_dim, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let qkv_w = q_dim + 2 * kv_dim;
        if let Some(bad) = batch.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ExecutorError(format!("token id {bad} outside the vocabulary")));
        }
        let s = self.stream.clone();
        let up_i32 = |v: Vec<i32>| s.clone_htod(&if v.is_empty() { vec![0] } else { v }).map_err(driver);

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
            segments: if segs.iter().all(|s| s.len == 1) { None } else { Some(Segments::upload(&s, &segs)?) },
            shrink: s.alloc_zeros::<f32>((n * self.max_rank).max(1)).map_err(driver)?,
            max_rank,
        };

        let alloc = |len: usize| s.alloc_zeros::<E>(len.max(1)).map_err(driver);
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

        // Logits for the last row of each chunk that wants them: gather those rows (the
        // embedding kernel over `x` as the table), norm, project.
        let wanted: Vec<i32> =
            batch.seqs.iter().filter(|q| q.wants_logits).map(|q| (q.start + q.len - 1) as i32).collect();
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
        let host = s.clone_dtoh(&logits).map_err(driver)?;
        Ok(host.into_iter().take(m * c.vocab_size).map(Element::to_f32).collect())
    }
}
