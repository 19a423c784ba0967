//! Causal self-attention over a paged KV cache.
//!
//! The cache of one layer is two pools (K and V) of `num_blocks · block_size` token slots; a slot
//! holds `kv_heads · head_dim` values. A sequence owns a list of blocks (its block table); the
//! token at position `p` lives in slot `table[p / block_size] · block_size + p % block_size`.
//! Paging lets sequences grow without copying and lets the scheduler bound KV memory exactly.
//! The pools hold f32, or f16 ([`KvValue`]): half the memory, and half the bytes a decode step
//! reads, for 11 significant bits a value (llama.cpp's default).

use crate::ops::{axpy, dot};

/// A value type of the KV pools: f32, or f16.
pub trait KvValue: Copy + Default + Send + Sync + 'static {
    /// Whether the type is f16 (the SIMD loops widen it as they load).
    const HALF: bool;
    fn narrow(v: f32) -> Self;
    fn widen(self) -> f32;
    /// The values themselves where they are f32 already.
    fn as_f32(values: &[Self]) -> Option<&[f32]>;
    /// The values themselves where they are f16.
    fn as_f16(values: &[Self]) -> Option<&[half::f16]>;
}

impl KvValue for f32 {
    const HALF: bool = false;
    fn narrow(v: f32) -> f32 {
        v
    }
    fn widen(self) -> f32 {
        self
    }
    fn as_f32(values: &[f32]) -> Option<&[f32]> {
        Some(values)
    }
    fn as_f16(_: &[f32]) -> Option<&[half::f16]> {
        None
    }
}

impl KvValue for half::f16 {
    const HALF: bool = true;
    fn narrow(v: f32) -> half::f16 {
        // Beyond f16's range a value saturates rather than becoming infinite (which would turn
        // the softmax into NaN).
        half::f16::from_f32(v.clamp(-65504.0, 65504.0))
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn as_f32(_: &[half::f16]) -> Option<&[f32]> {
        None
    }
    fn as_f16(values: &[half::f16]) -> Option<&[half::f16]> {
        Some(values)
    }
}

/// Shape of one layer's KV pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads (fewer than query heads under grouped-query attention).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Values one token slot holds, for K or for V.
    pub fn slot_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// One sequence's share of an attention call.
#[derive(Debug, Clone)]
pub struct AttentionSeq<'a> {
    /// First row of this sequence's queries in the flattened batch.
    pub q_start: usize,
    /// Number of query rows (new tokens) this step.
    pub q_len: usize,
    /// Tokens in the cache for this sequence *including* the new ones; the new tokens occupy
    /// positions `context_len - q_len .. context_len`.
    pub context_len: usize,
    /// Block table of the sequence.
    pub blocks: &'a [u32],
}

/// Slot index of position `pos` for a sequence with block table `blocks`.
#[inline]
pub fn slot_of(blocks: &[u32], block_size: usize, pos: usize) -> usize {
    blocks[pos / block_size] as usize * block_size + pos % block_size
}

/// Writes new keys and values into their cache slots (rounded to the pools' type).
///
/// `k_src`/`v_src` rows are `src_stride` apart and the K (resp. V) heads start at column
/// `k_offset` (resp. `v_offset`), so the fused `qkv` output can be stored without a copy.
/// `slots[t]` is the cache slot of row `t`.
#[allow(clippy::too_many_arguments)]
pub fn write_kv<T: KvValue>(
    layout: KvLayout,
    src: &[f32],
    src_stride: usize,
    k_offset: usize,
    v_offset: usize,
    slots: &[usize],
    k_cache: &mut [T],
    v_cache: &mut [T],
) {
    let w = layout.slot_width();
    for (t, &slot) in slots.iter().enumerate() {
        let row = &src[t * src_stride..];
        write_slot(&row[k_offset..k_offset + w], &mut k_cache[slot * w..(slot + 1) * w]);
        write_slot(&row[v_offset..v_offset + w], &mut v_cache[slot * w..(slot + 1) * w]);
    }
}

/// [`write_kv`] of `rows` rows that `prepare(t, row)` finishes first, in place (the rest of what a
/// step does to its fused `qkv` rows before attention: what the projection still owes them, the
/// rotary embedding), a share of the rows per task in one parallel section.
///
/// # Panics
/// When two rows share a slot, a slot is outside the pools, or the rows do not hold the keys
/// and values (caller bugs: the slots come from the block tables).
#[allow(clippy::too_many_arguments)]
pub fn write_kv_rows<T: KvValue>(
    layout: KvLayout,
    src: &mut [f32],
    src_stride: usize,
    (k_offset, v_offset): (usize, usize),
    slots: &[usize],
    (k_cache, v_cache): (&mut [T], &mut [T]),
    prepare: &(dyn Fn(usize, &mut [f32]) + Sync),
) {
    let (w, rows) = (layout.slot_width(), slots.len());
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    assert!(sorted.windows(2).all(|p| p[0] != p[1]), "write_kv: two rows share a cache slot");
    let pool = k_cache.len().min(v_cache.len()) / w.max(1);
    assert!(sorted.last().is_none_or(|&s| s < pool), "write_kv: a slot outside the pools");
    assert!(k_offset.max(v_offset) + w <= src_stride && src.len() >= rows * src_stride, "write_kv: short rows");
    let (ks, vs) = (crate::team::Shared::new(k_cache), crate::team::Shared::new(v_cache));
    crate::team::for_each_row(&mut src[..rows * src_stride], src_stride, &|t, row| {
        prepare(t, row);
        let slot = slots[t];
        // SAFETY: slot < pool (asserted), so its `w` values lie inside both pools, which stay
        // borrowed mutably for the call; the slots are distinct (asserted) and row t's task
        // alone writes slot t's.
        let (k, v) = unsafe {
            (std::slice::from_raw_parts_mut(ks.at(slot * w), w), std::slice::from_raw_parts_mut(vs.at(slot * w), w))
        };
        write_slot(&row[k_offset..k_offset + w], k);
        write_slot(&row[v_offset..v_offset + w], v);
    });
}

/// One head block of keys or values into its slot, rounded to the pool's type.
fn write_slot<T: KvValue>(values: &[f32], slot: &mut [T]) {
    for (d, &s) in slot.iter_mut().zip(values) {
        *d = T::narrow(s);
    }
}

/// Causal attention for a batch of sequences whose K/V (including this step's tokens) are
/// already in the cache.
///
/// `q` rows are `q_stride` apart with the `n_heads · head_dim` query values at column 0;
/// `out` is `[rows, n_heads · head_dim]`. Query head `h` reads KV head
/// `h / (n_heads / kv_heads)`. With `sliding_window = Some(w)`, a query at position `p` sees
/// positions `p + 1 - w ..= p` only. Softmax runs in f32 with each row's maximum subtracted.
///
/// # Panics
/// When `out` is shorter than the rows' heads, or a block table misses a position (caller bugs).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention<T: KvValue>(
    layout: KvLayout,
    q: &[f32],
    q_stride: usize,
    n_heads: usize,
    seqs: &[AttentionSeq<'_>],
    k_cache: &[T],
    v_cache: &[T],
    scale: f32,
    sliding_window: Option<usize>,
    out: &mut [f32],
) {
    let hd = layout.head_dim;
    let group = n_heads / layout.kv_heads;
    // One work item per (row, KV head): the `group` query heads that read that head's keys and
    // values, a contiguous block of the output row. A decode step's single row still spreads
    // over the threads.
    let mut work: Vec<(usize, usize, usize, &AttentionSeq<'_>)> =
        Vec::with_capacity(seqs.iter().map(|s| s.q_len).sum::<usize>() * layout.kv_heads);
    for seq in seqs {
        for i in 0..seq.q_len {
            for kvh in 0..layout.kv_heads {
                work.push((seq.q_start + i, seq.context_len - seq.q_len + i, kvh, seq));
            }
        }
    }
    assert!(out.len() >= work.len() * group * hd, "paged_attention: out too short");
    let out = &mut out[..work.len() * group * hd];
    // Item i owns output values i·group·hd .. (i + 1)·group·hd: the row's heads in order,
    // grouped by KV head. Up to four items a task amortise claiming one; a decode step's few
    // items go one a task, so that every thread takes a share.
    let per_task = (work.len() / (4 * crate::team::threads())).clamp(1, 4);
    let width = layout.slot_width();
    // Item i's visible positions' slots, a block at a time (runs of consecutive slots).
    let runs = |i: usize, f: &mut dyn FnMut(std::ops::Range<usize>)| {
        let (_, pos, _, seq) = work[i];
        let first = sliding_window.map_or(0, |win| (pos + 1).saturating_sub(win));
        for b in first / layout.block_size..=pos / layout.block_size {
            let start = (b * layout.block_size).max(first);
            let end = ((b + 1) * layout.block_size).min(pos + 1);
            let slot = seq.blocks[b] as usize * layout.block_size + start - b * layout.block_size;
            f(slot..slot + end.saturating_sub(start));
        }
    };
    crate::team::for_each_piece(out, group * hd, per_task, &|item, out_heads| {
        let (row, _, kvh, _) = work[item];
        // A decode row's next item's keys and values (most likely this task's next, else
        // another thread's) into L2 while this one computes: decode reads the cache once a step,
        // from memory (a prompt's rows read what the step just wrote, from cache).
        if item + 1 < work.len() && work[item + 1].3.q_len == 1 {
            let col = work[item + 1].2 * hd;
            runs(item + 1, &mut |slots| {
                for slot in slots {
                    let at = slot * width + col..slot * width + col + hd;
                    if at.end <= k_cache.len().min(v_cache.len()) {
                        crate::ops::prefetch_l2(&k_cache[at.clone()]);
                        crate::ops::prefetch_l2(&v_cache[at]);
                    }
                }
            });
        }
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.slots.clear();
            runs(item, &mut |slots| scratch.slots.extend(slots));
            let q_heads = &q[row * q_stride + kvh * group * hd..row * q_stride + (kvh + 1) * group * hd];
            let kv = Kv { k: k_cache, v: v_cache, width: layout.slot_width(), col: kvh * hd, head_dim: hd };
            attend(q_heads, kv, scale, scratch, out_heads);
        });
    });
}

thread_local! {
    /// Each thread's [`Scratch`], kept between items and calls.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// One KV head's pools, as an item reads them.
#[derive(Clone, Copy)]
struct Kv<'a, T> {
    k: &'a [T],
    v: &'a [T],
    /// Values a slot holds (all KV heads).
    width: usize,
    /// The head's first column within a slot.
    col: usize,
    head_dim: usize,
}

impl<T: KvValue> Kv<'_, T> {
    fn key(&self, slot: usize) -> &[T] {
        &self.k[slot * self.width + self.col..slot * self.width + self.col + self.head_dim]
    }

    fn value(&self, slot: usize) -> &[T] {
        &self.v[slot * self.width + self.col..slot * self.width + self.col + self.head_dim]
    }
}

/// An item's scratch space: the visible slots, `scores[g · n + i]` (query head `g` against
/// visible position `i`), and room for one key or value row widened to f32.
#[derive(Default)]
struct Scratch {
    slots: Vec<usize>,
    scores: Vec<f32>,
    row: Vec<f32>,
}

/// `values` as f32: themselves from an f32 pool, else widened into `buf`.
fn widened<'a, T: KvValue>(values: &'a [T], buf: &'a mut Vec<f32>) -> &'a [f32] {
    if let Some(v) = T::as_f32(values) {
        return v;
    }
    buf.resize(values.len(), 0.0);
    match T::as_f16(values) {
        Some(halves) => crate::ops::widen_half(halves, buf),
        None => buf.iter_mut().zip(values).for_each(|(b, v)| *b = v.widen()),
    }
    buf
}

/// The query heads of one KV head's group (`q_heads`, `group · head_dim` values) attending to
/// the positions at `scratch.slots`: each key and value row is read once for the whole group.
fn attend<T: KvValue>(q_heads: &[f32], kv: Kv<'_, T>, scale: f32, scratch: &mut Scratch, out_heads: &mut [f32]) {
    let hd = kv.head_dim;
    let (group, n) = (q_heads.len() / hd, scratch.slots.len());
    if n == 0 {
        // A window of no positions (`sliding_window = Some(0)`) sees nothing.
        out_heads.fill(0.0);
        return;
    }
    // Every slot is inside the pools before any unchecked read of the fast path.
    assert!(
        scratch.slots.iter().all(|&s| (s + 1) * kv.width <= kv.k.len().min(kv.v.len())) && kv.col + hd <= kv.width,
        "attention: a slot outside the KV pools"
    );
    scratch.scores.clear();
    scratch.scores.resize(group * n, 0.0);
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx512() && matches!(hd, 64 | 128) {
        // SAFETY: AVX-512F is present; the slots were checked above, and q_heads and
        // out_heads hold `group` heads of `hd`.
        unsafe {
            x86::scores(q_heads, kv, scale, &scratch.slots, &mut scratch.scores);
            x86::softmax_rows(&mut scratch.scores, n);
        }
        // SAFETY: as above.
        unsafe { x86::weigh(&scratch.scores, kv, &scratch.slots, out_heads) };
        return;
    }
    for (i, &slot) in scratch.slots.iter().enumerate() {
        let k = widened(kv.key(slot), &mut scratch.row);
        for (g, qh) in q_heads.chunks_exact(hd).enumerate() {
            scratch.scores[g * n + i] = dot(qh, k) * scale;
        }
    }
    softmax_rows(&mut scratch.scores, n);
    out_heads.fill(0.0);
    for (i, &slot) in scratch.slots.iter().enumerate() {
        let v = widened(kv.value(slot), &mut scratch.row);
        for (g, o) in out_heads.chunks_exact_mut(hd).enumerate() {
            axpy(scratch.scores[g * n + i], v, o);
        }
    }
}

/// Softmax of each `n`-long row of `scores`, in f32 with the row's maximum subtracted.
fn softmax_rows(scores: &mut [f32], n: usize) {
    for head in scores.chunks_exact_mut(n) {
        let max = head.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut denom = 0f32;
        for s in head.iter_mut() {
            *s = (*s - max).exp();
            denom += *s;
        }
        for s in head.iter_mut() {
            *s /= denom;
        }
    }
}

/// The AVX-512 loops of [`attend`] for heads of 64 or 128 values (`C` = 4 or 8 vectors a head):
/// a key's dot product with a query head is `C` multiply-adds, and 16 keys' products are reduced
/// together; each value row is loaded once for as many of the group's heads as fit in registers,
/// whose weighted sums stay there across all positions; the softmax runs 16 scores at a time with
/// a vector exponential.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Kv, KvValue};
    use std::arch::x86_64::*;

    /// 16 values of a pool from `p`, as f32.
    ///
    /// # Safety
    /// AVX-512F is present; `p` points at 16 values inside a pool.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<T: KvValue>(p: *const T) -> __m512 {
        // SAFETY: as the function's (an f16 pool's 16 values are 32 bytes).
        unsafe { if T::HALF { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) } else { _mm512_loadu_ps(p.cast()) } }
    }

    /// Vector registers a pass of [`weigh`] gives its heads' sums (of 32), beside one value row.
    const REGISTERS: usize = 16;

    /// `scores[g · n + i] = scale · (q_g · k_i)` for every query head `g` and visible slot `i`.
    ///
    /// # Safety
    /// AVX-512F is present; `kv.head_dim` is 64 or 128, every slot's head lies inside `kv.k`,
    /// `q` holds the group's heads and `scores` `group · slots.len()` values.
    pub(super) unsafe fn scores<T: KvValue>(q: &[f32], kv: Kv<'_, T>, scale: f32, slots: &[usize], scores: &mut [f32]) {
        // SAFETY: as the function's.
        unsafe {
            if kv.head_dim == 64 {
                scores_of::<4, T>(q, kv, scale, slots, scores)
            } else {
                scores_of::<8, T>(q, kv, scale, slots, scores)
            }
        }
    }

    /// [`scores`] for heads of `16 · C` values: 16 visible slots at a time, each head's 16 dot
    /// products reduced together (a transposing tree of 45 shuffles and adds instead of 16
    /// reductions of their own), the block's keys staying in L1 across the group's heads.
    #[target_feature(enable = "avx512f")]
    unsafe fn scores_of<const C: usize, T: KvValue>(
        q: &[f32],
        kv: Kv<'_, T>,
        scale: f32,
        slots: &[usize],
        scores: &mut [f32],
    ) {
        let (hd, n) = (16 * C, slots.len());
        let group = q.len() / hd;
        let scale = _mm512_set1_ps(scale);
        for i0 in (0..n).step_by(16) {
            let m = (n - i0).min(16);
            for g in 0..group {
                let mut qv = [_mm512_setzero_ps(); C];
                for (c, v) in qv.iter_mut().enumerate() {
                    // SAFETY: head g of `q` holds hd = 16 · C values.
                    *v = unsafe { _mm512_loadu_ps(q.as_ptr().add(g * hd + 16 * c)) };
                }
                let mut acc = [_mm512_setzero_ps(); 16];
                for (a, &slot) in acc.iter_mut().zip(&slots[i0..i0 + m]) {
                    // SAFETY: as the function's: the slot's head lies inside the K pool.
                    let k = unsafe { kv.k.as_ptr().add(slot * kv.width + kv.col) };
                    *a = _mm512_mul_ps(qv[0], unsafe { load16(k) });
                    for (c, qv) in qv.iter().enumerate().skip(1) {
                        *a = _mm512_fmadd_ps(*qv, unsafe { load16(k.add(16 * c)) }, *a);
                    }
                }
                let k = if m == 16 { 0xFFFF } else { ((1u32 << m) - 1) as __mmask16 };
                // SAFETY: the mask keeps the store to scores g·n + i0 .. g·n + i0 + m, inside.
                unsafe {
                    _mm512_mask_storeu_ps(scores.as_mut_ptr().add(g * n + i0), k, _mm512_mul_ps(sums16(&acc), scale))
                };
            }
        }
    }

    /// Lane `j`: the sum of `v[j]`'s 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn sums16(v: &[__m512; 16]) -> __m512 {
        // Halve the partial sums per vector while doubling the vectors per register: 128-bit
        // quarters (8 partials of two vectors in one), then quarters' halves (4 partials of four),
        // then within quarters (2 of eight, then 1 of sixteen).
        let mut a = [_mm512_setzero_ps(); 8];
        for (p, a) in a.iter_mut().enumerate() {
            let (x, y) = (v[2 * p], v[2 * p + 1]);
            *a =
                _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(x, y), _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y));
        }
        let mut b = [_mm512_setzero_ps(); 4];
        for (p, b) in b.iter_mut().enumerate() {
            let (x, y) = (a[2 * p], a[2 * p + 1]);
            *b =
                _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(x, y), _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y));
        }
        // Quarter j of b[p] holds the 4 partials of vector 4p + j.
        let c0 = _mm512_add_ps(_mm512_unpacklo_ps(b[0], b[1]), _mm512_unpackhi_ps(b[0], b[1]));
        let c1 = _mm512_add_ps(_mm512_unpacklo_ps(b[2], b[3]), _mm512_unpackhi_ps(b[2], b[3]));
        let d = _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(c0, c1), _mm512_shuffle_ps::<0b11_10_11_10>(c0, c1));
        // Element e of quarter j now holds vector 4e + j: transpose the 4 × 4.
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), d)
    }

    /// Softmax of each `n`-long row of `scores`, in f32 with the row's maximum subtracted.
    ///
    /// # Safety
    /// AVX-512F is present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn softmax_rows(scores: &mut [f32], n: usize) {
        let mask = |i: usize| if n - i >= 16 { 0xFFFF } else { ((1u32 << (n - i)) - 1) as __mmask16 };
        for head in scores.chunks_exact_mut(n) {
            let p = head.as_mut_ptr();
            // SAFETY (every access below): the masks keep every lane below n, inside the row.
            let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..n).step_by(16) {
                max = _mm512_max_ps(max, unsafe { _mm512_mask_loadu_ps(max, mask(i), p.add(i)) });
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
            let mut sum = _mm512_setzero_ps();
            for i in (0..n).step_by(16) {
                let e =
                    unsafe { crate::quant::x86::exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask(i), p.add(i)), max)) };
                sum = _mm512_mask_add_ps(sum, mask(i), sum, e);
                unsafe { _mm512_mask_storeu_ps(p.add(i), mask(i), e) };
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
            for i in (0..n).step_by(16) {
                unsafe {
                    _mm512_mask_storeu_ps(
                        p.add(i),
                        mask(i),
                        _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(i), p.add(i)), inv),
                    )
                };
            }
        }
    }

    /// `out_g = Σ_i p[g · n + i] · v_i` for every query head `g`, each head's sums held in
    /// registers across the slots.
    ///
    /// # Safety
    /// As [`scores`], with `out` holding the group's heads.
    pub(super) unsafe fn weigh<T: KvValue>(p: &[f32], kv: Kv<'_, T>, slots: &[usize], out: &mut [f32]) {
        // SAFETY: as the function's.
        unsafe {
            if kv.head_dim == 64 { weigh_of::<4, T>(p, kv, slots, out) } else { weigh_of::<8, T>(p, kv, slots, out) }
        }
    }

    /// [`weigh`] for heads of `16 · C` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn weigh_of<const C: usize, T: KvValue>(p: &[f32], kv: Kv<'_, T>, slots: &[usize], out: &mut [f32]) {
        let (hd, n) = (16 * C, slots.len());
        let group = out.len() / hd;
        let per = (REGISTERS / C).max(1);
        for g0 in (0..group).step_by(per) {
            let heads = per.min(group - g0);
            let mut acc = [[_mm512_setzero_ps(); C]; REGISTERS / 4];
            for (i, &slot) in slots.iter().enumerate() {
                let mut v = [_mm512_setzero_ps(); C];
                for (c, v) in v.iter_mut().enumerate() {
                    // SAFETY: as the function's: the slot's head lies inside the V pool.
                    *v = unsafe { load16(kv.v.as_ptr().add(slot * kv.width + kv.col + 16 * c)) };
                }
                for (h, acc) in acc.iter_mut().take(heads).enumerate() {
                    let w = _mm512_set1_ps(p[(g0 + h) * n + i]);
                    for (a, v) in acc.iter_mut().zip(v) {
                        *a = _mm512_fmadd_ps(w, v, *a);
                    }
                }
            }
            for (h, acc) in acc.iter().take(heads).enumerate() {
                for (c, a) in acc.iter().enumerate() {
                    // SAFETY: head g0 + h of `out` holds hd = 16 · C values.
                    unsafe { _mm512_storeu_ps(out.as_mut_ptr().add((g0 + h) * hd + 16 * c), *a) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Dense causal attention over contiguous K/V, in f64: the definition.
    #[allow(clippy::too_many_arguments)]
    fn dense(q: &[f32], k: &[f32], v: &[f32], n: usize, heads: usize, kvh: usize, hd: usize, scale: f64) -> Vec<f64> {
        let mut out = vec![0f64; n * heads * hd];
        for t in 0..n {
            for h in 0..heads {
                let kh = h / (heads / kvh);
                let s: Vec<f64> = (0..=t)
                    .map(|p| {
                        (0..hd)
                            .map(|d| q[(t * heads + h) * hd + d] as f64 * k[(p * kvh + kh) * hd + d] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    out[(t * heads + h) * hd + d] = (0..=t).map(|p| e[p] / z * v[(p * kvh + kh) * hd + d] as f64).sum();
                }
            }
        }
        out
    }

    #[test]
    fn paged_attention_matches_dense_causal_attention_with_scattered_blocks() {
        // Over f32 pools and f16 ones (against the values the f16 pools hold).
        scattered_blocks::<f32>();
        scattered_blocks::<half::f16>();
    }

    /// The values a pool of `T` holds for `x`.
    fn held<T: KvValue>(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| T::narrow(v).widen()).collect()
    }

    fn scattered_blocks<T: KvValue>() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let layout = KvLayout { block_size: 4, kv_heads: 2, head_dim: 8 };
        let (heads, n) = (4, 11);
        let w = layout.slot_width();
        let q: Vec<f32> = (0..n * heads * 8).map(|_| rng.random_range(-1.0..1.0)).collect();
        let kv: Vec<f32> = (0..n * 2 * w).map(|_| rng.random_range(-1.0..1.0)).collect();
        // Row t of `kv` is [k_t | v_t], as a fused projection would lay it out.
        let k: Vec<f32> = kv.chunks(2 * w).flat_map(|r| held::<T>(&r[..w])).collect();
        let v: Vec<f32> = kv.chunks(2 * w).flat_map(|r| held::<T>(&r[w..])).collect();
        let blocks = [5u32, 1, 3];
        let slots: Vec<usize> = (0..n).map(|p| slot_of(&blocks, 4, p)).collect();
        let (mut kc, mut vc) = (vec![T::default(); 6 * 4 * w], vec![T::default(); 6 * 4 * w]);
        write_kv(layout, &kv, 2 * w, 0, w, &slots, &mut kc, &mut vc);

        // The whole sequence as one prefill, and its last three tokens as a later chunk.
        let scale = 1.0 / (8f32).sqrt();
        let want = dense(&q, &k, &v, n, heads, 2, 8, scale as f64);
        let mut out = vec![f32::NAN; n * heads * 8];
        let seq = AttentionSeq { q_start: 0, q_len: n, context_len: n, blocks: &blocks };
        paged_attention(layout, &q, heads * 8, heads, &[seq], &kc, &vc, scale, None, &mut out);
        for (a, b) in out.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
        let tail = &q[(n - 3) * heads * 8..];
        let mut out_tail = vec![f32::NAN; 3 * heads * 8];
        let seq = AttentionSeq { q_start: 0, q_len: 3, context_len: n, blocks: &blocks };
        paged_attention(layout, tail, heads * 8, heads, &[seq], &kc, &vc, scale, None, &mut out_tail);
        assert_eq!(&out_tail[..], &out[(n - 3) * heads * 8..]);
    }

    #[test]
    fn heads_of_64_and_128_values_match_dense_attention_for_a_decode_batch() {
        decode_batch::<f32>();
        decode_batch::<half::f16>();
    }

    fn decode_batch<T: KvValue>() {
        // The head sizes the SIMD path takes, grouped-query heads, several sequences of one
        // new token each (a decode step) over scattered blocks.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        // Groups of 3 and 5 heads: one pass and a partial one, or two (4 heads of 64 or 2 of 128
        // a pass).
        for (hd, heads) in [(64, 6), (64, 10), (128, 6)] {
            let (kvh, block_size) = (2, 16);
            let layout = KvLayout { block_size, kv_heads: kvh, head_dim: hd };
            let w = layout.slot_width();
            let lens = [1usize, 17, 40];
            let tables: [Vec<u32>; 3] = [vec![4], vec![0, 6], vec![5, 1, 3]];
            let (mut kc, mut vc) = (vec![T::default(); 7 * block_size * w], vec![T::default(); 7 * block_size * w]);
            let mut want = Vec::new();
            let mut q_rows = Vec::new();
            for (&n, table) in lens.iter().zip(&tables) {
                let q: Vec<f32> = (0..n * heads * hd).map(|_| rng.random_range(-1.0..1.0)).collect();
                let kv: Vec<f32> = (0..n * 2 * w).map(|_| rng.random_range(-1.0..1.0)).collect();
                let k: Vec<f32> = kv.chunks(2 * w).flat_map(|r| held::<T>(&r[..w])).collect();
                let v: Vec<f32> = kv.chunks(2 * w).flat_map(|r| held::<T>(&r[w..])).collect();
                let slots: Vec<usize> = (0..n).map(|p| slot_of(table, block_size, p)).collect();
                write_kv(layout, &kv, 2 * w, 0, w, &slots, &mut kc, &mut vc);
                let scale = 1.0 / (hd as f64).sqrt();
                let all = dense(&q, &k, &v, n, heads, kvh, hd, scale);
                want.extend_from_slice(&all[(n - 1) * heads * hd..]);
                q_rows.extend_from_slice(&q[(n - 1) * heads * hd..]);
            }
            let seqs: Vec<AttentionSeq<'_>> = lens
                .iter()
                .zip(&tables)
                .enumerate()
                .map(|(i, (&n, t))| AttentionSeq { q_start: i, q_len: 1, context_len: n, blocks: t })
                .collect();
            let mut out = vec![f32::NAN; 3 * heads * hd];
            let scale = 1.0 / (hd as f32).sqrt();
            paged_attention(layout, &q_rows, heads * hd, heads, &seqs, &kc, &vc, scale, None, &mut out);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                let pools = std::any::type_name::<T>();
                assert!((*a as f64 - b).abs() < 1e-5, "{pools} pools, head dim {hd}, {heads} heads, [{i}]: {a} vs {b}");
            }
        }
    }

    #[test]
    fn sliding_window_limits_what_a_query_sees() {
        let layout = KvLayout { block_size: 2, kv_heads: 1, head_dim: 1 };
        // Keys all equal, so attention averages the visible values.
        let blocks = [0u32, 1, 2];
        let kc = vec![1f32; 6];
        let vc: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let q = vec![1f32; 5];
        let seq = AttentionSeq { q_start: 0, q_len: 5, context_len: 5, blocks: &blocks };
        let mut out = vec![0f32; 5];
        paged_attention(layout, &q, 1, 1, &[seq], &kc, &vc, 1.0, Some(2), &mut out);
        assert_eq!(out, vec![0.0, 0.5, 1.5, 2.5, 3.5]);
    }

    #[test]
    fn rows_prepared_and_written_in_parallel_match_the_serial_write_of_the_prepared_rows() {
        let layout = KvLayout { block_size: 4, kv_heads: 2, head_dim: 8 };
        let w = layout.slot_width();
        // Rows with a query block first and a few columns after the values, over scattered slots.
        let (rows, stride, pool) = (11, 3 * w + 5, 40 * w);
        let src: Vec<f32> = (0..rows * stride).map(|i| (i as f32 * 0.37).sin()).collect();
        let slots: Vec<usize> = (0..rows).map(|t| (t * 7 + 3) % 40).collect();
        let prepare = |t: usize, row: &mut [f32]| {
            for (j, v) in row.iter_mut().enumerate() {
                *v = *v * 2.0 + (t + j) as f32 * 0.01;
            }
        };
        let mut got = src.clone();
        let (mut kc, mut vc) = (vec![half::f16::ZERO; pool], vec![half::f16::ZERO; pool]);
        write_kv_rows(layout, &mut got, stride, (w, 2 * w), &slots, (&mut kc, &mut vc), &prepare);
        let mut want = src.clone();
        for (t, row) in want.chunks_mut(stride).enumerate() {
            prepare(t, row);
        }
        assert_eq!(got, want, "every row prepared in place, once");
        let (mut kw, mut vw) = (vec![half::f16::ZERO; pool], vec![half::f16::ZERO; pool]);
        write_kv(layout, &want, stride, w, 2 * w, &slots, &mut kw, &mut vw);
        assert!(kc == kw && vc == vw, "the pools hold what the serial write stores");

        // Two rows on one slot, or a slot past the pools: refused before anything is touched.
        for bad in [[3, 3], [3, 40]] {
            let mut rows2 = src[..2 * stride].to_vec();
            let (mut k2, mut v2) = (kw.clone(), vw.clone());
            let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                write_kv_rows(layout, &mut rows2, stride, (w, 2 * w), &bad, (&mut k2, &mut v2), &prepare)
            }));
            assert!(refused.is_err(), "slots {bad:?}");
            assert!(rows2 == src[..2 * stride] && k2 == kw && v2 == vw, "slots {bad:?} left no half state");
        }
    }
}
