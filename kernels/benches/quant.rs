//! Quantized matrix products on every path this CPU has: `cargo bench -p switchyard-kernels
//! --bench quant [-- --threads N]`. Prints billions of multiply-adds a second for SmolLM2's
//! projection shapes at decode (1 and 8 rows) and prefill (512 rows) sizes. Compare the paths
//! and shapes within one run: these machines' timings drift between runs.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};
use switchyard_kernels::quant::{BLOCK, Format, Path, Precision, Q8Rows, QuantMatrix, matmul_on};

/// GGUF blocks of a random `[rows, cols]` matrix.
fn random(format: Format, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QuantMatrix {
    let mut data = Vec::new();
    for _ in 0..rows * cols / BLOCK {
        data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
        if format == Format::Q4_1 {
            data.extend_from_slice(&f16::from_f32(rng.random_range(-0.2..0.2)).to_le_bytes());
        }
        let n = if format == Format::Q8_0 { 32 } else { 16 };
        data.extend((0..n).map(|_| rng.random::<u8>()));
    }
    match QuantMatrix::from_ggml(format, rows, cols, &data) {
        Ok(w) => w,
        Err(e) => panic!("bench matrix: {e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = args.iter().position(|a| a == "--threads").and_then(|i| args.get(i + 1)?.parse().ok());
    if let Some(Err(e)) = threads.map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build_global()) {
        eprintln!("--threads: {e}");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    println!("threads: {}", rayon::current_num_threads());
    println!("{:<24} {:<6} {:<9} {:>5} {:>8}", "weights, path", "acts", "shape", "rows", "GMAC/s");
    for format in [Format::Q4_1, Format::Q8_0] {
        // Gate and up fused, down, and the attention's fused q/k/v.
        for (n, k) in [(3072, 576), (576, 1536), (960, 576)] {
            let w = random(format, n, k, &mut rng);
            for m in [1, 8, 512] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut y = vec![0f32; m * n];
                for precision in [Precision::Int8, Precision::Int16] {
                    let mut q = Q8Rows::default();
                    q.quantize(&x, m, k, precision);
                    // The scalar specification is too slow to time on prefill's rows.
                    for path in Path::available().into_iter().filter(|&p| m <= 8 || p != Path::Scalar) {
                        // Warm up, then as many products as fit in a quarter second.
                        matmul_on(path, &w, &q, &mut y, n);
                        let (start, mut runs) = (Instant::now(), 0u64);
                        while start.elapsed() < Duration::from_millis(250) {
                            matmul_on(path, &w, &q, &mut y, n);
                            runs += 1;
                        }
                        let gmacs = (runs * (m * n * k) as u64) as f64 / start.elapsed().as_secs_f64() / 1e9;
                        let path = format!("{path:?}");
                        let path = path.split('(').next().unwrap_or_default();
                        let acts = if precision == Precision::Int8 { "8-bit" } else { "16-bit" };
                        println!(
                            "{:<24} {acts:<6} {:<9} {m:>5} {gmacs:>8.1}",
                            format!("{format:?} {path}"),
                            format!("{n}x{k}")
                        );
                    }
                }
            }
        }
    }
    // Decode streams every weight from memory once a step: 64 distinct matrices (about 64 MB in
    // Q4_1), each multiplied once a pass, on the fastest path.
    println!();
    println!("from memory: 64 distinct Q4_1 3072x576 matrices, path {:?}", Path::detect());
    let (n, k) = (3072, 576);
    let ws: Vec<QuantMatrix> = (0..64).map(|_| random(Format::Q4_1, n, k, &mut rng)).collect();
    for m in [1, 8] {
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut y = vec![0f32; m * n];
        for precision in [Precision::Int8, Precision::Int16] {
            let mut q = Q8Rows::default();
            q.quantize(&x, m, k, precision);
            let (start, mut passes) = (Instant::now(), 0u64);
            while start.elapsed() < Duration::from_millis(500) {
                for w in &ws {
                    matmul_on(Path::detect(), w, &q, &mut y, n);
                }
                passes += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            let gmacs = (passes * (ws.len() * m * n * k) as u64) as f64 / secs / 1e9;
            let gbs = (passes * ws.iter().map(|w| w.size_bytes() as u64).sum::<u64>()) as f64 / secs / 1e9;
            println!("  {m} rows, {precision:?} activations: {gmacs:.1} GMAC/s, weights read at {gbs:.1} GB/s");
        }
    }
}
