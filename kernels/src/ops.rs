//! Element-wise and row-wise operations of a Llama-family decoder layer.

use half::{bf16, f16};

/// Copies embedding rows: `out[t] = table[ids[t]]`.
///
/// # Panics
/// When an id is outside the table. Callers validate ids at the boundary, so this is a bug.
pub fn embedding(table: &[f32], hidden: usize, ids: &[u32], out: &mut [f32]) {
    for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
        let start = id as usize * hidden;
        row.copy_from_slice(&table[start..start + hidden]);
    }
}

/// RMSNorm as Llama defines it: `y = x / sqrt(mean(x²) + eps) · weight`, computed in f32
/// (the mean accumulates in f64 for a reference-grade result), row by row.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let hidden = weight.len();
    crate::team::for_each_row(out, hidden, &|r, o| rms_norm_row(&x[r * hidden..(r + 1) * hidden], weight, eps, o));
}

/// [`rms_norm`] of one row.
pub fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // The squares in eight running sums, which the compiler keeps in vectors: one sum's chain
    // of dependent f64 additions took about four times as long (a 576-wide row, Zen 4).
    let mut sums = [0f64; 8];
    let eights = x.chunks_exact(8);
    let rest: f64 = eights.remainder().iter().map(|&v| v as f64 * v as f64).sum();
    for eight in eights {
        for (sum, &v) in sums.iter_mut().zip(eight) {
            *sum += v as f64 * v as f64;
        }
    }
    let mean_sq = (sums.iter().sum::<f64>() + rest) / x.len().max(1) as f64;
    let inv = 1.0 / ((mean_sq as f32) + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(weight) {
        *o = (x * inv) * w;
    }
}

/// `x += y` (over the shorter of the two): the residual connection, a row at a time in the
/// sections that read it next.
pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (x, y) in x.iter_mut().zip(y) {
        *x += y;
    }
}

/// SwiGLU: for each row of a fused `[gate | up]` matrix (`2·inter` wide), writes
/// `silu(gate) · up` into `out` (`inter` wide).
pub fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    crate::team::for_each_row(out, inter, &|r, o| silu_mul_row(&gate_up[2 * inter * r..2 * inter * (r + 1)], o));
}

/// [`silu_mul`] of one `[gate | up]` row into `out` (half its width).
pub fn silu_mul_row(gate_up: &[f32], out: &mut [f32]) {
    let (gate, up) = gate_up.split_at(out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() {
        // SAFETY: AVX-512F is present; gate and up hold `out.len()` values each.
        return unsafe { crate::quant::x86::silu_mul512(gate, &up[..out.len()], out) };
    }
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `out[i] = e^(x[i] / div − sub)`: a softmax's weights, from logits at a temperature less their
/// largest. The vector exponential where the CPU has AVX-512 (within a few ulp of the exact
/// value, 0 below f32's range, NaN for NaN), `f32::exp` elsewhere.
///
/// # Panics
/// When `out` is shorter than `x` (a caller bug).
pub fn exp_scaled(x: &[f32], div: f32, sub: f32, out: &mut [f32]) {
    assert!(out.len() >= x.len(), "exp_scaled: room for {} values, {} given", out.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() {
        // SAFETY: AVX-512F is present; `out` holds `x.len()` values.
        return unsafe { crate::quant::x86::exp_scaled512(x, div, sub, out) };
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v / div - sub).exp();
    }
}

/// Rotary position embedding in the "rotate half" layout Hugging Face Llama uses: for each head,
/// dimension `i < d/2` pairs with `i + d/2`.
///
/// `x` is `[tokens, row_stride]` and the heads to rotate are `n_heads` consecutive `head_dim`
/// blocks starting at column `col_offset` (so the `q` and `k` parts of a fused `qkv` row can be
/// rotated in place). The angle of pair `i` at position `p` is `p · inv_freq[i]` in f32, and
/// `cos`/`sin` are multiplied by `attention_scaling` (1 except for YaRN).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    x: &mut [f32],
    row_stride: usize,
    col_offset: usize,
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    inv_freq: &[f32],
    attention_scaling: f32,
) {
    let turns = rope_turns(positions, inv_freq, attention_scaling);
    crate::team::for_each_row(x, row_stride, &|r, row| {
        let heads = &mut row[col_offset..col_offset + n_heads * head_dim];
        rope_row(heads, head_dim, &turns[r * head_dim..(r + 1) * head_dim]);
    });
}

/// What [`rope`] turns each pair by at each of `positions`: per position, the `cos` of every
/// pair's angle, then its `sin` (`2 · inv_freq.len()` values), each times `attention_scaling`.
/// Every layer of a step turns its rows by the same angles: a step works them out once.
pub fn rope_turns(positions: &[u32], inv_freq: &[f32], attention_scaling: f32) -> Vec<f32> {
    let half = inv_freq.len();
    let mut turns = vec![0f32; positions.len() * 2 * half];
    for (&pos, turns) in positions.iter().zip(turns.chunks_exact_mut(2 * half)) {
        let (cos, sin) = turns.split_at_mut(half);
        for ((&f, cos), sin) in inv_freq.iter().zip(cos).zip(sin) {
            let (s, c) = (pos as f32 * f).sin_cos();
            (*cos, *sin) = (c * attention_scaling, s * attention_scaling);
        }
    }
    turns
}

/// [`rope`] of one row's heads (`heads`: consecutive `head_dim` blocks), turned by its
/// position's [`rope_turns`] (`head_dim` values).
pub fn rope_row(heads: &mut [f32], head_dim: usize, turns: &[f32]) {
    debug_assert_eq!(turns.len(), head_dim);
    let (cos, sin) = turns.split_at(head_dim / 2);
    for head in heads.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(head_dim / 2);
        for (((a, b), &cos), &sin) in a.iter_mut().zip(b).zip(cos).zip(sin) {
            (*a, *b) = (*a * cos - *b * sin, *b * cos + *a * sin);
        }
    }
}

/// Asks for every cache line of `values` to be brought in (a hint: it never faults and changes
/// nothing the program reads).
pub fn prefetch<T>(values: &[T]) {
    lines(values, false);
}

/// As [`prefetch`], into L2: for what is read a while later (the next item of a loop).
pub fn prefetch_l2<T>(values: &[T]) {
    lines(values, true);
}

/// [`prefetch`] into L1, or into L2 only.
#[inline(always)]
fn lines<T>(values: &[T], l2: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        let (start, bytes) = (values.as_ptr() as usize, std::mem::size_of_val(values));
        for line in (start & !63..start + bytes).step_by(64) {
            // SAFETY: a prefetch reads nothing into the program and never faults.
            unsafe {
                if l2 {
                    _mm_prefetch::<_MM_HINT_T1>(line as *const i8)
                } else {
                    _mm_prefetch::<_MM_HINT_T0>(line as *const i8)
                }
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (values, l2);
}

/// A 16-bit float that matrices are kept in as they were stored (bf16 or f16): every value
/// widens exactly to f32.
pub trait Half: Copy + Send + Sync + 'static {
    /// Whether this is IEEE f16 (widened by a conversion instruction) rather than bf16 (the
    /// upper half of its f32).
    const IEEE: bool;

    fn widen(self) -> f32;
}

impl Half for bf16 {
    const IEEE: bool = false;

    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Half for f16 {
    const IEEE: bool = true;

    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `out = x`, widened to f32 (over the shorter of the two).
pub fn widen_half<T: Half>(x: &[T], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: AVX2 and F16C are present.
        return unsafe { crate::quant::x86::widen_avx2(x, out) };
    }
    for (o, x) in out.iter_mut().zip(x) {
        *o = x.widen();
    }
}

/// `v[r] = a_r · x` for the `v.len()` consecutive rows of `a` (bf16 or f16), each `x.len()`
/// long: a LoRA shrink or a decode-shaped product, the rows read side by side.
pub fn dots_half<T: Half>(a: &[T], x: &[f32], v: &mut [f32]) {
    assert!(a.len() >= v.len() * x.len(), "dots_half: {} rows of {} do not fit", v.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() {
        // SAFETY: AVX-512F/BW/VL are present; `a` holds the rows (asserted).
        return unsafe { crate::quant::x86::dots_half_avx512(a, x, v) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: AVX2, FMA and F16C are present; `a` holds the rows (asserted).
        return unsafe { crate::quant::x86::dots_half_avx2(a, x, v) };
    }
    // The specification: each value widened exactly to f32.
    for (v, a) in v.iter_mut().zip(a.chunks_exact(x.len().max(1))) {
        *v = a.iter().zip(x).map(|(a, x)| a.widen() * x).sum();
    }
}

/// `y += Σ_r v[r] · b_r` over the `v.len()` consecutive rows of `b` (bf16), each `y.len()`
/// long: a LoRA expand, in one pass over `y`.
pub fn axpys_bf16(v: &[f32], b: &[bf16], y: &mut [f32]) {
    assert!(b.len() >= v.len() * y.len(), "axpys_bf16: {} rows of {} do not fit", v.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() {
        // SAFETY: AVX-512F/BW/VL are present; `b` holds the rows (asserted).
        return unsafe { crate::quant::x86::axpys_bf16_avx512(v, b, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: AVX2, FMA and F16C are present; `b` holds the rows (asserted).
        return unsafe { crate::quant::x86::axpys_bf16_avx2(v, b, y) };
    }
    // The specification: each value widened exactly to f32.
    for (&v, b) in v.iter().zip(b.chunks_exact(y.len().max(1))) {
        for (y, b) in y.iter_mut().zip(b) {
            *y += v * b.to_f32();
        }
    }
}

/// `y += alpha · x` (over `y`'s length; `x` is at least as long).
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert!(x.len() >= y.len(), "axpy: x shorter than y");
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() {
        // SAFETY: AVX-512F is present; x holds at least y.len() values (asserted).
        return unsafe { crate::quant::x86::axpy_f32_avx512(alpha, x, y) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: AVX2 and FMA are present; x holds at least y.len() values (asserted).
        return unsafe { crate::quant::x86::axpy_f32_avx2(alpha, x, y) };
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// `a · b` over their common length, in 16 independent partial sums (lanes the compiler can keep
/// in vector registers; one running sum would serialize every add).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() {
        // SAFETY: AVX-512F is present; both slices hold at least n values.
        return unsafe { crate::quant::x86::dot_f32_avx512(a, b, n) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: AVX2 and FMA are present; both slices hold at least n values.
        return unsafe { crate::quant::x86::dot_f32_avx2(a, b, n) };
    }
    let (a, b) = (a[..n].chunks_exact(LANES), b[..n].chunks_exact(LANES));
    let tail: f32 = a.remainder().iter().zip(b.remainder()).map(|(x, y)| x * y).sum();
    let mut acc = [0f32; LANES];
    for (x, y) in a.zip(b) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every x86 vector path of the f32 and 16-bit-float helpers this CPU has, against each
    /// helper's definition computed in f64, on lengths with and without a partial last vector.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn every_vector_path_of_the_float_helpers_agrees_with_their_definition() {
        use crate::quant::x86;
        use rand::{Rng, SeedableRng};
        let (avx2, avx512) = (crate::quant::has_avx2(), crate::quant::has_avx512());
        eprintln!("AVX2: {avx2}, AVX-512: {avx512}");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
        let close = |what: &str, n: usize, got: f32, want: f64, size: f64| {
            assert!((got as f64 - want).abs() <= 1e-5 * size.max(1.0), "{what}, n = {n}: {got} vs {want}");
        };
        // Rows of 16-bit floats: one pass of eight and a short one; lengths about whole and partial
        // steps of 32 and vectors of 16 and 8.
        const ROWS: usize = 11;
        for n in [0, 1, 7, 8, 9, 16, 23, 32, 48, 64, 100, 200] {
            let (a, b, y0) = (values(n), values(n), values(n));
            let want_dot: f64 = a.iter().zip(&b).map(|(&a, &b)| a as f64 * b as f64).sum();
            let want_axpy: Vec<f64> = y0.iter().zip(&a).map(|(&y, &a)| y as f64 + 0.75 * a as f64).collect();
            // The rows, and the weights to sum them.
            let rows = values(ROWS * n);
            let (f16s, bf16s): (Vec<f16>, Vec<bf16>) =
                rows.iter().map(|&v| (f16::from_f32(v), bf16::from_f32(v))).unzip();
            let v = values(ROWS);
            if avx2 {
                // SAFETY (every call): AVX2, FMA and F16C are present; the slices hold what
                // each helper reads.
                close("dot, AVX2", n, unsafe { x86::dot_f32_avx2(&a, &b, n) }, want_dot, n as f64);
                let mut y = y0.clone();
                unsafe { x86::axpy_f32_avx2(0.75, &a, &mut y) };
                for (g, w) in y.iter().zip(&want_axpy) {
                    close("axpy, AVX2", n, *g, *w, 1.0);
                }
                let mut wide = vec![f32::NAN; ROWS * n];
                unsafe { x86::widen_avx2(&f16s, &mut wide) };
                assert!(wide.iter().zip(&f16s).all(|(w, h)| *w == h.to_f32()), "f16 widening, n = {n}");
                unsafe { x86::widen_avx2(&bf16s, &mut wide) };
                assert!(wide.iter().zip(&bf16s).all(|(w, h)| *w == h.to_f32()), "bf16 widening, n = {n}");
            }
            for (path, on) in [("AVX2", avx2), ("AVX-512", avx512)] {
                if !on {
                    continue;
                }
                let (mut dots_f16, mut dots_bf16, mut y) = ([f32::NAN; ROWS], [f32::NAN; ROWS], y0.clone());
                // SAFETY: the path's features are present; the rows hold ROWS·n values.
                unsafe {
                    if path == "AVX2" {
                        x86::dots_half_avx2(&f16s, &a, &mut dots_f16);
                        x86::dots_half_avx2(&bf16s, &a, &mut dots_bf16);
                        x86::axpys_bf16_avx2(&v, &bf16s, &mut y);
                    } else {
                        x86::dots_half_avx512(&f16s, &a, &mut dots_f16);
                        x86::dots_half_avx512(&bf16s, &a, &mut dots_bf16);
                        x86::axpys_bf16_avx512(&v, &bf16s, &mut y);
                    }
                }
                for r in 0..ROWS {
                    let row = r * n..(r + 1) * n;
                    let want = |row: &[f32]| -> f64 { row.iter().zip(&a).map(|(&w, &x)| w as f64 * x as f64).sum() };
                    let f16_row: Vec<f32> = f16s[row.clone()].iter().map(|h| h.to_f32()).collect();
                    let bf16_row: Vec<f32> = bf16s[row].iter().map(|h| h.to_f32()).collect();
                    close(&format!("dots_half f16, {path}"), n, dots_f16[r], want(&f16_row), n as f64);
                    close(&format!("dots_half bf16, {path}"), n, dots_bf16[r], want(&bf16_row), n as f64);
                }
                for (i, g) in y.iter().enumerate() {
                    let want =
                        y0[i] as f64 + (0..ROWS).map(|r| v[r] as f64 * bf16s[r * n + i].to_f32() as f64).sum::<f64>();
                    close(&format!("axpys_bf16, {path}"), n, *g, want, ROWS as f64);
                }
            }
        }
    }

    #[test]
    fn rms_norm_normalises_then_scales() {
        let x = [3.0f32, 4.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
        let w = [1.0f32, 2.0, 1.0, 1.0];
        let mut out = [0f32; 8];
        rms_norm(&x, &w, 0.0, &mut out);
        // mean square of the first row is 25/4, rms 2.5.
        let want = [1.2f32, 3.2, 0.0, 0.0, 1.0, 2.0, 1.0, 1.0];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn rms_norm_counts_every_value_of_a_row_past_its_eights() {
        // Rows of 13 (an eight and five), no value zero, so a value left out changes the norm.
        let hidden = 13;
        let x: Vec<f32> = (0..2 * hidden).map(|i| (i as f32 - 9.5) * 0.37).collect();
        let w: Vec<f32> = (0..hidden).map(|i| 1.0 + i as f32 / 8.0).collect();
        let mut out = vec![0f32; 2 * hidden];
        rms_norm(&x, &w, 1e-5, &mut out);
        for (r, row) in x.chunks_exact(hidden).enumerate() {
            let mean = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / hidden as f64;
            for (c, &v) in row.iter().enumerate() {
                let want = f64::from(v) / (mean + 1e-5).sqrt() * f64::from(w[c]);
                let got = f64::from(out[r * hidden + c]);
                assert!((got - want).abs() <= 1e-6 * want.abs().max(1.0), "row {r}, column {c}: {got} against {want}");
            }
        }
    }

    #[test]
    fn silu_mul_gates_the_up_projection() {
        // Rows of 37 (a vector and a part), gates from far below to far above zero.
        let inter = 37;
        let gate_up: Vec<f32> = (0..3 * 2 * inter).map(|i| (i as f32 - 111.0) * 0.9).collect();
        let mut out = vec![0f32; 3 * inter];
        silu_mul(&gate_up, inter, &mut out);
        for (i, &o) in out.iter().enumerate() {
            let (r, c) = (i / inter, i % inter);
            let (g, u) = (f64::from(gate_up[2 * inter * r + c]), f64::from(gate_up[2 * inter * r + inter + c]));
            let want = g / (1.0 + (-g).exp()) * u;
            // Where e^−g leaves f32's range the f32 answer is 0; elsewhere within a few ulp.
            assert!((f64::from(o) - want).abs() <= 1e-6 * want.abs() + 1e-30, "[{i}]: {o} vs {want}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_exponential_is_within_a_few_ulp_of_the_exact_one() {
        use std::arch::x86_64::*;
        if !crate::quant::has_avx512() {
            eprintln!("no AVX-512 here: nothing to test");
            return;
        }
        let mut worst = 0f64;
        for step in 0..200_000 {
            // −110 to 92: both ends leave f32's range.
            let x = -110.0 + step as f32 * 0.00101;
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F is present (checked above).
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), crate::quant::x86::exp512(_mm512_set1_ps(x))) };
            let want = f64::from(x).exp();
            if want > f64::from(f32::MAX) {
                assert_eq!(got[0], f32::INFINITY, "e^{x}");
            } else if want < f64::from(f32::MIN_POSITIVE) {
                // Subnormal results may lose their low bits; they are below any softmax weight.
                assert!(f64::from(got[0]) <= 2.0 * f64::from(f32::MIN_POSITIVE), "e^{x}: {}", got[0]);
            } else {
                let err = (f64::from(got[0]) - want).abs() / want;
                worst = worst.max(err);
                assert!(err <= 4.0 * f64::from(f32::EPSILON), "e^{x}: {} vs {want} ({err:e})", got[0]);
            }
        }
        eprintln!("worst relative error {worst:.2e}");
        // SAFETY: as above.
        let nan = unsafe { _mm512_cvtss_f32(crate::quant::x86::exp512(_mm512_set1_ps(f32::NAN))) };
        assert!(nan.is_nan());
    }

    #[test]
    fn softmax_weights_are_the_exponentials_of_the_scaled_logits() {
        // Lengths around the vector width, so the masked tail is covered.
        for n in [1, 15, 16, 17, 100, 49152] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 2000) as f32 * 0.05 - 60.0).collect();
            let (div, sub) = (0.7, 12.5);
            let mut out = vec![f32::NAN; n];
            exp_scaled(&x, div, sub, &mut out);
            for (i, (&o, &v)) in out.iter().zip(&x).enumerate() {
                // The exponent as f32 computes it, then its exact exponential.
                let want = f64::from(v / div - sub).exp();
                let tolerance = 4.0 * f64::from(f32::EPSILON) * want + 2.0 * f64::from(f32::MIN_POSITIVE);
                assert!((f64::from(o) - want).abs() <= tolerance, "{n} values, [{i}]: {o} vs {want}");
            }
        }
        let mut out = [1.0f32; 3];
        exp_scaled(&[f32::NEG_INFINITY, f32::NAN, 0.0], 1.0, 0.0, &mut out);
        assert!(out[0] == 0.0 && out[1].is_nan() && out[2] == 1.0, "{out:?}");
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let head_dim = 4;
        let inv_freq = [1.0f32, 0.01];
        let mut x = vec![1.0f32, 0.0, 0.0, 1.0, /* second token */ 1.0, 0.0, 0.0, 1.0];
        rope(&mut x, 4, 0, 1, head_dim, &[0, 1], &inv_freq, 1.0);
        // Position 0 leaves the vector unchanged.
        assert_eq!(&x[..4], &[1.0, 0.0, 0.0, 1.0]);
        // Position 1 rotates pair (0, 2) by 1 radian and pair (1, 3) by 0.01 radian.
        assert!((x[4] - 1f32.cos()).abs() < 1e-6 && (x[6] - 1f32.sin()).abs() < 1e-6);
        assert!((x[5] + 0.01f32.sin()).abs() < 1e-6 && (x[7] - 0.01f32.cos()).abs() < 1e-6);
        let norm: f32 = x[4..].iter().map(|v| v * v).sum();
        assert!((norm - 2.0).abs() < 1e-5);
    }
}
