//! Quantized matrix products on every path this CPU has: `cargo bench -p switchyard-kernels
//! --bench quant [-- --threads N]`. Prints billions of multiply-adds a second for SmolLM2's
//! projection shapes at decode (1 and 8 rows) and prefill (512 rows) sizes, and for decode's
//! weights streamed from memory (SmolLM2's, and a 1B model's in Q4_K). Compare the paths
//! and shapes within one run: these machines' timings drift between runs.

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};
use switchyard_kernels::quant::{BLOCK, Format, Path, Precision, Q8Rows, QuantMatrix, matmul_on};

/// GGUF blocks of a random `[rows, cols]` matrix (Q4_1, Q8_0 or Q4_K).
fn random(format: Format, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> QuantMatrix {
    let mut data = Vec::new();
    if format == Format::Q4_K {
        // Super-blocks of 256: d and dmin, then 12 bytes of 6-bit scales and 128 of quants.
        for _ in 0..rows * cols / 256 {
            for _ in 0..2 {
                data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.002)).to_le_bytes());
            }
            data.extend((0..140).map(|_| rng.random::<u8>()));
        }
    } else {
        for _ in 0..rows * cols / BLOCK {
            data.extend_from_slice(&f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
            if format == Format::Q4_1 {
                data.extend_from_slice(&f16::from_f32(rng.random_range(-0.2..0.2)).to_le_bytes());
            }
            let n = if format == Format::Q8_0 { 32 } else { 16 };
            data.extend((0..n).map(|_| rng.random::<u8>()));
        }
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
    // Decode streams every weight from memory once a step: distinct matrices, each multiplied
    // once a pass, on the fastest path. SmolLM2's gate and up (about 64 MB in Q4_1), and the 16
    // layers of a 1B model (Llama 3.2 1B's shapes with fused q/k/v and gate/up; 578 MB in Q4_K).
    println!();
    let ws: Vec<QuantMatrix> = (0..64).map(|_| random(Format::Q4_1, 3072, 576, &mut rng)).collect();
    from_memory("64 distinct Q4_1 3072x576 matrices", &ws, &[1, 8], &mut rng);
    let shapes = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)];
    let ws: Vec<QuantMatrix> =
        (0..16).flat_map(|_| shapes).map(|(n, k)| random(Format::Q4_K, n, k, &mut rng)).collect();
    from_memory("a 1B model's 16 layers in Q4_K", &ws, &[1], &mut rng);
}

/// Times passes over `ws`, every matrix multiplied once a pass by `m` activation rows, for each
/// of `rows`, and prints the multiply-adds a second and the rate the weights are read at.
fn from_memory(label: &str, ws: &[QuantMatrix], rows: &[usize], rng: &mut ChaCha8Rng) {
    let path = Path::detect();
    let bytes: u64 = ws.iter().map(|w| w.size_bytes() as u64).sum();
    let macs: u64 = ws.iter().map(|w| (w.rows() * w.cols()) as u64).sum();
    println!("from memory: {label} ({:.0} MB), path {path:?}", bytes as f64 / 1e6);
    let widest = ws.iter().map(|w| w.rows()).max().unwrap_or(0);
    for &m in rows {
        let mut y = vec![0f32; m * widest];
        for precision in [Precision::Int8, Precision::Int16] {
            // One set of activations for each width the matrices have.
            let mut xs: Vec<(usize, Q8Rows)> = Vec::new();
            for w in ws {
                if xs.iter().all(|(k, _)| *k != w.cols()) {
                    let x: Vec<f32> = (0..m * w.cols()).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let mut q = Q8Rows::default();
                    q.quantize(&x, m, w.cols(), precision);
                    xs.push((w.cols(), q));
                }
            }
            let (start, mut passes) = (Instant::now(), 0u64);
            while start.elapsed() < Duration::from_millis(500) {
                for w in ws {
                    if let Some((_, q)) = xs.iter().find(|(k, _)| *k == w.cols()) {
                        matmul_on(path, w, q, &mut y, w.rows());
                    }
                }
                passes += 1;
            }
            let secs = start.elapsed().as_secs_f64();
            let gmacs = (passes * m as u64 * macs) as f64 / secs / 1e9;
            let gbs = (passes * bytes) as f64 / secs / 1e9;
            println!("  {m} rows, {precision:?} activations: {gmacs:.1} GMAC/s, weights read at {gbs:.1} GB/s");
        }
    }
}
