//! Typed launch wrappers: argument checks, grid shapes, and the device-side tables the LoRA
//! kernels read (segments, adapter slot entries). Generic over the [`Device`] they launch on.

use super::device::{Device, DeviceBuffer, KernelArg, Launch};
use super::{CudaError, Element};
use crate::lora::Segment;
use cudarc::driver::{DeviceRepr, ValidAsZeroBits};
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
// SAFETY: all-zero bytes are a valid entry (null addresses, rank 0: no adapter).
unsafe impl ValidAsZeroBits for LoraSlotEntry {}

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
pub struct Segments<D: Device> {
    start: D::Buffer<i32>,
    len: D::Buffer<i32>,
    slot: D::Buffer<i32>,
    count: usize,
    /// One past the last row any segment covers.
    end: usize,
}

impl<D: Device> Segments<D> {
    /// Uploads segments built by [`crate::lora::segments`].
    pub fn upload(dev: &D, segs: &[Segment]) -> Result<Segments<D>, CudaError> {
        Self::upload_pieces(dev, segs, SEGMENT_PIECE_ROWS)
    }

    /// Uploads segments split into pieces of at most `piece` rows.
    pub fn upload_pieces(dev: &D, segs: &[Segment], piece: u32) -> Result<Segments<D>, CudaError> {
        let segs = &split_segments(segs, piece);
        // Empty device allocations are not allowed: keep one unused element.
        let col = |f: fn(&Segment) -> u32| {
            let mut v: Vec<i32> = segs.iter().map(|s| f(s) as i32).collect();
            if v.is_empty() {
                v.push(0);
            }
            dev.upload(&v)
        };
        Ok(Segments {
            start: col(|s| s.start)?,
            len: col(|s| s.len)?,
            slot: col(|s| s.slot)?,
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
#[derive(Debug)]
pub enum LoraRows<'a, D: Device> {
    /// SGMV: segments of consecutive rows sharing a slot (prefill-shaped batches).
    Segments(&'a Segments<D>),
    /// BGMV: one slot per row, negative for none (decode-shaped batches).
    PerRow { slots: &'a D::Buffer<i32>, rows: usize },
}

impl<D: Device> Clone for LoraRows<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D: Device> Copy for LoraRows<'_, D> {}

impl<D: Device> LoraRows<'_, D> {
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

    fn kernel(&self, op: &str) -> &'static str {
        match (self, op) {
            (LoraRows::Segments(_), "shrink") => "sgmv_shrink",
            (LoraRows::Segments(_), _) => "sgmv_expand",
            (LoraRows::PerRow { .. }, "shrink") => "bgmv_shrink",
            (LoraRows::PerRow { .. }, _) => "bgmv_expand",
        }
    }

    /// The row-selection arguments (segment arrays, or the per-row slots).
    fn args(&self, dev: &D) -> Vec<KernelArg> {
        match self {
            LoraRows::Segments(s) => vec![ptr(dev, &s.start), ptr(dev, &s.len), ptr(dev, &s.slot)],
            LoraRows::PerRow { slots, .. } => vec![ptr(dev, *slots)],
        }
    }
}

/// A buffer as a pointer argument.
fn ptr<D: Device, T: super::DeviceValue>(dev: &D, buf: &D::Buffer<T>) -> KernelArg {
    KernelArg::Ptr(dev.address(buf))
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

/// Every kernel, launched on one device with its arguments checked.
#[derive(Debug)]
pub struct CudaKernels<D: Device> {
    dev: Arc<D>,
}

impl<D: Device> CudaKernels<D> {
    pub fn new(dev: D) -> CudaKernels<D> {
        CudaKernels { dev: Arc::new(dev) }
    }

    /// The device every launch goes to.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The device, for work on other threads (uploads that overlap the launches).
    pub fn shared_device(&self) -> Arc<D> {
        self.dev.clone()
    }

    fn ptr<T: super::DeviceValue>(&self, buf: &D::Buffer<T>) -> KernelArg {
        ptr(self.dev.as_ref(), buf)
    }

    /// Launches `name` for element type `E` on a 2-D grid of 1-D blocks.
    ///
    /// # Safety
    /// As [`Device::launch`]: the arguments match the kernel and its buffers are large enough.
    unsafe fn launch<E: Element>(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        args: &[KernelArg],
    ) -> Result<(), CudaError> {
        let entry = format!("{name}_{}", E::DTYPE.suffix());
        let launch = Launch { entry: &entry, grid: (grid.0.max(1), grid.1.max(1), 1), block: (block, 1, 1), args };
        // SAFETY: forwarded from the caller.
        unsafe { self.dev.launch(&launch) }
    }

    /// `out[t] = table[ids[t]]` for `rows` ids.
    pub fn embedding<E: Element>(
        &self,
        ids: &D::Buffer<i32>,
        table: &D::Buffer<E>,
        out: &mut D::Buffer<E>,
        rows: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        check(ids.len() >= rows && out.len() >= rows * hidden, || "embedding: buffers too small".into())?;
        if rows == 0 {
            return Ok(());
        }
        let args = [self.ptr(ids), self.ptr(table), self.ptr(out), KernelArg::I32(i32_of(hidden, "hidden")?)];
        // SAFETY: the kernel reads rows·hidden values of `table` at ids the caller validated
        // against the vocabulary, and writes rows·hidden values of `out` (checked above).
        unsafe { self.launch::<E>("embedding", (u32_of(rows, "rows")?, 1), 256, &args) }
    }

    /// RMSNorm of `rows` rows.
    pub fn rms_norm<E: Element>(
        &self,
        x: &D::Buffer<E>,
        weight: &D::Buffer<E>,
        out: &mut D::Buffer<E>,
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
        let hidden = KernelArg::I32(i32_of(hidden, "hidden")?);
        let args = [self.ptr(x), self.ptr(weight), self.ptr(out), hidden, KernelArg::F32(eps)];
        // SAFETY: one block per row, each touching `hidden` values of its row (sizes checked).
        unsafe { self.launch::<E>("rms_norm", (u32_of(rows, "rows")?, 1), 256, &args) }
    }

    /// Rotary embedding in place on `n_heads` heads from column `col_offset` of each row.
    #[allow(clippy::too_many_arguments)]
    pub fn rope<E: Element>(
        &self,
        x: &mut D::Buffer<E>,
        row_stride: usize,
        col_offset: usize,
        n_heads: usize,
        head_dim: usize,
        positions: &D::Buffer<i32>,
        inv_freq: &D::Buffer<f32>,
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
        let args = [
            self.ptr(x),
            KernelArg::I32(i32_of(row_stride, "stride")?),
            KernelArg::I32(i32_of(col_offset, "offset")?),
            KernelArg::I32(i32_of(n_heads, "heads")?),
            KernelArg::I32(i32_of(head_dim, "head_dim")?),
            self.ptr(positions),
            self.ptr(inv_freq),
            KernelArg::F32(scaling),
        ];
        // SAFETY: each block rotates the heads of one row inside the bounds checked above.
        unsafe { self.launch::<E>("rope", (u32_of(rows, "rows")?, 1), 128, &args) }
    }

    /// SwiGLU over `rows` rows of a fused `[gate | up]` buffer.
    pub fn silu_mul<E: Element>(
        &self,
        gate_up: &D::Buffer<E>,
        out: &mut D::Buffer<E>,
        rows: usize,
        inter: usize,
    ) -> Result<(), CudaError> {
        check(gate_up.len() >= rows * 2 * inter && out.len() >= rows * inter, || "silu_mul: buffers too small".into())?;
        if rows == 0 {
            return Ok(());
        }
        let args = [self.ptr(gate_up), self.ptr(out), KernelArg::I32(i32_of(inter, "inter")?)];
        // SAFETY: one block per row within the checked sizes.
        unsafe { self.launch::<E>("silu_mul", (u32_of(rows, "rows")?, 1), 256, &args) }
    }

    /// `y[t] += bias` for `rows` rows of `width` values.
    pub fn add_bias<E: Element>(
        &self,
        y: &mut D::Buffer<E>,
        bias: &D::Buffer<E>,
        rows: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        check(y.len() >= rows * width && bias.len() >= width, || "add_bias: buffers too small".into())?;
        if rows == 0 {
            return Ok(());
        }
        let args = [self.ptr(y), self.ptr(bias), KernelArg::I32(i32_of(width, "width")?)];
        // SAFETY: one block per row within the checked sizes.
        unsafe { self.launch::<E>("add_bias", (u32_of(rows, "rows")?, 1), 256, &args) }
    }

    /// `x += y` over the first `n` elements.
    pub fn add_inplace<E: Element>(&self, x: &mut D::Buffer<E>, y: &D::Buffer<E>, n: usize) -> Result<(), CudaError> {
        check(x.len() >= n && y.len() >= n, || "add_inplace: buffers too small".into())?;
        if n == 0 {
            return Ok(());
        }
        let blocks = u32_of(n.div_ceil(256).min(65_535), "blocks")?;
        let n = i64::try_from(n).map_err(|_| CudaError::Arguments(format!("add_inplace: {n} elements")))?;
        let args = [self.ptr(x), self.ptr(y), KernelArg::I64(n)];
        // SAFETY: grid-stride loop over exactly n elements of both buffers.
        unsafe { self.launch::<E>("add_inplace", (blocks, 1), 256, &args) }
    }

    /// Stores K (columns `k_offset..`) and V (`v_offset..`) of each row in its cache slot.
    #[allow(clippy::too_many_arguments)]
    pub fn write_kv<E: Element>(
        &self,
        src: &D::Buffer<E>,
        src_stride: usize,
        k_offset: usize,
        v_offset: usize,
        slots: &D::Buffer<i32>,
        k_cache: &mut D::Buffer<E>,
        v_cache: &mut D::Buffer<E>,
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
        let args = [
            self.ptr(src),
            KernelArg::I32(i32_of(src_stride, "stride")?),
            KernelArg::I32(i32_of(k_offset, "k")?),
            KernelArg::I32(i32_of(v_offset, "v")?),
            self.ptr(slots),
            self.ptr(k_cache),
            self.ptr(v_cache),
            KernelArg::I32(i32_of(width, "w")?),
        ];
        // SAFETY: slot indices come from the scheduler's block tables, inside the cache.
        unsafe { self.launch::<E>("write_kv", (u32_of(rows, "rows")?, 1), 128, &args) }
    }

    /// Causal attention over the paged cache for `rows` query rows.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention<E: Element>(
        &self,
        q: &D::Buffer<E>,
        q_stride: usize,
        k_cache: &D::Buffer<E>,
        v_cache: &D::Buffer<E>,
        out: &mut D::Buffer<E>,
        row_pos: &D::Buffer<i32>,
        row_table: &D::Buffer<i32>,
        block_tables: &D::Buffer<i32>,
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
        let args = [
            self.ptr(q),
            KernelArg::I32(i32_of(q_stride, "q_stride")?),
            self.ptr(k_cache),
            self.ptr(v_cache),
            self.ptr(out),
            self.ptr(row_pos),
            self.ptr(row_table),
            self.ptr(block_tables),
            KernelArg::I32(i32_of(layout.block_size, "block_size")?),
            KernelArg::I32(i32_of(layout.kv_heads, "kv_heads")?),
            KernelArg::I32(i32_of(hd, "head_dim")?),
            KernelArg::I32(i32_of(n_heads, "heads")?),
            KernelArg::F32(scale),
            KernelArg::I32(window.map_or(Ok(0), |w| i32_of(w, "window"))?),
        ];
        let grid = (u32_of(rows, "rows")?, u32_of(n_heads, "heads")?);
        // SAFETY: every position a row reads is < its position + 1 and mapped through its block
        // table, whose blocks the scheduler allocated inside the cache.
        unsafe { self.launch::<E>("paged_attention", grid, ATTN_THREADS, &args) }
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
        x: &D::Buffer<E>,
        in_dim: usize,
        rows: LoraRows<'_, D>,
        table: &D::Buffer<LoraSlotEntry>,
        max_rank: usize,
        v: &mut D::Buffer<f32>,
        v_stride: usize,
    ) -> Result<(), CudaError> {
        Self::check_lora::<E>(in_dim, in_dim, v_stride, max_rank)?;
        let n = rows.rows();
        check(x.len() >= n * in_dim && v.len() >= n * v_stride, || "LoRA shrink: buffers too small".into())?;
        if rows.blocks() == 0 || max_rank == 0 {
            return Ok(());
        }
        let mut args = vec![self.ptr(x), KernelArg::I32(i32_of(in_dim, "in")?)];
        args.extend(rows.args(&self.dev));
        args.extend([self.ptr(table), self.ptr(v), KernelArg::I32(i32_of(v_stride, "v_stride")?)]);
        let grid = (u32_of(rows.blocks(), "rows")?, u32_of(max_rank.div_ceil(RANK_TILE), "rank tiles")?);
        // SAFETY: the rows index x and v within the sizes checked above; slot entries point at
        // live adapter matrices of the ranks they state (the executor keeps them alive).
        unsafe { self.launch::<E>(rows.kernel("shrink"), grid, SHRINK_THREADS, &args) }
    }

    /// Expand: `y[t, off..off+out] += scale · v[t, :rank] · Bᵀ` for every row with an adapter.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_expand<E: Element>(
        &self,
        v: &D::Buffer<f32>,
        v_stride: usize,
        rows: LoraRows<'_, D>,
        table: &D::Buffer<LoraSlotEntry>,
        y: &mut D::Buffer<E>,
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
        let mut args = vec![self.ptr(v), KernelArg::I32(i32_of(v_stride, "v")?)];
        args.extend(rows.args(&self.dev));
        args.extend([
            self.ptr(table),
            self.ptr(y),
            KernelArg::I32(i32_of(y_stride, "y")?),
            KernelArg::I32(i32_of(y_offset, "off")?),
            KernelArg::I32(i32_of(out_dim, "out")?),
        ]);
        let per_block = EXPAND_THREADS as usize * vec_width::<E>();
        let grid = (u32_of(rows.blocks(), "rows")?, u32_of(out_dim.div_ceil(per_block), "out tiles")?);
        // SAFETY: as for shrink; each thread writes only its own outputs of the rows it owns.
        unsafe { self.launch::<E>(rows.kernel("expand"), grid, EXPAND_THREADS, &args) }
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
    fn lora_launches_refuse_dimensions_the_vector_loads_cannot_cover() {
        assert!(CudaKernels::<super::super::CudaDevice>::check_lora::<half::bf16>(4096, 4096, 64, 64).is_ok());
        assert!(CudaKernels::<super::super::CudaDevice>::check_lora::<half::bf16>(4100, 4096, 64, 64).is_err());
        assert!(CudaKernels::<super::super::CudaDevice>::check_lora::<f32>(4100, 4096, 64, 64).is_ok());
        assert!(CudaKernels::<super::super::CudaDevice>::check_lora::<f32>(4096, 4096, 32, 64).is_err());
    }
}
