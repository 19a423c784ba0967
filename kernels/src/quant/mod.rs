//! Quantized weights, and the CPU kernels that compute on them directly without dequantizing the
//! matrix: a decode step reads each weight byte once, at a quarter to an eighth of the f32
//! bandwidth, and prefill multiplies 8-bit integers.
//!
//! # Formats
//! GGUF's block formats, [`BLOCK`] consecutive weights of a row per block, each with its scale:
//! - `Q8_0`: `f16 d`, `i8 q[32]`; weight `i` is `d·q[i]`;
//! - `Q4_0`: `f16 d`, `u8 q[16]`; weight `i < 16` is `d·((q[i] & 15) − 8)`, weight `16 + i` is
//!   `d·((q[i] >> 4) − 8)`;
//! - `Q4_1`: `f16 d`, `f16 m`, `u8 q[16]`; as `Q4_0` with `d·nibble + m`;
//! - `Q5_0`: `f16 d`, `u8 qh[4]`, `u8 q[16]`; as `Q4_0` with a fifth bit from bit `i` of the
//!   32-bit `qh` and an offset of 16: weight `i` is `d·(q5_i − 16)`;
//! - `Q5_1`: `f16 d`, `f16 m`, `u8 qh[4]`, `u8 q[16]`; as `Q5_0` with `d·q5 + m`;
//! - `Q4_K`: super-blocks of 256 weights, `f16 d`, `f16 dmin`, eight 6-bit pairs `(s_j, n_j)`
//!   packed in 12 bytes, `u8 q[128]`; weight `i` of sub-block `j` (32 weights) is
//!   `d·s_j·nibble − dmin·n_j`, the nibbles of sub-blocks `2c` and `2c + 1` being the low and
//!   high halves of bytes `32c..32c + 32`. Each sub-block is a `Q4_1` block whose scale `d·s_j`
//!   and offset `−dmin·n_j` need 17 significant bits: the kernels make them in f32, which holds
//!   them exactly, from `s_j` and `n_j` (a byte each) and the super-block's `d` and `−dmin`;
//! - `Q6_K`: super-blocks of 256 weights, `u8 ql[128]` (low four bits), `u8 qh[64]` (high two
//!   bits), `i8 s[16]`, `f16 d`; weight `t` is `d·s[t / 16]·(q_t − 32)` with the 6-bit `q_t`
//!   spread over `ql` and `qh` as ggml's `dequantize_row_q6_K` reads them. Each 32 weights are
//!   a block of 8-bit quants with one scale `d·s` (made exactly in f32 from the two) for each
//!   half of 16;
//! - `Q5_K`: super-blocks of 256 weights, `f16 d`, `f16 dmin`, the 12 bytes of 6-bit pairs as
//!   `Q4_K`'s, `u8 qh[32]`, `u8 q[128]`; as `Q4_K` with a fifth bit, bit `j` of `qh[i]` for
//!   weight `i` of sub-block `j`. Each sub-block is a block of byte quants with `Q4_K`'s scale
//!   and offset.
//!
//! The 5-bit formats' quants are stored a byte each (a format that also packed the fifth bits
//! would unpack them in every kernel): 8.5 bits a weight for `Q5_0`, 9 for `Q5_1` and 8.75
//! for `Q5_K`, against 5.5, 6 and 5.5 in the file (and `Q6_K`'s six bits, 8.625 for 6.5625;
//! `Q4_K` is 4.75 bits for 4.5). llama.cpp's K-quant files fall back to `Q5_0`
//! and `Q5_1` for rows that are not a whole number of 256-weight super-blocks.
//!
//! # Layout in memory
//! [`QuantMatrix::from_ggml`] repacks a matrix once, at load, into a layout made for 64-byte
//! vectors, with the same bits per weight: every quant, scale and offset is kept exactly. Rows
//! are taken [`PANEL`] (16) at a time, one per 32-bit lane of a vector (the last panel is padded
//! with zero rows). A panel is stored block after block; each of its blocks (the same 32 columns
//! of its 16 rows) holds
//!
//! - the quants, unsigned (`Q8_0` as `q + 128`), in 64-byte vectors whose lane `j` holds four
//!   consecutive weights of row `j`: for the formats stored a byte a quant (`Q8_0`, the `Q5`
//!   formats, `Q6_K`), vector `k` (of 8) holds weights `4k..4k + 4`; for the 4-bit ones, vector
//!   `k` (of 4) holds weights `4k..4k + 4` in its low nibbles and `16 + 4k..16 + 4k + 4` in its
//!   high ones;
//! - the 16 rows' scales `d` (f16; for the K formats the 8-bit integer `s_j` or `s[t / 16]`);
//! - for `Q4_1`, `Q5_1`, `Q4_K` and `Q5_K`, the 16 rows' offsets `m` (f16; for the K formats
//!   the 8-bit `n_j`); for `Q6_K`, the 16 rows' scales of the block's second half (8-bit).
//!
//! After its blocks, a K format's panel holds each super-block's f32 scales ([`SUPER`] blocks
//! each): the 16 rows' `d`, and for `Q4_K` and `Q5_K` their `−dmin`. A kernel multiplies a
//! block's integers by them (products exact in f32): the K formats keep the file's 6- or
//! 8-bit scales at a byte each, not the products at four.
//!
//! So weight `i` of a row's block is `d·(u_i − o) + m`, with the format's offset `o` (128 for
//! `Q8_0`, 8 for `Q4_0`, 16 for `Q5_0`, 32 for `Q6_K`, else 0) and `m = 0` for the formats
//! without offsets (`Q6_K`'s second half has its own `d`); and one vector of quants times four activations
//! broadcast to every lane gives four multiply-adds for each of 16 output rows, which land side
//! by side.
//!
//! # Dot products
//! Activations are first quantized per block ([`Q8Rows`], as ggml's `Q8_1`: a scale `e_b`,
//! integers `q_i` with `x_i ≈ e_b·q_i`, and `s_b = e_b·Σq`). A row's dot product is then
//! `Σ_b d_b·e_b·Σ_i u_i·q_i + Σ_b (m_b − o·d_b)·s_b`: integer multiply-adds inside a block,
//! one float multiply-add per block (for `Q6_K`, one per half block, with the integer totals of
//! each half's activations that [`Q8Rows`] keeps for it). The only error beyond f32 rounding is
//! the activations' rounding: to within 1/254 of their block's largest magnitude with 8-bit `q`
//! ([`Precision::Int8`], llama.cpp's arithmetic), or to within 1/64516 of it with
//! `q = 254·h + l` in two 8-bit limbs ([`Precision::Int16`]), whose integer sum is
//! `254·Σu·h + Σu·l`: the same 8-bit products twice, on weights unpacked once.
//!
//! [`dot_scalar`] is the specification. The SIMD paths (AVX-512 VNNI and AVX2 on x86-64, NEON
//! with the dot-product extension on aarch64) are chosen at run time; they compute the same
//! integer sums exactly (`Q8_0`'s as `Σ(u − 128)·q` where a path multiplies signed bytes only,
//! the offsets' term then being in it) and may differ from the specification only in the order
//! float terms are added. The tests hold every path this CPU has to that; `scripts/test` also
//! runs them for aarch64 under `qemu-aarch64`. Other CPUs run the specification.

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod simd;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

use half::f16;
use rayon::prelude::*;
use std::sync::{Mutex, PoisonError};

/// Weights per block (every format here).
pub const BLOCK: usize = 32;
/// Weight rows interleaved in one panel: one per 32-bit lane of a 64-byte vector.
pub const PANEL: usize = 16;
/// Blocks of [`BLOCK`] in a K format's super-block.
pub(crate) const SUPER: usize = 8;

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q8_0,
    Q4_0,
    Q4_1,
    #[allow(non_camel_case_types)] // GGUF's names, as the others
    Q4_K,
    #[allow(non_camel_case_types)]
    Q6_K,
    Q5_0,
    Q5_1,
    #[allow(non_camel_case_types)]
    Q5_K,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 8] = [
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q4_K,
        Format::Q6_K,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q5_K,
    ];

    /// Weights of one block in GGUF (a row is a whole number of them).
    pub const fn ggml_block_weights(self) -> usize {
        match self {
            Format::Q4_K | Format::Q5_K | Format::Q6_K => 256,
            _ => BLOCK,
        }
    }

    /// Bytes of one block in GGUF.
    pub const fn ggml_block_bytes(self) -> usize {
        match self {
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Q4_K => 144,
            Format::Q6_K => 210,
            Format::Q5_0 => 22,
            Format::Q5_1 => 24,
            Format::Q5_K => 176,
        }
    }

    /// Bytes of a panel's quants for one block (16 rows of 32 weights).
    const fn quant_bytes(self) -> usize {
        if self.byte_quants() { 512 } else { 256 }
    }

    /// Whether quants are stored a byte each (`Q8_0`, and the 5 and 6 bits of the `Q5` formats
    /// and `Q6_K`), not as nibbles.
    const fn byte_quants(self) -> bool {
        matches!(self, Format::Q8_0 | Format::Q5_0 | Format::Q5_1 | Format::Q5_K | Format::Q6_K)
    }

    /// Whether blocks carry an offset `m`.
    const fn has_offsets(self) -> bool {
        matches!(self, Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K)
    }

    /// Whether each half of a block has its own scale (`Q6_K`'s 16-weight sub-blocks).
    const fn has_half_scales(self) -> bool {
        matches!(self, Format::Q6_K)
    }

    /// Whether the format has super-blocks of [`SUPER`] blocks whose scales (f32) multiply a
    /// small integer scale (and offset) of each block: the K formats.
    pub(crate) const fn is_k(self) -> bool {
        matches!(self, Format::Q4_K | Format::Q5_K | Format::Q6_K)
    }

    /// Bytes of one scale or offset in a panel's block: f16, or for the K formats the 8-bit
    /// integer that multiplies its super-block's scale.
    const fn scale_bytes(self) -> usize {
        if self.is_k() { 1 } else { 2 }
    }

    /// Bytes of a panel's block: the quants, 16 scales, and 16 offsets or second-half scales
    /// where there are any.
    const fn block_bytes(self) -> usize {
        let per_row = if self.has_offsets() || self.has_half_scales() { 2 } else { 1 };
        self.quant_bytes() + PANEL * self.scale_bytes() * per_row
    }

    /// Bytes of a panel's super-block scales (K formats): 16 f32 `d`, and with offsets 16 f32
    /// `−dmin`.
    const fn super_bytes(self) -> usize {
        match self {
            Format::Q4_K | Format::Q5_K => 2 * 4 * PANEL,
            Format::Q6_K => 4 * PANEL,
            _ => 0,
        }
    }

    /// Bytes of a panel of `blocks` blocks: the blocks, then (K formats) the super-blocks'
    /// scales.
    pub(crate) const fn panel_bytes(self, blocks: usize) -> usize {
        blocks * self.block_bytes() + blocks / SUPER * self.super_bytes()
    }

    /// What the unsigned quants carry over the signed value they stand for.
    const fn offset(self) -> f32 {
        match self {
            Format::Q8_0 => 128.0,
            Format::Q4_0 => 8.0,
            Format::Q5_0 => 16.0,
            Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => 0.0,
            Format::Q6_K => 32.0,
        }
    }
}

/// Why a quantized matrix could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("a row of {cols} weights is not a whole number of {block}-weight blocks")]
    Ragged { cols: usize, block: usize },
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

/// One block of one row, unpacked: the unsigned quants, the scale, the offset (zero for
/// `Q8_0`, `Q4_0` and `Q6_K`), and the scale of the block's second half (`d` but for `Q6_K`).
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    u: [u8; BLOCK],
    d: f32,
    m: f32,
    d_hi: f32,
    /// K formats: the super-block's scale and `−dmin` (f16 values), and the block's integer
    /// scale and offset (`Q6_K`: its halves' scales), whose products are `d`, `m` (`d_hi`).
    k: KScales,
}

/// A K-format block's scales as stored: `d = sd·s`, `m = sm·n` (`Q6_K`: `d_hi = sd·n`).
#[derive(Debug, Clone, Copy, Default)]
struct KScales {
    sd: f32,
    sm: f32,
    s: i8,
    n: i8,
}

/// The f16 at `src[i..i + 2]`, as f32.
fn f16_at(src: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([src[i], src[i + 1]]).to_f32()
}

impl Block {
    /// The scale of weight `i`.
    fn d(&self, i: usize) -> f32 {
        if i < BLOCK / 2 { self.d } else { self.d_hi }
    }

    /// Block `j` of the GGUF block `src` (`j` is 0 except in `Q4_K`'s super-blocks).
    fn from_ggml(format: Format, src: &[u8], j: usize) -> Block {
        let mut block = Block { d: f16_at(src, 0), ..Block::default() };
        match format {
            Format::Q8_0 => {
                for (u, &q) in block.u.iter_mut().zip(&src[2..34]) {
                    *u = q ^ 0x80; // i8 q as u8 q + 128
                }
            }
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q5_1 => {
                // After d (and m): the 32 fifth bits of the Q5 formats, then the nibbles.
                let at = if matches!(format, Format::Q4_1 | Format::Q5_1) { 4 } else { 2 };
                if at == 4 {
                    block.m = f16_at(src, 2);
                }
                let (high, qs) = if matches!(format, Format::Q5_0 | Format::Q5_1) {
                    (u32::from_le_bytes([src[at], src[at + 1], src[at + 2], src[at + 3]]), &src[at + 4..at + 20])
                } else {
                    (0, &src[at..at + 16])
                };
                for (i, &q) in qs.iter().enumerate() {
                    block.u[i] = q & 15;
                    block.u[i + 16] = q >> 4;
                }
                for (i, u) in block.u.iter_mut().enumerate() {
                    *u |= (((high >> i) & 1) as u8) << 4;
                }
            }
            Format::Q4_K | Format::Q5_K => {
                // Sub-block j's 6-bit scale and offset: j < 4 in the low six bits of bytes j and
                // j + 4; j >= 4 in the nibbles of byte j + 4, with two high bits each from the
                // top of bytes j − 4 and j.
                let packed = &src[4..16];
                let (s, n) = if j < 4 {
                    (packed[j] & 63, packed[j + 4] & 63)
                } else {
                    ((packed[j + 4] & 15) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
                };
                // Products of an f16 and a 6-bit integer: exact in f32.
                block.k = KScales { sd: block.d, sm: -f16_at(src, 2), s: s as i8, n: n as i8 };
                block.d *= f32::from(s);
                block.m = block.k.sm * f32::from(n);
                // Q5_K: weight i's fifth bit is bit j of qh[i], and the nibbles follow qh.
                let at = if format == Format::Q5_K { 48 } else { 16 } + 32 * (j / 2);
                for (i, (u, &q)) in block.u.iter_mut().zip(&src[at..at + 32]).enumerate() {
                    *u = if j.is_multiple_of(2) { q & 15 } else { q >> 4 };
                    if format == Format::Q5_K {
                        *u |= ((src[16 + i] >> j) & 1) << 4;
                    }
                }
            }
            Format::Q6_K => {
                // Weights 32j + i: in super-block half h = j / 4, group g = j % 4 of 32, the
                // low four bits are a nibble of ql[64h + 32·(g & 1) + i] (the high nibble for
                // g >= 2), the high two are bits 2g, 2g + 1 of qh[32h + i].
                let (h, g) = (j / 4, j % 4);
                for (i, u) in block.u.iter_mut().enumerate() {
                    let low = src[64 * h + 32 * (g & 1) + i];
                    let low = if g < 2 { low & 15 } else { low >> 4 };
                    *u = low | (((src[128 + 32 * h + i] >> (2 * g)) & 3) << 4);
                }
                // Products of an f16 and an 8-bit integer: exact in f32.
                let d = f16_at(src, 208);
                let (s, n) = (src[192 + 2 * j] as i8, src[192 + 2 * j + 1] as i8);
                block.k = KScales { sd: d, sm: 0.0, s, n };
                block.d = d * f32::from(s);
                block.d_hi = d * f32::from(n);
                return block;
            }
        }
        block.d_hi = block.d;
        block
    }
}

impl QuantMatrix {
    /// Repacks `data`, the GGUF blocks of every row, row after row, after checking its size.
    pub fn from_ggml(format: Format, rows: usize, cols: usize, data: &[u8]) -> Result<QuantMatrix, QuantError> {
        let (weights, bytes) = (format.ggml_block_weights(), format.ggml_block_bytes());
        if !cols.is_multiple_of(weights) {
            return Err(QuantError::Ragged { cols, block: weights });
        }
        let want = rows * cols / weights * bytes;
        if data.len() != want {
            return Err(QuantError::Size { format, rows, cols, got: data.len(), want });
        }
        // Blocks of 32 weights in one GGUF block.
        let per = weights / BLOCK;
        let blocks = cols / weights;
        Ok(QuantMatrix::from_blocks(format, rows, cols, |r, b| {
            let at = (r * blocks + b / per) * bytes;
            Block::from_ggml(format, &data[at..at + bytes], b % per)
        }))
    }

    /// A matrix whose block `b` of row `r` is `block(r, b)`, built a panel per task.
    fn from_blocks(
        format: Format,
        rows: usize,
        cols: usize,
        block: impl Fn(usize, usize) -> Block + Sync,
    ) -> QuantMatrix {
        let mut out = QuantMatrix { format, rows, cols, data: Vec::new() };
        let panel_bytes = out.panel_bytes();
        out.data = weight_buffer(out.panels() * panel_bytes);
        let blocks_bytes = out.blocks() * format.block_bytes();
        out.data.par_chunks_mut(panel_bytes.max(1)).enumerate().for_each(|(p, panel)| {
            let (blocks, supers) = panel.split_at_mut(blocks_bytes);
            for lane in 0..PANEL.min(rows - p * PANEL) {
                for (b, dst) in blocks.chunks_exact_mut(format.block_bytes()).enumerate() {
                    let block = block(p * PANEL + lane, b);
                    put(format, dst, lane, &block);
                    if format.is_k() && b.is_multiple_of(SUPER) {
                        let at = b / SUPER * format.super_bytes() + 4 * lane;
                        supers[at..at + 4].copy_from_slice(&block.k.sd.to_le_bytes());
                        if format.has_offsets() {
                            supers[at + 4 * PANEL..at + 4 * PANEL + 4].copy_from_slice(&block.k.sm.to_le_bytes());
                        }
                    }
                }
            }
        });
        out
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
        // Row r of the stack: (part, row within it).
        let origin: Vec<(usize, usize)> =
            parts.iter().enumerate().flat_map(|(i, p)| (0..p.rows).map(move |r| (i, r))).collect();
        Ok(QuantMatrix::from_blocks(first.format, origin.len(), first.cols, |r, b| {
            let (i, row) = origin[r];
            parts[i].block(row, b)
        }))
    }

    /// The matrix with its rows in the order `order` gives (`order[i]` is the row placed at `i`).
    ///
    /// # Panics
    /// When `order` names a row that does not exist.
    pub fn select_rows(&self, order: &[usize]) -> QuantMatrix {
        assert!(order.iter().all(|&r| r < self.rows), "select_rows: no such row");
        QuantMatrix::from_blocks(self.format, order.len(), self.cols, |r, b| self.block(order[r], b))
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

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    fn panels(&self) -> usize {
        self.rows.div_ceil(PANEL)
    }

    fn panel_bytes(&self) -> usize {
        self.format.panel_bytes(self.blocks())
    }

    /// Panel `p`'s bytes.
    fn panel(&self, p: usize) -> &[u8] {
        let n = self.panel_bytes();
        &self.data[p * n..(p + 1) * n]
    }

    /// Block `b` of row `r`, unpacked.
    fn block(&self, r: usize, b: usize) -> Block {
        let format = self.format;
        let (panel, at) = (self.panel(r / PANEL), b * format.block_bytes());
        let src = &panel[at..at + format.block_bytes()];
        let lane = r % PANEL;
        let mut block = Block::default();
        for k in 0..format.quant_bytes() / 64 {
            let four = &src[64 * k + 4 * lane..64 * k + 4 * lane + 4];
            for (t, &byte) in four.iter().enumerate() {
                if format.byte_quants() {
                    block.u[4 * k + t] = byte;
                } else {
                    block.u[4 * k + t] = byte & 15;
                    block.u[16 + 4 * k + t] = byte >> 4;
                }
            }
        }
        let (scales, width) = (format.quant_bytes(), format.scale_bytes());
        if format.is_k() {
            // The super-block's scales after the blocks, then the products (exact in f32).
            let supers = &panel[self.blocks() * format.block_bytes()..];
            let at = b / SUPER * format.super_bytes() + 4 * lane;
            let f32_at = |i: usize| f32::from_le_bytes([supers[i], supers[i + 1], supers[i + 2], supers[i + 3]]);
            let sm = if format.has_offsets() { f32_at(at + 4 * PANEL) } else { 0.0 };
            let k = KScales { sd: f32_at(at), sm, s: src[scales + lane] as i8, n: src[scales + PANEL + lane] as i8 };
            block.d = k.sd * f32::from(k.s);
            if format.has_offsets() {
                block.m = k.sm * f32::from(k.n);
                block.d_hi = block.d;
            } else {
                block.d_hi = k.sd * f32::from(k.n);
            }
            block.k = k;
            return block;
        }
        block.d = f16_at(src, scales + width * lane);
        block.d_hi = block.d;
        if format.has_offsets() {
            block.m = f16_at(src, scales + width * (PANEL + lane));
        } else if format.has_half_scales() {
            block.d_hi = f16_at(src, scales + width * (PANEL + lane));
        }
        block
    }

    /// Row `r` as f32 (`out` holds `cols` values).
    ///
    /// # Panics
    /// When there is no row `r` (a caller bug: token ids are checked against the vocabulary
    /// before they reach an embedding).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "dequantize_row: row {r} of {}", self.rows);
        let o = self.format.offset();
        for (b, values) in out[..self.cols].chunks_exact_mut(BLOCK).enumerate() {
            let block = self.block(r, b);
            for (i, (v, &u)) in values.iter_mut().zip(&block.u).enumerate() {
                *v = block.d(i) * (f32::from(u) - o) + block.m;
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

/// Writes `block` as lane `lane` of a panel's block (`dst`, one block's bytes).
fn put(format: Format, dst: &mut [u8], lane: usize, block: &Block) {
    for k in 0..format.quant_bytes() / 64 {
        let four = &mut dst[64 * k + 4 * lane..64 * k + 4 * lane + 4];
        for (t, byte) in four.iter_mut().enumerate() {
            *byte = if format.byte_quants() {
                block.u[4 * k + t]
            } else {
                block.u[4 * k + t] | (block.u[16 + 4 * k + t] << 4)
            };
        }
    }
    let (scales, width) = (format.quant_bytes(), format.scale_bytes());
    if format.is_k() {
        // The integers; the super-block's scales go after the panel's blocks (`from_blocks`).
        dst[scales + lane] = block.k.s as u8;
        dst[scales + PANEL + lane] = block.k.n as u8;
        return;
    }
    // The values came from f16: converting back is exact.
    let mut store = |at: usize, v: f32| dst[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
    store(scales + width * lane, block.d);
    if format.has_offsets() {
        store(scales + width * (PANEL + lane), block.m);
    } else if format.has_half_scales() {
        store(scales + width * (PANEL + lane), block.d_hi);
    }
}

/// How finely [`Q8Rows`] holds activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// One 8-bit value each, as ggml's `Q8_1`: `x ≈ e·q` with `e` the block's largest
    /// magnitude over 127, so rounded to within 1/254 of that magnitude.
    #[default]
    Int8,
    /// Two 8-bit limbs each, `x ≈ (e/254)·(254·h + l)`: `h` as `Int8`'s `q`, and `l` the
    /// remainder (within half a step) in 254ths of a step, so within ±127 and the value rounded
    /// to within 1/64516 of the block's largest magnitude. Twice the integer multiply-adds, on
    /// weights unpacked once for both limbs.
    Int16,
}

/// The weight of the high limb in [`Precision::Int16`]'s `254·h + l`.
const LIMB: i32 = 254;

impl Precision {
    fn limbs(self) -> usize {
        match self {
            Precision::Int8 => 1,
            Precision::Int16 => 2,
        }
    }
}

/// Rows of activations quantized for dot products, as ggml's `Q8_1`: per block of [`BLOCK`], a
/// scale `e`, the integer values `q` (one or two 8-bit limbs, [`Precision`]) with `x ≈ e·q`,
/// `e·Σq`, and the integer `Σq` of each half block (for `Q6_K`'s half-block scales).
#[derive(Debug, Clone, Default)]
pub struct Q8Rows {
    rows: usize,
    /// Blocks per row.
    blocks: usize,
    precision: Precision,
    /// Per row, the high limbs of every block, then (`Int16`) the low limbs.
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<f32>,
    /// Per block, `Σq` of its first and second halves (with two limbs, `Σ(254·h + l)`).
    halves: Vec<i32>,
}

/// The same rows quantized alike (the buffers hold more than the rows where earlier rows were
/// wider).
impl PartialEq for Q8Rows {
    fn eq(&self, other: &Q8Rows) -> bool {
        (self.rows, self.blocks, self.precision) == (other.rows, other.blocks, other.precision)
            && (0..self.rows).all(|r| {
                let (a, b) = (self.row(r), other.row(r));
                (a.q, a.lo, a.d, a.sum, a.halves) == (b.q, b.lo, b.d, b.sum, b.halves)
            })
    }
}

/// `v` at least `len` long (what is past the rows in use keeps stale values).
fn fit<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Quantizes one row's values into its place in a [`Q8Rows`] ([`Q8Rows::quantize_each`]).
type Quantize<'a> = dyn FnMut(&[f32]) + 'a;

/// One row of [`Q8Rows`].
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    /// The values (`Int8`) or their high limbs (`Int16`).
    q: &'a [i8],
    /// The low limbs (`Int16`); empty for `Int8`.
    lo: &'a [i8],
    d: &'a [f32],
    sum: &'a [f32],
    halves: &'a [i32],
}

impl Q8Rows {
    /// Quantizes `rows` rows of `cols` values (a whole number of blocks) from `x` to
    /// `precision`, reusing this value's buffers.
    ///
    /// # Panics
    /// When `cols` is not a whole number of blocks or `x` is too short (caller bugs).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize, precision: Precision) {
        self.quantize_on(Path::detect(), x, rows, cols, precision);
    }

    /// [`Q8Rows::quantize`] on `path` (AVX-512 has its own rounding loop; the others run the
    /// scalar one, which is the specification: every path gives the same bits for finite input).
    pub fn quantize_on(&mut self, path: Path, x: &[f32], rows: usize, cols: usize, precision: Precision) {
        assert!(x.len() >= rows * cols, "quantize: bad shape");
        self.quantize_each(path, rows, cols, precision, &|r, quantize| quantize(&x[r * cols..(r + 1) * cols]));
    }

    /// [`Q8Rows::quantize`] of rows that `make(r, row)` first writes into row `r` of `x`: an
    /// element-wise step and the quantization of what it writes in one parallel section (a
    /// decode step's norms and SwiGLU before their products).
    ///
    /// # Panics
    /// When `cols` is not a whole number of blocks or `x` is too short (caller bugs).
    pub fn quantize_made(
        &mut self,
        x: &mut [f32],
        rows: usize,
        cols: usize,
        precision: Precision,
        make: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        assert!(x.len() >= rows * cols, "quantize: bad shape");
        let xs = crate::team::Rows::new(&mut x[..rows * cols], cols);
        self.quantize_each(Path::detect(), rows, cols, precision, &|r, quantize| {
            let mut row = xs.row(r);
            make(r, &mut row);
            quantize(&row);
        });
    }

    /// Sizes the buffers for `rows` rows of `cols` values and runs `each(r, quantize)` for
    /// every row `r`, a share of the rows per task, where `quantize(values)` quantizes row `r`.
    fn quantize_each(
        &mut self,
        path: Path,
        rows: usize,
        cols: usize,
        precision: Precision,
        each: &(dyn Fn(usize, &mut Quantize<'_>) + Sync),
    ) {
        assert!(cols.is_multiple_of(BLOCK), "quantize: bad shape");
        let blocks = cols / BLOCK;
        let row_q = precision.limbs() * cols;
        self.rows = rows;
        self.blocks = blocks;
        self.precision = precision;
        // The buffers only grow: a step's products alternate between input widths, and zeroing
        // what a wider input needs again each time measured a few percent of a decode step.
        fit(&mut self.q, rows * row_q);
        fit(&mut self.d, rows * blocks);
        fit(&mut self.sum, rows * blocks);
        fit(&mut self.halves, 2 * rows * blocks);
        if rows == 0 || cols == 0 {
            return;
        }
        // A share of the rows per thread (the team is awake between a step's sections, so even
        // a decode step's few rows split), at most about 16K values a task.
        let per_task = rows.div_ceil(crate::team::threads()).clamp(1, (1 << 14) / cols + 1);
        let tasks: Vec<Mutex<_>> = self.q[..rows * row_q]
            .chunks_mut(row_q * per_task)
            .zip(self.d[..rows * blocks].chunks_mut(blocks * per_task))
            .zip(self.sum[..rows * blocks].chunks_mut(blocks * per_task))
            .zip(self.halves[..2 * rows * blocks].chunks_mut(2 * blocks * per_task))
            .map(Mutex::new)
            .collect();
        crate::team::for_each(tasks.len(), &|t| {
            // Each task locks its own rows: never contended.
            let mut task = tasks[t].lock().unwrap_or_else(PoisonError::into_inner);
            let (((q, d), sum), halves) = &mut *task;
            let parts = q.chunks_exact_mut(row_q).zip(d.chunks_exact_mut(blocks)).zip(sum.chunks_exact_mut(blocks));
            for (i, (((q, d), sum), halves)) in parts.zip(halves.chunks_exact_mut(2 * blocks)).enumerate() {
                each(t * per_task + i, &mut |x| path.quantize_row(x, q, d, sum, halves));
            }
        });
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let (n, cols) = (self.blocks, self.blocks * BLOCK);
        let q = &self.q[r * self.precision.limbs() * cols..(r + 1) * self.precision.limbs() * cols];
        let (q, lo) = q.split_at(cols);
        let (d, sum, halves) =
            (&self.d[r * n..(r + 1) * n], &self.sum[r * n..(r + 1) * n], &self.halves[2 * r * n..2 * (r + 1) * n]);
        Q8Row { q, lo, d, sum, halves }
    }
}

/// `v` rounded to the nearest integer (ties to even), for |v| < 2²²: adding 1.5·2²³ leaves the
/// integer in the low mantissa bits. A few instructions, where `round` is a call into libm.
fn round(v: f32) -> i32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// One row: `q` has room for one or two limbs of `x`'s values (the precision), `d` and `sum`
/// for its blocks, `halves` for two values a block. The specification of every path's rounding.
fn quantize_row(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32], halves: &mut [i32]) {
    let (q, lo) = q.split_at_mut(x.len());
    for (b, block) in x.chunks_exact(BLOCK).enumerate() {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        // A block too small for a normal scale (or all zeros) quantizes to zeros.
        let inv = if scale.is_normal() { 1.0 / scale } else { 0.0 };
        let values = b * BLOCK..(b + 1) * BLOCK;
        // The integer totals of the block's two halves.
        let mut totals = [0i32; 2];
        // |v · inv| <= 127 and the remainder is within half a step, so |254 · remainder| <= 127:
        // the clamps change nothing but a NaN activation's garbage, which they keep in range.
        if lo.is_empty() {
            for (i, (o, &v)) in q[values].iter_mut().zip(block).enumerate() {
                *o = round(v * inv).clamp(-127, 127) as i8;
                totals[i / 16] += i32::from(*o);
            }
            d[b] = scale;
        } else {
            for (i, ((o, l), &v)) in q[values.clone()].iter_mut().zip(&mut lo[values]).zip(block).enumerate() {
                let high = round(v * inv).clamp(-127, 127);
                let low = round((v * inv - high as f32) * LIMB as f32).clamp(-127, 127);
                (*o, *l) = (high as i8, low as i8);
                totals[i / 16] += LIMB * high + low;
            }
            d[b] = scale / LIMB as f32;
        }
        sum[b] = d[b] * (totals[0] + totals[1]) as f32;
        halves[2 * b..2 * b + 2].copy_from_slice(&totals);
    }
}

/// The dot product of row `r` of `w` with quantized activations: the specification.
pub fn dot_scalar(w: &QuantMatrix, r: usize, x: Q8Row<'_>) -> f32 {
    let o = w.format.offset();
    let mut acc = 0f32;
    for b in 0..w.blocks() {
        let block = w.block(r, b);
        // The integer sum of u·q over weights `range` of the block (and 254·u·h + u·l with two
        // limbs).
        let sum = |range: std::ops::Range<usize>| -> i32 {
            let dot = |q: &[i8]| -> i32 {
                let q = &q[b * BLOCK + range.start..b * BLOCK + range.end];
                block.u[range.clone()].iter().zip(q).map(|(&u, &q)| i32::from(u) * i32::from(q)).sum()
            };
            if x.lo.is_empty() { dot(x.q) } else { LIMB * dot(x.q) + dot(x.lo) }
        };
        if w.format.has_half_scales() {
            // Each half's integer sum of (u − o)·q, scaled by its own d.
            for (h, d) in [block.d, block.d_hi].into_iter().enumerate() {
                let s = sum(16 * h..16 * (h + 1)) - o as i32 * x.halves[2 * b + h];
                acc += d * x.d[b] * s as f32;
            }
        } else {
            acc += block.d * x.d[b] * sum(0..BLOCK) as f32 + (block.m - o * block.d) * x.sum[b];
        }
    }
    acc
}

/// Whether the AVX-512 path runs here (detected once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    matches!(Path::detect(), Path::Avx512(_))
}

/// Whether the AVX2 helpers of the f32 and 16-bit-float operations can run here: AVX2, FMA
/// and F16C (detected once). Where AVX-512 is present too, its helpers are taken first.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| x86::Avx2::detect().is_some())
}

/// The fastest dot-product path this CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(x86::Avx2),
    #[cfg(target_arch = "x86_64")]
    Avx512(x86::Avx512),
    #[cfg(target_arch = "aarch64")]
    Neon(neon::Neon),
}

/// A panel's products with a tile of activation rows: `[activation row][lane]`.
pub(crate) type PanelOut = [[f32; PANEL]; TILE];

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
            #[cfg(target_arch = "aarch64")]
            if let Some(p) = neon::Neon::detect() {
                return Path::Neon(p);
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
        #[cfg(target_arch = "aarch64")]
        paths.extend(neon::Neon::detect().map(Path::Neon));
        paths
    }

    /// One row of [`Q8Rows::quantize_on`].
    fn quantize_row(self, x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32], halves: &mut [i32]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(path) => path.quantize_row(x, q, d, sum, halves),
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(path) => path.quantize_row(x, q, d, sum, halves),
            _ => quantize_row(x, q, d, sum, halves),
        }
    }

    /// `out[i][j] = w_{16p + j} · xs[i]` for the rows of panel `p` (a padding row's product
    /// is 0) and up to [`TILE`] activation rows.
    fn panel(self, w: &QuantMatrix, p: usize, xs: &[Q8Row<'_>], out: &mut PanelOut, ahead: &mut Ahead<'_>) {
        debug_assert!(xs.len() <= TILE);
        match self {
            Path::Scalar => {
                for (o, x) in out.iter_mut().zip(xs) {
                    for (j, v) in o.iter_mut().enumerate() {
                        let r = p * PANEL + j;
                        *v = if r < w.rows { dot_scalar(w, r, *x) } else { 0.0 };
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            Path::Avx2(path) => path.panel(w, p, xs, out, ahead),
            #[cfg(target_arch = "x86_64")]
            Path::Avx512(path) => path.panel(w, p, xs, out, ahead),
            #[cfg(target_arch = "aarch64")]
            Path::Neon(path) => path.panel(w, p, xs, out, ahead),
        }
    }
}

/// `len` zeroed bytes for a matrix's weights, their whole 2 MiB pages backed by huge pages
/// where Linux has them to give (Linux's transparent huge pages, in `madvise` mode on most
/// distributions). Decode streams every weight once a step: with 4 KiB pages that is a TLB miss
/// every 4 KiB, with 2 MiB ones almost none (a 1B Q4_K_M model's decode on a 2-core Zen 4: about
/// 3% more tokens a second; smaller matrices than 2 MiB get none).
fn weight_buffer(len: usize) -> Vec<u8> {
    // A zeroed allocation this large is fresh mapped memory as a rule, untouched until the
    // repacking writes it, so the advice comes before its pages exist; where the allocator
    // reuses memory already touched, the kernel's khugepaged may still collapse it later.
    let buffer = vec![0u8; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buffer.as_ptr() as usize;
        let (first, end) = (start.next_multiple_of(HUGE), (start + len) & !(HUGE - 1));
        if end > first {
            // SAFETY: the range lies inside `buffer`'s allocation, and MADV_HUGEPAGE changes
            // how its pages are backed, never what they hold. A refusal (no THP) changes nothing.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    buffer
}

/// Activation rows a panel is unpacked for at once.
pub const TILE: usize = 8;

/// `y[i, j] = x[i] · w[j]` for every activation row `i` and weight row `j` (a linear layer,
/// `y = x·Wᵀ`), with `y`'s rows `y_stride` apart, on `path`. The panels are spread over
/// the team's threads in chunks; within a chunk, each panel's block is unpacked once per [`TILE`]
/// activation rows, and a chunk's panels stay in cache while every tile passes over them.
///
/// # Panics
/// When the shapes do not match (caller bugs).
pub fn matmul_on(path: Path, w: &QuantMatrix, x: &Q8Rows, y: &mut [f32], y_stride: usize) {
    matmul_beside(path, w, x, y, y_stride, None);
}

/// [`matmul_on`] with `beside`'s items in the same parallel section: task `k` asks for item
/// `k`'s memory, multiplies chunk `k` of the panels, then does item `k`, so the item's reads
/// are under way while the chunk computes (and the two need one section, not two).
///
/// # Panics
/// When the shapes do not match (caller bugs).
pub fn matmul_beside(
    path: Path,
    w: &QuantMatrix,
    x: &Q8Rows,
    y: &mut [f32],
    y_stride: usize,
    beside: Option<&dyn crate::team::Beside>,
) {
    let (m, n) = (x.rows, w.rows);
    let side = beside.map_or(0, |b| b.tasks());
    if m == 0 || n == 0 {
        if let Some(b) = beside {
            crate::team::run_beside(b);
        }
        return;
    }
    assert!(x.blocks == w.blocks(), "matmul: activations of {} blocks, weights of {}", x.blocks, w.blocks());
    let need = (m - 1).checked_mul(y_stride).and_then(|v| v.checked_add(n));
    assert!(y_stride >= n && need.is_some_and(|need| y.len() >= need), "matmul: y too short");
    // Chunks of panels: enough of them to keep every thread busy, and small enough (with the
    // tiles of activations) to stay in the core's cache; with items beside, at least one
    // chunk for each item where there are panels enough.
    let (threads, panels) = (crate::team::threads(), w.panels());
    let chunk = match side {
        0 if m * n * w.cols < 1 << 17 => panels,
        0 => (panels / (4 * threads)).clamp(1, 4),
        _ => (panels / (4 * threads)).clamp(1, 4).min((panels / side).max(1)),
    };
    // Where the panels are arithmetic-bound (several rows), the last chunks a panel each, so
    // that the threads finish the section together.
    let tail = if m >= TILE / 2 && chunk > 1 && chunk < panels { (2 * threads).min(panels) } else { 0 };
    let whole = (panels - tail).div_ceil(chunk);
    let span_of = |c: usize| {
        if c < whole {
            c * chunk..((c + 1) * chunk).min(panels - tail)
        } else {
            panels - tail + (c - whole)..panels - tail + (c - whole) + 1
        }
    };
    let out = crate::team::Shared::new(y);
    let run = |c: usize, ahead: &mut Ahead<'_>| {
        VALUES.with_borrow_mut(|values| {
            let span = span_of(c);
            let mut steps = m.div_ceil(TILE) * span.len();
            for i0 in (0..m).step_by(TILE) {
                let t = (m - i0).min(TILE);
                let xs: [Q8Row<'_>; TILE] = std::array::from_fn(|k| x.row(i0 + k.min(t - 1)));
                for p in span.clone() {
                    ahead.pace(steps * w.blocks());
                    steps -= 1;
                    path.panel(w, p, &xs[..t], values, ahead);
                    let cols = PANEL.min(n - p * PANEL);
                    for (k, v) in values[..t].iter().enumerate() {
                        let to = out.at((i0 + k) * y_stride + p * PANEL);
                        // SAFETY: row i0 + k < m and columns p·16 .. p·16 + cols <= n are inside
                        // `y` (asserted above), and only the task owning panel p writes them. A
                        // whole panel's copy has a constant length: a vector store, not a call.
                        unsafe {
                            if cols == PANEL {
                                std::ptr::copy_nonoverlapping(v.as_ptr(), to, PANEL);
                            } else {
                                std::ptr::copy_nonoverlapping(v.as_ptr(), to, cols);
                            }
                        }
                    }
                }
            }
        })
    };
    let chunks = whole + tail;
    match beside {
        None if chunks == 1 => run(0, &mut Ahead::default()),
        None => crate::team::for_each(chunks, &|c| run(c, &mut Ahead::default())),
        // Item k's memory into L2 a few lines a block while chunk k computes (all at once
        // where there is no chunk k). Asking for it into L1 as well, once in L2, measured no
        // faster.
        Some(b) => crate::team::for_each(chunks.max(side), &|k| {
            let mut ahead = Ahead::default();
            if k < side {
                ahead.ranges = b.memory(k);
            }
            if k < chunks {
                run(k, &mut ahead);
            } else {
                b.prefetch(k);
            }
            if k < side {
                b.run(k);
            }
        }),
    }
}

thread_local! {
    /// Each thread's products of a panel with a tile, which every panel overwrites (one buffer a
    /// thread, where a zeroed one a task measured about 1% of a decode step).
    static VALUES: std::cell::RefCell<PanelOut> = const { std::cell::RefCell::new([[0f32; PANEL]; TILE]) };
}

/// The memory a [`crate::team::Beside`] item reads, asked for into L2 a few lines a block while
/// the panels beside it compute: each panel kernel calls [`Ahead::step`] once a block. The
/// panels at batch sizes are arithmetic-bound, leaving memory's bandwidth spare, and a steady
/// trickle of requests keeps within the few misses a core has outstanding. (Asked for a panel's
/// share at a time, a hundred lines and more for a `gate,up` item, SmolLM2 at batch 8 with
/// eight adapters decoded about 3% slower on a 2-core Zen 4.)
#[derive(Default)]
struct Ahead<'a> {
    /// What is not yet asked for.
    ranges: [&'a [u8]; 2],
    /// Lines a block ([`Ahead::pace`]).
    per_block: usize,
}

impl Ahead<'_> {
    /// Lines not yet asked for.
    fn lines(&self) -> usize {
        self.ranges.iter().map(|r| r.len().div_ceil(64)).sum()
    }

    /// Spreads what is not yet asked for over the next `blocks` blocks.
    fn pace(&mut self, blocks: usize) {
        self.per_block = self.lines().div_ceil(blocks.max(1));
    }

    /// Asks for a block's share.
    #[inline(always)]
    fn step(&mut self) {
        if self.per_block > 0 {
            self.ask(self.per_block);
            if self.ranges.iter().all(|r| r.is_empty()) {
                self.per_block = 0;
            }
        }
    }

    /// Asks for the next `lines` lines into L2.
    fn ask(&mut self, lines: usize) {
        let mut bytes = 64 * lines;
        for range in &mut self.ranges {
            let (now, later) = range.split_at(bytes.min(range.len()));
            crate::ops::prefetch_l2(now);
            (bytes, *range) = (bytes - now.len(), later);
        }
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
        let blocks = rows * cols / format.ggml_block_weights();
        let mut data = Vec::with_capacity(blocks * format.ggml_block_bytes());
        for _ in 0..blocks {
            if format == Format::Q6_K {
                // Quants and 8-bit scales, then d.
                data.extend((0..208).map(|_| rng.random::<u8>()));
                data.extend_from_slice(&f16::from_f32(rng.random_range(0.0001..0.001)).to_le_bytes());
                continue;
            }
            let scale = if matches!(format, Format::Q4_K | Format::Q5_K) { 0.001..0.002 } else { 0.001..0.05 };
            data.extend_from_slice(&f16::from_f32(rng.random_range(scale)).to_le_bytes());
            let offset = match format {
                Format::Q4_1 | Format::Q5_1 => -0.2..0.2,
                Format::Q4_K | Format::Q5_K => 0.0..0.005,
                _ => 0.0..0.0,
            };
            if !offset.is_empty() {
                data.extend_from_slice(&f16::from_f32(rng.random_range(offset)).to_le_bytes());
            }
            let n = format.ggml_block_bytes() - data.len() % format.ggml_block_bytes();
            data.extend((0..n).map(|_| rng.random::<u8>()));
        }
        data
    }

    fn random(format: Format, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QuantMatrix {
        QuantMatrix::from_ggml(format, rows, cols, &random_ggml(format, rows, cols, rng)).expect("sized right")
    }

    /// GGUF's own dequantization of one block, written from the format's definition (ggml's
    /// `dequantize_row_*`).
    fn ggml_block(format: Format, blk: &[u8]) -> Vec<f32> {
        let d = f16_at(blk, 0);
        let mut out = vec![0f32; format.ggml_block_weights()];
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
            Format::Q5_0 | Format::Q5_1 => {
                // ggml's `dequantize_row_q5_0`/`_q5_1`: bit j of qh is weight j's fifth bit,
                // bit j + 16 weight j + 16's.
                let (h, m, o) = if format == Format::Q5_0 { (2, 0.0, 16.0) } else { (4, f16_at(blk, 2), 0.0) };
                let qh = u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]]);
                for j in 0..16 {
                    let x0 = u32::from(blk[h + 4 + j] & 0x0F) | (((qh >> j) << 4) & 0x10);
                    let x1 = u32::from(blk[h + 4 + j] >> 4) | ((qh >> (j + 12)) & 0x10);
                    out[j] = d * (x0 as f32 - o) + m;
                    out[j + 16] = d * (x1 as f32 - o) + m;
                }
            }
            Format::Q4_K | Format::Q5_K => {
                // ggml's `get_scale_min_k4`, then 64 weights (two sub-blocks) per 32 bytes.
                let q = &blk[4..16];
                let scale_min = |j: usize| -> (u8, u8) {
                    if j < 4 {
                        (q[j] & 63, q[j + 4] & 63)
                    } else {
                        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
                    }
                };
                let dmin = f16_at(blk, 2);
                // Q5_K (`dequantize_row_q5_K`): the fifth bits in qh[32] before the nibbles,
                // bits 2c and 2c + 1 of qh[l] for the two sub-blocks of chunk c.
                let (ql, five) = if format == Format::Q5_K { (48, true) } else { (16, false) };
                for c in 0..4 {
                    let ((s1, m1), (s2, m2)) = (scale_min(2 * c), scale_min(2 * c + 1));
                    let (d1, c1) = (d * f32::from(s1), dmin * f32::from(m1));
                    let (d2, c2) = (d * f32::from(s2), dmin * f32::from(m2));
                    for l in 0..32 {
                        let byte = blk[ql + 32 * c + l];
                        let (h1, h2) = if five {
                            ((blk[16 + l] >> (2 * c)) & 1, (blk[16 + l] >> (2 * c + 1)) & 1)
                        } else {
                            (0, 0)
                        };
                        out[64 * c + l] = d1 * f32::from((byte & 0xF) + 16 * h1) - c1;
                        out[64 * c + 32 + l] = d2 * f32::from((byte >> 4) + 16 * h2) - c2;
                    }
                }
            }
            Format::Q6_K => {
                let d = f16_at(blk, 208);
                let sc = |i: usize| d * f32::from(blk[192 + i] as i8);
                for n in 0..2 {
                    let (ql, qh) = (&blk[64 * n..], &blk[128 + 32 * n..]);
                    for l in 0..32 {
                        let q = |low: u8, shift: u8| f32::from((low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32);
                        let is = 8 * n + l / 16;
                        out[128 * n + l] = sc(is) * q(ql[l] & 0xF, 0);
                        out[128 * n + l + 32] = sc(is + 2) * q(ql[l + 32] & 0xF, 2);
                        out[128 * n + l + 64] = sc(is + 4) * q(ql[l] >> 4, 4);
                        out[128 * n + l + 96] = sc(is + 6) * q(ql[l + 32] >> 4, 6);
                    }
                }
            }
        }
        out
    }

    /// Row widths to test `format` with: a whole number of its GGUF blocks, in rising order.
    fn widths(format: Format) -> [usize; 6] {
        if format.ggml_block_weights() == 256 {
            [256, 512, 768, 1280, 1536, 2304]
        } else {
            [32, 64, 96, 576, 1056, 1536]
        }
    }

    fn activations(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|i| rng.random_range(-2.0..2.0) * if i % 7 == 0 { 4.0 } else { 1.0 }).collect()
    }

    #[test]
    fn repacking_keeps_every_weight_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for format in Format::ALL {
            // 19 rows: the second panel is padded.
            let (rows, cols) = (19, widths(format)[2]);
            let ggml = random_ggml(format, rows, cols, &mut rng);
            let w = QuantMatrix::from_ggml(format, rows, cols, &ggml).expect("sized right");
            // The same bits per weight as the file, plus the padding rows, but where quants are
            // kept a byte each (Q6_K, the Q5 formats) and the K formats' 6-bit scales a byte
            // each with f32 super-block scales: Q4_K from 4.5 bits to 4.75, Q6_K from 6.5625 to
            // 8.625, Q5_0 from 5.5 to 8.5, Q5_1 from 6 to 9, Q5_K from 5.5 to 8.75.
            let bits = w.size_bytes() as f64 * 8.0 / (32 * cols) as f64;
            let file = (8 * format.ggml_block_bytes()) as f64 / format.ggml_block_weights() as f64;
            let kept = match format {
                Format::Q4_K => 4.75,
                Format::Q6_K => 8.625,
                Format::Q5_K => 8.75,
                Format::Q5_0 => 8.5,
                Format::Q5_1 => 9.0,
                _ => file,
            };
            assert_eq!(bits, kept, "{format:?}");
            let want: Vec<f32> =
                ggml.chunks_exact(format.ggml_block_bytes()).flat_map(|b| ggml_block(format, b)).collect();
            assert_eq!(w.dequantize(), want, "{format:?}");
        }
    }

    #[test]
    fn the_quantized_dot_is_the_f32_dot_of_the_dequantized_row_to_within_activation_rounding() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Each activation moves by at most half a step: its block's amax / 254, or / 64516 with
        // two limbs.
        for (precision, steps) in [(Precision::Int8, 254.0), (Precision::Int16, 64516.0)] {
            for format in Format::ALL {
                let (rows, cols) = (16, if format.ggml_block_weights() == 256 { 512 } else { 288 });
                let w = random(format, rows, cols, &mut rng);
                let x = activations(cols, &mut rng);
                let mut q = Q8Rows::default();
                q.quantize(&x, 1, cols, precision);
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    w.dequantize_row(r, &mut row);
                    let exact: f64 = row.iter().zip(&x).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                    let bound: f64 = row
                        .chunks(BLOCK)
                        .zip(x.chunks(BLOCK))
                        .map(|(wb, xb)| {
                            let step = f64::from(xb.iter().fold(0f32, |m, v| m.max(v.abs()))) / steps;
                            wb.iter().map(|&v| f64::from(v.abs()) * step).sum::<f64>()
                        })
                        .sum();
                    let got = f64::from(dot_scalar(&w, r, q.row(0)));
                    // Beyond the activations' rounding, f32's in the per-block float terms.
                    let float = 1e-6 * row.iter().zip(&x).map(|(&a, &b)| f64::from((a * b).abs())).sum::<f64>();
                    assert!(
                        (got - exact).abs() <= bound * 1.01 + float,
                        "{precision:?} {format:?} row {r}: {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
    }

    #[test]
    fn adapters_beside_a_product_leave_it_as_alone_and_each_row_gets_its_own() {
        use crate::lora::{Bgmv, LoraHalf, LoraMat, Target, bgmv_targets};
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let cols = 64;
        // Rank, A and Bᵀ (bf16) per slot and target; slot 2 has no matrix for the second target.
        let ranks = [4usize, 8, 3];
        // Fewer panels than items, more, and many (chunks of several panels).
        for n in [16, 200, 1040] {
            let targets = [Target { out_dim: n / 4, y_offset: 0 }, Target { out_dim: n - n / 4, y_offset: n / 4 }];
            let half = |len: usize, rng: &mut ChaCha8Rng| -> Vec<half::bf16> {
                (0..len).map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0))).collect()
            };
            let mats: Vec<Vec<(Vec<half::bf16>, Vec<half::bf16>)>> = ranks
                .iter()
                .map(|&r| targets.iter().map(|t| (half(r * cols, &mut rng), half(r * t.out_dim, &mut rng))).collect())
                .collect();
            let mat = |slot: u32, j: usize| {
                let (a, bt) = &mats[slot as usize][j];
                (slot != 2 || j == 0).then_some(LoraMat {
                    a: &[],
                    b: &[],
                    bt: None,
                    half: Some(LoraHalf { a, bt }),
                    rank: ranks[slot as usize],
                    scale: 0.5,
                })
            };
            let w = random(Format::Q4_1, n, cols, &mut rng);
            let slots = [Some(1), None, Some(0), Some(2), Some(1), Some(0), None, Some(2), Some(0)];
            let m = slots.len();
            let xs = activations(m * cols, &mut rng);
            let mut x = Q8Rows::default();
            x.quantize(&xs, m, cols, Precision::Int16);
            for path in Path::available() {
                let mut alone = vec![f32::NAN; m * n];
                matmul_on(path, &w, &x, &mut alone, n);
                let mut after = vec![0f32; m * n];
                bgmv_targets(&xs, cols, &slots, &targets, mat, &mut after, n);
                let (mut y, mut delta) = (vec![f32::NAN; m * n], vec![0f32; m * n]);
                let job = Bgmv::new(&xs, cols, &slots, &targets, mat, &mut delta, n);
                matmul_beside(path, &w, &x, &mut y, n, Some(&job));
                drop(job);
                assert_eq!(y, alone, "{path:?} n {n}: the product");
                assert_eq!(delta, after, "{path:?} n {n}: the adapters");
                // Rows without an adapter, and slot 2's second block, got nothing.
                for (t, slot) in slots.iter().enumerate() {
                    let row = &delta[t * n..(t + 1) * n];
                    let untouched = match slot {
                        None => 0..n,
                        Some(2) => n / 4..n,
                        Some(_) => 0..0,
                    };
                    assert!(row[untouched].iter().all(|&v| v == 0.0), "{path:?} n {n} row {t}");
                    assert!(slot.is_none() || row[..n / 4].iter().any(|&v| v != 0.0), "{path:?} n {n} row {t}");
                }
            }
        }
    }

    #[test]
    fn every_simd_path_this_cpu_has_agrees_with_the_scalar_specification() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let paths = Path::available();
        eprintln!("paths: {paths:?}");
        let shapes = [(8, 7), (16, 1), (40, 11)].into_iter().cycle();
        for (format, precision) in Format::ALL.into_iter().flat_map(|f| [(f, Precision::Int8), (f, Precision::Int16)]) {
            // Odd block counts; partial, whole and several panels; partial, whole and several tiles.
            for (cols, (rows, m)) in widths(format).into_iter().zip(shapes.clone()) {
                let w = random(format, rows, cols, &mut rng);
                let mut x = Q8Rows::default();
                x.quantize(&activations(m * cols, &mut rng), m, cols, precision);
                let mut want = vec![0f32; m * rows];
                matmul_on(Path::Scalar, &w, &x, &mut want, rows);
                for &path in &paths {
                    let mut got = vec![f32::NAN; m * rows];
                    matmul_on(path, &w, &x, &mut got, rows);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        // The same integer sums; only the order of the per-block float adds differs.
                        let scale = (0..m).flat_map(|r| x.row(r).d.to_vec()).fold(1f32, f32::max) * cols as f32;
                        assert!(
                            (g - e).abs() <= 1e-5 * scale,
                            "{path:?} {format:?} {precision:?} cols {cols} [{i}]: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_path_quantizes_activations_to_the_same_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let cols = 576;
        let mut x = activations(3 * cols, &mut rng);
        // A block of zeros, one too small for a normal scale, ties at every half step, and
        // a block of one large value among small ones.
        x[..32].fill(0.0);
        x[32..64].fill(1e-39);
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5 / 127.0 * 16.0;
        }
        x[96..128].fill(1e-4);
        x[100] = -300.0;
        for precision in [Precision::Int8, Precision::Int16] {
            let mut want = Q8Rows::default();
            want.quantize_on(Path::Scalar, &x, 3, cols, precision);
            for path in Path::available() {
                let mut got = Q8Rows::default();
                got.quantize_on(path, &x, 3, cols, precision);
                assert_eq!(got.q, want.q, "{path:?} {precision:?} quants");
                assert_eq!(got.d, want.d, "{path:?} {precision:?} scales");
                assert_eq!(got.sum, want.sum, "{path:?} {precision:?} sums");
                assert_eq!(got.halves, want.halves, "{path:?} {precision:?} half-block totals");
            }
        }
    }

    #[test]
    fn the_largest_quants_times_the_largest_activations_do_not_saturate_any_path() {
        // Every quant at its extreme (Q8_0's −128, the 4- and 5-bit formats' 15 and 31) and every activation
        // at ±127: the sums the SIMD paths build in 16-bit lanes are at their largest.
        let (rows, cols) = (16, 256);
        for format in Format::ALL {
            let d = f16::from_f32(0.01).to_le_bytes();
            let block: Vec<u8> = match format {
                Format::Q8_0 => [&d[..], &[0x80; 32]].concat(),
                Format::Q4_0 => [&d[..], &[0xFF; 16]].concat(),
                Format::Q4_1 => [&d[..], &[0; 2], &[0xFF; 16]].concat(),
                // Every sub-block's 6-bit scale at its largest, 63.
                Format::Q4_K => [&d[..], &[0; 2], &[0xFF; 12], &[0xFF; 128]].concat(),
                // Every quant at 63 and every scale at −128.
                Format::Q6_K => [&[0xFF; 192][..], &[0x80; 16], &d[..]].concat(),
                Format::Q5_0 => [&d[..], &[0xFF; 20]].concat(),
                Format::Q5_1 => [&d[..], &[0; 2], &[0xFF; 20]].concat(),
                Format::Q5_K => [&d[..], &[0; 2], &[0xFF; 12], &[0xFF; 160]].concat(),
            };
            let blocks = rows * cols / format.ggml_block_weights();
            let w = QuantMatrix::from_ggml(format, rows, cols, &block.repeat(blocks)).expect("sized");
            for (sign, precision) in [(1.0f32, Precision::Int8), (-1.0, Precision::Int8), (-1.0, Precision::Int16)] {
                let mut x = Q8Rows::default();
                x.quantize(&vec![sign * 3.0; 2 * cols], 2, cols, precision);
                let mut row = vec![0f32; cols];
                w.dequantize_row(0, &mut row);
                let exact: f32 = row.iter().map(|v| v * sign * 3.0).sum();
                for path in Path::available() {
                    let mut y = vec![0f32; 2 * rows];
                    matmul_on(path, &w, &x, &mut y, rows);
                    for v in y {
                        assert!(
                            (v - exact).abs() <= 1e-3 * exact.abs(),
                            "{path:?} {format:?} {precision:?} {sign}: {v} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_fills_every_element_of_its_column_block_threaded_or_not() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let cases = [(1, 5, 128, Precision::Int8), (3, 300, 128, Precision::Int16), (9, 700, 576, Precision::Int8)];
        for (m, rows, cols, precision) in cases {
            let w = random(Format::Q4_1, rows, cols, &mut rng);
            let mut x = Q8Rows::default();
            x.quantize(&activations(m * cols, &mut rng), m, cols, precision);
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
        // The second part's rows straddle the stack's first and second panels.
        let a = random(Format::Q4_0, 2, 64, &mut rng);
        let b = random(Format::Q4_0, 19, 64, &mut rng);
        let s = QuantMatrix::stack(&[&a, &b]).expect("same format");
        assert_eq!(s.rows(), 21);
        let (da, db, ds) = (a.dequantize(), b.dequantize(), s.dequantize());
        assert_eq!(ds, [da, db].concat());
        let picked = s.select_rows(&[20, 0]);
        assert_eq!(picked.dequantize(), [&ds[20 * 64..21 * 64], &ds[0..64]].concat());
        let c = random(Format::Q8_0, 1, 64, &mut rng);
        assert!(matches!(QuantMatrix::stack(&[&a, &c]), Err(QuantError::Mismatch(_))));
    }

    #[test]
    fn matrices_of_the_wrong_size_are_refused() {
        assert_eq!(QuantMatrix::from_ggml(Format::Q4_1, 2, 40, &[]), Err(QuantError::Ragged { cols: 40, block: 32 }));
        assert_eq!(
            QuantMatrix::from_ggml(Format::Q4_K, 2, 576, &[]),
            Err(QuantError::Ragged { cols: 576, block: 256 })
        );
        let e = QuantMatrix::from_ggml(Format::Q8_0, 2, 64, &[0; 100]).expect_err("refused");
        assert_eq!(e, QuantError::Size { format: Format::Q8_0, rows: 2, cols: 64, got: 100, want: 136 });
    }

    #[test]
    fn rows_quantized_as_they_are_made_match_rows_quantized_after() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // One buffer for all, as a step reuses it: the narrower rows after wider ones leave
        // stale values past the rows in use.
        let mut made = Q8Rows::default();
        // One row, a decode batch's share per thread, and more rows than a task takes.
        for (rows, cols) in [(1, 64), (8, 576), (37, 96)] {
            let src: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-3.0..3.0)).collect();
            let want_x: Vec<f32> = src.iter().enumerate().map(|(i, v)| v * (i / cols + 1) as f32).collect();
            for precision in [Precision::Int8, Precision::Int16] {
                // Each row made from its source row and its index, over stale values.
                let mut x = vec![f32::NAN; rows * cols];
                made.quantize_made(&mut x, rows, cols, precision, &|r, row| {
                    for (o, v) in row.iter_mut().zip(&src[r * cols..(r + 1) * cols]) {
                        *o = v * (r + 1) as f32;
                    }
                });
                assert_eq!(x, want_x, "{rows}x{cols}: the made rows stay in x");
                let mut after = Q8Rows::default();
                after.quantize(&want_x, rows, cols, precision);
                assert_eq!(made, after, "{rows}x{cols}, {precision:?}");
            }
        }
    }
}
