//! The x86-64 paths of [`super`], chosen at run time: AVX-512 with VNNI (64 weights an
//! instruction, unsigned quants times signed activations) and AVX2 with FMA.

use super::{BLOCK, Format, PAIR, Q8Row, TILE};
use std::arch::x86_64::*;

const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;

fn kind(format: Format) -> u8 {
    match format {
        Format::Q8_0 => Q8_0,
        Format::Q4_0 => Q4_0,
        Format::Q4_1 => Q4_1,
    }
}

/// Calls `$tile::<R, K>` for the number of activation rows `R` (1 to [`TILE`]) and the format
/// `K`: the const parameters each path's kernel is monomorphized on.
macro_rules! dispatch {
    ($tile:ident, $format:expr, $pairs:expr, $w:expr, $xs:expr, $emit:expr) => {{
        macro_rules! go {
            ($r:literal) => {
                match kind($format) {
                    Q8_0 => $tile::<$r, Q8_0>($pairs, $w, $xs, $emit),
                    Q4_0 => $tile::<$r, Q4_0>($pairs, $w, $xs, $emit),
                    _ => $tile::<$r, Q4_1>($pairs, $w, $xs, $emit),
                }
            };
        }
        match $xs.len() {
            0 => {}
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            4 => go!(4),
            5 => go!(5),
            6 => go!(6),
            7 => go!(7),
            _ => go!(8),
        }
    }};
}

/// Checks what every path's loads rely on: `w` is whole rows of `pairs` pairs of `format`, and
/// each activation row has `2·pairs` blocks.
fn check(format: Format, pairs: usize, w: &[u8], xs: &[Q8Row<'_>]) {
    assert!(w.len().is_multiple_of(pairs * format.pair_bytes()), "dot: the weights are not rows of {pairs} pairs");
    assert!(xs.len() <= TILE, "dot: tile too large");
    for x in xs {
        assert!(
            x.q.len() >= pairs * PAIR && x.d.len() >= 2 * pairs && x.sum.len() >= 2 * pairs,
            "dot: activations shorter than the weight row"
        );
    }
}

/// Proof that this CPU has AVX-512 (F, BW, VL), VNNI, F16C and FMA: only [`Avx512::detect`]
/// makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avx512(());

impl Avx512 {
    pub(super) fn detect() -> Option<Avx512> {
        (is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma"))
        .then_some(Avx512(()))
    }

    /// For each row `j` of `w` (whole rows of `pairs` pairs of `format`): `emit(j, [w_j · x
    /// for x in xs])`.
    pub(super) fn dot_rows(
        self,
        format: Format,
        pairs: usize,
        w: &[u8],
        xs: &[Q8Row<'_>],
        emit: &mut impl FnMut(usize, &[f32]),
    ) {
        check(format, pairs, w, xs);
        // SAFETY: `self` exists only where the features were detected; `check` proved the
        // extents every load in `tile512` relies on.
        unsafe { dispatch!(tile512, format, pairs, w, xs, emit) }
    }
}

/// For every weight row `j` of `w`: `emit(j, [row_j · xs[r] for r < R])`.
///
/// Per pair of blocks, the weights become one vector of 64 unsigned bytes (the first block's 32
/// in the low half), `vpdpbusd` sums four products a lane, so lanes 0–7 hold the first block's
/// partial sums and 8–15 the second's; they are scaled by `d_b·e_b` (a lane permutation of
/// the scales of the pair's group of eight pairs) and accumulated. The offsets' terms are one
/// multiply-add per group.
///
/// # Safety
/// The CPU has the features [`Avx512::detect`] checks; `w` is whole rows of `pairs` pairs, and
/// `xs` holds `R` rows of at least `2·pairs` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
unsafe fn tile512<const R: usize, const K: u8>(
    pairs: usize,
    w: &[u8],
    xs: &[Q8Row<'_>],
    emit: &mut impl FnMut(usize, &[f32]),
) {
    let format = [Format::Q8_0, Format::Q4_0, Format::Q4_1][K as usize];
    // Callers pass exactly R rows (`dot_rows` matches on the count).
    let Ok(xs) = <&[Q8Row<'_>; R]>::try_from(xs) else { return };
    for (j, row) in w.chunks_exact(pairs * format.pair_bytes()).enumerate() {
        // SAFETY: as this function's.
        let out: [f32; R] = unsafe { row512::<R, K>(pairs, row, xs) };
        emit(j, &out);
    }
}

/// One weight row of [`tile512`].
///
/// # Safety
/// As [`tile512`], for one row of `pairs` pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
unsafe fn row512<const R: usize, const K: u8>(pairs: usize, row: &[u8], xs: &[Q8Row<'_>; R]) -> [f32; R] {
    let format = [Format::Q8_0, Format::Q4_0, Format::Q4_1][K as usize];
    let quant_bytes = format.pair_quant_bytes();
    let quants = row.as_ptr();
    // SAFETY (every pointer below): the scales start after `pairs` pairs of quants and hold
    // `2·pairs` f16 values, the Q4_1 offsets as many after them; masked loads touch only the
    // lanes their mask selects, which stay below `2·pairs` blocks; activation rows hold
    // `pairs · 64` quants and `2·pairs` scales and sums.
    let scales = unsafe { quants.add(pairs * quant_bytes) };
    let mins = unsafe { scales.add(4 * pairs) };
    let low4 = _mm256_set1_epi8(0x0F);
    let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    // The offsets' terms go into the same accumulators: only the lanes' total is wanted.
    let mut acc = [_mm512_setzero_ps(); R];
    let mut g = 0;
    while g < pairs {
        let n = (pairs - g).min(8);
        let k = ((1u32 << (2 * n)) - 1) as __mmask16;
        let d = _mm512_cvtph_ps(unsafe { _mm256_maskz_loadu_epi16(k, scales.add(4 * g).cast()) });
        let mut sc = [_mm512_setzero_ps(); R];
        for r in 0..R {
            sc[r] = _mm512_mul_ps(d, unsafe { _mm512_maskz_loadu_ps(k, xs[r].d.as_ptr().add(2 * g)) });
        }
        for p in 0..n {
            let at = unsafe { quants.add((g + p) * quant_bytes) };
            let w = if K == Q8_0 {
                unsafe { _mm512_loadu_si512(at.cast()) }
            } else {
                let v = unsafe { _mm256_loadu_si256(at.cast()) };
                let lo = _mm256_and_si256(v, low4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
            };
            let lanes = _mm512_add_epi32(halves, _mm512_set1_epi32(2 * p as i32));
            for r in 0..R {
                let a = unsafe { _mm512_loadu_si512(xs[r].q.as_ptr().add((g + p) * PAIR).cast()) };
                let s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a));
                acc[r] = _mm512_fmadd_ps(s, _mm512_permutexvar_ps(lanes, sc[r]), acc[r]);
            }
        }
        let c = if K == Q4_1 {
            _mm512_cvtph_ps(unsafe { _mm256_maskz_loadu_epi16(k, mins.add(4 * g).cast()) })
        } else {
            _mm512_mul_ps(d, _mm512_set1_ps(-format.offset()))
        };
        for r in 0..R {
            let s = unsafe { _mm512_maskz_loadu_ps(k, xs[r].sum.as_ptr().add(2 * g)) };
            acc[r] = _mm512_fmadd_ps(c, s, acc[r]);
        }
        g += 8;
    }
    // A loop, not `array::from_fn`: a closure would not inherit this function's features.
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = _mm512_reduce_add_ps(acc[r]);
    }
    out
}

/// Proof that this CPU has AVX2, FMA and F16C: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avx2(());

impl Avx2 {
    pub(super) fn detect() -> Option<Avx2> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
            .then_some(Avx2(()))
    }

    /// For each row `j` of `w` (whole rows of `pairs` pairs of `format`): `emit(j, [w_j · x
    /// for x in xs])`.
    pub(super) fn dot_rows(
        self,
        format: Format,
        pairs: usize,
        w: &[u8],
        xs: &[Q8Row<'_>],
        emit: &mut impl FnMut(usize, &[f32]),
    ) {
        check(format, pairs, w, xs);
        // SAFETY: `self` exists only where the features were detected; `check` proved the
        // extents every load in `tile256` relies on.
        unsafe { dispatch!(tile256, format, pairs, w, xs, emit) }
    }
}

/// Eight values from `src` starting at `at`, zero past its end.
fn eight<T: Copy + Default>(src: &[T], at: usize) -> [T; 8] {
    let mut out = [T::default(); 8];
    let n = src.len().saturating_sub(at).min(8);
    out[..n].copy_from_slice(&src[at..at + n]);
    out
}

/// Eight f16 values' bits from little-endian bytes, starting at value `at`, zero past the end.
fn halves16(bytes: &[u8], at: usize) -> [u16; 8] {
    let mut out = [0u16; 8];
    for (i, o) in out.iter_mut().enumerate() {
        if let Some(b) = bytes.get(2 * (at + i)..2 * (at + i) + 2) {
            *o = u16::from_le_bytes([b[0], b[1]]);
        }
    }
    out
}

/// As [`tile512`], a block (32 weights) at a time: `maddubs` multiplies unsigned by signed
/// bytes into 16-bit pairs (a Q8_0 weight's sign moves to the activation first, since its
/// magnitude can reach 128), `madd` widens them into eight 32-bit sums.
///
/// # Safety
/// As [`tile512`], with the features [`Avx2::detect`] checks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile256<const R: usize, const K: u8>(
    pairs: usize,
    w: &[u8],
    xs: &[Q8Row<'_>],
    emit: &mut impl FnMut(usize, &[f32]),
) {
    let format = [Format::Q8_0, Format::Q4_0, Format::Q4_1][K as usize];
    // Callers pass exactly R rows (`dot_rows` matches on the count).
    let Ok(xs) = <&[Q8Row<'_>; R]>::try_from(xs) else { return };
    for (j, row) in w.chunks_exact(pairs * format.pair_bytes()).enumerate() {
        // SAFETY: as this function's.
        let out: [f32; R] = unsafe { row256::<R, K>(pairs, row, xs) };
        emit(j, &out);
    }
}

/// One weight row of [`tile256`].
///
/// # Safety
/// As [`tile256`], for one row of `pairs` pairs.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row256<const R: usize, const K: u8>(pairs: usize, row: &[u8], xs: &[Q8Row<'_>; R]) -> [f32; R] {
    let format = [Format::Q8_0, Format::Q4_0, Format::Q4_1][K as usize];
    let quant_bytes = format.pair_quant_bytes();
    let blocks = 2 * pairs;
    let (quants, rest) = row.split_at(pairs * quant_bytes);
    let (scales, mins) = rest.split_at(2 * blocks);
    let low4 = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut corr = [_mm256_setzero_ps(); R];
    for g in (0..blocks).step_by(8) {
        // SAFETY: loads from local arrays of eight values.
        let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(halves16(scales, g).as_ptr().cast()) });
        let mut sc = [[0f32; 8]; R];
        for r in 0..R {
            let e = unsafe { _mm256_loadu_ps(eight(&xs[r].d[..blocks], g).as_ptr()) };
            unsafe { _mm256_storeu_ps(sc[r].as_mut_ptr(), _mm256_mul_ps(d, e)) };
        }
        for b in g..(g + 8).min(blocks) {
            let (pair, second) = (b / 2, b % 2 == 1);
            // SAFETY: 32 bytes inside the pair's quants (64 for Q8_0, the block's half; 32 for
            // the 4-bit formats, nibbles selected below).
            let w = if K == Q8_0 {
                let at = pair * PAIR + if second { BLOCK } else { 0 };
                _mm256_xor_si256(unsafe { _mm256_loadu_si256(quants[at..at + 32].as_ptr().cast()) }, flip)
            } else {
                let v = unsafe { _mm256_loadu_si256(quants[pair * 32..pair * 32 + 32].as_ptr().cast()) };
                if second { _mm256_and_si256(_mm256_srli_epi16(v, 4), low4) } else { _mm256_and_si256(v, low4) }
            };
            for r in 0..R {
                // SAFETY: 32 activation bytes of block b, inside the row.
                let a = unsafe { _mm256_loadu_si256(xs[r].q[b * BLOCK..(b + 1) * BLOCK].as_ptr().cast()) };
                let products = if K == Q8_0 {
                    _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w))
                } else {
                    _mm256_maddubs_epi16(w, a)
                };
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
                acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(sc[r][b - g]), acc[r]);
            }
        }
        // Q8_0's products were signed already: its offset is accounted for.
        let c = match K {
            Q4_1 => _mm256_cvtph_ps(unsafe { _mm_loadu_si128(halves16(mins, g).as_ptr().cast()) }),
            Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-format.offset())),
            _ => _mm256_setzero_ps(),
        };
        for r in 0..R {
            let s = unsafe { _mm256_loadu_ps(eight(&xs[r].sum[..blocks], g).as_ptr()) };
            corr[r] = _mm256_fmadd_ps(c, s, corr[r]);
        }
    }
    // A loop, not `array::from_fn`: a closure would not inherit this function's features.
    let mut out = [0f32; R];
    for r in 0..R {
        let v = _mm256_add_ps(acc[r], corr[r]);
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let quarter = _mm_hadd_ps(half, half);
        out[r] = _mm_cvtss_f32(_mm_hadd_ps(quarter, quarter));
    }
    out
}

/// `a · b` over `n` values, 16 lanes at a time.
///
/// # Safety
/// The CPU has AVX-512F; `a` and `b` hold at least `n` values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn dot_f32_avx512(a: &[f32], b: &[f32], n: usize) -> f32 {
    let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    // SAFETY (loads): every full load reads 16 values below n; the tail load is masked to the
    // values below n.
    while i + 32 <= n {
        acc0 = _mm512_fmadd_ps(
            unsafe { _mm512_loadu_ps(a.as_ptr().add(i)) },
            unsafe { _mm512_loadu_ps(b.as_ptr().add(i)) },
            acc0,
        );
        acc1 = _mm512_fmadd_ps(
            unsafe { _mm512_loadu_ps(a.as_ptr().add(i + 16)) },
            unsafe { _mm512_loadu_ps(b.as_ptr().add(i + 16)) },
            acc1,
        );
        i += 32;
    }
    while i < n {
        let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        let x = unsafe { _mm512_maskz_loadu_ps(k, a.as_ptr().add(i)) };
        let y = unsafe { _mm512_maskz_loadu_ps(k, b.as_ptr().add(i)) };
        acc0 = _mm512_fmadd_ps(x, y, acc0);
        i += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

/// `y += alpha · x` over `y.len()` values, 16 lanes at a time.
///
/// # Safety
/// The CPU has AVX-512F; `x` holds at least `y.len()` values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn axpy_f32_avx512(alpha: f32, x: &[f32], y: &mut [f32]) {
    let (n, a) = (y.len(), _mm512_set1_ps(alpha));
    let mut i = 0;
    while i < n {
        let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: the mask keeps every lane below n, inside both slices.
        unsafe {
            let v = _mm512_fmadd_ps(
                a,
                _mm512_maskz_loadu_ps(k, x.as_ptr().add(i)),
                _mm512_maskz_loadu_ps(k, y.as_ptr().add(i)),
            );
            _mm512_mask_storeu_ps(y.as_mut_ptr().add(i), k, v);
        }
        i += 16;
    }
}

/// bf16 values `at..at + 16` of `x` as f32 (masked to the values before `n`).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `x` holds at least `n` values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn bf16_lanes(x: &[half::bf16], at: usize, n: usize) -> __m512 {
    let k = if n - at >= 16 { 0xFFFF } else { ((1u32 << (n - at)) - 1) as __mmask16 };
    // SAFETY: the mask keeps every lane below n, inside `x`; bf16 is a u16 in memory.
    let bits = unsafe { _mm256_maskz_loadu_epi16(k, x.as_ptr().add(at).cast()) };
    // A bf16 is the upper half of the f32 it stands for.
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))
}

/// `a · b` over `n` values, `a` in bf16, 16 lanes at a time.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `a` and `b` hold at least `n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn dot_bf16_avx512(a: &[half::bf16], b: &[f32], n: usize) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: as the function's; the masks keep every lane below n.
        unsafe {
            acc = _mm512_fmadd_ps(bf16_lanes(a, i, n), _mm512_maskz_loadu_ps(k, b.as_ptr().add(i)), acc);
        }
        i += 16;
    }
    _mm512_reduce_add_ps(acc)
}

/// `y += alpha · x` over `y.len()` values, `x` in bf16.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `x` holds at least `y.len()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn axpy_bf16_avx512(alpha: f32, x: &[half::bf16], y: &mut [f32]) {
    let (n, a) = (y.len(), _mm512_set1_ps(alpha));
    let mut i = 0;
    while i < n {
        let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: as the function's; the masks keep every lane below n.
        unsafe {
            let v = _mm512_fmadd_ps(a, bf16_lanes(x, i, n), _mm512_maskz_loadu_ps(k, y.as_ptr().add(i)));
            _mm512_mask_storeu_ps(y.as_mut_ptr().add(i), k, v);
        }
        i += 16;
    }
}
