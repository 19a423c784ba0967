//! Kernel checks: every CUDA kernel against its CPU specification (the function of the same name
//! in this crate) on random inputs of several shapes, in every dtype, with outputs poisoned with
//! NaN first so that an element a kernel fails to write cannot pass. The same checks run on a
//! real GPU (`kernel-check`, in the device check) and on the emulator (this crate's tests).

#![allow(clippy::too_many_arguments)]

use super::{
    CudaError, CudaKernels, Device, DeviceValue, Dtype, Element, LoraRows, LoraSlotEntry, SEGMENT_PIECE_ROWS, Segments,
};
use crate::{KvLayout, LoraMat, attention, lora, ops};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Write as _;

type Result<T> = std::result::Result<T, CudaError>;

/// ‖got − want‖ / ‖want‖ in f64; NaN when `got` has a NaN (so it never passes).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        let d = *g as f64 - *w as f64;
        num += d * d;
        den += (*w as f64) * (*w as f64);
    }
    if got.iter().any(|v| !v.is_finite()) { f64::NAN } else { (num / den.max(1e-30)).sqrt() }
}

fn tolerance<E: Element>() -> f64 {
    match E::DTYPE {
        Dtype::F32 => 1e-4,
        Dtype::Bf16 => 1.5e-2,
        Dtype::F16 => 3e-3,
    }
}

/// Uploaded adapters: the slot table, the device buffers it points at (kept alive), and host
/// copies (A, B as `[out, r]`, rank, scale) for the CPU reference.
pub type Adapters<D, E> =
    (<D as Device>::Buffer<LoraSlotEntry>, Vec<<D as Device>::Buffer<E>>, Vec<(Vec<f32>, Vec<f32>, usize, f32)>);

/// One kernel checked on one shape and dtype.
#[derive(Debug, Clone)]
pub struct CheckRow {
    /// Kernel and dtype, e.g. `rms_norm bf16`.
    pub kernel: String,
    pub shape: String,
    /// ‖device − cpu‖ / ‖cpu‖.
    pub error: f64,
    pub tolerance: f64,
}

impl CheckRow {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// Runs kernels on a device and compares them with their CPU specifications.
#[derive(Debug)]
pub struct Checker<'a, D: Device> {
    rng: ChaCha8Rng,
    k: &'a CudaKernels<D>,
    rows: Vec<CheckRow>,
}

impl<'a, D: Device> Checker<'a, D> {
    /// Inputs are drawn from a ChaCha8 stream seeded with `seed`.
    pub fn new(k: &'a CudaKernels<D>, seed: u64) -> Checker<'a, D> {
        Checker { rng: ChaCha8Rng::seed_from_u64(seed), k, rows: Vec::new() }
    }

    /// Every check, for every dtype: the element-wise and row-wise ops, attention over a
    /// scattered paged cache, and SGMV and BGMV over mixed ranks with rows without adapters.
    pub fn run_all(mut self) -> Result<Vec<CheckRow>> {
        self.ops::<f32>()?;
        self.ops::<bf16>()?;
        self.ops::<f16>()?;
        self.attention::<f32>()?;
        self.attention::<bf16>()?;
        self.attention::<f16>()?;
        self.lora::<f32>()?;
        self.lora::<bf16>()?;
        self.lora::<f16>()?;
        Ok(self.rows)
    }

    /// Random values in [-b, b), rounded through E so the CPU sees exactly what the GPU sees.
    pub fn random<E: Element>(&mut self, n: usize, b: f32) -> (Vec<E>, Vec<f32>) {
        let dev: Vec<E> = (0..n).map(|_| E::from_f32(self.rng.random_range(-b..b))).collect();
        let host = dev.iter().map(|v| v.to_f32()).collect();
        (dev, host)
    }

    pub fn up<T: DeviceValue>(&self, v: &[T]) -> Result<D::Buffer<T>> {
        self.k.device().upload(v)
    }

    fn poisoned<E: Element>(&self, n: usize) -> Result<D::Buffer<E>> {
        self.up(&vec![E::from_f32(f32::NAN); n])
    }

    fn down<E: Element>(&self, s: &D::Buffer<E>) -> Result<Vec<f32>> {
        Ok(self.k.device().download(s)?.into_iter().map(|v| v.to_f32()).collect())
    }

    fn record<E: Element>(&mut self, kernel: &str, shape: String, got: &[f32], want: &[f32]) {
        let error = rel_err(got, want);
        let tolerance = tolerance::<E>();
        self.rows.push(CheckRow { kernel: format!("{kernel} {}", E::DTYPE.suffix()), shape, error, tolerance });
    }

    fn ops<E: Element>(&mut self) -> Result<()> {
        for &(rows, hidden, inter) in &[(1usize, 576usize, 1536usize), (7, 4096, 11008), (64, 896, 4864)] {
            let shape = format!("rows={rows} hidden={hidden}");
            // embedding
            let vocab = 1000;
            let (table, table_h) = self.random::<E>(vocab * hidden, 1.0);
            let ids: Vec<i32> = (0..rows).map(|_| self.rng.random_range(0..vocab as i32)).collect();
            let (d_ids, d_table) = (self.up(&ids)?, self.up(&table)?);
            let mut out = self.poisoned::<E>(rows * hidden)?;
            self.k.embedding(&d_ids, &d_table, &mut out, rows, hidden)?;
            let mut want = vec![0f32; rows * hidden];
            let ids_u: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
            ops::embedding(&table_h, hidden, &ids_u, &mut want);
            let got = self.down(&out)?;
            self.record::<E>("embedding", shape.clone(), &got, &want);

            // rms_norm
            let (x, x_h) = self.random::<E>(rows * hidden, 2.0);
            let (w, w_h) = self.random::<E>(hidden, 1.5);
            let (d_x, d_w) = (self.up(&x)?, self.up(&w)?);
            let mut out = self.poisoned::<E>(rows * hidden)?;
            self.k.rms_norm(&d_x, &d_w, &mut out, rows, hidden, 1e-5)?;
            let mut want = vec![0f32; rows * hidden];
            ops::rms_norm(&x_h, &w_h, 1e-5, &mut want);
            let got = self.down(&out)?;
            self.record::<E>("rms_norm", shape.clone(), &got, &want);

            // silu_mul
            let (gu, gu_h) = self.random::<E>(rows * 2 * inter, 4.0);
            let d_gu = self.up(&gu)?;
            let mut out = self.poisoned::<E>(rows * inter)?;
            self.k.silu_mul(&d_gu, &mut out, rows, inter)?;
            let mut want = vec![0f32; rows * inter];
            ops::silu_mul(&gu_h, inter, &mut want);
            let got = self.down(&out)?;
            self.record::<E>("silu_mul", format!("rows={rows} inter={inter}"), &got, &want);

            // add_bias
            let (yb, yb_h) = self.random::<E>(rows * hidden, 1.0);
            let (bias, bias_h) = self.random::<E>(hidden, 1.0);
            let (mut d_yb, d_bias) = (self.up(&yb)?, self.up(&bias)?);
            self.k.add_bias(&mut d_yb, &d_bias, rows, hidden)?;
            let want: Vec<f32> = yb_h.iter().enumerate().map(|(i, v)| v + bias_h[i % hidden]).collect();
            let got = self.down(&d_yb)?;
            self.record::<E>("add_bias", shape.clone(), &got, &want);

            // add_inplace
            let (a, a_h) = self.random::<E>(rows * hidden, 1.0);
            let (b, b_h) = self.random::<E>(rows * hidden, 1.0);
            let (mut d_a, d_b) = (self.up(&a)?, self.up(&b)?);
            self.k.add_inplace(&mut d_a, &d_b, rows * hidden)?;
            let mut want = a_h.clone();
            ops::add_inplace(&mut want, &b_h);
            let got = self.down(&d_a)?;
            self.record::<E>("add_inplace", shape.clone(), &got, &want);
        }
        // rope on a fused qkv row: q heads at 0, k heads after them.
        for &(rows, heads, kv_heads, hd) in &[(5usize, 9usize, 3usize, 64usize), (33, 32, 8, 128)] {
            let stride = (heads + 2 * kv_heads) * hd;
            let (x, x_h) = self.random::<E>(rows * stride, 1.0);
            let pos: Vec<i32> = (0..rows).map(|_| self.rng.random_range(0..8192)).collect();
            let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / hd as f32)).collect();
            let (mut d_x, d_pos, d_inv) = (self.up(&x)?, self.up(&pos)?, self.up(&inv)?);
            self.k.rope(&mut d_x, stride, 0, heads, hd, &d_pos, &d_inv, 1.0, rows)?;
            self.k.rope(&mut d_x, stride, heads * hd, kv_heads, hd, &d_pos, &d_inv, 1.0, rows)?;
            let pos_u: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
            let mut want = x_h.clone();
            ops::rope(&mut want, stride, 0, heads, hd, &pos_u, &inv, 1.0);
            ops::rope(&mut want, stride, heads * hd, kv_heads, hd, &pos_u, &inv, 1.0);
            let got = self.down(&d_x)?;
            self.record::<E>("rope", format!("rows={rows} heads={heads}/{kv_heads} head_dim={hd}"), &got, &want);
        }
        Ok(())
    }

    fn attention<E: Element>(&mut self) -> Result<()> {
        for &(heads, kv_heads, hd, window) in
            &[(9usize, 3usize, 64usize, None), (32, 8, 128, None), (32, 8, 128, Some(64usize))]
        {
            let layout = KvLayout { block_size: 16, kv_heads, head_dim: hd };
            let width = layout.slot_width();
            // Decode rows with various contexts, plus a prefill chunk of 37 rows after 50 cached tokens.
            let seqs: Vec<(usize, usize)> = vec![(1, 1), (17, 1), (300, 1), (2000, 1), (87, 37)];
            let num_blocks = seqs.iter().map(|(ctx, _)| ctx.div_ceil(16)).sum::<usize>() + 8;
            // Scatter blocks: a random permutation of the pool.
            let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
            for i in (1..pool.len()).rev() {
                pool.swap(i, self.rng.random_range(0..=i));
            }
            let (kc, kc_h) = self.random::<E>(num_blocks * 16 * width, 1.0);
            let (vc, vc_h) = self.random::<E>(num_blocks * 16 * width, 1.0);
            let rows: usize = seqs.iter().map(|(_, q)| q).sum();
            let q_stride = heads * hd;
            let (q, q_h) = self.random::<E>(rows * q_stride, 1.0);
            let mut tables: Vec<Vec<u32>> = Vec::new();
            let (mut row_pos, mut row_table, mut flat) = (Vec::new(), Vec::new(), Vec::new());
            let mut next = 0;
            for &(ctx, q_len) in &seqs {
                let blocks: Vec<u32> = pool[next..next + ctx.div_ceil(16)].to_vec();
                next += blocks.len();
                for i in 0..q_len {
                    row_pos.push((ctx - q_len + i) as i32);
                    row_table.push(flat.len() as i32);
                }
                flat.extend(blocks.iter().map(|&b| b as i32));
                tables.push(blocks);
            }
            let mut cpu_seqs = Vec::new();
            let mut start = 0;
            for (i, &(ctx, q_len)) in seqs.iter().enumerate() {
                cpu_seqs.push(attention::AttentionSeq { q_start: start, q_len, context_len: ctx, blocks: &tables[i] });
                start += q_len;
            }
            let scale = 1.0 / (hd as f32).sqrt();
            let mut want = vec![0f32; rows * q_stride];
            attention::paged_attention(
                layout, &q_h, q_stride, heads, &cpu_seqs, &kc_h, &vc_h, scale, window, &mut want,
            );
            let (d_q, d_kc, d_vc) = (self.up(&q)?, self.up(&kc)?, self.up(&vc)?);
            let (d_pos, d_tab, d_flat) = (self.up(&row_pos)?, self.up(&row_table)?, self.up(&flat)?);
            let mut out = self.poisoned::<E>(rows * q_stride)?;
            self.k.paged_attention(
                &d_q, q_stride, &d_kc, &d_vc, &mut out, &d_pos, &d_tab, &d_flat, layout, heads, scale, window, rows,
            )?;
            let got = self.down(&out)?;
            let shape = format!("heads={heads}/{kv_heads} head_dim={hd} ctx≤2000 window={window:?}");
            self.record::<E>("paged_attention", shape, &got, &want);
        }
        // write_kv into scattered slots of a poisoned cache region.
        let (rows, stride, width) = (11usize, 3 * 256usize, 256usize);
        let (src, src_h) = self.random::<E>(rows * stride, 1.0);
        let slots: Vec<i32> = (0..rows as i32).map(|i| i * 3 + 1).collect();
        let (d_src, d_slots) = (self.up(&src)?, self.up(&slots)?);
        let (mut kc, mut vc) = (self.poisoned::<E>(40 * width)?, self.poisoned::<E>(40 * width)?);
        self.k.write_kv(&d_src, stride, 256, 512, &d_slots, &mut kc, &mut vc, width, rows)?;
        let (kg, vg) = (self.down(&kc)?, self.down(&vc)?);
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for (t, &s) in slots.iter().enumerate() {
            let s = s as usize;
            got.extend_from_slice(&kg[s * width..(s + 1) * width]);
            got.extend_from_slice(&vg[s * width..(s + 1) * width]);
            want.extend_from_slice(&src_h[t * stride + 256..t * stride + 512]);
            want.extend_from_slice(&src_h[t * stride + 512..t * stride + 768]);
        }
        self.record::<E>("write_kv", format!("rows={rows} width={width}"), &got, &want);
        Ok(())
    }

    /// Uploads adapters (A as [r, in], Bᵀ as [r, out]) and returns their slot table and host copies
    /// (A, B as [out, r]).
    pub fn adapters<E: Element>(&mut self, ranks: &[usize], in_dim: usize, out_dim: usize) -> Result<Adapters<D, E>> {
        let (mut entries, mut keep, mut host) = (Vec::new(), Vec::new(), Vec::new());
        for (i, &r) in ranks.iter().enumerate() {
            let (a, a_h) = self.random::<E>(r * in_dim, (1.0 / in_dim as f32).sqrt() * 2.0);
            let (bt, bt_h) = self.random::<E>(r * out_dim, 0.5);
            let mut b_h = vec![0f32; out_dim * r];
            for rr in 0..r {
                for o in 0..out_dim {
                    b_h[o * r + rr] = bt_h[rr * out_dim + o];
                }
            }
            let (d_a, d_bt) = (self.up(&a)?, self.up(&bt)?);
            let scale = 0.5 + i as f32 * 0.25;
            let dev = self.k.device();
            entries.push(LoraSlotEntry { a: dev.address(&d_a), b_t: dev.address(&d_bt), rank: r as i32, scale });
            keep.push(d_a);
            keep.push(d_bt);
            host.push((a_h, b_h, r, scale));
        }
        Ok((self.up(&entries)?, keep, host))
    }

    fn lora<E: Element>(&mut self) -> Result<()> {
        let ranks = [8usize, 64, 128, 16, 32];
        for &(in_dim, out_dim, y_stride, y_off) in
            &[(4096usize, 4096usize, 4096 + 2048, 1024usize), (4096, 1024, 1024, 0), (576, 192, 960, 576)]
        {
            let (table, _keep, host) = self.adapters::<E>(&ranks, in_dim, out_dim)?;
            // Rows: a 5-row segment, rows with no adapter, single rows, a 17-row segment.
            let mut row_slots: Vec<Option<u32>> = Vec::new();
            row_slots.extend([Some(0); 5]);
            row_slots.extend([None; 3]);
            row_slots.push(Some(1));
            row_slots.extend([Some(2); 17]);
            row_slots.push(Some(3));
            row_slots.push(None);
            row_slots.extend([Some(4); 2]);
            let rows = row_slots.len();
            let (x, x_h) = self.random::<E>(rows * in_dim, 1.0);
            let (y0, y0_h) = self.random::<E>(rows * y_stride, 1.0);
            let mut want = y0_h.clone();
            let mat = |s: u32| {
                let (a, b, r, scale) = &host[s as usize];
                Some(LoraMat { a, b, bt: None, half: None, rank: *r, scale: *scale })
            };
            lora::bgmv(&x_h, in_dim, &row_slots, mat, out_dim, &mut want, y_stride, y_off);
            let max_rank = 128;
            let d_x = self.up(&x)?;
            let shape = format!("rows={rows} in={in_dim} out={out_dim} ranks=8..128 +none");

            // SGMV, with segments split as the executor splits them, and also in longer pieces
            // (whole segments), where one block loops over several rows.
            for piece in [SEGMENT_PIECE_ROWS, 4, u32::MAX] {
                let segs = Segments::upload_pieces(self.k.device(), &lora::segments(&row_slots), piece)?;
                let mut v = self.k.device().alloc_zeros::<f32>(rows * max_rank)?;
                let mut y = self.up(&y0)?;
                let sel = LoraRows::Segments(&segs);
                self.k.lora_shrink(&d_x, in_dim, sel, &table, max_rank, &mut v, max_rank)?;
                self.k.lora_expand(&v, max_rank, sel, &table, &mut y, y_stride, y_off, out_dim)?;
                let got = self.down(&y)?;
                let rows_per_block = if piece == u32::MAX { "all".to_string() } else { piece.to_string() };
                self.record::<E>("sgmv shrink+expand", format!("{shape} rows/block={rows_per_block}"), &got, &want);
            }

            // BGMV
            let slots_i: Vec<i32> = row_slots.iter().map(|s| s.map_or(-1, |s| s as i32)).collect();
            let d_slots = self.up(&slots_i)?;
            let mut v = self.k.device().alloc_zeros::<f32>(rows * max_rank)?;
            let mut y = self.up(&y0)?;
            let sel = LoraRows::PerRow { slots: &d_slots, rows };
            self.k.lora_shrink(&d_x, in_dim, sel, &table, max_rank, &mut v, max_rank)?;
            self.k.lora_expand(&v, max_rank, sel, &table, &mut y, y_stride, y_off, out_dim)?;
            let got = self.down(&y)?;
            self.record::<E>("bgmv shrink+expand", shape, &got, &want);
        }
        Ok(())
    }
}

/// The checks as a table, one line per row, `PASS` or `FAIL` last.
pub fn table(rows: &[CheckRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:<28} {:<60} {:>10} {:>8} {:>6}", "kernel", "shape", "rel err", "tol", "ok");
    for r in rows {
        let verdict = if r.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(out, "{:<28} {:<60} {:>10.2e} {:>8.0e} {verdict:>6}", r.kernel, r.shape, r.error, r.tolerance);
    }
    out
}
