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
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            y_stride as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
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
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            y_stride as isize,
            true,
            x.as_ptr(),
            1,
            x_stride as isize,
            w.as_ptr(),
            k as isize,
            1,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism(m, n, k),
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
