//! Quantized weights as GGUF stores them, and the CPU kernels that compute on them directly,
//! without dequantizing the matrix: a decode step reads each weight byte once, at a quarter to
//! an eighth of the f32 bandwidth.
//!
//! A weight matrix `[rows, cols]` is a run of blocks per row, each block holding
//! [`BLOCK`] consecutive weights of the row and their scale (ggml's layouts, byte for byte):
//!
//! - `Q8_0`: `f16 d`, `i8 q[32]`; weight `i` is `d·q[i]`;
//! - `Q4_0`: `f16 d`, `u8 q[16]`; weight `i < 16` is `d·((q[i] & 15) − 8)`, weight `16 + i` is
//!   `d·((q[i] >> 4) − 8)`;
//! - `Q4_1`: `f16 d`, `f16 m`, `u8 q[16]`; as `Q4_0` with `d·nibble + m`.
//!
//! A dot product with a row first quantizes the activations to 8 bits per block of 32
//! ([`Q8Row`]: a scale and the block's sum per block), as ggml does, so the inner loop is integer
//! multiply-adds; the error this adds is that of rounding each activation to 1/254 of its
//! block's largest magnitude.
//!
//! The scalar functions here are the specification. The SIMD paths (AVX2 on x86-64, chosen at
//! run time) compute the same integer sums exactly and may differ from the scalar result only
//! in the order the per-block floats are added; the tests hold them to that.

#[cfg(target_arch = "x86_64")]
mod x86;

use half::f16;
use rayon::prelude::*;

/// Weights per block (every format here).
pub const BLOCK: usize = 32;

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Format {
    /// Bytes of one block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
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
}

/// A weight matrix `[rows, cols]` in its quantized form.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantMatrix {
    format: Format,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl QuantMatrix {
    /// Takes `data` (the blocks of every row, row after row) after checking its size.
    pub fn new(format: Format, rows: usize, cols: usize, data: Vec<u8>) -> Result<QuantMatrix, QuantError> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(QuantError::Ragged { cols });
        }
        let want = rows * (cols / BLOCK) * format.block_bytes();
        if data.len() != want {
            return Err(QuantError::Size { format, rows, cols, got: data.len(), want });
        }
        Ok(QuantMatrix { format, rows, cols, data })
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

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// The blocks of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.row_bytes();
        &self.data[r * n..(r + 1) * n]
    }

    /// Row `r` as f32 (for tests and for the rows a GEMM tile needs).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        dequantize(self.format, self.row(r), out);
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes whole blocks of `format` into `out` (one weight per element).
pub fn dequantize(format: Format, blocks: &[u8], out: &mut [f32]) {
    for (blk, out) in blocks.chunks_exact(format.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
        let d = f16_at(blk, 0);
        match format {
            Format::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(&blk[2..34]) {
                    *o = d * f32::from(q as i8);
                }
            }
            Format::Q4_0 | Format::Q4_1 => {
                let (offset, m, q) = match format {
                    Format::Q4_0 => (8.0, 0.0, &blk[2..18]),
                    _ => (0.0, f16_at(blk, 2), &blk[4..20]),
                };
                let (lo, hi) = out.split_at_mut(16);
                for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(q) {
                    *l = (f32::from(b & 15) - offset) * d + m;
                    *h = (f32::from(b >> 4) - offset) * d + m;
                }
            }
        }
    }
}

/// A row of activations quantized for dot products: per block of [`BLOCK`], a scale `d` (the
/// block's largest magnitude over 127), the 8-bit values, and `d` times their sum (what a
/// `Q4_1` weight's offset multiplies).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Q8Row {
    pub d: Vec<f32>,
    pub sum: Vec<f32>,
    pub q: Vec<i8>,
}

/// Quantizes `x` (a whole number of blocks) into `out`, reusing its buffers.
pub fn quantize_row(x: &[f32], out: &mut Q8Row) {
    let blocks = x.len() / BLOCK;
    out.d.clear();
    out.sum.clear();
    out.q.clear();
    out.q.reserve(blocks * BLOCK);
    for block in x.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut total = 0i32;
        for &v in block {
            // |v · inv| <= 127: the cast cannot saturate.
            let q = (v * inv).round() as i8;
            total += i32::from(q);
            out.q.push(q);
        }
        out.d.push(d);
        out.sum.push(d * total as f32);
    }
}

/// The dot product of one row's blocks with quantized activations: the specification.
pub fn dot_scalar(format: Format, row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(format.block_bytes()).enumerate() {
        let q8 = &x.q[b * BLOCK..(b + 1) * BLOCK];
        let d = f16_at(blk, 0) * x.d[b];
        match format {
            Format::Q8_0 => {
                let s: i32 = blk[2..34].iter().zip(q8).map(|(&w, &a)| i32::from(w as i8) * i32::from(a)).sum();
                acc += d * s as f32;
            }
            Format::Q4_0 | Format::Q4_1 => {
                let (offset, qs) = match format {
                    Format::Q4_0 => (8, &blk[2..18]),
                    _ => (0, &blk[4..20]),
                };
                let mut s = 0i32;
                for (i, &b) in qs.iter().enumerate() {
                    s += (i32::from(b & 15) - offset) * i32::from(q8[i]);
                    s += (i32::from(b >> 4) - offset) * i32::from(q8[i + 16]);
                }
                acc += d * s as f32;
                if format == Format::Q4_1 {
                    acc += f16_at(blk, 2) * x.sum[b];
                }
            }
        }
    }
    acc
}

/// The dot product of one row's blocks with quantized activations, on the fastest path this
/// CPU has.
pub fn dot(format: Format, row: &[u8], x: &Q8Row) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some(avx2) = x86::Avx2::detect() {
        return avx2.dot(format, row, x);
    }
    dot_scalar(format, row, x)
}

/// Rows below which a product runs on the calling thread.
const PARALLEL_MIN_ROWS: usize = 64;

/// `y[r] = w[r] · x` for every row of `w`: a decode step's linear layer, spread over rayon's
/// threads by rows (bandwidth-bound: each weight byte is read once).
pub fn matvec(w: &QuantMatrix, x: &Q8Row, y: &mut [f32]) {
    assert!(x.q.len() == w.cols && y.len() >= w.rows, "matvec: shapes do not match");
    let row_bytes = w.row_bytes();
    let rows = w.data.par_chunks_exact(row_bytes).zip(y[..w.rows].par_iter_mut());
    if w.rows < PARALLEL_MIN_ROWS {
        w.data.chunks_exact(row_bytes).zip(y.iter_mut()).for_each(|(row, y)| *y = dot(w.format, row, x));
    } else {
        rows.with_min_len(PARALLEL_MIN_ROWS / 4).for_each(|(row, y)| *y = dot(w.format, row, x));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A random matrix in `format`: random scales (and offsets) and random quants.
    fn random(format: Format, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QuantMatrix {
        let blocks = rows * cols / BLOCK;
        let mut data = Vec::with_capacity(blocks * format.block_bytes());
        for _ in 0..blocks {
            data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
            if format == Format::Q4_1 {
                data.extend_from_slice(&f16::from_f32(rng.random_range(-0.2..0.2)).to_le_bytes());
            }
            let n = if format == Format::Q8_0 { 32 } else { 16 };
            data.extend((0..n).map(|_| rng.random::<u8>()));
        }
        QuantMatrix::new(format, rows, cols, data).expect("sized right")
    }

    fn activations(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|i| rng.random_range(-2.0..2.0) * if i % 7 == 0 { 4.0 } else { 1.0 }).collect()
    }

    #[test]
    fn the_quantized_dot_is_the_f32_dot_of_the_dequantized_row_to_within_activation_rounding() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for format in [Format::Q8_0, Format::Q4_0, Format::Q4_1] {
            let (rows, cols) = (16, 256);
            let w = random(format, rows, cols, &mut rng);
            let x = activations(cols, &mut rng);
            let mut q = Q8Row::default();
            quantize_row(&x, &mut q);
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
                let got = f64::from(dot_scalar(format, w.row(r), &q));
                assert!(
                    (got - exact).abs() <= bound * 1.01 + 1e-5,
                    "{format:?} row {r}: {got} vs {exact} (bound {bound})"
                );
            }
        }
    }

    #[test]
    fn every_simd_path_this_cpu_has_agrees_with_the_scalar_specification() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for format in [Format::Q8_0, Format::Q4_0, Format::Q4_1] {
            for cols in [32, 64, 96, 576, 1536] {
                let w = random(format, 8, cols, &mut rng);
                let mut q = Q8Row::default();
                quantize_row(&activations(cols, &mut rng), &mut q);
                for r in 0..8 {
                    let want = dot_scalar(format, w.row(r), &q);
                    let got = dot(format, w.row(r), &q);
                    // The same integer sums; only the order of the per-block float adds differs.
                    let scale = q.d.iter().fold(1f32, |m, d| m.max(d.abs())) * cols as f32;
                    assert!((got - want).abs() <= 1e-5 * scale, "{format:?} cols {cols} row {r}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn matvec_computes_every_row_threaded_or_not() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for rows in [5, 300] {
            let w = random(Format::Q4_1, rows, 128, &mut rng);
            let mut q = Q8Row::default();
            quantize_row(&activations(128, &mut rng), &mut q);
            let mut y = vec![f32::NAN; rows];
            matvec(&w, &q, &mut y);
            for (r, &y) in y.iter().enumerate() {
                assert_eq!(y, dot(Format::Q4_1, w.row(r), &q), "row {r}");
            }
        }
    }

    #[test]
    fn matrices_of_the_wrong_size_are_refused() {
        assert_eq!(QuantMatrix::new(Format::Q4_1, 2, 40, vec![]), Err(QuantError::Ragged { cols: 40 }));
        let e = QuantMatrix::new(Format::Q8_0, 2, 64, vec![0; 100]).expect_err("refused");
        assert_eq!(e, QuantError::Size { format: Format::Q8_0, rows: 2, cols: 64, got: 100, want: 136 });
    }
}
