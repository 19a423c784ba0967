//! Quantized weights, and the CPU kernels that compute on them directly without dequantizing the
//! matrix: a decode step reads each weight byte once, at a quarter to an eighth of the f32
//! bandwidth, and prefill multiplies 8-bit integers.
//!
//! # Formats
//! GGUF's block formats, [`BLOCK`] consecutive weights of a row per block, each with its scale:
//! - `Q8_0`: `f16 d`, `i8 q[32]`; weight `i` is `d·q[i]`;
//! - `Q4_0`: `f16 d`, `u8 q[16]`; weight `i < 16` is `d·((q[i] & 15) − 8)`, weight `16 + i` is
//!   `d·((q[i] >> 4) − 8)`;
//! - `Q4_1`: `f16 d`, `f16 m`, `u8 q[16]`; as `Q4_0` with `d·nibble + m`.
//!
//! # Layout in memory
//! [`QuantMatrix::from_ggml`] repacks a matrix once, at load, into a layout made for 64-byte
//! vectors, with the same bits per weight: every quant, scale and offset is kept exactly. Each
//! row is split into pairs of blocks (64 weights; a row with an odd number of blocks gets a zero
//! block) and stored as
//!
//! - the quants of every pair, unsigned: `Q8_0` as `q + 128` (64 bytes a pair), `Q4_0`/`Q4_1` as
//!   32 bytes whose low nibbles are the pair's first block in order and whose high nibbles are its
//!   second;
//! - the scales `d` of every block (f16);
//! - for `Q4_1`, the offsets `m` of every block (f16).
//!
//! So weight `i` of block `b` is `d_b·(u_i − o) + m_b`, with the format's offset `o` (128, 8, 0)
//! and `m_b = 0` outside `Q4_1`.
//!
//! # Dot products
//! Activations are first quantized to 8 bits per block ([`Q8Rows`], as ggml's `Q8_1`: a scale
//! `e_b` and `s_b = e_b·Σq`). A row's dot product is then
//! `Σ_b d_b·e_b·Σ_i u_i·q_i + Σ_b (m_b − o·d_b)·s_b`: integer multiply-adds inside a block,
//! one float multiply-add per block. The only error beyond f32 rounding is the activations'
//! rounding to 1/254 of their block's largest magnitude.
//!
//! [`dot_scalar`] is the specification. The SIMD paths (AVX-512 VNNI, AVX2 on x86-64; NEON on
//! aarch64) are chosen at run time; they compute the same integer sums exactly and may differ
//! from the specification only in the order float terms are added. The tests hold every path
//! this CPU has to that.

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use half::f16;
use rayon::prelude::*;

/// Weights per block (every format here).
pub const BLOCK: usize = 32;
/// Weights per pair of blocks: the unit the layout and the SIMD paths work in.
const PAIR: usize = 2 * BLOCK;

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Format {
    /// Bytes of one block in GGUF.
    pub const fn ggml_block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
        }
    }

    /// Bytes of one pair's quants in the repacked layout.
    const fn pair_quant_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 64,
            Format::Q4_0 | Format::Q4_1 => 32,
        }
    }

    /// Bytes of one pair in the repacked layout: quants, two scales, and two offsets for Q4_1.
    const fn pair_bytes(self) -> usize {
        self.pair_quant_bytes() + if matches!(self, Format::Q4_1) { 8 } else { 4 }
    }

    /// What the unsigned quants carry over the signed value they stand for.
    const fn offset(self) -> f32 {
        match self {
            Format::Q8_0 => 128.0,
            Format::Q4_0 => 8.0,
            Format::Q4_1 => 0.0,
        }
    }
}

/// Why a quantized matrix could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("a row of {cols} weights is not a whole number of {BLOCK}-weight blocks")]
    Ragged { cols: usize },
    #[error("{format:?} data for [{rows}, {cols}] is {got} bytes; it should be {want}")]
    Size { format: Format, rows: usize, cols: usize, got: usize, want: usize },
    #[error("cannot stack matrices of different formats or widths ({0})")]
    Mismatch(String),
}

/// A weight matrix `[rows, cols]` in its quantized form (the repacked layout above).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl QuantMatrix {
    /// Repacks `data`, the GGUF blocks of every row, row after row, after checking its size.
    pub fn from_ggml(format: Format, rows: usize, cols: usize, data: &[u8]) -> Result<QuantMatrix, QuantError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QuantError::Ragged { cols });
        }
        let blocks = cols / BLOCK;
        let want = rows * blocks * format.ggml_block_bytes();
        if data.len() != want {
            return Err(QuantError::Size { format, rows, cols, got: data.len(), want });
        }
        let mut out = QuantMatrix { format, rows, cols, data: Vec::new() };
        let row_bytes = out.row_bytes();
        out.data = vec![0u8; rows * row_bytes];
        let ggml_row = blocks * format.ggml_block_bytes();
        out.data.par_chunks_mut(row_bytes).zip(data.par_chunks(ggml_row)).for_each(|(dst, src)| {
            repack_row(format, src, dst);
        });
        Ok(out)
    }

    /// Stacks matrices of one format and width along their rows (fused projections).
    pub fn stack(parts: &[&QuantMatrix]) -> Result<QuantMatrix, QuantError> {
        let first = parts.first().ok_or_else(|| QuantError::Mismatch("nothing to stack".into()))?;
        if let Some(other) = parts.iter().find(|p| p.format != first.format || p.cols != first.cols) {
            return Err(QuantError::Mismatch(format!(
                "{:?} [.., {}] and {:?} [.., {}]",
                first.format, first.cols, other.format, other.cols
            )));
        }
        let data = parts.iter().flat_map(|p| p.data.iter().copied()).collect();
        Ok(QuantMatrix { format: first.format, rows: parts.iter().map(|p| p.rows).sum(), cols: first.cols, data })
    }

    /// The matrix with its rows in the order `order` gives (`order[i]` is the row placed at `i`).
    ///
    /// # Panics
    /// When `order` names a row that does not exist.
    pub fn select_rows(&self, order: &[usize]) -> QuantMatrix {
        let n = self.row_bytes();
        let data = order.iter().flat_map(|&r| self.data[r * n..(r + 1) * n].iter().copied()).collect();
        QuantMatrix { format: self.format, rows: order.len(), cols: self.cols, data }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the matrix holds.
    pub fn size_bytes(&self) -> usize {
        self.data.len()
    }

    fn pairs(&self) -> usize {
        self.cols.div_ceil(PAIR)
    }

    fn row_bytes(&self) -> usize {
        self.pairs() * self.format.pair_bytes()
    }

    /// Row `r` in the repacked layout.
    fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Row `r` as f32 (`out` holds `cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (format, pairs) = (self.format, self.pairs());
        let row = self.row(r);
        let (quants, scales) = row.split_at(pairs * format.pair_quant_bytes());
        for (b, block) in out[..self.cols].chunks_exact_mut(BLOCK).enumerate() {
            let d = f16_at(scales, 2 * b);
            let m = if format == Format::Q4_1 { f16_at(scales, 2 * (2 * pairs + b)) } else { 0.0 };
            for (i, o) in block.iter_mut().enumerate() {
                *o = d * (f32::from(quant(format, quants, b * BLOCK + i)) - format.offset()) + m;
            }
        }
    }

    /// The whole matrix as f32, `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols.max(1)).enumerate().for_each(|(r, row)| self.dequantize_row(r, row));
        out
    }
}

/// Unsigned quant of weight `i` of a repacked row's quants.
fn quant(format: Format, quants: &[u8], i: usize) -> u8 {
    let (pair, j) = (i / PAIR, i % PAIR);
    match format {
        Format::Q8_0 => quants[pair * PAIR + j],
        Format::Q4_0 | Format::Q4_1 => {
            let byte = quants[pair * 32 + j % BLOCK];
            if j < BLOCK { byte & 15 } else { byte >> 4 }
        }
    }
}

/// One row from GGUF blocks (`src`) into the repacked layout (`dst`, zeroed).
fn repack_row(format: Format, src: &[u8], dst: &mut [u8]) {
    let pairs = dst.len() / format.pair_bytes();
    let (quants, scales) = dst.split_at_mut(pairs * format.pair_quant_bytes());
    for (b, blk) in src.chunks_exact(format.ggml_block_bytes()).enumerate() {
        let (pair, second) = (b / 2, b % 2 == 1);
        scales[2 * b..2 * b + 2].copy_from_slice(&blk[0..2]);
        match format {
            Format::Q8_0 => {
                let at = pair * PAIR + if second { BLOCK } else { 0 };
                for (o, &q) in quants[at..at + BLOCK].iter_mut().zip(&blk[2..34]) {
                    *o = q ^ 0x80; // i8 q as u8 q + 128
                }
            }
            Format::Q4_0 | Format::Q4_1 => {
                let qs = if format == Format::Q4_0 { &blk[2..18] } else { &blk[4..20] };
                if format == Format::Q4_1 {
                    let m = 2 * (2 * pairs + b);
                    scales[m..m + 2].copy_from_slice(&blk[2..4]);
                }
                let shift = if second { 4 } else { 0 };
                let bytes = &mut quants[pair * 32..pair * 32 + 32];
                for (j, &q) in qs.iter().enumerate() {
                    bytes[j] |= (q & 15) << shift;
                    bytes[j + 16] |= (q >> 4) << shift;
                }
            }
        }
    }
}

/// Rows of activations quantized for dot products, as ggml's `Q8_1`: per block of [`BLOCK`], a
/// scale `e` (the block's largest magnitude over 127), the 8-bit values, and `e` times their sum.
/// Rows are padded with zero blocks to whole pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Q8Rows {
    rows: usize,
    /// Blocks per row, padded to whole pairs.
    blocks: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<f32>,
}

/// One row of [`Q8Rows`].
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    q: &'a [i8],
    d: &'a [f32],
    sum: &'a [f32],
}

impl Q8Rows {
    /// Quantizes `rows` rows of `cols` values (a whole number of blocks) from `x`, reusing this
    /// value's buffers.
    ///
    /// # Panics
    /// When `cols` is not a whole number of blocks or `x` is too short (caller bugs).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(cols.is_multiple_of(BLOCK) && x.len() >= rows * cols, "quantize: bad shape");
        let blocks = cols.div_ceil(PAIR) * 2;
        self.rows = rows;
        self.blocks = blocks;
        self.q.resize(rows * blocks * BLOCK, 0);
        self.d.resize(rows * blocks, 0.0);
        self.sum.resize(rows * blocks, 0.0);
        let rows_of = |q: &mut [i8], d: &mut [f32], sum: &mut [f32], x: &[f32]| {
            let parts = q.chunks_exact_mut(blocks * BLOCK).zip(d.chunks_exact_mut(blocks));
            for ((q, d), (sum, x)) in parts.zip(sum.chunks_exact_mut(blocks).zip(x.chunks_exact(cols))) {
                quantize_row(x, q, d, sum);
            }
        };
        // A decode step's few rows are not worth a trip through the thread pool.
        let per_task = (1 << 14) / cols.max(1) + 1;
        if rows <= per_task {
            rows_of(&mut self.q, &mut self.d, &mut self.sum, &x[..rows * cols]);
        } else {
            self.q
                .par_chunks_mut(blocks * BLOCK * per_task)
                .zip(self.d.par_chunks_mut(blocks * per_task))
                .zip(self.sum.par_chunks_mut(blocks * per_task))
                .zip(x[..rows * cols].par_chunks(cols * per_task))
                .for_each(|(((q, d), sum), x)| rows_of(q, d, sum, x));
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let n = self.blocks;
        Q8Row {
            q: &self.q[r * n * BLOCK..(r + 1) * n * BLOCK],
            d: &self.d[r * n..(r + 1) * n],
            sum: &self.sum[r * n..(r + 1) * n],
        }
    }
}

/// One row: `q`, `d` and `sum` have room for whole pairs; blocks past `x` are zero.
fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32]) {
    q.fill(0);
    d.fill(0.0);
    sum.fill(0.0);
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut total = 0i32;
        for (o, &v) in q[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(block) {
            // |v · inv| <= 127: the cast cannot saturate. Rounded to nearest (ties to even)
            // by adding 1.5·2²³, which leaves the integer in the low mantissa bits: a few
            // instructions, where `round` is a call into libm.
            const MAGIC: f32 = 12_582_912.0;
            let v = ((v * inv + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32) as i8;
            total += i32::from(v);
            *o = v;
        }
        d[b] = scale;
        sum[b] = scale * total as f32;
    }
}

/// The dot product of row `r` of `w` with quantized activations: the specification.
pub fn dot_scalar(w: &QuantMatrix, r: usize, x: Q8Row<'_>) -> f32 {
    let (format, pairs) = (w.format, w.pairs());
    let row = w.row(r);
    let (quants, scales) = row.split_at(pairs * format.pair_quant_bytes());
    let mut acc = 0f32;
    for b in 0..2 * pairs {
        let s: i32 =
            (b * BLOCK..(b + 1) * BLOCK).map(|i| i32::from(quant(format, quants, i)) * i32::from(x.q[i])).sum();
        let d = f16_at(scales, 2 * b);
        let m = if format == Format::Q4_1 { f16_at(scales, 2 * (2 * pairs + b)) } else { 0.0 };
        acc += d * x.d[b] * s as f32 + (m - format.offset() * d) * x.sum[b];
    }
    acc
}

/// Whether the AVX-512 path runs here (detected once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    matches!(Path::detect(), Path::Avx512(_))
}

/// The fastest dot-product path this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(x86::Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(x86::Avx512),
}

impl Path {
    /// Detected once per process.
    pub fn detect() -> Path {
        static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
        *PATH.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if let Some(p) = x86::Avx512::detect() {
                return Path::Avx512(p);
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(p) = x86::Avx2::detect() {
                return Path::Avx2(p);
            }
            Path::Scalar
        })
    }

    /// Every path this CPU can run, the scalar one first (for tests and benchmarks).
    pub fn available() -> Vec<Path> {
        #[allow(unused_mut)]
        let mut paths = vec![Path::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            paths.extend(x86::Avx2::detect().map(Path::Avx2));
            paths.extend(x86::Avx512::detect().map(Path::Avx512));
        }
        paths
    }

    /// For each weight row `j` in `rows`: `emit(j, [w_j · x for x in xs])`, with up to [`TILE`]
    /// activation rows at once (each weight block is unpacked once for all of them).
    fn dot_rows(
        self,
        w: &QuantMatrix,
        rows: std::ops::Range<usize>,
        xs: &[Q8Row<'_>],
        mut emit: impl FnMut(usize, &[f32]),
    ) {
        debug_assert!(xs.len() <= TILE);
        let n = w.row_bytes();
        let block = &w.data[rows.start * n..rows.end * n];
        let mut emit = |j: usize, v: &[f32]| emit(rows.start + j, v);
        match self {
            Path::Scalar => {
                let mut out = [0f32; TILE];
                for j in 0..rows.len() {
                    for (o, x) in out.iter_mut().zip(xs) {
                        *o = dot_scalar(w, rows.start + j, *x);
                    }
                    emit(j, &out[..xs.len()]);
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(p) => p.dot_rows(w.format, w.pairs(), block, xs, &mut emit),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(p) => p.dot_rows(w.format, w.pairs(), block, xs, &mut emit),
        }
    }
}

/// Activation rows one weight row is unpacked for.
pub const TILE: usize = 8;

/// The output pointer shared by [`matmul`]'s tasks, which write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: see `matmul`: tasks write disjoint elements, and the borrow outlives them.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Through a method, so closures capture the whole `Out` (which is `Send`), not its field.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `y[i, j] = x[i] · w[j]` for every activation row `i` and weight row `j` (a linear layer,
/// `y = x·Wᵀ`), with `y`'s rows `y_stride` apart, on `path`. The weight rows are spread over
/// rayon's threads in chunks; within a chunk, each weight row is unpacked once per [`TILE`]
/// activation rows, and a chunk's rows stay in cache while every tile passes over them.
///
/// # Panics
/// When the shapes do not match (caller bugs).
pub fn matmul_on(path: Path, w: &QuantMatrix, x: &Q8Rows, y: &mut [f32], y_stride: usize) {
    let (m, n) = (x.rows, w.rows);
    if m == 0 || n == 0 {
        return;
    }
    assert!(x.blocks == 2 * w.pairs(), "matmul: activations of {} blocks, weights of {}", x.blocks, 2 * w.pairs());
    assert!(y_stride >= n && y.len() >= (m - 1) * y_stride + n, "matmul: y too short");
    // Chunks of weight rows: enough of them to keep every thread busy, and small enough (with
    // the tiles of activations) to stay in the core's cache.
    let threads = rayon::current_num_threads();
    let work = m * n * w.cols;
    let chunk = if work < 1 << 17 { n } else { (n / (4 * threads)).clamp(8, 64) };
    let out = Out(y.as_mut_ptr());
    let run = |c: usize| {
        let rows = c * chunk..((c + 1) * chunk).min(n);
        for i0 in (0..m).step_by(TILE) {
            let t = (m - i0).min(TILE);
            let xs: [Q8Row<'_>; TILE] = std::array::from_fn(|k| x.row(i0 + k.min(t - 1)));
            path.dot_rows(w, rows.clone(), &xs[..t], |j, values| {
                for (k, &v) in values.iter().enumerate() {
                    // SAFETY: (i0 + k, j) with i0 + k < m and j < n is inside `y` (asserted
                    // above), and only the task owning weight row j writes column j.
                    unsafe { *out.at((i0 + k) * y_stride + j) = v };
                }
            });
        }
    };
    let chunks = n.div_ceil(chunk);
    if chunks == 1 {
        run(0);
    } else {
        (0..chunks).into_par_iter().for_each(run);
    }
}

/// [`matmul_on`] on the fastest path this CPU has.
pub fn matmul(w: &QuantMatrix, x: &Q8Rows, y: &mut [f32], y_stride: usize) {
    matmul_on(Path::detect(), w, x, y, y_stride);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// GGUF blocks of a random matrix in `format`: random scales (and offsets) and quants.
    fn random_ggml(format: Format, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let blocks = rows * cols / BLOCK;
        let mut data = Vec::with_capacity(blocks * format.ggml_block_bytes());
        for _ in 0..blocks {
            data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
            if format == Format::Q4_1 {
                data.extend_from_slice(&f16::from_f32(rng.random_range(-0.2..0.2)).to_le_bytes());
            }
            let n = if format == Format::Q8_0 { 32 } else { 16 };
            data.extend((0..n).map(|_| rng.random::<u8>()));
        }
        data
    }

    fn random(format: Format, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QuantMatrix {
        QuantMatrix::from_ggml(format, rows, cols, &random_ggml(format, rows, cols, rng)).expect("sized right")
    }

    /// GGUF's own dequantization of one block, written from the format's definition.
    fn ggml_block(format: Format, blk: &[u8]) -> [f32; BLOCK] {
        let d = f16_at(blk, 0);
        let mut out = [0f32; BLOCK];
        match format {
            Format::Q8_0 => {
                for i in 0..BLOCK {
                    out[i] = d * f32::from(blk[2 + i] as i8);
                }
            }
            Format::Q4_0 | Format::Q4_1 => {
                let (qs, m, o) = if format == Format::Q4_0 { (2, 0.0, 8.0) } else { (4, f16_at(blk, 2), 0.0) };
                for i in 0..16 {
                    out[i] = d * (f32::from(blk[qs + i] & 15) - o) + m;
                    out[i + 16] = d * (f32::from(blk[qs + i] >> 4) - o) + m;
                }
            }
        }
        out
    }

    fn activations(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|i| rng.random_range(-2.0..2.0) * if i % 7 == 0 { 4.0 } else { 1.0 }).collect()
    }

    #[test]
    fn repacking_keeps_every_weight_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for format in [Format::Q8_0, Format::Q4_0, Format::Q4_1] {
            // 96 columns: three blocks, so the second pair is padded.
            let (rows, cols) = (3, 96);
            let ggml = random_ggml(format, rows, cols, &mut rng);
            let w = QuantMatrix::from_ggml(format, rows, cols, &ggml).expect("sized right");
            assert_eq!(w.size_bytes(), rows * 2 * format.pair_bytes());
            let want: Vec<f32> =
                ggml.chunks_exact(format.ggml_block_bytes()).flat_map(|b| ggml_block(format, b)).collect();
            assert_eq!(w.dequantize(), want, "{format:?}");
        }
    }

    #[test]
    fn the_quantized_dot_is_the_f32_dot_of_the_dequantized_row_to_within_activation_rounding() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for format in [Format::Q8_0, Format::Q4_0, Format::Q4_1] {
            let (rows, cols) = (16, 288);
            let w = random(format, rows, cols, &mut rng);
            let x = activations(cols, &mut rng);
            let mut q = Q8Rows::default();
            q.quantize(&x, 1, cols);
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                let exact: f64 = row.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                // Each activation moves by at most half a step (its block's amax / 254).
                let bound: f64 = row
                    .chunks(BLOCK)
                    .zip(x.chunks(BLOCK))
                    .map(|(wb, xb)| {
                        let step = f64::from(xb.iter().fold(0f32, |m, v| m.max(v.abs()))) / 254.0;
                        wb.iter().map(|&v| f64::from(v.abs()) * step).sum::<f64>()
                    })
                    .sum();
                let got = f64::from(dot_scalar(&w, r, q.row(0)));
                assert!(
                    (got - exact).abs() <= bound * 1.01 + 1e-4,
                    "{format:?} row {r}: {got} vs {exact} (bound {bound})"
                );
            }
        }
    }

    #[test]
    fn every_simd_path_this_cpu_has_agrees_with_the_scalar_specification() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let paths = Path::available();
        eprintln!("paths: {paths:?}");
        for format in [Format::Q8_0, Format::Q4_0, Format::Q4_1] {
            // Odd block counts, partial groups of scales, and widths past one group.
            for cols in [32, 64, 96, 576, 1056, 1536] {
                let (rows, m) = (8, 7);
                let w = random(format, rows, cols, &mut rng);
                let mut x = Q8Rows::default();
                x.quantize(&activations(m * cols, &mut rng), m, cols);
                let mut want = vec![0f32; m * rows];
                matmul_on(Path::Scalar, &w, &x, &mut want, rows);
                for &path in &paths {
                    let mut got = vec![f32::NAN; m * rows];
                    matmul_on(path, &w, &x, &mut got, rows);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        // The same integer sums; only the order of the per-block float adds differs.
                        let scale = (0..m).flat_map(|r| x.row(r).d.to_vec()).fold(1f32, f32::max) * cols as f32;
                        assert!((g - e).abs() <= 1e-5 * scale, "{path:?} {format:?} cols {cols} [{i}]: {g} vs {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_fills_every_element_of_its_column_block_threaded_or_not() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for (m, rows, cols) in [(1, 5, 128), (3, 300, 128), (9, 700, 576)] {
            let w = random(Format::Q4_1, rows, cols, &mut rng);
            let mut x = Q8Rows::default();
            x.quantize(&activations(m * cols, &mut rng), m, cols);
            let stride = rows + 3;
            let mut y = vec![-7.0f32; m * stride];
            matmul(&w, &x, &mut y, stride);
            for i in 0..m {
                for j in 0..rows {
                    let want = dot_scalar(&w, j, x.row(i));
                    let got = y[i * stride + j];
                    assert!((got - want).abs() <= 1e-3 * (1.0 + want.abs()), "[{i}, {j}]: {got} vs {want}");
                }
                assert!(y[i * stride + rows..(i + 1) * stride].iter().all(|&v| v == -7.0), "row {i} spilled");
            }
        }
    }

    #[test]
    fn stacking_and_selecting_rows_move_whole_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let a = random(Format::Q4_0, 2, 64, &mut rng);
        let b = random(Format::Q4_0, 3, 64, &mut rng);
        let s = QuantMatrix::stack(&[&a, &b]).expect("same format");
        assert_eq!(s.rows(), 5);
        let (da, db, ds) = (a.dequantize(), b.dequantize(), s.dequantize());
        assert_eq!(ds, [da, db].concat());
        let picked = s.select_rows(&[4, 0]);
        assert_eq!(picked.dequantize(), [&ds[4 * 64..5 * 64], &ds[0..64]].concat());
        let c = random(Format::Q8_0, 1, 64, &mut rng);
        assert!(matches!(QuantMatrix::stack(&[&a, &c]), Err(QuantError::Mismatch(_))));
    }

    #[test]
    fn matrices_of_the_wrong_size_are_refused() {
        assert_eq!(QuantMatrix::from_ggml(Format::Q4_1, 2, 40, &[]), Err(QuantError::Ragged { cols: 40 }));
        let e = QuantMatrix::from_ggml(Format::Q8_0, 2, 64, &[0; 100]).expect_err("refused");
        assert_eq!(e, QuantError::Size { format: Format::Q8_0, rows: 2, cols: 64, got: 100, want: 136 });
    }
}
