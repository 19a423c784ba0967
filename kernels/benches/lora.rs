//! LoRA at decode beside the quantized products it adds to: `cargo bench -p switchyard-kernels
//! --bench lora [-- --threads N]`. SmolLM2's layers (30 of them, their four products in Q4_1)
//! multiply 8 activation rows, each row with its own rank-8 bf16 adapter on all seven
//! projections, read from memory as a decode step reads them: each row's adapter lies in memory
//! of its own, a layer's matrices one after another (as one loaded adapter's do), so that a
//! product reads a short stretch of each row's adapter. The adapters run in a section of their
//! own after each product, and beside it in the product's section. Prints each product's time
//! a pass over the layers and what the adapters add; compare within one run.

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};
use switchyard_kernels::lora::{Bgmv, LoraHalf, LoraMat, Target};
use switchyard_kernels::quant::{BLOCK, Format, Path, Precision, Q8Rows, QuantMatrix, matmul_beside};
use switchyard_kernels::team;

/// GGUF Q4_1 blocks of a random `[rows, cols]` matrix.
fn random(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QuantMatrix {
    let mut data = Vec::new();
    for _ in 0..rows * cols / BLOCK {
        data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
        data.extend_from_slice(&f16::from_f32(rng.random_range(-0.2..0.2)).to_le_bytes());
        data.extend((0..16).map(|_| rng.random::<u8>()));
    }
    QuantMatrix::from_ggml(Format::Q4_1, rows, cols, &data).unwrap_or_else(|e| panic!("bench matrix: {e}"))
}

/// One product of every layer.
struct Product {
    name: &'static str,
    k: usize,
    n: usize,
    targets: Vec<Target>,
    ws: Vec<QuantMatrix>,
    /// Where its targets' matrices start in an adapter's layer.
    at: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = args.iter().position(|a| a == "--threads").and_then(|i| args.get(i + 1)?.parse().ok());
    if let Some(Err(e)) = threads.map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build_global()) {
        eprintln!("--threads: {e}");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (layers, rows, rank) = (30, 8, 8);
    let shapes: [(&str, usize, &[usize]); 4] =
        [("q,k,v", 576, &[576, 192, 192]), ("o", 576, &[576]), ("gate,up", 576, &[1536, 1536]), ("down", 1536, &[576])];
    let mut at = 0;
    let products: Vec<Product> = shapes
        .iter()
        .map(|&(name, k, outs)| {
            let targets: Vec<Target> = outs
                .iter()
                .scan(0, |off, &out_dim| {
                    *off += out_dim;
                    Some(Target { out_dim, y_offset: *off - out_dim })
                })
                .collect();
            let n = outs.iter().sum();
            let ws = (0..layers).map(|_| random(n, k, &mut rng)).collect();
            let start = at;
            at += rank * (k * targets.len() + n);
            Product { name, k, n, targets, ws, at: start }
        })
        .collect();
    // Each row's adapter a layer at a time: A (`[rank, in]`) and Bᵀ (`[rank, out]`) of every
    // target of every product, one after another.
    let adapters: Vec<Vec<Vec<bf16>>> = (0..rows)
        .map(|_| (0..layers).map(|_| (0..at).map(|_| bf16::from_f32(rng.random_range(-0.1..0.1))).collect()).collect())
        .collect();
    let slots: Vec<Option<u32>> = (0..rows as u32).map(Some).collect();
    let path = Path::detect();
    println!("threads: {}, path {path:?}", rayon::current_num_threads());
    println!("{layers} layers of SmolLM2's Q4_1 products, {rows} rows, a rank-{rank} bf16 adapter for each row");
    println!(
        "{:<8} {:<10} {:>9} {:>9} {:>7} {:>9} {:>7}",
        "acts", "product", "alone ms", "after ms", "ratio", "beside ms", "ratio"
    );
    for precision in [Precision::Int16, Precision::Int8] {
        let mut total = [0f64; 3];
        for p in &products {
            let x: Vec<f32> = (0..rows * p.k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut q = Q8Rows::default();
            q.quantize(&x, rows, p.k, precision);
            let (mut y, mut delta) = (vec![0f32; rows * p.n], vec![0f32; rows * p.n]);
            let mut pass = |mode: usize| {
                for (l, w) in p.ws.iter().enumerate() {
                    let mat = |slot: u32, j: usize| {
                        let at = p.at + p.targets[..j].iter().map(|t| rank * (p.k + t.out_dim)).sum::<usize>();
                        let (a, rest) = adapters[slot as usize][l][at..].split_at(rank * p.k);
                        let bt = &rest[..rank * p.targets[j].out_dim];
                        Some(LoraMat { a: &[], b: &[], bt: None, half: Some(LoraHalf { a, bt }), rank, scale: 0.5 })
                    };
                    delta.fill(0.0);
                    let job = Bgmv::new(&x, p.k, &slots, &p.targets, mat, &mut delta, p.n);
                    match mode {
                        0 => matmul_beside(path, w, &q, &mut y, p.n, None),
                        1 => {
                            matmul_beside(path, w, &q, &mut y, p.n, None);
                            team::run_beside(&job);
                        }
                        _ => matmul_beside(path, w, &q, &mut y, p.n, Some(&job)),
                    }
                }
            };
            // Many short rounds, the three interleaved in each; the fastest pass of each (these
            // machines' neighbours slow whole seconds down).
            let mut best = [f64::MAX; 3];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(2) {
                for (mode, best) in best.iter_mut().enumerate() {
                    let t = Instant::now();
                    pass(mode);
                    *best = best.min(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            let acts = if precision == Precision::Int8 { "8-bit" } else { "16-bit" };
            println!(
                "{acts:<8} {:<10} {:>9.3} {:>9.3} {:>7.2} {:>9.3} {:>7.2}",
                p.name,
                best[0],
                best[1],
                best[0] / best[1],
                best[2],
                best[0] / best[2]
            );
            for (total, best) in total.iter_mut().zip(best) {
                *total += best;
            }
        }
        println!(
            "{:<8} {:<10} {:>9.3} {:>9.3} {:>7.2} {:>9.3} {:>7.2}",
            "",
            "all",
            total[0],
            total[1],
            total[0] / total[1],
            total[2],
            total[0] / total[2]
        );
    }
}
