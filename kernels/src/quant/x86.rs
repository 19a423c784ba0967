//! The x86-64 paths of [`super`]: AVX2 (with FMA), chosen at run time.

use super::{BLOCK, Format, Q8Row, f16_at};
use std::arch::x86_64::*;

/// Proof that this CPU has AVX2 and FMA: only [`Avx2::detect`] makes one.
#[derive(Debug, Clone, Copy)]
pub(super) struct Avx2(());

impl Avx2 {
    pub(super) fn detect() -> Option<Avx2> {
        (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Avx2(()))
    }

    /// [`super::dot_scalar`], on 32 lanes at a time.
    pub(super) fn dot(self, format: Format, row: &[u8], x: &Q8Row) -> f32 {
        let blocks = row.len() / format.block_bytes();
        assert!(
            row.len() == blocks * format.block_bytes() && x.q.len() >= blocks * BLOCK && x.d.len() >= blocks,
            "dot: the row and the activations do not match"
        );
        // SAFETY: `self` exists only where AVX2 and FMA were detected; the assert above keeps
        // every load inside `row` and `x` (see `dot_avx2`).
        unsafe { dot_avx2(format, row, x) }
    }
}

/// # Safety
/// The CPU has AVX2 and FMA; `row` is `blocks` whole blocks of `format`, and `x` holds at
/// least `blocks` blocks.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(format: Format, row: &[u8], x: &Q8Row) -> f32 {
    let bb = format.block_bytes();
    let blocks = row.len() / bb;
    let mut acc = _mm256_setzero_ps();
    let mut offsets = 0f32;
    let ones = _mm256_set1_epi16(1);
    let nibble = _mm_set1_epi8(0x0F);
    for b in 0..blocks {
        let blk = &row[b * bb..(b + 1) * bb];
        // SAFETY (loads): 32 activation bytes at b·32 are inside `x.q`; the weight loads read
        // 32 bytes at offset 2 of a 34-byte Q8_0 block, or 16 bytes at offset 2 (Q4_0, 18 bytes)
        // or 4 (Q4_1, 20 bytes): all inside `blk`. Unaligned loads are used throughout.
        let a = unsafe { _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK).cast()) };
        let products = match format {
            Format::Q8_0 => {
                let w = unsafe { _mm256_loadu_si256(blk.as_ptr().add(2).cast()) };
                // maddubs multiplies unsigned by signed bytes: |w| times a with w's sign.
                _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w))
            }
            Format::Q4_0 | Format::Q4_1 => {
                let at = if format == Format::Q4_0 { 2 } else { 4 };
                let q = unsafe { _mm_loadu_si128(blk.as_ptr().add(at).cast()) };
                // Low nibbles are weights 0..16, high nibbles 16..32.
                let lo = _mm_and_si128(q, nibble);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), nibble);
                let w = _mm256_set_m128i(hi, lo);
                if format == Format::Q4_0 {
                    let w = _mm256_sub_epi8(w, _mm256_set1_epi8(8));
                    _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w))
                } else {
                    _mm256_maddubs_epi16(w, a)
                }
            }
        };
        // Pairs of 16-bit products (at most 2·128·127, no saturation) into eight 32-bit sums.
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
        let d = f16_at(blk, 0) * x.d[b];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), sums, acc);
        if format == Format::Q4_1 {
            offsets += f16_at(blk, 2) * x.sum[b];
        }
    }
    let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let quarter = _mm_hadd_ps(half, half);
    _mm_cvtss_f32(_mm_hadd_ps(quarter, quarter)) + offsets
}
