//! The x86-64 paths of [`super`], chosen at run time: AVX-512 with VNNI (`vpdpbusd`: 64
//! multiply-adds of unsigned quants by signed activations an instruction) and AVX2 with FMA.
//! Both compute a panel's 16 rows at once from the interleaved layout: a vector of quants times
//! four activations broadcast to every lane.

use super::simd::{Q6_K, Q8_0, check, dispatch};
use super::{Ahead, BLOCK, Format, PANEL, PanelOut, Q8Row, QuantMatrix, SUPER};
use std::arch::x86_64::*;

/// Asks for the weights ahead of the block at `at` (`block_bytes` long) to be brought into
/// cache: [`AHEAD_L2`] bytes on into L2 and [`AHEAD_L1`] bytes on into L1, a line for every 64
/// bytes of the block. Consecutive blocks continue each other's sequence of addresses, so as
/// the blocks pass every line is asked for (once, where blocks are whole lines). Decode streams
/// every weight from memory once a step, and the hardware prefetcher alone leaves the kernels
/// waiting on it; a request far enough ahead to cover memory's latency at the kernels' pace is
/// too far for L1, which the lines would leave before use, hence the two. The count is the
/// format's constant, so the requests are straight-line code. (The loop this replaced asked for
/// the lines starting inside each block, a count that varies from block to block; measured on a
/// 2-core Zen 4 with the `quant` bench, one thread, one row from cache ran 33–75% faster
/// without it, eight rows 2–5%, and weights streamed from memory 3–10%.) Past the end of the
/// weights it asks for nothing harmful: a prefetch never faults.
#[inline(always)]
fn prefetch(at: *const u8, block_bytes: usize) {
    for line in 0..block_bytes.div_ceil(64) {
        // SAFETY (both): a prefetch is a hint: it reads nothing into the program and never
        // faults.
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(AHEAD_L2 + 64 * line).cast());
            _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(AHEAD_L1 + 64 * line).cast());
        }
    }
}

/// How far ahead of the block computed [`prefetch`] asks for lines into L2 and into L1. Measured
/// on a 2-core Zen 4 (AVX-512 VNNI) with the `quant` bench's 1B model (Q4_K, one activation
/// row, streamed from memory), alternating builds: 24–27 GB/s with 8 blocks (2.3 KB) ahead into
/// L1 alone, 26–30 GB/s with these; the AVX2 path on the same machine, 20 and 20–22.
const AHEAD_L2: usize = 6144;
const AHEAD_L1: usize = 1536;

/// Four activations of `q` from `at` as one 32-bit value, to broadcast to every lane.
///
/// # Safety
/// `q` holds `at + 4` values.
#[inline(always)]
unsafe fn four(q: &[i8], at: usize) -> i32 {
    // SAFETY: as the function's.
    unsafe { q.as_ptr().add(at).cast::<i32>().read_unaligned() }
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

    /// `out[i][j]` = row `j` of `w`'s panel `p` times `xs[i]`.
    pub(super) fn panel(self, w: &QuantMatrix, p: usize, xs: &[Q8Row<'_>], out: &mut PanelOut, ahead: &mut Ahead<'_>) {
        let (format, blocks, panel) = (w.format, w.blocks(), w.panel(p));
        check(format, blocks, panel, xs);
        // SAFETY: `self` exists only where the features were detected; `check` proved the
        // extents every load in `panel512` relies on.
        unsafe { dispatch!(panel512, format, blocks, panel, xs, out, ahead) }
    }
}

impl Avx512 {
    /// [`super::quantize_row`] sixteen values at a time, with the same operations in the same
    /// order on each value, so the same bits for finite input.
    pub(super) fn quantize_row(self, x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32], halves: &mut [i32]) {
        let two = quantize_extents(x, q, d, sum, halves);
        // SAFETY: `self` proves the features; `quantize_extents` proved every block's extent.
        unsafe { quantize512(x, q, d, sum, halves, two) }
    }
}

/// Checks the extents a SIMD `quantize_row` relies on: `x` whole blocks, `q` one or two limbs of
/// its values, `d` and `sum` a value per block and `halves` two. Whether there are two limbs.
///
/// # Panics
/// When they do not hold (caller bugs).
fn quantize_extents(x: &[f32], q: &[i8], d: &[f32], sum: &[f32], halves: &[i32]) -> bool {
    let blocks = x.len() / BLOCK;
    let limbs = q.len() / x.len().max(1);
    assert!(
        x.len().is_multiple_of(BLOCK) && (limbs == 1 || limbs == 2) && q.len() == limbs * x.len(),
        "quantize: room for {} values, {} given",
        q.len(),
        x.len()
    );
    assert!(
        d.len() >= blocks && sum.len() >= blocks && halves.len() >= 2 * blocks,
        "quantize: room for {} blocks",
        d.len().min(sum.len()).min(halves.len() / 2)
    );
    limbs == 2
}

/// [`Avx512::quantize_row`].
///
/// # Safety
/// The CPU has AVX-512F; `x` is whole blocks, `q` holds `limbs · x.len()` values (high limbs,
/// then low), `d` and `sum` a value per block, `halves` two.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize512(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32], halves: &mut [i32], two: bool) {
    let n = x.len();
    let (lo_min, hi_max) = (_mm512_set1_epi32(-127), _mm512_set1_epi32(127));
    let clamp = |v: __m512i| _mm512_min_epi32(_mm512_max_epi32(v, lo_min), hi_max);
    let limb = _mm512_set1_ps(super::LIMB as f32);
    for b in 0..n / BLOCK {
        // SAFETY (every access below): block b's 32 values, quants and low limbs are inside
        // `x` and `q` (the caller's promise).
        let v =
            unsafe { [_mm512_loadu_ps(x.as_ptr().add(b * BLOCK)), _mm512_loadu_ps(x.as_ptr().add(b * BLOCK + 16))] };
        // (With a NaN in the block the maximum may differ from the scalar one; the quants stay
        // clamped in range either way.)
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1]))).max(0.0);
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale.is_normal() { 1.0 / scale } else { 0.0 });
        let mut totals = [0i32; 2];
        for (h, v) in v.into_iter().enumerate() {
            let at = b * BLOCK + 16 * h;
            let scaled = _mm512_mul_ps(v, inv);
            let high = clamp(_mm512_cvtps_epi32(scaled));
            unsafe { _mm_storeu_si128(q.as_mut_ptr().add(at).cast(), _mm512_cvtepi32_epi8(high)) };
            if two {
                let rest = _mm512_mul_ps(_mm512_sub_ps(scaled, _mm512_cvtepi32_ps(high)), limb);
                let low = clamp(_mm512_cvtps_epi32(rest));
                unsafe { _mm_storeu_si128(q.as_mut_ptr().add(n + at).cast(), _mm512_cvtepi32_epi8(low)) };
                totals[h] = _mm512_reduce_add_epi32(_mm512_add_epi32(
                    _mm512_mullo_epi32(high, _mm512_set1_epi32(super::LIMB)),
                    low,
                ));
            } else {
                totals[h] = _mm512_reduce_add_epi32(high);
            }
        }
        d[b] = if two { scale / super::LIMB as f32 } else { scale };
        sum[b] = d[b] * (totals[0] + totals[1]) as f32;
        (halves[2 * b], halves[2 * b + 1]) = (totals[0], totals[1]);
    }
}

/// Sixteen signed bytes at `at`, as f32.
///
/// # Safety
/// The CPU has AVX-512F; 16 bytes at `at` are readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn ints512(at: *const u8) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(at.cast()) }))
}

/// Eight signed bytes at `at`, as f32.
///
/// # Safety
/// The CPU has AVX2; 8 bytes at `at` are readable.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn ints256(at: *const u8) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(at.cast()) }))
}

/// [`Avx512::panel`] for `R` activation rows of format `K`.
///
/// Per block, the quants become eight vectors (a 4-bit vector's low and high nibbles, or
/// `Q8_0`'s eight), vector `k` holding weights `4k..4k + 4` of every row; `vpdpbusd` multiplies
/// one by activations `4k..4k + 4` broadcast and sums each lane's four products, so after
/// eight of them lane `j` holds row `j`'s integer sum for the block. It is converted and scaled
/// by `d_j·e` in one multiply-add, and the offsets' term is one more.
///
/// # Safety
/// The CPU has the features [`Avx512::detect`] checks; `panel` is `blocks` blocks of `K`, and
/// `xs` holds `R` rows of at least `blocks` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma,avx2")]
unsafe fn panel512<const R: usize, const K: u8, const F: bool>(
    blocks: usize,
    panel: &[u8],
    xs: &[Q8Row<'_>],
    out: &mut PanelOut,
    ahead: &mut Ahead<'_>,
) {
    let format = Format::ALL[K as usize];
    // Callers pass exactly R rows (`panel` matches on the count).
    let Ok(xs) = <&[Q8Row<'_>; R]>::try_from(xs) else { return };
    let (quant_bytes, block_bytes, super_bytes) = (format.quant_bytes(), format.block_bytes(), format.super_bytes());
    let low4 = _mm512_set1_epi8(0x0F);
    let offset = _mm512_set1_ps(-format.offset());
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..blocks {
        // SAFETY (every load below): block b's bytes lie inside `panel`, its quants first
        // (`quant_bytes`), then 16 scales and, with offsets or (Q6_K) second-half scales, 16
        // more (f16, or f32 for the K formats); each activation row holds block b's 32 quants,
        // scale and sum.
        let at = unsafe { panel.as_ptr().add(b * block_bytes) };
        prefetch(at, block_bytes);
        ahead.step();
        let mut w = [_mm512_setzero_si512(); 8];
        if format.byte_quants() {
            for (k, w) in w.iter_mut().enumerate() {
                *w = unsafe { _mm512_loadu_si512(at.add(64 * k).cast()) };
            }
        } else {
            for k in 0..4 {
                let v = unsafe { _mm512_loadu_si512(at.add(64 * k).cast()) };
                w[k] = _mm512_and_si512(v, low4);
                w[4 + k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
            }
        }
        // The offsets' term `m − o·d`, or for Q6_K the second half's scales.
        let (d, c) = if format.is_k() {
            // The block's 8-bit integers times its super-block's f32 scales (exact products).
            // SAFETY: the super-blocks' scales follow the panel's blocks (`check`).
            let (s, n) = unsafe { (ints512(at.add(quant_bytes)), ints512(at.add(quant_bytes + PANEL))) };
            let sup = unsafe { panel.as_ptr().add(blocks * block_bytes + b / SUPER * super_bytes).cast::<f32>() };
            let sd = unsafe { _mm512_loadu_ps(sup) };
            let second = if format.has_offsets() { unsafe { _mm512_loadu_ps(sup.add(PANEL)) } } else { sd };
            (_mm512_mul_ps(sd, s), _mm512_mul_ps(second, n))
        } else {
            let d = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(at.add(quant_bytes).cast()) });
            let c = if format.has_offsets() {
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(at.add(quant_bytes + 2 * PANEL).cast()) })
            } else {
                _mm512_mul_ps(d, offset)
            };
            (d, c)
        };
        for r in 0..R {
            let (q, e, sum) = (xs[r].q, unsafe { *xs[r].d.get_unchecked(b) }, unsafe { *xs[r].sum.get_unchecked(b) });
            // SAFETY: `check` proved block b's values (and low limbs, for F) are inside the row.
            let s = unsafe { sum512(&w, q, b * BLOCK) };
            let lo = if F { unsafe { sum512(&w, xs[r].lo, b * BLOCK) } } else { [_mm512_setzero_si512(); 2] };
            // 254·s + l, as 256·s − 2·s + l.
            let limbs = |s: __m512i, l: __m512i| {
                if F {
                    _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(s, 8), _mm512_add_epi32(s, s)), l)
                } else {
                    s
                }
            };
            let e = _mm512_set1_ps(e);
            if K == Q6_K {
                // Each half's Σ(u − 32)·q, scaled by its own d.
                // SAFETY: `check` proved the row holds two totals a block.
                let totals = unsafe { xs[r].halves.get_unchecked(2 * b..2 * b + 2) };
                for (h, scale) in [d, c].into_iter().enumerate() {
                    let s = _mm512_sub_epi32(limbs(s[h], lo[h]), _mm512_set1_epi32(32 * totals[h]));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(scale, e), acc[r]);
                }
            } else {
                let s = limbs(_mm512_add_epi32(s[0], s[1]), _mm512_add_epi32(lo[0], lo[1]));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, e), acc[r]);
                acc[r] = _mm512_fmadd_ps(c, _mm512_set1_ps(sum), acc[r]);
            }
        }
    }
    for r in 0..R {
        // SAFETY: 16 floats into a row of 16.
        unsafe { _mm512_storeu_ps(out[r].as_mut_ptr(), acc[r]) };
    }
}

/// Lane `j`: the integer sums of row `j`'s block (`w`, eight vectors of unsigned quants, vector
/// `k` holding weights `4k..4k + 4`) times the 32 activations of `q` from `at`, for the first
/// and the second half of the block.
///
/// # Safety
/// The CPU has AVX-512 VNNI; `q` holds `at + 32` values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn sum512(w: &[__m512i; 8], q: &[i8], at: usize) -> [__m512i; 2] {
    // Two chains of four (the halves), so the sums do not wait on each other's latency.
    let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    for k in 0..4 {
        // SAFETY: as the function's.
        s0 = _mm512_dpbusd_epi32(s0, w[k], _mm512_set1_epi32(unsafe { four(q, at + 4 * k) }));
        s1 = _mm512_dpbusd_epi32(s1, w[4 + k], _mm512_set1_epi32(unsafe { four(q, at + 16 + 4 * k) }));
    }
    [s0, s1]
}

/// Proof that this CPU has AVX2, FMA and F16C: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avx2(());

impl Avx2 {
    pub(super) fn detect() -> Option<Avx2> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c"))
            .then_some(Avx2(()))
    }

    /// As [`Avx512::panel`].
    pub(super) fn panel(self, w: &QuantMatrix, p: usize, xs: &[Q8Row<'_>], out: &mut PanelOut, ahead: &mut Ahead<'_>) {
        let (format, blocks, panel) = (w.format, w.blocks(), w.panel(p));
        check(format, blocks, panel, xs);
        // SAFETY: `self` exists only where the features were detected; `check` proved the
        // extents every load in `panel256` relies on.
        unsafe { dispatch!(panel256, format, blocks, panel, xs, out, ahead) }
    }

    /// As [`Avx512::quantize_row`], eight values at a time: the same bits as
    /// [`super::quantize_row`] for finite input.
    pub(super) fn quantize_row(self, x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32], halves: &mut [i32]) {
        let two = quantize_extents(x, q, d, sum, halves);
        // SAFETY: `self` proves the features; `quantize_extents` proved every block's extent.
        unsafe { quantize256(x, q, d, sum, halves, two) }
    }
}

/// Each lane clamped to −127..=127.
#[inline]
#[target_feature(enable = "avx2")]
fn clamp127(v: __m256i) -> __m256i {
    _mm256_min_epi32(_mm256_max_epi32(v, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127))
}

/// Four vectors of 32-bit quants (each in −127..=127) as 32 bytes in order: the packs work
/// within 128-bit lanes, leaving the groups of four in the order 0, 2, 4, 6, 1, 3, 5, 7.
#[inline]
#[target_feature(enable = "avx2")]
fn bytes256(v: &[__m256i; 4]) -> __m256i {
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// The sum of a vector's eight 32-bit lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn sum_i32x8(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
}

/// [`Avx2::quantize_row`].
///
/// # Safety
/// The CPU has AVX2; `x` is whole blocks, `q` holds `limbs · x.len()` values (high limbs, then
/// low), `d` and `sum` a value per block, `halves` two.
#[target_feature(enable = "avx2")]
unsafe fn quantize256(x: &[f32], q: &mut [i8], d: &mut [f32], sum: &mut [f32], halves: &mut [i32], two: bool) {
    let n = x.len();
    let limb = _mm256_set1_ps(super::LIMB as f32);
    let sign = _mm256_set1_ps(-0.0);
    for b in 0..n / BLOCK {
        let mut v = [_mm256_setzero_ps(); 4];
        let mut m = _mm256_setzero_ps();
        for (i, v) in v.iter_mut().enumerate() {
            // SAFETY: block b's 32 values are inside `x` (the caller's promise).
            *v = unsafe { _mm256_loadu_ps(x.as_ptr().add(b * BLOCK + 8 * i)) };
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *v));
        }
        // (With a NaN in the block the maximum may differ from the scalar one; the quants stay
        // clamped in range either way.)
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))).max(0.0);
        let scale = amax / 127.0;
        let inv = _mm256_set1_ps(if scale.is_normal() { 1.0 / scale } else { 0.0 });
        // Each value's quants, and its two limbs as one integer (`LIMB·high + low`) for the totals.
        let (mut high, mut low, mut value) =
            ([_mm256_setzero_si256(); 4], [_mm256_setzero_si256(); 4], [_mm256_setzero_si256(); 4]);
        for i in 0..4 {
            // `cvtps` rounds to nearest, ties to even, as `round` does.
            let scaled = _mm256_mul_ps(v[i], inv);
            high[i] = clamp127(_mm256_cvtps_epi32(scaled));
            value[i] = high[i];
            if two {
                let rest = _mm256_mul_ps(_mm256_sub_ps(scaled, _mm256_cvtepi32_ps(high[i])), limb);
                low[i] = clamp127(_mm256_cvtps_epi32(rest));
                value[i] = _mm256_add_epi32(_mm256_mullo_epi32(high[i], _mm256_set1_epi32(super::LIMB)), low[i]);
            }
        }
        // SAFETY: block b's quants (and low limbs) are inside `q` (the caller's promise).
        unsafe {
            _mm256_storeu_si256(q.as_mut_ptr().add(b * BLOCK).cast(), bytes256(&high));
            if two {
                _mm256_storeu_si256(q.as_mut_ptr().add(n + b * BLOCK).cast(), bytes256(&low));
            }
        }
        let totals = [sum_i32x8(_mm256_add_epi32(value[0], value[1])), sum_i32x8(_mm256_add_epi32(value[2], value[3]))];
        d[b] = if two { scale / super::LIMB as f32 } else { scale };
        sum[b] = d[b] * (totals[0] + totals[1]) as f32;
        (halves[2 * b], halves[2 * b + 1]) = (totals[0], totals[1]);
    }
}

/// As [`panel512`], in two halves of eight rows (the low and high 32 bytes of each 64-byte
/// vector). Without `vpdpbusd`, `maddubs` multiplies unsigned by signed bytes into 16-bit sums
/// of two products and `madd` widens them. For the 4-bit formats a block's eight `maddubs`
/// are added in 16 bits first: each lane is at most 8 · 2 · 15 · 127 = 30480. `Q8_0`'s quants
/// are turned back into signed bytes, and each weight's sign moved onto its activation (its
/// magnitude reaches 128, so 2 · 128 · 127 fits one `maddubs` lane but not two).
///
/// The loops run weight vector by weight vector, each multiplied into every activation row
/// before the next is unpacked: a row's integer sum is then one short chain of adds among `R`
/// independent ones, and the sixteen registers hold the rows' sums instead of a block's eight
/// unpacked vectors (which left too few for the rows, spilled and serialised).
///
/// # Safety
/// As [`panel512`], with the features [`Avx2::detect`] checks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel256<const R: usize, const K: u8, const F: bool>(
    blocks: usize,
    panel: &[u8],
    xs: &[Q8Row<'_>],
    out: &mut PanelOut,
    ahead: &mut Ahead<'_>,
) {
    let format = Format::ALL[K as usize];
    // Callers pass exactly R rows (`panel` matches on the count).
    let Ok(xs) = <&[Q8Row<'_>; R]>::try_from(xs) else { return };
    let (quant_bytes, block_bytes, super_bytes) = (format.quant_bytes(), format.block_bytes(), format.super_bytes());
    let low4 = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    let offset = _mm256_set1_ps(-format.offset());
    for half in 0..2 {
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..blocks {
            // SAFETY (every load below): as in `panel512`, for this half's 32 bytes of each
            // vector and its eight rows' scales and offsets.
            let at = unsafe { panel.as_ptr().add(b * block_bytes) };
            // The second half finds the panel in cache.
            if half == 0 {
                prefetch(at, block_bytes);
                ahead.step();
            }
            // The offsets' term `m − o·d`, or for Q6_K the second half's scales.
            let (d, c) = if format.is_k() {
                // As in `panel512`, for this half's eight rows.
                // SAFETY: the super-blocks' scales follow the panel's blocks (`check`).
                let (s, n) = unsafe {
                    (ints256(at.add(quant_bytes + 8 * half)), ints256(at.add(quant_bytes + PANEL + 8 * half)))
                };
                let sup = unsafe {
                    panel.as_ptr().add(blocks * block_bytes + b / SUPER * super_bytes).cast::<f32>().add(8 * half)
                };
                let sd = unsafe { _mm256_loadu_ps(sup) };
                let second = if format.has_offsets() { unsafe { _mm256_loadu_ps(sup.add(PANEL)) } } else { sd };
                (_mm256_mul_ps(sd, s), _mm256_mul_ps(second, n))
            } else {
                let scales = unsafe { at.add(quant_bytes + 16 * half) };
                let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(scales.cast()) });
                let c = if format.has_offsets() {
                    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(scales.add(2 * PANEL).cast()) })
                } else {
                    _mm256_mul_ps(d, offset)
                };
                (d, c)
            };
            // Row r's block: its integer sum `s · e` (both limbs as one, `LIMB·s + lo`, for F)
            // scaled by `scale` into `acc[r]`; for Q6_K a half's sum, less 32 times the half's
            // activations (as in `panel512`).
            let scaled = |acc: &mut __m256, r: usize, s: __m256i, lo: __m256i, h: usize, scale: __m256| {
                let e = _mm256_set1_ps(unsafe { *xs[r].d.get_unchecked(b) });
                let mut s =
                    if F { _mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32(super::LIMB)), lo) } else { s };
                if K == Q6_K {
                    // SAFETY: `check` proved block b's two totals are inside the row.
                    s = _mm256_sub_epi32(s, _mm256_set1_epi32(32 * unsafe { *xs[r].halves.get_unchecked(2 * b + h) }));
                }
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(scale, e), *acc);
            };
            // The rows a group at a time, eight (four with low limbs, whose sums double the
            // registers): row r's running integer sums in `s` (and `lo`) stay in registers.
            let group = if F { 4 } else { 8 };
            for g in (0..R).step_by(group) {
                let rows = g..(g + group).min(R);
                let (mut s, mut lo) = ([_mm256_setzero_si256(); 8], [_mm256_setzero_si256(); 8]);
                for k in 0..8 {
                    // Vector k: weights 4k..4k + 4 of each of the half's rows.
                    let w = if format.byte_quants() {
                        unsafe { _mm256_loadu_si256(at.add(64 * k + 32 * half).cast()) }
                    } else {
                        let v = unsafe { _mm256_loadu_si256(at.add(64 * (k % 4) + 32 * half).cast()) };
                        _mm256_and_si256(if k < 4 { v } else { _mm256_srli_epi16(v, 4) }, low4)
                    };
                    // The Q5 formats' and Q6_K's quants (at most 63) multiply as unsigned bytes
                    // as they are; Q8_0's are signed again.
                    let w = if K == Q8_0 { _mm256_xor_si256(w, flip) } else { w };
                    let magnitude = _mm256_abs_epi8(w);
                    for (i, r) in rows.clone().enumerate() {
                        // SAFETY: `check` proved block b's values (and low limbs, for F) are
                        // inside the row.
                        let a = _mm256_set1_epi32(unsafe { four(xs[r].q, b * BLOCK + 4 * k) });
                        s[i] = step::<K>(s[i], w, magnitude, a);
                        if F {
                            let a = _mm256_set1_epi32(unsafe { four(xs[r].lo, b * BLOCK + 4 * k) });
                            lo[i] = step::<K>(lo[i], w, magnitude, a);
                        }
                    }
                    if K == Q6_K && k == 3 {
                        // The first half's sums are done: scaled by its own d.
                        for (i, r) in rows.clone().enumerate() {
                            scaled(&mut acc[r], r, s[i], lo[i], 0, d);
                            (s[i], lo[i]) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        }
                    }
                }
                for (i, r) in rows.enumerate() {
                    if K == Q6_K {
                        scaled(&mut acc[r], r, s[i], lo[i], 1, c);
                        continue;
                    }
                    scaled(&mut acc[r], r, finish::<K>(s[i]), finish::<K>(lo[i]), 0, d);
                    // Q8_0's products were signed already: its offset is accounted for.
                    if K != Q8_0 {
                        // SAFETY: `check` proved block b's total is inside the row.
                        let sum = unsafe { *xs[r].sum.get_unchecked(b) };
                        acc[r] = _mm256_fmadd_ps(c, _mm256_set1_ps(sum), acc[r]);
                    }
                }
            }
        }
        for r in 0..R {
            // SAFETY: 8 floats into lanes 8·half.. of a row of 16.
            unsafe { _mm256_storeu_ps(out[r].as_mut_ptr().add(8 * half), acc[r]) };
        }
    }
}

/// Adds the products of one weight vector `w` (`magnitude`: its absolute values, used for
/// `Q8_0`) with four activations `a` broadcast to every lane into a row's running sum `s`: in
/// 16 bits for the 4-bit formats (see [`finish`]), else widened to 32 bits at once (eight
/// `maddubs` of quants up to 63 would not fit 16 bits).
#[inline]
#[target_feature(enable = "avx2")]
fn step<const K: u8>(s: __m256i, w: __m256i, magnitude: __m256i, a: __m256i) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if K == Q8_0 {
        _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(a, w)), ones))
    } else if Format::ALL[K as usize].byte_quants() {
        _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones))
    } else {
        _mm256_add_epi16(s, _mm256_maddubs_epi16(w, a))
    }
}

/// A row's sum from [`step`] in 32 bits.
#[inline]
#[target_feature(enable = "avx2")]
fn finish<const K: u8>(s: __m256i) -> __m256i {
    if Format::ALL[K as usize].byte_quants() { s } else { _mm256_madd_epi16(s, _mm256_set1_epi16(1)) }
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

/// 16-bit floats `at..at + 16` of `x` as f32 (masked to the values before `n`).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `x` holds at least `n` values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn half_lanes<T: crate::ops::Half>(x: &[T], at: usize, n: usize) -> __m512 {
    let k = if n - at >= 16 { 0xFFFF } else { ((1u32 << (n - at)) - 1) as __mmask16 };
    // SAFETY: the mask keeps every lane below n, inside `x`; both 16-bit floats are a u16 in
    // memory.
    let bits = unsafe { _mm256_maskz_loadu_epi16(k, x.as_ptr().add(at).cast()) };
    if T::IEEE {
        _mm512_cvtph_ps(bits)
    } else {
        // A bf16 is the upper half of the f32 it stands for.
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))
    }
}

/// `v[r] = a_r · x` for the `v.len()` consecutive rows `a_r` of `a`, each `x.len()` long (bf16
/// or f16). bf16 rows go eight a pass over `x` ([`dots_bf16_512`]); f16 ones four, each with its
/// own accumulator.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `a` holds `v.len() · x.len()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn dots_half_avx512<T: crate::ops::Half>(a: &[T], x: &[f32], v: &mut [f32]) {
    let n = x.len();
    if !T::IEEE {
        // SAFETY: as the function's; a bf16 is a u16 in memory.
        return unsafe { dots_bf16_512(std::slice::from_raw_parts(a.as_ptr().cast::<u16>(), a.len()), x, v) };
    }
    for (c, v) in v.chunks_mut(4).enumerate() {
        // A short last group repeats its first row; the extra sums are dropped.
        let rows: [&[T]; 4] = std::array::from_fn(|r| {
            let r = 4 * c + if r < v.len() { r } else { 0 };
            &a[r * n..(r + 1) * n]
        });
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i < n {
            let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
            // SAFETY: the masks keep every lane below n, inside `x` and each row.
            let xv = unsafe { _mm512_maskz_loadu_ps(k, x.as_ptr().add(i)) };
            for (acc, row) in acc.iter_mut().zip(rows) {
                *acc = _mm512_fmadd_ps(unsafe { half_lanes(row, i, n) }, xv, *acc);
            }
            i += 16;
        }
        for (v, acc) in v.iter_mut().zip(acc) {
            *v = _mm512_reduce_add_ps(acc);
        }
    }
}

/// Calls `$body` with `$r` = 0, …, 7 while `$r < $rows`, written out, so that arrays indexed by
/// `$r` (a pass's accumulators) stay in registers.
macro_rules! up_to_eight {
    ($r:ident < $rows:expr, $body:block) => {{
        let rows = $rows;
        up_to_eight!(rows, $r, $body, 0 1 2 3 4 5 6 7);
    }};
    ($rows:ident, $r:ident, $body:block, $($i:literal)*) => {$(
        if $i < $rows {
            let $r = $i;
            $body
        }
    )*};
}

/// The 32 bf16 (as `u16`) at `at` as f32: those at even offsets in the first vector, those at
/// odd offsets in the second. A bf16 is the upper half of the f32 it stands for, and in the
/// 32-bit lanes of the load the even one is the lower half and the odd one the upper: a shift
/// and a mask, where a conversion in order takes a shuffle of each half.
///
/// # Safety
/// The CPU has AVX-512F; 32 values at `at` are readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn bf16_pairs(at: *const u16) -> [__m512; 2] {
    // SAFETY: as the function's.
    let w = unsafe { _mm512_loadu_si512(at.cast()) };
    [
        _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)),
        _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(0xFFFF_0000_u32 as i32))),
    ]
}

/// The lane indices that take the even-offset (`EVEN`) and odd-offset (`ODD`) values of two
/// vectors, 32 values in order, into one (`_mm512_permutex2var_ps`), and back.
const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];
const FIRST: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
const SECOND: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];

/// [`dots_half_avx512`] for bf16: eight rows a pass over `x`, 32 values a step, each row's 32
/// widened by [`bf16_pairs`] and multiplied by `x`'s even- and odd-offset values (separated once
/// a step, for the eight rows). Two multiply-adds a row a step, on eight independent chains:
/// the multiply-adds run back to back, where four rows of one each waited on their latency.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `a` holds `v.len() · x.len()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dots_bf16_512(a: &[u16], x: &[f32], v: &mut [f32]) {
    let n = x.len();
    for (c, v) in v.chunks_mut(8).enumerate() {
        let rows = &a[8 * c * n..];
        // A whole eight (every row of a rank-8 adapter) with its row count a constant, so that
        // the step keeps no per-row test and its accumulators stay in registers.
        // SAFETY: as the function's: `rows` holds `v.len()` rows of `n`.
        unsafe {
            if v.len() == 8 {
                dots_bf16_512_eight::<true>(rows, x, v);
            } else {
                dots_bf16_512_eight::<false>(rows, x, v);
            }
        }
    }
}

/// [`dots_bf16_512`] for up to eight rows (`v.len()`; exactly eight where `EIGHT`).
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `a` holds `v.len() · x.len()` values; `v` is at most 8 long.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dots_bf16_512_eight<const EIGHT: bool>(a: &[u16], x: &[f32], v: &mut [f32]) {
    let n = x.len();
    let full = n - n % 32;
    let rows = if EIGHT { 8 } else { v.len() };
    // SAFETY: each table is 16 lanes.
    let (even, odd) = unsafe { (_mm512_loadu_si512(EVEN.as_ptr().cast()), _mm512_loadu_si512(ODD.as_ptr().cast())) };
    let row = |r: usize| a[r * n..(r + 1) * n].as_ptr();
    let mut acc = [_mm512_setzero_ps(); 8];
    for i in (0..full).step_by(32) {
        // SAFETY (every load): values i..i + 32 are below n, inside `x` and each row.
        let (x0, x1) = unsafe { (_mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(x.as_ptr().add(i + 16))) };
        let (xe, xo) = (_mm512_permutex2var_ps(x0, even, x1), _mm512_permutex2var_ps(x0, odd, x1));
        up_to_eight!(r < rows, {
            let [lo, hi] = unsafe { bf16_pairs(row(r).add(i)) };
            acc[r] = _mm512_fmadd_ps(hi, xo, _mm512_fmadd_ps(lo, xe, acc[r]));
        });
    }
    // The last values (fewer than 32), 16 at a time.
    for i in (full..n).step_by(16) {
        let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: the masks keep every lane below n, inside `x` and each row.
        let xv = unsafe { _mm512_maskz_loadu_ps(k, x.as_ptr().add(i)) };
        up_to_eight!(r < rows, {
            let bits = unsafe { _mm256_maskz_loadu_epi16(k, row(r).add(i).cast()) };
            let w = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
            acc[r] = _mm512_fmadd_ps(w, xv, acc[r]);
        });
    }
    for (v, acc) in v.iter_mut().zip(acc) {
        *v = _mm512_reduce_add_ps(acc);
    }
}

/// `y += Σ_r v[r] · b_r` over the `v.len()` consecutive rows `b_r` of `b`, each `y.len()` long
/// (bf16): one pass over `y`, 32 values a step, each row's 32 widened by [`bf16_pairs`] into the
/// even- and odd-offset values of `y` (separated at the step's start and merged back at its end);
/// the rows alternate between two pairs of sums, four independent chains of multiply-adds.
///
/// # Safety
/// The CPU has AVX-512F/BW/VL; `b` holds `v.len() · y.len()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn axpys_bf16_avx512(v: &[f32], b: &[half::bf16], y: &mut [f32]) {
    let n = y.len();
    let full = n - n % 32;
    // SAFETY: a bf16 is a u16 in memory; each table is 16 lanes.
    let b: &[u16] = unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), b.len()) };
    let idx = |i: &[i32; 16]| unsafe { _mm512_loadu_si512(i.as_ptr().cast()) };
    let (even, odd, first, second) = (idx(&EVEN), idx(&ODD), idx(&FIRST), idx(&SECOND));
    for i in (0..full).step_by(32) {
        // SAFETY (every access): values i..i + 32 are below n, inside `y` and each row of `b`.
        unsafe {
            let (y0, y1) = (_mm512_loadu_ps(y.as_ptr().add(i)), _mm512_loadu_ps(y.as_ptr().add(i + 16)));
            let (mut ye, mut yo) = (_mm512_permutex2var_ps(y0, even, y1), _mm512_permutex2var_ps(y0, odd, y1));
            let (mut ye2, mut yo2) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut r = 0;
            while r + 2 <= v.len() {
                let ([lo, hi], w) = (bf16_pairs(b.as_ptr().add(r * n + i)), _mm512_set1_ps(v[r]));
                (ye, yo) = (_mm512_fmadd_ps(w, lo, ye), _mm512_fmadd_ps(w, hi, yo));
                let ([lo, hi], w) = (bf16_pairs(b.as_ptr().add((r + 1) * n + i)), _mm512_set1_ps(v[r + 1]));
                (ye2, yo2) = (_mm512_fmadd_ps(w, lo, ye2), _mm512_fmadd_ps(w, hi, yo2));
                r += 2;
            }
            if r < v.len() {
                let ([lo, hi], w) = (bf16_pairs(b.as_ptr().add(r * n + i)), _mm512_set1_ps(v[r]));
                (ye, yo) = (_mm512_fmadd_ps(w, lo, ye), _mm512_fmadd_ps(w, hi, yo));
            }
            let (ye, yo) = (_mm512_add_ps(ye, ye2), _mm512_add_ps(yo, yo2));
            _mm512_storeu_ps(y.as_mut_ptr().add(i), _mm512_permutex2var_ps(ye, first, yo));
            _mm512_storeu_ps(y.as_mut_ptr().add(i + 16), _mm512_permutex2var_ps(ye, second, yo));
        }
    }
    // The last values (fewer than 32), 16 at a time.
    for i in (full..n).step_by(16) {
        let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: the mask keeps every lane below n, inside `y` and each row of `b`.
        unsafe {
            let mut sum = _mm512_maskz_loadu_ps(k, y.as_ptr().add(i));
            for (r, &w) in v.iter().enumerate() {
                let bits = _mm256_maskz_loadu_epi16(k, b.as_ptr().add(r * n + i).cast());
                let row = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
                sum = _mm512_fmadd_ps(_mm512_set1_ps(w), row, sum);
            }
            _mm512_mask_storeu_ps(y.as_mut_ptr().add(i), k, sum);
        }
    }
}

/// The sum of a vector's eight lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn sum_lanes256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// As [`dot_f32_avx512`], eight lanes at a time, the values past the last full eight one by one.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` and `b` hold at least `n` values.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32_avx2(a: &[f32], b: &[f32], n: usize) -> f32 {
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY (loads): every load reads 8 values below n.
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(
            unsafe { _mm256_loadu_ps(a.as_ptr().add(i)) },
            unsafe { _mm256_loadu_ps(b.as_ptr().add(i)) },
            acc0,
        );
        acc1 = _mm256_fmadd_ps(
            unsafe { _mm256_loadu_ps(a.as_ptr().add(i + 8)) },
            unsafe { _mm256_loadu_ps(b.as_ptr().add(i + 8)) },
            acc1,
        );
        i += 16;
    }
    if i + 8 <= n {
        acc0 = _mm256_fmadd_ps(
            unsafe { _mm256_loadu_ps(a.as_ptr().add(i)) },
            unsafe { _mm256_loadu_ps(b.as_ptr().add(i)) },
            acc0,
        );
        i += 8;
    }
    sum_lanes256(_mm256_add_ps(acc0, acc1)) + (i..n).map(|i| a[i] * b[i]).sum::<f32>()
}

/// As [`axpy_f32_avx512`], eight lanes at a time.
///
/// # Safety
/// The CPU has AVX2 and FMA; `x` holds at least `y.len()` values.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn axpy_f32_avx2(alpha: f32, x: &[f32], y: &mut [f32]) {
    let (n, a) = (y.len(), _mm256_set1_ps(alpha));
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: values i..i + 8 are below n, inside both slices.
        unsafe {
            let v = _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(y.as_ptr().add(i)));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), v);
        }
        i += 8;
    }
    for i in i..n {
        y[i] += alpha * x[i];
    }
}

/// 16-bit floats `at..at + 8` of `x` as f32.
///
/// # Safety
/// The CPU has AVX2 and F16C; `x` holds at least `at + 8` values.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn half8<T: crate::ops::Half>(x: &[T], at: usize) -> __m256 {
    // SAFETY: as the function's; both 16-bit floats are a u16 in memory.
    let bits = unsafe { _mm_loadu_si128(x.as_ptr().add(at).cast()) };
    if T::IEEE {
        _mm256_cvtph_ps(bits)
    } else {
        // A bf16 is the upper half of the f32 it stands for.
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16))
    }
}

/// `out = x` widened to f32 (`out` as long as `x`), eight values at a time.
///
/// # Safety
/// The CPU has AVX2 and F16C.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn widen_avx2<T: crate::ops::Half>(x: &[T], out: &mut [f32]) {
    let n = x.len().min(out.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: values i..i + 8 are below n, inside both slices.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), half8(x, i)) };
        i += 8;
    }
    for i in i..n {
        out[i] = x[i].widen();
    }
}

/// As [`dots_half_avx512`], eight lanes at a time: bf16 rows eight a pass ([`dots_bf16_256`]),
/// f16 ones four.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `a` holds `v.len() · x.len()` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dots_half_avx2<T: crate::ops::Half>(a: &[T], x: &[f32], v: &mut [f32]) {
    let n = x.len();
    if !T::IEEE {
        // SAFETY: as the function's; a bf16 is a u16 in memory.
        return unsafe { dots_bf16_256(std::slice::from_raw_parts(a.as_ptr().cast::<u16>(), a.len()), x, v) };
    }
    let full = n - n % 8;
    for (c, v) in v.chunks_mut(4).enumerate() {
        // A short last group repeats its first row; the extra sums are dropped.
        let rows: [&[T]; 4] = std::array::from_fn(|r| {
            let r = 4 * c + if r < v.len() { r } else { 0 };
            &a[r * n..(r + 1) * n]
        });
        let mut acc = [_mm256_setzero_ps(); 4];
        for i in (0..full).step_by(8) {
            // SAFETY: values i..i + 8 are below n, inside `x` and each row.
            let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) };
            for (acc, row) in acc.iter_mut().zip(rows) {
                *acc = _mm256_fmadd_ps(unsafe { half8(row, i) }, xv, *acc);
            }
        }
        for ((v, acc), row) in v.iter_mut().zip(acc).zip(rows) {
            *v = sum_lanes256(acc) + (full..n).map(|i| row[i].widen() * x[i]).sum::<f32>();
        }
    }
}

/// As [`bf16_pairs`], 16 bf16 at `at`: those at even offsets, then those at odd ones.
///
/// # Safety
/// The CPU has AVX2; 16 values at `at` are readable.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bf16_pairs256(at: *const u16) -> [__m256; 2] {
    // SAFETY: as the function's.
    let w = unsafe { _mm256_loadu_si256(at.cast()) };
    [
        _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)),
        _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(0xFFFF_0000_u32 as i32))),
    ]
}

/// The values at even and at odd offsets of 16 in order (`x0`, then `x1`), each eight in order.
#[inline]
#[target_feature(enable = "avx2")]
fn deinterleave256(x0: __m256, x1: __m256) -> [__m256; 2] {
    // Within each 128-bit half: 0, 2 of `x0`'s and 0, 2 of `x1`'s (1, 3 for the odd ones); then
    // the 64-bit quarters back in order.
    let (even, odd) = (_mm256_shuffle_ps::<0b10_00_10_00>(x0, x1), _mm256_shuffle_ps::<0b11_01_11_01>(x0, x1));
    let order = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
    [order(even), order(odd)]
}

/// [`dots_bf16_512`] eight lanes at a time: 16 values a step.
///
/// # Safety
/// The CPU has AVX2 and FMA; `a` holds `v.len() · x.len()` values.
#[target_feature(enable = "avx2,fma")]
unsafe fn dots_bf16_256(a: &[u16], x: &[f32], v: &mut [f32]) {
    let n = x.len();
    let full = n - n % 16;
    for (c, v) in v.chunks_mut(8).enumerate() {
        let row = |r: usize| &a[(8 * c + r) * n..(8 * c + r + 1) * n];
        let mut acc = [_mm256_setzero_ps(); 8];
        for i in (0..full).step_by(16) {
            // SAFETY (every load): values i..i + 16 are below n, inside `x` and each row.
            let (x0, x1) = unsafe { (_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(x.as_ptr().add(i + 8))) };
            let [xe, xo] = deinterleave256(x0, x1);
            up_to_eight!(r < v.len(), {
                let [lo, hi] = unsafe { bf16_pairs256(row(r).as_ptr().add(i)) };
                acc[r] = _mm256_fmadd_ps(hi, xo, _mm256_fmadd_ps(lo, xe, acc[r]));
            });
        }
        for (r, (v, acc)) in v.iter_mut().zip(acc).enumerate() {
            let tail = (full..n).map(|i| f32::from_bits(u32::from(row(r)[i]) << 16) * x[i]).sum::<f32>();
            *v = sum_lanes256(acc) + tail;
        }
    }
}

/// As [`axpys_bf16_avx512`], eight lanes at a time: 16 values a step.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `b` holds `v.len() · y.len()` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpys_bf16_avx2(v: &[f32], b: &[half::bf16], y: &mut [f32]) {
    let n = y.len();
    let full = n - n % 16;
    // SAFETY: a bf16 is a u16 in memory.
    let bits: &[u16] = unsafe { std::slice::from_raw_parts(b.as_ptr().cast(), b.len()) };
    for i in (0..full).step_by(16) {
        // SAFETY (every access): values i..i + 16 are below n, inside `y` and each row of `b`.
        unsafe {
            let [mut ye, mut yo] =
                deinterleave256(_mm256_loadu_ps(y.as_ptr().add(i)), _mm256_loadu_ps(y.as_ptr().add(i + 8)));
            let (mut ye2, mut yo2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut r = 0;
            while r + 2 <= v.len() {
                let ([lo, hi], w) = (bf16_pairs256(bits.as_ptr().add(r * n + i)), _mm256_set1_ps(v[r]));
                (ye, yo) = (_mm256_fmadd_ps(w, lo, ye), _mm256_fmadd_ps(w, hi, yo));
                let ([lo, hi], w) = (bf16_pairs256(bits.as_ptr().add((r + 1) * n + i)), _mm256_set1_ps(v[r + 1]));
                (ye2, yo2) = (_mm256_fmadd_ps(w, lo, ye2), _mm256_fmadd_ps(w, hi, yo2));
                r += 2;
            }
            if r < v.len() {
                let ([lo, hi], w) = (bf16_pairs256(bits.as_ptr().add(r * n + i)), _mm256_set1_ps(v[r]));
                (ye, yo) = (_mm256_fmadd_ps(w, lo, ye), _mm256_fmadd_ps(w, hi, yo));
            }
            let (ye, yo) = (_mm256_add_ps(ye, ye2), _mm256_add_ps(yo, yo2));
            // Back in order: the pairs of each 128-bit half, then the halves.
            let (low, high) = (_mm256_unpacklo_ps(ye, yo), _mm256_unpackhi_ps(ye, yo));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_permute2f128_ps::<0x20>(low, high));
            _mm256_storeu_ps(y.as_mut_ptr().add(i + 8), _mm256_permute2f128_ps::<0x31>(low, high));
        }
    }
    for (r, &v) in v.iter().enumerate() {
        for i in full..n {
            y[i] += v * b[r * n + i].to_f32();
        }
    }
}

/// `e^x` in every lane: `x = n·ln 2 + r` with an integer `n` and `|r| <= ln 2 / 2` (ln 2 in two
/// parts, so `r` carries no rounding from the product), `e^r` by its Taylor series to degree 7
/// (truncation below 6e-9), and `2^n` applied by `vscalefps`, which goes to 0 and to infinity
/// where `e^x` leaves f32's range. Within a few ulp of the exact value (tested); NaN stays NaN.
///
/// # Safety
/// The CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
    // ln 2 to 16 significant bits (0.693145751953125), so n · LN2_HI is exact, and the rest.
    const LN2_HI: f32 = f32::from_bits(0x3F31_7200);
    const LN2_LO: f32 = (std::f64::consts::LN_2 - LN2_HI as f64) as f32;
    // Beyond ±104 the result is 0 or infinity anyway; the clamp keeps n and r finite (a NaN
    // passes: `vminps`/`vmaxps` return their second operand when either is NaN).
    let x = _mm512_max_ps(_mm512_set1_ps(-104.0), _mm512_min_ps(_mm512_set1_ps(104.0), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x));
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// [`crate::ops::exp_scaled`], 16 lanes at a time.
///
/// # Safety
/// The CPU has AVX-512F; `out` holds at least `x.len()` values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp_scaled512(x: &[f32], div: f32, sub: f32, out: &mut [f32]) {
    let (n, div, sub) = (x.len(), _mm512_set1_ps(div), _mm512_set1_ps(sub));
    let mut i = 0;
    while i < n {
        let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: the mask keeps every lane below n, inside `x` and `out`.
        unsafe {
            let v = _mm512_maskz_loadu_ps(k, x.as_ptr().add(i));
            let e = exp512(_mm512_sub_ps(_mm512_div_ps(v, div), sub));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, e);
        }
        i += 16;
    }
}

/// `out[i] = silu(gate[i]) · up[i]` over `out.len()` values, 16 lanes at a time.
///
/// # Safety
/// The CPU has AVX-512F; `gate` and `up` hold at least `out.len()` values.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn silu_mul512(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let (n, one) = (out.len(), _mm512_set1_ps(1.0));
    let mut i = 0;
    while i < n {
        let k = if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        // SAFETY: the mask keeps every lane below n, inside the three slices.
        unsafe {
            let g = _mm512_maskz_loadu_ps(k, gate.as_ptr().add(i));
            let e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let silu = _mm512_div_ps(g, _mm512_add_ps(one, e));
            let v = _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(k, up.as_ptr().add(i)));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), k, v);
        }
        i += 16;
    }
}
