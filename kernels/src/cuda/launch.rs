//! Typed launch wrappers: argument checks, grid shapes, and the device-side tables the LoRA
//! kernels read (segments, adapter slot entries).

#[cfg(test)]
use super::SOURCES;
use super::{CudaError, Dtype, Element, compile_all, device_arch};
use crate::lora::Segment;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

/// Threads per block of the shrink kernels (must match `SHRINK_THREADS` in lora.cu).
const SHRINK_THREADS: u32 = 256;
/// Ranks one shrink block computes (must match `RANK_TILE` in lora.cu).
const RANK_TILE: usize = 8;
/// Threads per block of the expand kernels.
const EXPAND_THREADS: u32 = 128;
/// Warps per attention block (must match `ATTN_WARPS` in attention.cu).
const ATTN_THREADS: u32 = 32 * 4;
/// Largest head dimension the attention kernel holds in registers (`MAX_HEAD_DIM`).
const MAX_HEAD_DIM: usize = 256;

/// Entry points defined by each source, without the dtype suffix.
const ENTRY_POINTS: &[(&str, &[&str])] = &[
    ("lora", &["sgmv_shrink", "sgmv_expand", "bgmv_shrink", "bgmv_expand"]),
    ("ops", &["add_bias", "embedding", "rms_norm", "rope", "silu_mul", "add_inplace"]),
    ("attention", &["write_kv", "paged_attention"]),
];

/// The first entry point of a source (used by the compile test to check instantiation).
#[cfg(test)]
pub(super) fn first_kernel_of(source: &str) -> &'static str {
    ENTRY_POINTS.iter().find(|(s, _)| *s == source).map_or("", |(_, e)| e[0])
}

/// One adapter's matrices for one (layer, projection), as the LoRA kernels read them.
/// `rank == 0` means the adapter does not target the projection.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoraSlotEntry {
    /// Device address of A, `[rank, in]`.
    pub a: u64,
    /// Device address of Bᵀ, `[rank, out]`.
    pub b_t: u64,
    pub rank: i32,
    pub scale: f32,
}

// SAFETY: a plain `#[repr(C)]` struct of integers and a float, laid out exactly as `LoraSlot`
// in lora.cu (u64, u64, int, float; 24 bytes, 8-byte aligned).
unsafe impl DeviceRepr for LoraSlotEntry {}

/// Rows one SGMV block handles at most. Longer segments (many rows on one adapter, as in a
/// prefill or a popular adapter) are split so their rows spread over many blocks; the pieces
/// re-read the adapter's matrices from L2, which is cheap next to the parallelism gained.
/// Measured on an H200 (64 rows on one rank-16 adapter, hidden 4096, shrink+expand): pieces of
/// 1, 2, 4, 8, 16 and 64 rows took 11.7, 14.4, 20.2, 32.1, 56.0 and 197.5 µs.
pub const SEGMENT_PIECE_ROWS: u32 = 1;

/// Splits segments into pieces of at most `piece` rows.
pub fn split_segments(segs: &[Segment], piece: u32) -> Vec<Segment> {
    let piece = piece.max(1);
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        let mut start = s.start;
        while start < s.start + s.len {
            let len = piece.min(s.start + s.len - start);
            out.push(Segment { start, len, slot: s.slot });
            start += len;
        }
    }
    out
}

/// Segments of a batch in device memory, split into pieces of at most
/// [`SEGMENT_PIECE_ROWS`] rows.
#[derive(Debug)]
pub struct Segments {
    start: CudaSlice<i32>,
    len: CudaSlice<i32>,
    slot: CudaSlice<i32>,
    count: usize,
    /// One past the last row any segment covers.
    end: usize,
}

impl Segments {
    /// Uploads segments built by [`crate::lora::segments`].
    pub fn upload(stream: &Arc<CudaStream>, segs: &[Segment]) -> Result<Segments, CudaError> {
        Self::upload_pieces(stream, segs, SEGMENT_PIECE_ROWS)
    }

    /// Uploads segments split into pieces of at most `piece` rows.
    pub fn upload_pieces(stream: &Arc<CudaStream>, segs: &[Segment], piece: u32) -> Result<Segments, CudaError> {
        let segs = &split_segments(segs, piece);
        let col = |f: fn(&Segment) -> u32| segs.iter().map(|s| f(s) as i32).collect::<Vec<i32>>();
        // Empty device allocations are not allowed: keep one unused element.
        let pad = |mut v: Vec<i32>| {
            if v.is_empty() {
                v.push(0);
            }
            v
        };
        Ok(Segments {
            start: stream.clone_htod(&pad(col(|s| s.start)))?,
            len: stream.clone_htod(&pad(col(|s| s.len)))?,
            slot: stream.clone_htod(&pad(col(|s| s.slot)))?,
            count: segs.len(),
            end: segs.iter().map(|s| (s.start + s.len) as usize).max().unwrap_or(0),
        })
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Which rows of a batch use which adapter slot, in the form a LoRA kernel family reads.
#[derive(Debug, Clone, Copy)]
pub enum LoraRows<'a> {
    /// SGMV: segments of consecutive rows sharing a slot (prefill-shaped batches).
    Segments(&'a Segments),
    /// BGMV: one slot per row, negative for none (decode-shaped batches).
    PerRow { slots: &'a CudaSlice<i32>, rows: usize },
}

impl LoraRows<'_> {
    /// Blocks along the grid's first dimension: one per segment or per row.
    fn blocks(&self) -> usize {
        match self {
            LoraRows::Segments(s) => s.count,
            LoraRows::PerRow { rows, .. } => *rows,
        }
    }

    /// Rows the launch touches (buffers must hold at least this many).
    fn rows(&self) -> usize {
        match self {
            LoraRows::Segments(s) => s.end,
            LoraRows::PerRow { rows, .. } => *rows,
        }
    }

    fn kernel(&self, op: &str) -> String {
        match self {
            LoraRows::Segments(_) => format!("sgmv_{op}"),
            LoraRows::PerRow { .. } => format!("bgmv_{op}"),
        }
    }

    /// Pushes the row-selection arguments (segment arrays, or the per-row slots).
    fn push<'b>(&'b self, b: &mut cudarc::driver::LaunchArgs<'b>) {
        match self {
            LoraRows::Segments(s) => {
                b.arg(&s.start).arg(&s.len).arg(&s.slot);
            }
            LoraRows::PerRow { slots, .. } => {
                b.arg(*slots);
            }
        }
    }
}

fn u32_of(v: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::Arguments(format!("{what} {v} is too large for a launch")))
}

fn i32_of(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Arguments(format!("{what} {v} does not fit in 32 bits")))
}

fn check(cond: bool, msg: impl FnOnce() -> String) -> Result<(), CudaError> {
    if cond { Ok(()) } else { Err(CudaError::Arguments(msg())) }
}

/// Elements of `E` in one 16-byte vector (the LoRA kernels' load width).
fn vec_width<E: Element>() -> usize {
    16 / std::mem::size_of::<E>()
}

/// Every kernel, compiled for one device and loaded into its context, with the stream they run
/// on.
#[derive(Debug)]
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
}

impl CudaKernels {
    /// Compiles every source for the context's device and loads it.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<CudaKernels, CudaError> {
        let arch = device_arch(ctx)?;
        let mut functions = HashMap::new();
        for (name, ptx) in compile_all(arch)? {
            let module = ctx.load_module(ptx)?;
            let entries = ENTRY_POINTS.iter().find(|(s, _)| *s == name).map_or(&[][..], |(_, e)| e);
            for entry in entries {
                for dtype in [Dtype::F32, Dtype::Bf16, Dtype::F16] {
                    let full = format!("{entry}_{}", dtype.suffix());
                    functions.insert(full.clone(), module.load_function(&full)?);
                }
            }
        }
        Ok(CudaKernels { stream: ctx.default_stream(), functions })
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn func<E: Element>(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        let full = format!("{name}_{}", E::DTYPE.suffix());
        self.functions.get(&full).ok_or_else(|| CudaError::Arguments(format!("no kernel {full}")))
    }

    fn cfg(grid: (u32, u32), block: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (grid.0.max(1), grid.1.max(1), 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
    }

    /// `out[t] = table[ids[t]]` for `rows` ids.
    pub fn embedding<E: Element>(
        &self,
        ids: &CudaSlice<i32>,
        table: &CudaSlice<E>,
        out: &mut CudaSlice<E>,
        rows: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        check(ids.len() >= rows && out.len() >= rows * hidden, || "embedding: buffers too small".into())?;
        if rows == 0 {
            return Ok(());
        }
        let hidden_i = i32_of(hidden, "hidden")?;
        let mut b = self.stream.launch_builder(self.func::<E>("embedding")?);
        b.arg(ids).arg(table).arg(out).arg(&hidden_i);
        // SAFETY: the kernel reads rows·hidden values of `table` at ids the caller validated
        // against the vocabulary, and writes rows·hidden values of `out` (checked above).
        unsafe { b.launch(Self::cfg((u32_of(rows, "rows")?, 1), 256)) }?;
        Ok(())
    }

    /// RMSNorm of `rows` rows.
    pub fn rms_norm<E: Element>(
        &self,
        x: &CudaSlice<E>,
        weight: &CudaSlice<E>,
        out: &mut CudaSlice<E>,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        check(x.len() >= rows * hidden && out.len() >= rows * hidden && weight.len() >= hidden, || {
            "rms_norm: buffers too small".into()
        })?;
        if rows == 0 {
            return Ok(());
        }
        let hidden_i = i32_of(hidden, "hidden")?;
        let mut b = self.stream.launch_builder(self.func::<E>("rms_norm")?);
        b.arg(x).arg(weight).arg(out).arg(&hidden_i).arg(&eps);
        // SAFETY: one block per row, each touching `hidden` values of its row (sizes checked).
        unsafe { b.launch(Self::cfg((u32_of(rows, "rows")?, 1), 256)) }?;
        Ok(())
    }

    /// Rotary embedding in place on `n_heads` heads from column `col_offset` of each row.
    #[allow(clippy::too_many_arguments)]
    pub fn rope<E: Element>(
        &self,
        x: &mut CudaSlice<E>,
        row_stride: usize,
        col_offset: usize,
        n_heads: usize,
        head_dim: usize,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        scaling: f32,
        rows: usize,
    ) -> Result<(), CudaError> {
        check(col_offset + n_heads * head_dim <= row_stride && x.len() >= rows * row_stride, || {
            "rope: heads exceed the row or buffer".into()
        })?;
        check(positions.len() >= rows && inv_freq.len() >= head_dim / 2 && head_dim.is_multiple_of(2), || {
            "rope: positions or frequencies too short".into()
        })?;
        if rows == 0 {
            return Ok(());
        }
        let args = [i32_of(row_stride, "stride")?, i32_of(col_offset, "offset")?, i32_of(n_heads, "heads")?];
        let hd = i32_of(head_dim, "head_dim")?;
        let mut b = self.stream.launch_builder(self.func::<E>("rope")?);
        b.arg(x).arg(&args[0]).arg(&args[1]).arg(&args[2]).arg(&hd).arg(positions).arg(inv_freq).arg(&scaling);
        // SAFETY: each block rotates the heads of one row inside the bounds checked above.
        unsafe { b.launch(Self::cfg((u32_of(rows, "rows")?, 1), 128)) }?;
        Ok(())
    }

    /// SwiGLU over `rows` rows of a fused `[gate | up]` buffer.
    pub fn silu_mul<E: Element>(
        &self,
        gate_up: &CudaSlice<E>,
        out: &mut CudaSlice<E>,
        rows: usize,
        inter: usize,
    ) -> Result<(), CudaError> {
        check(gate_up.len() >= rows * 2 * inter && out.len() >= rows * inter, || "silu_mul: buffers too small".into())?;
        if rows == 0 {
            return Ok(());
        }
        let inter_i = i32_of(inter, "inter")?;
        let mut b = self.stream.launch_builder(self.func::<E>("silu_mul")?);
        b.arg(gate_up).arg(out).arg(&inter_i);
        // SAFETY: one block per row within the checked sizes.
        unsafe { b.launch(Self::cfg((u32_of(rows, "rows")?, 1), 256)) }?;
        Ok(())
    }

    /// `y[t] += bias` for `rows` rows of `width` values.
    pub fn add_bias<E: Element>(
        &self,
        y: &mut CudaSlice<E>,
        bias: &CudaSlice<E>,
        rows: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        check(y.len() >= rows * width && bias.len() >= width, || "add_bias: buffers too small".into())?;
        if rows == 0 {
            return Ok(());
        }
        let width_i = i32_of(width, "width")?;
        let mut b = self.stream.launch_builder(self.func::<E>("add_bias")?);
        b.arg(y).arg(bias).arg(&width_i);
        // SAFETY: one block per row within the checked sizes.
        unsafe { b.launch(Self::cfg((u32_of(rows, "rows")?, 1), 256)) }?;
        Ok(())
    }

    /// `x += y` over the first `n` elements.
    pub fn add_inplace<E: Element>(&self, x: &mut CudaSlice<E>, y: &CudaSlice<E>, n: usize) -> Result<(), CudaError> {
        check(x.len() >= n && y.len() >= n, || "add_inplace: buffers too small".into())?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let blocks = u32_of(n.div_ceil(256).min(65_535), "blocks")?;
        let mut b = self.stream.launch_builder(self.func::<E>("add_inplace")?);
        b.arg(x).arg(y).arg(&n_i);
        // SAFETY: grid-stride loop over exactly n elements of both buffers.
        unsafe { b.launch(Self::cfg((blocks, 1), 256)) }?;
        Ok(())
    }

    /// Stores K (columns `k_offset..`) and V (`v_offset..`) of each row in its cache slot.
    #[allow(clippy::too_many_arguments)]
    pub fn write_kv<E: Element>(
        &self,
        src: &CudaSlice<E>,
        src_stride: usize,
        k_offset: usize,
        v_offset: usize,
        slots: &CudaSlice<i32>,
        k_cache: &mut CudaSlice<E>,
        v_cache: &mut CudaSlice<E>,
        width: usize,
        rows: usize,
    ) -> Result<(), CudaError> {
        check(k_offset.max(v_offset) + width <= src_stride && src.len() >= rows * src_stride, || {
            "write_kv: K/V columns exceed the row".into()
        })?;
        check(slots.len() >= rows && k_cache.len() == v_cache.len(), || "write_kv: bad slots or caches".into())?;
        if rows == 0 {
            return Ok(());
        }
        let a = [i32_of(src_stride, "stride")?, i32_of(k_offset, "k")?, i32_of(v_offset, "v")?, i32_of(width, "w")?];
        let mut b = self.stream.launch_builder(self.func::<E>("write_kv")?);
        b.arg(src).arg(&a[0]).arg(&a[1]).arg(&a[2]).arg(slots).arg(k_cache).arg(v_cache).arg(&a[3]);
        // SAFETY: slot indices come from the scheduler's block tables, inside the cache.
        unsafe { b.launch(Self::cfg((u32_of(rows, "rows")?, 1), 128)) }?;
        Ok(())
    }

    /// Causal attention over the paged cache for `rows` query rows.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention<E: Element>(
        &self,
        q: &CudaSlice<E>,
        q_stride: usize,
        k_cache: &CudaSlice<E>,
        v_cache: &CudaSlice<E>,
        out: &mut CudaSlice<E>,
        row_pos: &CudaSlice<i32>,
        row_table: &CudaSlice<i32>,
        block_tables: &CudaSlice<i32>,
        layout: crate::KvLayout,
        n_heads: usize,
        scale: f32,
        window: Option<usize>,
        rows: usize,
    ) -> Result<(), CudaError> {
        let hd = layout.head_dim;
        check(hd <= MAX_HEAD_DIM && n_heads.is_multiple_of(layout.kv_heads), || {
            format!("paged_attention: head_dim {hd} > {MAX_HEAD_DIM} or heads not a multiple of kv heads")
        })?;
        check(q.len() >= rows * q_stride && out.len() >= rows * n_heads * hd && n_heads * hd <= q_stride, || {
            "paged_attention: buffers too small".into()
        })?;
        check(row_pos.len() >= rows && row_table.len() >= rows, || "paged_attention: row tables too short".into())?;
        if rows == 0 {
            return Ok(());
        }
        let ints = [
            i32_of(q_stride, "q_stride")?,
            i32_of(layout.block_size, "block_size")?,
            i32_of(layout.kv_heads, "kv_heads")?,
            i32_of(hd, "head_dim")?,
            i32_of(n_heads, "heads")?,
            window.map_or(Ok(0), |w| i32_of(w, "window"))?,
        ];
        let mut b = self.stream.launch_builder(self.func::<E>("paged_attention")?);
        b.arg(q).arg(&ints[0]).arg(k_cache).arg(v_cache).arg(out).arg(row_pos).arg(row_table).arg(block_tables);
        b.arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&scale).arg(&ints[5]);
        // SAFETY: every position a row reads is < its position + 1 and mapped through its block
        // table, whose blocks the scheduler allocated inside the cache.
        unsafe { b.launch(Self::cfg((u32_of(rows, "rows")?, u32_of(n_heads, "heads")?), ATTN_THREADS)) }?;
        Ok(())
    }

    fn check_lora<E: Element>(
        in_dim: usize,
        out_dim: usize,
        v_stride: usize,
        max_rank: usize,
    ) -> Result<(), CudaError> {
        let w = vec_width::<E>();
        check(in_dim.is_multiple_of(w) && out_dim.is_multiple_of(w), || {
            format!("LoRA kernels need in ({in_dim}) and out ({out_dim}) dimensions that are multiples of {w}")
        })?;
        check(max_rank <= v_stride, || format!("v stride {v_stride} below max rank {max_rank}"))
    }

    /// Shrink: `v[t, :rank] = x[t] · Aᵀ` for every row with an adapter (SGMV or BGMV by `rows`).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_shrink<E: Element>(
        &self,
        x: &CudaSlice<E>,
        in_dim: usize,
        rows: LoraRows<'_>,
        table: &CudaSlice<LoraSlotEntry>,
        max_rank: usize,
        v: &mut CudaSlice<f32>,
        v_stride: usize,
    ) -> Result<(), CudaError> {
        Self::check_lora::<E>(in_dim, in_dim, v_stride, max_rank)?;
        let n = rows.rows();
        check(x.len() >= n * in_dim && v.len() >= n * v_stride, || "LoRA shrink: buffers too small".into())?;
        if rows.blocks() == 0 || max_rank == 0 {
            return Ok(());
        }
        let (in_i, vs) = (i32_of(in_dim, "in")?, i32_of(v_stride, "v_stride")?);
        let func = self.func::<E>(&rows.kernel("shrink"))?;
        let mut b = self.stream.launch_builder(func);
        b.arg(x).arg(&in_i);
        rows.push(&mut b);
        b.arg(table).arg(v).arg(&vs);
        let grid = (u32_of(rows.blocks(), "rows")?, u32_of(max_rank.div_ceil(RANK_TILE), "rank tiles")?);
        // SAFETY: the rows index x and v within the sizes checked above; slot entries point at
        // live adapter matrices of the ranks they state (the executor keeps them alive).
        unsafe { b.launch(Self::cfg(grid, SHRINK_THREADS)) }?;
        Ok(())
    }

    /// Expand: `y[t, off..off+out] += scale · v[t, :rank] · Bᵀ` for every row with an adapter.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_expand<E: Element>(
        &self,
        v: &CudaSlice<f32>,
        v_stride: usize,
        rows: LoraRows<'_>,
        table: &CudaSlice<LoraSlotEntry>,
        y: &mut CudaSlice<E>,
        y_stride: usize,
        y_offset: usize,
        out_dim: usize,
    ) -> Result<(), CudaError> {
        Self::check_lora::<E>(out_dim, out_dim, v_stride, 0)?;
        let n = rows.rows();
        check(y_offset + out_dim <= y_stride && y.len() >= n * y_stride && v.len() >= n * v_stride, || {
            "LoRA expand: output block exceeds the row or buffers too small".into()
        })?;
        if rows.blocks() == 0 {
            return Ok(());
        }
        let ints = [i32_of(v_stride, "v")?, i32_of(y_stride, "y")?, i32_of(y_offset, "off")?, i32_of(out_dim, "out")?];
        let func = self.func::<E>(&rows.kernel("expand"))?;
        let mut b = self.stream.launch_builder(func);
        b.arg(v).arg(&ints[0]);
        rows.push(&mut b);
        b.arg(table).arg(y).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]);
        let per_block = EXPAND_THREADS as usize * vec_width::<E>();
        let grid = (u32_of(rows.blocks(), "rows")?, u32_of(out_dim.div_ceil(per_block), "out tiles")?);
        // SAFETY: as for shrink; each thread writes only its own outputs of the rows it owns.
        unsafe { b.launch(Self::cfg(grid, EXPAND_THREADS)) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_segments_are_split_into_pieces_that_keep_their_slot() {
        let segs = [Segment { start: 0, len: 10, slot: 3 }, Segment { start: 12, len: 1, slot: 0 }];
        assert_eq!(
            split_segments(&segs, 4),
            vec![
                Segment { start: 0, len: 4, slot: 3 },
                Segment { start: 4, len: 4, slot: 3 },
                Segment { start: 8, len: 2, slot: 3 },
                Segment { start: 12, len: 1, slot: 0 },
            ]
        );
        assert_eq!(split_segments(&segs, 0).len(), 11, "a zero piece size means one row per piece");
    }

    #[test]
    fn the_slot_entry_matches_the_kernels_struct_layout() {
        assert_eq!(std::mem::size_of::<LoraSlotEntry>(), 24);
        assert_eq!(std::mem::align_of::<LoraSlotEntry>(), 8);
    }

    #[test]
    fn every_entry_point_is_listed_for_a_source_that_exists() {
        for (source, entries) in ENTRY_POINTS {
            let (_, text) = SOURCES.iter().find(|(s, _)| s == source).expect("source exists");
            for e in *entries {
                assert!(text.contains(&format!("INSTANTIATE({e},")), "{source}.cu does not instantiate {e}");
            }
        }
    }

    #[test]
    fn lora_launches_refuse_dimensions_the_vector_loads_cannot_cover() {
        assert!(CudaKernels::check_lora::<half::bf16>(4096, 4096, 64, 64).is_ok());
        assert!(CudaKernels::check_lora::<half::bf16>(4100, 4096, 64, 64).is_err());
        assert!(CudaKernels::check_lora::<f32>(4100, 4096, 64, 64).is_ok());
        assert!(CudaKernels::check_lora::<f32>(4096, 4096, 32, 64).is_err());
    }
}
