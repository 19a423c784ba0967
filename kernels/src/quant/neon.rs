//! The aarch64 path of [`super`], chosen at run time: NEON with the dot-product extension
//! (`sdot`: sixteen multiply-adds of signed bytes an instruction, four into each 32-bit lane).
//! A 128-bit vector holds four lanes of the interleaved layout, so a panel's 16 rows are
//! computed as four groups of four, each group over every block of the panel; the panel is in
//! cache after the first.
//!
//! The dot-product intrinsics are not stable Rust, so `sdot` is written as inline assembly; the
//! rest is `core::arch` intrinsics.

use super::simd::{Q6_K, Q8_0, check, dispatch};
use super::{Ahead, BLOCK, Format, PANEL, PanelOut, Q8Row, QuantMatrix, SUPER};
use std::arch::aarch64::*;
use std::arch::{asm, is_aarch64_feature_detected};

/// Proof that this CPU has NEON with the dot-product instructions (`dotprod`) and half-precision
/// conversions (`fp16`): only [`Neon::detect`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neon(());

impl Neon {
    pub(super) fn detect() -> Option<Neon> {
        (is_aarch64_feature_detected!("neon")
            && is_aarch64_feature_detected!("dotprod")
            && is_aarch64_feature_detected!("fp16"))
        .then_some(Neon(()))
    }

    /// `out[i][j]` = row `j` of `w`'s panel `p` times `xs[i]`.
    pub(super) fn panel(self, w: &QuantMatrix, p: usize, xs: &[Q8Row<'_>], out: &mut PanelOut, ahead: &mut Ahead<'_>) {
        let (format, blocks, panel) = (w.format, w.blocks(), w.panel(p));
        check(format, blocks, panel, xs);
        // SAFETY: `self` exists only where the features were detected; `check` proved the
        // extents every load in `panel_neon` relies on.
        unsafe { dispatch!(panel_neon, format, blocks, panel, xs, out, ahead) }
    }
}

/// [`Neon::panel`] for `R` activation rows of format `K`, as the x86 kernels compute it, four
/// rows at a time: per block, the group's quants become eight vectors (vector `k` holding
/// weights `4k..4k + 4` of each of the four rows), `sdot` multiplies each by activations
/// `4k..4k + 4` and sums each lane's four products, and the integer sums are converted and
/// scaled by `d_j·e` in one multiply-add, the offsets' term being one more. `Q8_0`'s quants are
/// turned back into signed bytes (its offset term is then none); the others (at most 63) are
/// signed bytes as they are.
///
/// # Safety
/// The CPU has the features [`Neon::detect`] checks; `panel` is `blocks` blocks of `K`, and
/// `xs` holds `R` rows of at least `blocks` blocks.
#[target_feature(enable = "neon,dotprod,fp16")]
unsafe fn panel_neon<const R: usize, const K: u8, const F: bool>(
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
    let (low4, flip) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x80));
    let offset = vdupq_n_f32(-format.offset());
    for g in 0..PANEL / 4 {
        let mut acc = [vdupq_n_f32(0.0); R];
        for b in 0..blocks {
            // SAFETY (every load below): block b's bytes lie inside `panel`, its quants first
            // (`quant_bytes`, this group's 16 bytes of each 64), then 16 scales and, with
            // offsets or (Q6_K) second-half scales, 16 more (f16, or f32 for the K formats);
            // each activation row holds block b's 32 quants, scale and sum.
            let at = unsafe { panel.as_ptr().add(b * block_bytes) };
            if g == 0 {
                ahead.step();
            }
            let mut w = [vdupq_n_s8(0); 8];
            if format.byte_quants() {
                for (k, w) in w.iter_mut().enumerate() {
                    let v = unsafe { vld1q_u8(at.add(64 * k + 16 * g)) };
                    *w = vreinterpretq_s8_u8(if K == Q8_0 { veorq_u8(v, flip) } else { v });
                }
            } else {
                for k in 0..4 {
                    let v = unsafe { vld1q_u8(at.add(64 * k + 16 * g)) };
                    w[k] = vreinterpretq_s8_u8(vandq_u8(v, low4));
                    w[4 + k] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                }
            }
            // The offsets' term `m − o·d`, or for Q6_K the second half's scales.
            let (d, c) = if format.is_k() {
                // The block's 8-bit integers times its super-block's f32 scales (exact).
                // SAFETY: the super-blocks' scales follow the panel's blocks (`check`).
                let (s, n) =
                    unsafe { (ints4(at.add(quant_bytes + 4 * g)), ints4(at.add(quant_bytes + PANEL + 4 * g))) };
                let sup = unsafe { panel.as_ptr().add(blocks * block_bytes + b / SUPER * super_bytes + 16 * g) };
                let sd = unsafe { f32x4(sup) };
                let second = if format.has_offsets() { unsafe { f32x4(sup.add(4 * PANEL)) } } else { sd };
                (vmulq_f32(sd, s), vmulq_f32(second, n))
            } else {
                let scales = unsafe { at.add(quant_bytes + 8 * g) };
                let d = unsafe { f16x4(scales) };
                let c =
                    if format.has_offsets() { unsafe { f16x4(scales.add(2 * PANEL)) } } else { vmulq_f32(d, offset) };
                (d, c)
            };
            for r in 0..R {
                let x = &xs[r];
                // SAFETY: `check` proved block b's values (and low limbs, for F), its scale, sum
                // and two totals are inside the row.
                let (e, sum) = unsafe { (*x.d.get_unchecked(b), *x.sum.get_unchecked(b)) };
                let mut s = unsafe { sums(&w, x.q, b * BLOCK) };
                if F {
                    let lo = unsafe { sums(&w, x.lo, b * BLOCK) };
                    for (s, lo) in s.iter_mut().zip(lo) {
                        *s = vmlaq_n_s32(lo, *s, super::LIMB);
                    }
                }
                let e = vdupq_n_f32(e);
                if K == Q6_K {
                    // Each half's Σ(u − 32)·q, scaled by its own d.
                    let totals = unsafe { x.halves.get_unchecked(2 * b..2 * b + 2) };
                    for (h, scale) in [d, c].into_iter().enumerate() {
                        let s = vsubq_s32(s[h], vdupq_n_s32(32 * totals[h]));
                        acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(s), vmulq_f32(scale, e));
                    }
                    continue;
                }
                acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(vaddq_s32(s[0], s[1])), vmulq_f32(d, e));
                if K != Q8_0 {
                    acc[r] = vfmaq_f32(acc[r], c, vdupq_n_f32(sum));
                }
            }
        }
        for r in 0..R {
            // SAFETY: 4 floats into lanes 4·g.. of a row of 16.
            unsafe { vst1q_f32(out[r].as_mut_ptr().add(4 * g), acc[r]) };
        }
    }
}

/// Four f16 values from `at` (any alignment), as f32.
///
/// # Safety
/// The CPU has `fp16`; `at` points at 8 readable bytes.
#[inline]
#[target_feature(enable = "neon,fp16")]
unsafe fn f16x4(at: *const u8) -> float32x4_t {
    // SAFETY: as the function's.
    vcvt_f32_f16(vreinterpret_f16_u8(unsafe { vld1_u8(at) }))
}

/// Four signed bytes from `at`, as f32.
///
/// # Safety
/// `at` points at 4 readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn ints4(at: *const u8) -> float32x4_t {
    // SAFETY: as the function's.
    let four = unsafe { at.cast::<u32>().read_unaligned() };
    vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vcreate_s8(u64::from(four))))))
}

/// Four f32 values from `at` (any alignment).
///
/// # Safety
/// `at` points at 16 readable bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f32x4(at: *const u8) -> float32x4_t {
    // SAFETY: as the function's.
    vreinterpretq_f32_u8(unsafe { vld1q_u8(at) })
}

/// Lane `j`: the integer sums of row `j`'s block (`w`, eight vectors of signed quants, vector
/// `k` holding weights `4k..4k + 4` of four rows) times the 32 activations of `q` from `at`,
/// for the first and the second half of the block. Two chains of four, so the halves' sums do
/// not wait on each other's latency.
///
/// # Safety
/// The CPU has `dotprod`; `q` holds `at + 32` values.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sums(w: &[int8x16_t; 8], q: &[i8], at: usize) -> [int32x4_t; 2] {
    // SAFETY: as the function's.
    let (first, second) = unsafe { (vld1q_s8(q.as_ptr().add(at)), vld1q_s8(q.as_ptr().add(at + 16))) };
    let zero = vdupq_n_s32(0);
    // SAFETY (each `sdot`): the caller's promise of `dotprod`.
    unsafe {
        let s0 = sdot::<3>(sdot::<2>(sdot::<1>(sdot::<0>(zero, w[0], first), w[1], first), w[2], first), w[3], first);
        let s1 =
            sdot::<3>(sdot::<2>(sdot::<1>(sdot::<0>(zero, w[4], second), w[5], second), w[6], second), w[7], second);
        [s0, s1]
    }
}

/// `acc` plus, in lane `j`, the four signed bytes of lane `j` of `w` times the four of lane `L`
/// of `x` (`sdot` by element).
///
/// # Safety
/// The CPU has `dotprod`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot<const L: i32>(mut acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    // SAFETY: the instruction exists (the caller's promise) and touches only these registers.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{lane}]",
            acc = inout(vreg) acc,
            w = in(vreg) w,
            x = in(vreg) x,
            lane = const L,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}
