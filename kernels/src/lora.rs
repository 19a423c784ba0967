//! Batched LoRA: every row of a batch may use a different adapter.
//!
//! For a projection `W` (`[out, in]`) and an adapter with `A` (`[r, in]`), `B` (`[out, r]`) and
//! scale `s`, LoRA adds `s · (x · Aᵀ) · Bᵀ` to the projection's output. A batch carries, per row,
//! the adapter slot it uses or none. Rows are grouped into [`Segment`]s — runs of consecutive
//! rows that share a slot — and the product is computed in two steps:
//!
//! - **shrink**: `v[t, :r] = x[t] · Aᵀ` (down to the rank), then
//! - **expand**: `y[t, off..off+out] += s · v[t, :r] · Bᵀ` (back up, into a column block of `y`).
//!
//! This is the SGMV formulation (segmented gather matrix-vector); BGMV is the special case of
//! one row per segment, used for decode. Different segments may have different ranks. The
//! functions here are the specification of the device kernels and the CPU execution path.

use crate::matmul::linear_strided;
use crate::ops::{axpy, axpys_bf16, dot, dots_half};
use crate::team::Beside;
use half::bf16;

/// A run of consecutive batch rows `[start, start + len)` that all use adapter `slot`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: u32,
    pub len: u32,
    pub slot: u32,
}

/// One adapter's matrices for one projection.
#[derive(Debug, Clone, Copy)]
pub struct LoraMat<'a> {
    /// `[rank, in]`, row-major.
    pub a: &'a [f32],
    /// `[out, rank]`, row-major.
    pub b: &'a [f32],
    /// `B` transposed, `[rank, out]`, where the executor keeps it (the CPU does): [`bgmv`]
    /// then expands a row with `rank` contiguous multiply-adds instead of `out` short dot
    /// products.
    pub bt: Option<&'a [f32]>,
    /// `A` and `Bᵀ` rounded to bf16, where the executor keeps them so (the CPU's quantized dtypes):
    /// [`bgmv`] then reads half the bytes, computing in f32.
    pub half: Option<LoraHalf<'a>>,
    pub rank: usize,
    pub scale: f32,
}

/// An adapter module's matrices in bf16, for decode: `a` is `[rank, in]`, `bt` is `[rank, out]`.
#[derive(Debug, Clone, Copy)]
pub struct LoraHalf<'a> {
    pub a: &'a [bf16],
    pub bt: &'a [bf16],
}

/// Groups per-row adapter slots into segments, merging neighbours that share a slot. Rows with
/// no adapter belong to no segment.
pub fn segments(row_slots: &[Option<u32>]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for (row, slot) in row_slots.iter().enumerate() {
        let Some(slot) = *slot else { continue };
        match out.last_mut() {
            Some(seg) if seg.slot == slot && (seg.start + seg.len) as usize == row => seg.len += 1,
            _ => out.push(Segment { start: row as u32, len: 1, slot }),
        }
    }
    out
}

/// SGMV shrink: for every segment, `v[t, :rank] = x[t] · Aᵀ`. `x` rows are `in_dim` wide,
/// `v` rows are `v_stride` (at least the largest rank) wide. Segments whose slot has no matrix
/// for this projection (the adapter does not target it) are left untouched.
pub fn sgmv_shrink<'a>(
    x: &[f32],
    in_dim: usize,
    segs: &[Segment],
    mat: impl Fn(u32) -> Option<LoraMat<'a>>,
    v: &mut [f32],
    v_stride: usize,
) {
    for seg in segs {
        let Some(m) = mat(seg.slot) else { continue };
        let (start, len) = (seg.start as usize, seg.len as usize);
        v[start * v_stride..(start + len) * v_stride].fill(0.0);
        linear_strided(
            &x[start * in_dim..],
            in_dim,
            len,
            in_dim,
            m.a,
            m.rank,
            1.0,
            &mut v[start * v_stride..],
            v_stride,
        );
    }
}

/// SGMV expand: for every segment, `y[t, y_offset..y_offset+out] += scale · v[t, :rank] · Bᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn sgmv_expand<'a>(
    v: &[f32],
    v_stride: usize,
    segs: &[Segment],
    mat: impl Fn(u32) -> Option<LoraMat<'a>>,
    out_dim: usize,
    y: &mut [f32],
    y_stride: usize,
    y_offset: usize,
) {
    for seg in segs {
        let Some(m) = mat(seg.slot) else { continue };
        let (start, len) = (seg.start as usize, seg.len as usize);
        linear_strided(
            &v[start * v_stride..],
            v_stride,
            len,
            m.rank,
            m.b,
            out_dim,
            m.scale,
            &mut y[start * y_stride + y_offset..],
            y_stride,
        );
    }
}

/// BGMV (one adapter per row): `y[t, off..off+out] += s · (x[t] · Aᵀ) · Bᵀ` for every row `t`
/// whose slot has a matrix. Row-parallel; the decode-shaped counterpart of the SGMV pair.
#[allow(clippy::too_many_arguments)]
pub fn bgmv<'a>(
    x: &[f32],
    in_dim: usize,
    row_slots: &[Option<u32>],
    mat: impl Fn(u32) -> Option<LoraMat<'a>> + Sync,
    out_dim: usize,
    y: &mut [f32],
    y_stride: usize,
    y_offset: usize,
) {
    bgmv_targets(x, in_dim, row_slots, &[Target { out_dim, y_offset }], |slot, _| mat(slot), y, y_stride);
}

/// A projection that [`bgmv_targets`] adds into: its width and its column block in `y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub out_dim: usize,
    pub y_offset: usize,
}

/// [`bgmv`] for several projections of the same input at once (a layer's q, k and v, or gate
/// and up), each into its own column block of `y`: `mat(slot, j)` is the adapter's matrix for
/// `targets[j]`. One parallel section of (row, projection) tasks.
///
/// # Panics
/// When the column blocks overlap or leave `y`'s rows, or `x` or `y` is too short (caller bugs).
pub fn bgmv_targets<'a>(
    x: &[f32],
    in_dim: usize,
    row_slots: &[Option<u32>],
    targets: &[Target],
    mat: impl Fn(u32, usize) -> Option<LoraMat<'a>> + Sync,
    y: &mut [f32],
    y_stride: usize,
) {
    crate::team::run_beside(&Bgmv::new(x, in_dim, row_slots, targets, mat, y, y_stride));
}

/// [`bgmv_targets`] as items of work, one per (row, projection) that has an adapter matrix, to
/// run in a section of its own or beside a projection's product (see [`crate::team::Beside`]).
/// Holds `y` borrowed mutably for as long as it lives.
pub struct Bgmv<'s, 'a> {
    x: &'s [f32],
    in_dim: usize,
    /// (row, target, matrix), looked up once.
    items: Vec<(usize, Target, LoraMat<'a>)>,
    out: crate::team::Shared<f32>,
    y_stride: usize,
    _y: std::marker::PhantomData<&'s mut [f32]>,
}

impl<'s, 'a> Bgmv<'s, 'a> {
    /// # Panics
    /// When the column blocks overlap or leave `y`'s rows, `x` or `y` is too short, or a
    /// matrix is smaller than its rank and the dimensions say (caller bugs).
    pub fn new(
        x: &'s [f32],
        in_dim: usize,
        row_slots: &[Option<u32>],
        targets: &[Target],
        mat: impl Fn(u32, usize) -> Option<LoraMat<'a>>,
        y: &'s mut [f32],
        y_stride: usize,
    ) -> Self {
        let rows = row_slots.len();
        let mut blocks: Vec<(usize, usize)> = targets.iter().map(|t| (t.y_offset, t.y_offset + t.out_dim)).collect();
        blocks.sort_unstable();
        let end = blocks.last().map_or(0, |b| b.1);
        assert!(
            blocks.windows(2).all(|w| w[0].1 <= w[1].0) && end <= y_stride,
            "bgmv: column blocks overlap or leave a row of {y_stride}"
        );
        assert!(
            rows == 0 || end == 0 || (y.len() >= (rows - 1) * y_stride + end && x.len() >= rows * in_dim),
            "bgmv: x or y too short for {rows} rows"
        );
        let mut items = Vec::with_capacity(rows * targets.len());
        for (t, slot) in row_slots.iter().enumerate() {
            let Some(slot) = *slot else { continue };
            for (j, &target) in targets.iter().enumerate() {
                if target.out_dim > 0
                    && let Some(m) = mat(slot, j)
                {
                    items.push((t, target, m));
                }
            }
        }
        for (_, target, m) in &items {
            let (a, b) = (m.rank * in_dim, m.rank * target.out_dim);
            let fits = match m.half {
                Some(h) => h.a.len() >= a && h.bt.len() >= b,
                None => m.a.len() >= a && m.bt.unwrap_or(m.b).len() >= b,
            };
            assert!(fits, "bgmv: a rank-{} matrix smaller than {in_dim} by {}", m.rank, target.out_dim);
        }
        let out = crate::team::Shared::new(y);
        Bgmv { x, in_dim, items, out, y_stride, _y: std::marker::PhantomData }
    }
}

impl std::fmt::Debug for Bgmv<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bgmv").field("in_dim", &self.in_dim).field("items", &self.items.len()).finish_non_exhaustive()
    }
}

impl Beside for Bgmv<'_, '_> {
    fn tasks(&self) -> usize {
        self.items.len()
    }

    fn memory(&self, i: usize) -> [&[u8]; 2] {
        let Some(&(_, target, m)) = self.items.get(i) else { return [&[], &[]] };
        // A row's adapter is a few kilobytes in many short streams, which the hardware
        // prefetcher would meet one at a time.
        let (a, b) = (m.rank * self.in_dim, m.rank * target.out_dim);
        match m.half {
            Some(h) => [bytes(&h.a[..a]), bytes(&h.bt[..b])],
            None => [bytes(&m.a[..a]), bytes(&m.bt.unwrap_or(m.b)[..b])],
        }
    }

    fn run(&self, i: usize) {
        let Some(&(t, target, m)) = self.items.get(i) else { return };
        // SAFETY: row t's block of this target lies inside `y` (asserted in `new`), is
        // disjoint from every other (row, target)'s (the blocks do not overlap, and a row
        // has each target once), and only this item writes it while `y` is borrowed mutably
        // for the job's life.
        let y =
            unsafe { std::slice::from_raw_parts_mut(self.out.at(t * self.y_stride + target.y_offset), target.out_dim) };
        SHRUNK.with_borrow_mut(|v| {
            v.clear();
            v.resize(m.rank, 0.0);
            row(m, &self.x[t * self.in_dim..(t + 1) * self.in_dim], v, y);
        });
    }
}

/// `values` as the bytes they occupy.
fn bytes<T: Copy>(values: &[T]) -> &[u8] {
    // SAFETY: the same memory, as many bytes as the values' size; every byte of an `f32` or a
    // `bf16` is initialized.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast(), std::mem::size_of_val(values)) }
}

thread_local! {
    /// Each thread's rank-sized intermediate for [`Bgmv`]'s items.
    static SHRUNK: std::cell::RefCell<Vec<f32>> = std::cell::RefCell::default();
}

/// One row of [`bgmv`]: `y += s · (x · Aᵀ) · Bᵀ`, through `v` (`rank` values).
fn row(m: LoraMat<'_>, x: &[f32], v: &mut [f32], y: &mut [f32]) {
    if let Some(h) = m.half {
        let (a, bt) = (&h.a[..m.rank * x.len()], &h.bt[..m.rank * y.len()]);
        dots_half(a, x, v);
        for v in v.iter_mut() {
            *v *= m.scale;
        }
        axpys_bf16(v, bt, y);
        return;
    }
    for (v, a) in v.iter_mut().zip(m.a.chunks_exact(x.len())) {
        *v = dot(a, x);
    }
    match m.bt {
        Some(bt) => {
            for (&v, bt) in v.iter().zip(bt.chunks_exact(y.len())) {
                axpy(m.scale * v, bt, y);
            }
        }
        None => {
            for (y, b) in y.iter_mut().zip(m.b.chunks_exact(m.rank)) {
                *y += m.scale * dot(b, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    struct Adapter {
        a: Vec<f32>,
        b: Vec<f32>,
        rank: usize,
        scale: f32,
    }

    fn random(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// The definition, per row, in f64.
    fn reference(x: &[f32], in_dim: usize, rows: &[Option<u32>], ads: &[Adapter], out_dim: usize) -> Vec<f64> {
        let mut y = vec![0f64; rows.len() * out_dim];
        for (t, slot) in rows.iter().enumerate() {
            let Some(s) = slot else { continue };
            let ad = &ads[*s as usize];
            let v: Vec<f64> = (0..ad.rank)
                .map(|r| (0..in_dim).map(|i| ad.a[r * in_dim + i] as f64 * x[t * in_dim + i] as f64).sum())
                .collect();
            for o in 0..out_dim {
                let dot: f64 = (0..ad.rank).map(|r| ad.b[o * ad.rank + r] as f64 * v[r]).sum();
                y[t * out_dim + o] = ad.scale as f64 * dot;
            }
        }
        y
    }

    #[test]
    fn segments_merge_runs_and_skip_rows_without_adapter() {
        let rows = [Some(2), Some(2), None, Some(2), Some(0), Some(0), None];
        assert_eq!(
            segments(&rows),
            vec![
                Segment { start: 0, len: 2, slot: 2 },
                Segment { start: 3, len: 1, slot: 2 },
                Segment { start: 4, len: 2, slot: 0 },
            ]
        );
        assert!(segments(&[None, None]).is_empty());
    }

    #[test]
    fn sgmv_and_bgmv_match_the_definition_with_mixed_ranks() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (in_dim, out_dim) = (48, 40);
        let ranks = [8usize, 16, 4, 32];
        let ads: Vec<Adapter> = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| Adapter {
                a: random(&mut rng, r * in_dim),
                b: random(&mut rng, out_dim * r),
                rank: r,
                scale: 0.5 + i as f32,
            })
            .collect();
        let rows = [Some(0), Some(0), Some(0), None, Some(3), Some(1), Some(1), None, Some(2), Some(3)];
        let x = random(&mut rng, rows.len() * in_dim);
        let want = reference(&x, in_dim, &rows, &ads, out_dim);
        let mat = |s: u32| {
            let a = &ads[s as usize];
            Some(LoraMat { a: &a.a, b: &a.b, bt: None, half: None, rank: a.rank, scale: a.scale })
        };
        // Write into the middle column block of a wider output holding a base result of 1.0.
        let (stride, off) = (out_dim + 7, 3);
        let check = |y: &[f32]| {
            for t in 0..rows.len() {
                for o in 0..stride {
                    let got = y[t * stride + o] as f64;
                    let expect =
                        if (off..off + out_dim).contains(&o) { 1.0 + want[t * out_dim + o - off] } else { 1.0 };
                    assert!((got - expect).abs() <= 1e-4 * (1.0 + expect.abs()), "row {t} col {o}: {got} vs {expect}");
                }
            }
        };

        let segs = segments(&rows);
        let max_rank = 32;
        let mut v = vec![f32::NAN; rows.len() * max_rank];
        let mut y = vec![1f32; rows.len() * stride];
        sgmv_shrink(&x, in_dim, &segs, mat, &mut v, max_rank);
        sgmv_expand(&v, max_rank, &segs, mat, out_dim, &mut y, stride, off);
        check(&y);

        let mut y = vec![1f32; rows.len() * stride];
        bgmv(&x, in_dim, &rows, mat, out_dim, &mut y, stride, off);
        check(&y);

        // With B transposed, as the CPU executor keeps it.
        let transposed: Vec<Vec<f32>> = ads
            .iter()
            .map(|a| (0..a.rank).flat_map(|r| (0..out_dim).map(move |o| a.b[o * a.rank + r])).collect())
            .collect();
        let mat_t = |s: u32| {
            let a = &ads[s as usize];
            Some(LoraMat {
                a: &a.a,
                b: &a.b,
                bt: Some(&transposed[s as usize]),
                half: None,
                rank: a.rank,
                scale: a.scale,
            })
        };
        let mut y = vec![1f32; rows.len() * stride];
        bgmv(&x, in_dim, &rows, mat_t, out_dim, &mut y, stride, off);
        check(&y);

        // In bf16 (as the CPU's q8 dtype keeps them): the definition on the rounded matrices.
        let round = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let halves: Vec<(Vec<bf16>, Vec<bf16>)> =
            ads.iter().zip(&transposed).map(|(a, t)| (round(&a.a), round(t))).collect();
        let rounded: Vec<Adapter> = ads
            .iter()
            .map(|a| Adapter {
                a: round(&a.a).iter().map(|v| v.to_f32()).collect(),
                b: round(&a.b).iter().map(|v| v.to_f32()).collect(),
                rank: a.rank,
                scale: a.scale,
            })
            .collect();
        let want = reference(&x, in_dim, &rows, &rounded, out_dim);
        let mat_h = |s: u32| {
            let a = &ads[s as usize];
            let (ha, hbt) = &halves[s as usize];
            Some(LoraMat {
                a: &a.a,
                b: &a.b,
                bt: None,
                half: Some(LoraHalf { a: ha, bt: hbt }),
                rank: a.rank,
                scale: a.scale,
            })
        };
        let mut y = vec![1f32; rows.len() * stride];
        bgmv(&x, in_dim, &rows, mat_h, out_dim, &mut y, stride, off);
        for t in 0..rows.len() {
            for o in 0..out_dim {
                let (got, expect) = (y[t * stride + off + o] as f64, 1.0 + want[t * out_dim + o]);
                assert!((got - expect).abs() <= 1e-4 * (1.0 + expect.abs()), "bf16 row {t} col {o}: {got} vs {expect}");
            }
        }
    }

    #[test]
    fn several_projections_in_one_call_match_one_call_each() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let in_dim = 64;
        let targets = [Target { out_dim: 40, y_offset: 0 }, Target { out_dim: 24, y_offset: 40 }];
        let stride = 70;
        // Per slot and target: A, Bᵀ in bf16, rank; slot 1 has no matrix for the second target.
        let rank = [5usize, 8];
        let mats: Vec<Vec<(Vec<bf16>, Vec<bf16>)>> = (0..2)
            .map(|s| {
                targets
                    .iter()
                    .map(|t| {
                        let round = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
                        (round(random(&mut rng, rank[s] * in_dim)), round(random(&mut rng, rank[s] * t.out_dim)))
                    })
                    .collect()
            })
            .collect();
        let mat = |slot: u32, j: usize| {
            let (a, bt) = &mats[slot as usize][j];
            (slot == 0 || j == 0).then_some(LoraMat {
                a: &[],
                b: &[],
                bt: None,
                half: Some(LoraHalf { a, bt }),
                rank: rank[slot as usize],
                scale: 0.75,
            })
        };
        let rows = [Some(1), None, Some(0), Some(0), Some(1)];
        let x = random(&mut rng, rows.len() * in_dim);
        let base = random(&mut rng, rows.len() * stride);
        let mut together = base.clone();
        bgmv_targets(&x, in_dim, &rows, &targets, mat, &mut together, stride);
        let mut apart = base.clone();
        for (j, t) in targets.iter().enumerate() {
            bgmv(&x, in_dim, &rows, |slot| mat(slot, j), t.out_dim, &mut apart, stride, t.y_offset);
        }
        assert_eq!(together, apart);
        // Columns past the blocks, rows without an adapter, and slot 1's second block are kept.
        for (t, slot) in rows.iter().enumerate() {
            let row = |y: &[f32]| y[t * stride..(t + 1) * stride].to_vec();
            let (got, was) = (row(&together), row(&base));
            assert_eq!(got[64..], was[64..]);
            match slot {
                None => assert_eq!(got, was),
                Some(1) => assert_eq!(got[40..], was[40..]),
                _ => assert_ne!(got[40..64], was[40..64]),
            }
        }
    }

    #[test]
    fn a_slot_without_this_projection_leaves_rows_unchanged() {
        let rows = [Some(0), Some(1)];
        let (a, b) = (vec![1f32; 2 * 4], vec![1f32; 3 * 2]);
        let mat = |s: u32| (s == 1).then_some(LoraMat { a: &a, b: &b, bt: None, half: None, rank: 2, scale: 1.0 });
        let x = vec![1f32; 2 * 4];
        let mut y = vec![0f32; 2 * 3];
        let segs = segments(&rows);
        let mut v = vec![0f32; 2 * 2];
        sgmv_shrink(&x, 4, &segs, mat, &mut v, 2);
        sgmv_expand(&v, 2, &segs, mat, 3, &mut y, 3, 0);
        assert_eq!(y, vec![0.0, 0.0, 0.0, 8.0, 8.0, 8.0]);
    }
}
