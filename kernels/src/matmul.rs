//! Dense matrix products on the CPU, through the `gemm` crate (multi-threaded with rayon).

use gemm::Parallelism;

/// Rows below which a product runs on the calling thread: splitting tiny products across the
/// pool costs more than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

pub(crate) fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m.saturating_mul(n).saturating_mul(k) < PARALLEL_MIN_FLOPS {
        Parallelism::None
    } else {
        Parallelism::Rayon(rayon::current_num_threads())
    }
}

/// `y[m, n] (+)= x[m, k] · w[n, k]ᵀ`: a linear layer with a PyTorch-layout weight.
///
/// `y` rows are `y_stride` apart, which lets a caller write into a column block of a wider
/// matrix (for example the `k` part of a fused `qkv` output). When `accumulate` is false `y` is
/// overwritten; otherwise the product is added to it.
///
/// # Panics
/// When a slice is shorter than the shapes require (a caller bug, never input-dependent).
#[allow(clippy::too_many_arguments)]
pub fn linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, y: &mut [f32], y_stride: usize, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(x.len() >= m * k, "linear: x has {} values, needs {}", x.len(), m * k);
    assert!(w.len() >= n * k, "linear: w has {} values, needs {}", w.len(), n * k);
    assert!(y_stride >= n, "linear: y stride {y_stride} < n {n}");
    assert!(y.len() >= (m - 1) * y_stride + n, "linear: y too short");
    if k == 0 {
        if !accumulate {
            for row in y.chunks_mut(y_stride).take(m) {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above prove every index gemm touches is inside the three slices:
    // dst (i, j) at i*y_stride + j < (m-1)*y_stride + n; lhs (i, p) at i*k + p < m*k;
    // rhs (p, j) = w[j, p] at j*k + p < n*k. `y` is borrowed mutably, so nothing aliases it.
    unsafe {
        gemm_nt(m, n, k, (y.as_mut_ptr(), y_stride, accumulate), (x.as_ptr(), k), w.as_ptr(), 1.0, parallelism(m, n, k))
    }
}

/// Activation rows from which [`linear_half`] widens tiles of weights to f32 and multiplies them
/// as a GEMM; fewer rows read the 16-bit weights directly.
const HALF_GEMM_ROWS: usize = 16;
/// Weight rows a task widens at once in [`linear_half`]'s GEMM path: with `k` up to 8192 the
/// tile (2 MiB) stays within a core's cache while every activation row passes over it.
const HALF_TILE: usize = 64;

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` for bf16 or f16 weights kept as they were stored (half the
/// bytes of f32), `y`'s rows `y_stride` apart. Every weight widens exactly to f32, so the result
/// is [`linear`]'s on the widened matrix up to the order of the f32 additions.
///
/// Decode-shaped products (a few rows) read the weights in place, a few of their rows per pass
/// over an activation row ([`crate::ops::dots_half`]); from [`HALF_GEMM_ROWS`] rows, tiles of
/// weight rows are widened once and multiplied by every activation row as a GEMM. Either way
/// the team's threads take blocks of output columns.
///
/// # Panics
/// When a slice is shorter than the shapes require (a caller bug, never input-dependent).
#[allow(clippy::too_many_arguments)]
pub fn linear_half<T: crate::ops::Half>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[T],
    n: usize,
    y: &mut [f32],
    y_stride: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(x.len() >= m * k, "linear_half: x has {} values, needs {}", x.len(), m * k);
    assert!(w.len() >= n * k, "linear_half: w has {} values, needs {}", w.len(), n * k);
    assert!(y_stride >= n && y.len() >= (m - 1) * y_stride + n, "linear_half: y too short");
    let out = crate::team::Shared::new(y);
    if m < HALF_GEMM_ROWS {
        // Blocks of weight rows: enough for every thread, each a few dozen KiB that stay in
        // cache across the activation rows.
        let rows = (n / (4 * crate::team::threads())).clamp(16, 256);
        crate::team::for_each(n.div_ceil(rows), &|t| {
            let (j0, j1) = (t * rows, ((t + 1) * rows).min(n));
            for i in 0..m {
                // SAFETY: row i's columns j0..j1 lie inside `y` (asserted above), and only the
                // task owning columns j0..j1 touches them.
                let y = unsafe { std::slice::from_raw_parts_mut(out.at(i * y_stride + j0), j1 - j0) };
                crate::ops::dots_half(&w[j0 * k..j1 * k], &x[i * k..(i + 1) * k], y);
            }
        });
        return;
    }
    crate::team::for_each(n.div_ceil(HALF_TILE), &|t| {
        let (j0, j1) = (t * HALF_TILE, ((t + 1) * HALF_TILE).min(n));
        TILE.with_borrow_mut(|tile| {
            tile.clear();
            tile.extend(w[j0 * k..j1 * k].iter().map(|v| v.widen()));
            // SAFETY: as in `linear`, for the m rows of columns j0..j1 of `y` (inside it,
            // asserted above), which only this task writes; lhs and rhs are the slices' own.
            unsafe {
                gemm_nt(
                    m,
                    j1 - j0,
                    k,
                    (out.at(j0), y_stride, false),
                    (x.as_ptr(), k),
                    tile.as_ptr(),
                    1.0,
                    Parallelism::None,
                )
            }
        });
    });
}

thread_local! {
    /// Each thread's widened tile of [`linear_half`], kept between tasks and calls.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y[m, n] (+)= alpha · x[m, k] · w[n, k]ᵀ` with explicit row strides for `x` and `w`.
/// Used by the LoRA path, whose operands are row blocks of larger buffers.
#[allow(clippy::too_many_arguments)]
pub fn linear_strided(
    x: &[f32],
    x_stride: usize,
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    alpha: f32,
    y: &mut [f32],
    y_stride: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(x_stride >= k && x.len() >= (m - 1) * x_stride + k, "linear_strided: x too short");
    assert!(w.len() >= n * k, "linear_strided: w too short");
    assert!(y_stride >= n && y.len() >= (m - 1) * y_stride + n, "linear_strided: y too short");
    // SAFETY: as in `linear`, with lhs (i, p) at i*x_stride + p <= (m-1)*x_stride + k - 1.
    unsafe {
        gemm_nt(
            m,
            n,
            k,
            (y.as_mut_ptr(), y_stride, true),
            (x.as_ptr(), x_stride),
            w.as_ptr(),
            alpha,
            parallelism(m, n, k),
        )
    }
}

/// `dst[i, j] (+)= scale · Σ_p lhs[i, p] · rhs[j, p]` for `i < m`, `j < n`, `p < k`, through
/// `gemm`: `dst` rows `dst.1` apart (added to when `dst.2`, else overwritten), `lhs` rows
/// `lhs.1` apart, `rhs` an `[n, k]` row-major matrix (a PyTorch-layout weight).
///
/// # Safety
/// Every `(i, j)` of `dst` at `i·dst.1 + j`, `(i, p)` of `lhs` at `i·lhs.1 + p` and `(j, p)` of
/// `rhs` at `j·k + p` lies inside its allocation, and nothing else touches `dst`'s values during
/// the call.
#[allow(clippy::too_many_arguments)] // gemm's own call takes nineteen
unsafe fn gemm_nt(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, usize, bool),
    lhs: (*const f32, usize),
    rhs: *const f32,
    scale: f32,
    parallelism: Parallelism,
) {
    // SAFETY: as the function's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1 as isize,
            dst.2,
            lhs.0,
            1,
            lhs.1 as isize,
            rhs,
            k as isize,
            1,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k).map(|p| x[i * k + p] as f64 * w[j * k + p] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn linear_matches_naive_product_for_awkward_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(m, k, n) in &[(1, 1, 1), (1, 64, 96), (7, 33, 5), (64, 128, 300), (3, 576, 1536)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let want = naive(&x, m, k, &w, n);
            let mut y = vec![f32::NAN; m * n];
            linear(&x, m, k, &w, n, &mut y, n, false);
            for (a, b) in y.iter().zip(&want) {
                assert!((*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{m}x{k}x{n}: {a} vs {b}");
            }
            // Accumulating adds the product to what is there.
            linear(&x, m, k, &w, n, &mut y, n, true);
            for (a, b) in y.iter().zip(&want) {
                assert!((*a as f64 - 2.0 * b).abs() <= 2e-4 * (1.0 + b.abs()));
            }
        }
    }

    #[test]
    fn bf16_weights_multiply_as_their_f32_values_in_both_shapes_of_product() {
        half_weights_multiply_as_their_f32_values(half::bf16::from_f32);
    }

    #[test]
    fn f16_weights_multiply_as_their_f32_values_in_both_shapes_of_product() {
        half_weights_multiply_as_their_f32_values(half::f16::from_f32);
    }

    fn half_weights_multiply_as_their_f32_values<T: crate::ops::Half>(round: fn(f32) -> T) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        // Decode-shaped (below HALF_GEMM_ROWS) and GEMM-shaped products; widths that are not
        // whole vectors, tiles or column blocks.
        for &(m, k, n) in &[(1, 64, 96), (3, 33, 517), (8, 576, 1536), (16, 100, 70), (40, 256, 300)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<T> = (0..n * k).map(|_| round(rng.random_range(-1.0..1.0))).collect();
            let wide: Vec<f32> = w.iter().map(|v| v.widen()).collect();
            let want = naive(&x, m, k, &wide, n);
            // Output rows wider than the product: the columns past it stay untouched.
            let stride = n + 3;
            let mut y = vec![-7.0f32; m * stride];
            linear_half(&x, m, k, &w, n, &mut y, stride);
            for i in 0..m {
                for j in 0..n {
                    let (a, b) = (y[i * stride + j], want[i * n + j]);
                    assert!((f64::from(a) - b).abs() <= 1e-4 * (1.0 + b.abs()), "{m}x{k}x{n} [{i}, {j}]: {a} vs {b}");
                }
                assert!(y[i * stride + n..(i + 1) * stride].iter().all(|&v| v == -7.0), "{m}x{k}x{n}: row {i} spilled");
            }
        }
    }

    #[test]
    fn linear_writes_only_its_column_block() {
        let (m, k, n, stride) = (3, 4, 2, 5);
        let x: Vec<f32> = (0..m * k).map(|v| v as f32).collect();
        let w: Vec<f32> = (0..n * k).map(|v| (v % 3) as f32).collect();
        let mut y = vec![-1.0f32; m * stride];
        linear(&x, m, k, &w, n, &mut y[1..], stride, false);
        let want = naive(&x, m, k, &w, n);
        for i in 0..m {
            assert_eq!(y[i * stride], -1.0);
            for j in 0..n {
                assert_eq!(y[i * stride + 1 + j] as f64, want[i * n + j]);
            }
            assert!(y[i * stride + 3..i * stride + 5].iter().all(|&v| v == -1.0));
        }
    }
}
